r"""Forward SDEs, their reverse-time SDEs and probability-flow ODEs.

Every SDE here is an It\^o SDE on :math:`t \in [0, T]`,

.. math::  dx = f(x, t)\,dt + g(t)\,dw,

with an affine drift, so its transition kernel from :math:`x(0)` is Gaussian,
:math:`p_{0t}(x(t) \mid x(0)) = \mathcal N(\alpha_t x(0), \sigma_t^2 I)`
(``marginal_prob``). Anderson (1982) gives the reverse-time SDE

.. math::  dx = [f(x, t) - g(t)^2 \nabla_x \log p_t(x)]\,dt + g(t)\,d\bar w,

and Song et al. (2021, eq. 13) the probability-flow ODE with the same marginals,

.. math::  dx = [f(x, t) - \tfrac12 g(t)^2 \nabla_x \log p_t(x)]\,dt.

Both are written in forward-time coordinates: a sampler integrates them from
``T`` down to ``eps`` with a negative ``dt``.

Each SDE also has a discretisation ``x_{i+1} = x_i + f_i(x_i) + G_i z_i`` on the grid
``t_i = i T / (N - 1)`` (``discretize``): the DDPM Markov chain of Ho et al. (2020) for
VP, the SMLD noise levels of Song & Ermon (2019) for VE and Euler--Maruyama for
sub-VP. DDPM and SMLD are thus these SDEs seen on a grid, not separate models.

Every SDE here is an *affine path*: its drift and diffusion follow from
:math:`(\alpha_t, \sigma_t)` alone (``SDE``), so further families are paths too: the
cosine schedule (``CosineSDE``), EDM's :math:`\sigma_t = t` (``EDMSDE``) and rectified flow
:math:`\alpha_t = 1 - t, \sigma_t = t` (``RectifiedFlow``), with Euler--Maruyama as their
discretisation.

The SDEs are immutable pytrees (``flax.struct.dataclass``): their float parameters are
leaves and ``N`` is static, so an SDE can be passed to a ``jax.jit``-ed function.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def batch_broadcast(values: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape per-example ``values`` of shape ``(B,)`` to broadcast against ``x`` (B, ...)."""
    return jnp.reshape(values, values.shape + (1,) * (x.ndim - values.ndim))


def _sum_over_data(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def one_minus_exp(y: jax.Array) -> jax.Array:
    """``1 - exp(-y)`` accurate for small ``y``, through ``tanh`` rather than ``expm1``.

    ``-expm1(-y)`` is the textbook form, but XLA:CPU (jaxlib 0.10) returned NaN for a
    whole batch when it was fused with a reduction in the likelihood-weighted loss.
    """
    half = jnp.tanh(0.5 * y)
    return 2.0 * half / (1.0 + half)


def _standard_normal_logp(z: jax.Array, scale: jax.Array | float = 1.0) -> jax.Array:
    """log N(z; 0, scale^2 I), summed over all but the batch axis."""
    dim = np.prod(z.shape[1:])
    return -0.5 * dim * jnp.log(2 * jnp.pi * scale**2) - _sum_over_data(z**2) / (2 * scale**2)


class SDE:
    r"""An affine path :math:`x_t = \alpha_t x_0 + \sigma_t z` and the SDE whose marginals it has.

    A subclass provides ``marginal_coeffs(t) -> (alpha_t, sigma_t)`` and ``t_from_log_snr``;
    everything else follows. The It\^o SDE :math:`dx = f(t) x\,dt + g(t)\,dw` started at
    :math:`x_0` has exactly these marginals when (Kingma et al. 2021, VDM, appendix A)

    .. math::  f(t) = \frac{d \log \alpha_t}{dt}, \qquad
       g(t)^2 = \frac{d \sigma_t^2}{dt} - 2 f(t)\,\sigma_t^2,

    computed here from the derivatives of ``marginal_coeffs`` (forward-mode autodiff, exact);
    VP, sub-VP and VE override ``sde`` with their closed forms. The prior is
    :math:`\mathcal N(0, \sigma_T^2 I)` (the marginal at ``T`` with the signal
    :math:`\alpha_T x_0` dropped); ``discretize`` defaults to Euler--Maruyama.
    """

    N: int
    end_time: float = 1.0  # A field of the paths that end before t = 1.

    @property
    def T(self) -> float:
        """End time of the forward process: ``end_time``."""
        return self.end_time

    def marginal_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""``(alpha_t, sigma_t)`` of the kernel :math:`\mathcal N(\alpha_t x_0, \sigma_t^2 I)`."""
        raise NotImplementedError

    def marginal_coeffs_and_derivatives(
        self, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        r"""``(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt)``, each shaped like ``t``."""
        (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(
            self.marginal_coeffs, (t,), (jnp.ones_like(t),)
        )
        return alpha, sigma, d_alpha, d_sigma

    def marginal_variance(self, t: jax.Array) -> jax.Array:
        r""":math:`\sigma_t^2`; a path overrides it where :math:`\sigma_t^2` is smoother than
        :math:`\sigma_t` (at :math:`\sigma_0 = 0` the derivative of :math:`\sigma_t` is infinite)."""
        return self.marginal_coeffs(t)[1] ** 2

    def drift_and_diffusion_coeffs(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""``(f(t), g(t))`` with :math:`f = \dot\alpha/\alpha` and
        :math:`g^2 = d\sigma^2/dt - 2 f \sigma^2` (see the class docstring)."""
        coeffs = lambda s: (self.marginal_coeffs(s)[0], self.marginal_variance(s))
        (alpha, variance), (d_alpha, d_variance) = jax.jvp(coeffs, (t,), (jnp.ones_like(t),))
        f = d_alpha / alpha
        return f, jnp.sqrt(jnp.maximum(d_variance - 2.0 * f * variance, 0.0))

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Drift ``f(x, t)`` shaped like ``x`` and diffusion ``g(t)`` shaped ``(B,)``."""
        f, g = self.drift_and_diffusion_coeffs(t)
        return batch_broadcast(f, x) * x, g

    def marginal_prob(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""Mean ``alpha_t x`` (shaped like ``x``) and std ``sigma_t`` (shaped ``(B,)``) of
        :math:`p_{0t}(x(t) \mid x(0) = x)`."""
        alpha, sigma = self.marginal_coeffs(t)
        return batch_broadcast(alpha, x) * x, sigma

    def log_snr(self, t: jax.Array) -> jax.Array:
        r"""Half log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t / \sigma_t)`,
        decreasing in ``t`` (the time variable of DPM-Solver)."""
        alpha, sigma = self.marginal_coeffs(t)
        return jnp.log(alpha) - jnp.log(sigma)

    def t_from_log_snr(self, log_snr: jax.Array) -> jax.Array:
        """Inverse of ``log_snr``."""
        raise NotImplementedError

    def prior_std(self) -> jax.Array:
        r""":math:`\sigma_T`, the std of the prior :math:`\mathcal N(0, \sigma_T^2 I)`."""
        return self.marginal_coeffs(jnp.asarray(self.T, jnp.float32))[1]

    def prior_sampling(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Samples of the prior :math:`\\mathcal N(0, \\sigma_T^2 I)`, shaped ``shape``."""
        return jax.random.normal(key, shape) * self.prior_std()

    def prior_logp(self, z: jax.Array) -> jax.Array:
        """Log density of the prior at ``z``, summed over data dimensions: ``(B,)``."""
        return _standard_normal_logp(z, self.prior_std())

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        r"""One step ``x_{i+1} = x_i + f_i + G_i z`` of size ``dt = T / N``.

        Euler--Maruyama: :math:`f_i = f(x, t)\,\Delta t`, :math:`G_i = g(t)\sqrt{\Delta t}`.
        Returns ``f_i`` shaped like ``x`` and ``G_i`` shaped ``(B,)``.
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * jnp.sqrt(dt)

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (or probability-flow ODE) driven by ``score_fn``."""
        return ReverseSDE(forward=self, score_fn=score_fn, probability_flow=probability_flow)


AffinePath = SDE  # The name of the concept: every SDE here is an affine Gaussian path.


@flax.struct.dataclass
class ReverseSDE:
    r"""Reverse-time SDE of ``forward`` with ``score_fn`` in place of the true score.

    ``sde`` returns the drift :math:`f - c\, g^2 s` and diffusion :math:`g` (or 0), with
    :math:`c = 1` for the reverse SDE and :math:`c = 1/2`, zero diffusion, for the
    probability-flow ODE. ``discretize`` does the same with the forward SDE's discrete
    ``(f_i, G_i)``; the reverse step is then ``x_{i-1} = x_i - f_rev + G_rev z``
    (the "reverse diffusion" predictor of Song et al. 2021, eq. 46).
    """

    forward: SDE
    score_fn: ScoreFn = flax.struct.field(pytree_node=False)
    probability_flow: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def T(self) -> float:
        return self.forward.T

    @property
    def N(self) -> int:
        return self.forward.N

    def _reverse(self, x, t, drift, diffusion):
        score = self.score_fn(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        drift = drift - batch_broadcast(weight * diffusion**2, x) * score
        diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
        return drift, diffusion

    def sde(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Reverse drift shaped like ``x`` and diffusion shaped ``(B,)``."""
        return self._reverse(x, t, *self.forward.sde(x, t))

    def discretize(self, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Reverse discrete ``(f_rev, G_rev)``: ``f_rev = f_i - c G_i^2 s``."""
        return self._reverse(x, t, *self.forward.discretize(x, t))


def _time_index(t: jax.Array, N: int, T: float) -> jax.Array:
    """Index ``i`` of the grid point ``t_i = i T / (N - 1)`` nearest to ``t``."""
    return jnp.round(t * (N - 1) / T).astype(jnp.int32)


class _LinearBetaSDE(SDE):
    r"""The linear noise schedule shared by VP and sub-VP, and their N(0, I) prior."""

    beta_min: float
    beta_max: float

    def beta(self, t: jax.Array) -> jax.Array:
        r""":math:`\beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min})`."""
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: jax.Array) -> jax.Array:
        r""":math:`\int_0^t \beta(s)\,ds = \beta_{min} t + \tfrac12(\beta_{max}-\beta_{min}) t^2`."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def _t_from_integrated_beta(self, integral: jax.Array) -> jax.Array:
        # The positive root of beta_min t + (beta_max - beta_min) t^2 / 2 = integral.
        delta = self.beta_max - self.beta_min
        return (-self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * delta * integral)) / delta

    def prior_sampling(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(key, shape)

    def prior_logp(self, z: jax.Array) -> jax.Array:
        return _standard_normal_logp(z)


@flax.struct.dataclass
class VPSDE(_LinearBetaSDE):
    r"""Variance-preserving SDE (Song et al. 2021, eq. 11), the continuum limit of DDPM.

    .. math::  dx = -\tfrac12 \beta(t)\,x\,dt + \sqrt{\beta(t)}\,dw,
       \qquad \beta(t) = \beta_{min} + t(\beta_{max} - \beta_{min}).

    Marginal: :math:`\alpha_t = e^{-\frac12\int_0^t \beta}`,
    :math:`\sigma_t^2 = 1 - \alpha_t^2`, with
    :math:`\int_0^t\beta = \beta_{min} t + \tfrac12 (\beta_{max}-\beta_{min}) t^2`.
    Prior :math:`\mathcal N(0, I)`.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    # --- DDPM's discrete chain (Ho et al. 2020): beta_i linear in [beta_min/N, beta_max/N].
    @property
    def discrete_betas(self) -> jax.Array:
        return jnp.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    @property
    def alphas(self) -> jax.Array:
        return 1.0 - self.discrete_betas

    @property
    def alphas_cumprod(self) -> jax.Array:
        r""":math:`\bar\alpha_i = \prod_{j \le i} (1 - \beta_j)`."""
        return jnp.cumprod(self.alphas)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> jax.Array:
        r""":math:`\sqrt{1 - \bar\alpha_i}`, the std of level ``i``, with
        :math:`1 - \bar\alpha_i` accumulated as :math:`c_i = c_{i-1} + \beta_i - c_{i-1}\beta_i`:
        ``1 - alphas_cumprod`` would lose 3 of float32's 7 digits at the first levels, where
        it is about 1e-4."""
        # (a, b) -> 1 - (1 - a)(1 - b) is associative, so the accumulation is a parallel scan.
        accumulate = lambda a, b: a + b - a * b
        return jnp.sqrt(jax.lax.associative_scan(accumulate, self.discrete_betas))

    def sde(self, x, t):
        beta_t = self.beta(t)
        return -0.5 * batch_broadcast(beta_t, x) * x, jnp.sqrt(beta_t)

    def marginal_coeffs(self, t):
        alpha = jnp.exp(-0.5 * self.integrated_beta(t))
        return alpha, jnp.sqrt(one_minus_exp(self.integrated_beta(t)))

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(2 lambda), so integrated_beta(t) = softplus(-2 lambda).
        return self._t_from_integrated_beta(jax.nn.softplus(-2.0 * log_snr))

    def discretize(self, x, t):
        r"""DDPM: :math:`x_i = \sqrt{1-\beta_i}\,x_{i-1} + \sqrt{\beta_i}\,z`, i.e.
        :math:`f_i = (\sqrt{1-\beta_i} - 1) x`, :math:`G_i = \sqrt{\beta_i}`."""
        i = _time_index(t, self.N, self.T)
        beta = self.discrete_betas[i]
        return (batch_broadcast(jnp.sqrt(1.0 - beta), x) - 1.0) * x, jnp.sqrt(beta)


@flax.struct.dataclass
class subVPSDE(_LinearBetaSDE):
    r"""Sub-variance-preserving SDE (Song et al. 2021, eq. 12).

    .. math::  dx = -\tfrac12 \beta(t)\,x\,dt
       + \sqrt{\beta(t)\,(1 - e^{-2\int_0^t \beta})}\,dw.

    Marginal: :math:`\alpha_t = e^{-\frac12\int_0^t\beta}` as for VP, but
    :math:`\sigma_t = 1 - \alpha_t^2`, so its variance is never above VP's.
    Prior :math:`\mathcal N(0, I)`. ``discretize`` is Euler--Maruyama.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def sde(self, x, t):
        beta_t = self.beta(t)
        discount = one_minus_exp(2.0 * self.integrated_beta(t))
        return -0.5 * batch_broadcast(beta_t, x) * x, jnp.sqrt(beta_t * discount)

    def marginal_coeffs(self, t):
        alpha = jnp.exp(-0.5 * self.integrated_beta(t))
        return alpha, one_minus_exp(self.integrated_beta(t))

    def t_from_log_snr(self, log_snr):
        # e^lambda = alpha / (1 - alpha^2): the positive root of e^l a^2 + a - e^l = 0,
        # written as 2 e^l / (1 + sqrt(1 + 4 e^{2l})) to avoid cancellation.
        e = jnp.exp(log_snr)
        alpha = 2.0 * e / (1.0 + jnp.sqrt(1.0 + 4.0 * e**2))
        return self._t_from_integrated_beta(-2.0 * jnp.log(alpha))


@flax.struct.dataclass
class VESDE(SDE):
    r"""Variance-exploding SDE (Song et al. 2021, eq. 9), the continuum limit of SMLD.

    .. math::  dx = \sigma(t)\sqrt{2 \log(\sigma_{max}/\sigma_{min})}\,dw,
       \qquad \sigma(t) = \sigma_{min} (\sigma_{max}/\sigma_{min})^t.

    Marginal: :math:`\alpha_t = 1`, :math:`\sigma_t = \sigma(t)`. Strictly the SDE
    adds variance :math:`\sigma(t)^2 - \sigma_{min}^2` to ``x(0)``; like the paper we
    take ``x(0)`` to carry noise of scale ``sigma_min`` already, which makes
    :math:`\sigma(t)` exact. Prior :math:`\mathcal N(0, \sigma_{max}^2 I)`.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def sigma(self, t: jax.Array) -> jax.Array:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    # --- SMLD's noise levels (Song & Ermon 2019): geometric from sigma_min to sigma_max.
    @property
    def discrete_sigmas(self) -> jax.Array:
        return jnp.exp(jnp.linspace(jnp.log(self.sigma_min), jnp.log(self.sigma_max), self.N))

    def sde(self, x, t):
        log_ratio = jnp.log(self.sigma_max) - jnp.log(self.sigma_min)
        return jnp.zeros_like(x), self.sigma(t) * jnp.sqrt(2.0 * log_ratio)

    def marginal_coeffs(self, t):
        return jnp.ones_like(t), self.sigma(t)

    def t_from_log_snr(self, log_snr):
        log_ratio = jnp.log(self.sigma_max) - jnp.log(self.sigma_min)
        return (-log_snr - jnp.log(self.sigma_min)) / log_ratio

    def prior_sampling(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.random.normal(key, shape) * self.sigma_max

    def prior_logp(self, z: jax.Array) -> jax.Array:
        return _standard_normal_logp(z, self.sigma_max)

    def discretize(self, x, t):
        r"""SMLD: :math:`x_i = x_{i-1} + \sqrt{\sigma_i^2 - \sigma_{i-1}^2}\,z`
        (with :math:`\sigma_{-1} = 0`), i.e. :math:`f_i = 0`."""
        i = _time_index(t, self.N, self.T)
        sigmas = self.discrete_sigmas
        previous = jnp.where(i == 0, 0.0, sigmas[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sigmas[i] ** 2 - previous**2)


@flax.struct.dataclass
class CosineSDE(SDE):
    r"""The cosine schedule of Nichol & Dhariwal (2021, eq. 17) as a variance-preserving path.

    .. math::  \alpha_t = \frac{\cos(\phi_t)}{\cos(\phi_0)}, \quad
       \phi_t = \frac{t + s}{1 + s}\,\frac{\pi}{2}, \qquad \sigma_t = \sqrt{1 - \alpha_t^2},

    i.e. :math:`\bar\alpha_t = \alpha_t^2 = f(t)/f(0)` with :math:`f(t) = \cos^2\phi_t`. Its SDE
    (from the affine-path formulas) is VP's with :math:`\beta(t) = -2 f(t) = \pi \tan(\phi_t)/(1+s)`,
    which diverges at :math:`t = 1` where :math:`\alpha_1 = 0`; the path therefore ends at
    ``T = 0.9946`` (as DPM-Solver's cosine schedule; :math:`\alpha_T \approx 0.0084`,
    :math:`\lambda_T \approx -4.8`), the counterpart of Nichol & Dhariwal's clipping of
    :math:`\beta_t` at 0.999. Prior :math:`\mathcal N(0, \sigma_T^2 I)`, :math:`\sigma_T \approx 1`.
    ``discretize`` is Euler--Maruyama.
    """

    s: float = 0.008
    end_time: float = flax.struct.field(pytree_node=False, default=0.9946)
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def _phi(self, t):
        return (t + self.s) / (1.0 + self.s) * (0.5 * jnp.pi)

    def marginal_coeffs(self, t):
        phi_0 = self._phi(jnp.zeros_like(t))
        return jnp.cos(self._phi(t)) / jnp.cos(phi_0), jnp.sqrt(self.marginal_variance(t))

    def marginal_variance(self, t):
        # 1 - cos^2(phi) / cos^2(phi_0) = sin(phi - phi_0) sin(phi + phi_0) / cos^2(phi_0),
        # without the cancellation of 1 - alpha^2 near t = 0.
        phi, phi_0 = self._phi(t), self._phi(jnp.zeros_like(t))
        difference = t / (1.0 + self.s) * (0.5 * jnp.pi)  # phi - phi_0, without round-off
        return jnp.sin(difference) * jnp.sin(phi + phi_0) / jnp.cos(phi_0) ** 2

    def t_from_log_snr(self, log_snr):
        # alpha^2 = sigmoid(2 lambda) on a variance-preserving path.
        alpha = jnp.sqrt(jax.nn.sigmoid(2.0 * log_snr))
        phi = jnp.arccos(alpha * jnp.cos(self._phi(jnp.zeros_like(log_snr))))
        return phi * (1.0 + self.s) / (0.5 * jnp.pi) - self.s


@flax.struct.dataclass
class EDMSDE(SDE):
    r"""The sigma-parametrised path of Karras et al. (2022, EDM): :math:`\alpha_t = 1`,
    :math:`\sigma_t = t`, on :math:`t \in [\sigma_{min}, \sigma_{max}]`.

    Its SDE is :math:`dx = \sqrt{2t}\,dw` (:math:`f = 0`, :math:`g^2 = d\sigma^2/dt = 2t`), a
    variance-exploding SDE whose time is the noise level; the probability-flow ODE is EDM's
    :math:`dx/d\sigma = -\sigma\,\nabla\log p`. ``T = sigma_max``; sampling ends at
    ``sigma_min`` (``sampling.default_eps``). Prior :math:`\mathcal N(0, \sigma_{max}^2 I)`.
    Unlike ``VESDE`` no noise is assumed in ``x(0)``: :math:`\sigma_0 = 0`.
    ``sigma_min`` and ``sigma_max`` are static (``T`` is a Python float).
    """

    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    N: int = flax.struct.field(pytree_node=False, default=1000)

    @property
    def T(self) -> float:
        return self.sigma_max

    def marginal_coeffs(self, t):
        return jnp.ones_like(t), t

    def t_from_log_snr(self, log_snr):
        return jnp.exp(-log_snr)


@flax.struct.dataclass
class RectifiedFlow(SDE):
    r"""The rectified-flow / conditional optimal-transport path (Liu et al. 2023; Lipman et
    al. 2023 with :math:`\sigma_{min} = 0`): :math:`\alpha_t = 1 - t`, :math:`\sigma_t = t`.

    Its velocity is :math:`dx_t/dt = z - x_0` and its SDE (from the affine-path formulas)
    :math:`f = -1/(1 - t)`, :math:`g^2 = 2t/(1 - t)`, which diverges at :math:`t = 1` where
    :math:`\alpha_1 = 0`; the path therefore ends at ``T = 1 - 1e-3`` (``end_time``;
    :math:`\alpha_T = 10^{-3}`). The probability-flow ODE is the flow-matching ODE
    :math:`dx/dt = v(x, t)`. Prior :math:`\mathcal N(0, T^2 I)`. ``discretize`` is
    Euler--Maruyama.
    """

    end_time: float = flax.struct.field(pytree_node=False, default=0.999)
    N: int = flax.struct.field(pytree_node=False, default=1000)

    def marginal_coeffs(self, t):
        return 1.0 - t, t

    def t_from_log_snr(self, log_snr):
        # (1 - t) / t = e^lambda.
        return jax.nn.sigmoid(-log_snr)


SDES: dict[str, type[SDE]] = {
    "vpsde": VPSDE,
    "subvpsde": subVPSDE,
    "vesde": VESDE,
    "cosine": CosineSDE,
    "edm": EDMSDE,
    "rectified_flow": RectifiedFlow,
}


def get_sde(config) -> SDE:
    """Build the path named by ``config.training.sde`` with ``config.model`` parameters.

    ``vpsde``, ``subvpsde`` (``model.beta_min``, ``beta_max``), ``vesde`` (``model.sigma_min``,
    ``sigma_max``), ``cosine``, ``edm`` (``model.sigma_min``, ``sigma_max``: EDM's 0.002 and
    80), ``rectified_flow``; ``model.num_scales`` is ``N``.
    """
    name = config.training.sde.lower()
    if name not in SDES:
        raise ValueError(f"Unknown training.sde {config.training.sde!r}; valid: {sorted(SDES)}")
    model, N = config.model, config.model.num_scales
    if name in ("vesde", "edm"):
        return SDES[name](sigma_min=float(model.sigma_min), sigma_max=float(model.sigma_max), N=N)
    if name in ("cosine", "rectified_flow"):
        return SDES[name](N=N)
    return SDES[name](beta_min=model.beta_min, beta_max=model.beta_max, N=N)
