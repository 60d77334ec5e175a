r"""Score-matching losses: continuous denoising score matching and the discrete DDPM
and SMLD objectives, each one per-example function plus its batch mean.

Denoising score matching (Vincent 2011; Song et al. 2021, eq. 7) with the Gaussian
kernel :math:`x_t = \alpha_t x_0 + \sigma_t z` of any SDE in ``sde.py``:

.. math::  \mathcal L(\theta) = \mathbb E_{t \sim U[\epsilon, T]}\, \lambda(t)\,
   \mathbb E_{x_0, z} \big\| s_\theta(x_t, t) + z / \sigma_t \big\|^2 .

With ``likelihood_weighting=False`` the weight is :math:`\lambda(t) = \sigma_t^2`, so
the summand is :math:`\| \sigma_t s_\theta + z \|^2`; with ``likelihood_weighting=True``
it is :math:`\lambda(t) = g(t)^2`, which makes the loss an upper bound on the negative
log-likelihood (Song et al. 2021b, "Maximum likelihood training of score-based
diffusion models", Thm. 1). ``reduce_mean`` averages over data dimensions; otherwise
the sum over data dimensions is halved, as in the 2021 reference.

The other families are other weightings :math:`\lambda(t) = w(t)\,\sigma_t^2` and
distributions of :math:`t` of the same loss (``weighting``, ``time_distribution``; see
:data:`WEIGHTINGS`, :data:`TIME_DISTRIBUTIONS`): the data-prediction, v and flow-matching
velocity errors, EDM's weight and log-normal noise levels (Karras et al. 2022), min-SNR-gamma
(Hang et al. 2023) and SD3's logit-normal times (Esser et al. 2024). A regression of any
network target is one of these, since every target is affine in the data prediction
(``parametrization.py``). The losses take a score function, never a network: the train
step that builds one from a network is in ``training/step.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_sde.sde import SDE, VESDE, VPSDE, ScoreFn, batch_broadcast


def _reduce_over_data(values: jax.Array, reduce_mean: bool) -> jax.Array:
    """Mean over data dimensions, or half their sum; keeps the batch axis."""
    flat = values.reshape(values.shape[0], -1)
    return jnp.mean(flat, axis=-1) if reduce_mean else 0.5 * jnp.sum(flat, axis=-1)


# --- Weightings and time distributions of the DSM loss ------------------------------------
#
# Every weighting is written as a weight w(t) on the noise-prediction error
# ||sigma_t s + z||^2 = ||eps_hat - eps||^2, so that lambda(t) = w(t) sigma_t^2 in the
# module docstring's form. Errors of the other targets are multiples of it (see
# parametrization.py): ||x0_hat - x0||^2 = (sigma/alpha)^2 ||eps_hat - eps||^2,
# ||v_hat - v||^2 = ((alpha^2 + sigma^2)/alpha)^2 ||.||^2 and, for the flow-matching
# velocity u = alpha' x0 + sigma' eps, ||u_hat - u||^2 = (sigma' - alpha' sigma/alpha)^2 ||.||^2.


class LossOptions(NamedTuple):
    """Constants of the weightings and time distributions (the papers' defaults)."""

    sigma_data: float = 0.5  # EDM's sigma_data
    min_snr_gamma: float = 5.0  # Hang et al. (2023)
    log_normal_mean: float = -1.2  # EDM's P_mean
    log_normal_std: float = 1.2  # EDM's P_std
    logit_normal_mean: float = 0.0  # Esser et al. (2024, SD3)
    logit_normal_std: float = 1.0


DEFAULT_LOSS_OPTIONS = LossOptions()


def _snr(sde, t):
    alpha, sigma = sde.marginal_coeffs(t)
    return (alpha / sigma) ** 2


def _v_weight(sde, t):
    alpha, sigma = sde.marginal_coeffs(t)
    return ((alpha**2 + sigma**2) / alpha) ** 2


def _velocity_weight(sde, t, options):
    alpha, sigma, d_alpha, d_sigma = sde.marginal_coeffs_and_derivatives(t)
    return (d_sigma - d_alpha * sigma / alpha) ** 2


# name -> w(sde, t, options): the weight on ||eps_hat - eps||^2, shaped like t.
WEIGHTINGS: dict[str, Callable[[SDE, jax.Array, LossOptions], jax.Array]] = {
    # lambda = sigma^2 (Song et al. 2021): DDPM's noise-prediction loss.
    "sigma2": lambda sde, t, o: jnp.ones_like(t),
    # lambda = g^2 (Song et al. 2021b): an upper bound on the negative log-likelihood.
    "likelihood": lambda sde, t, o: (
        sde.sde(jnp.zeros((t.shape[0], 1)), t)[1] ** 2 / sde.marginal_coeffs(t)[1] ** 2
    ),
    # The data-prediction error ||x0_hat - x0||^2.
    "x0": lambda sde, t, o: 1.0 / _snr(sde, t),
    # Salimans & Ho's v error ||v_hat - v||^2.
    "v": lambda sde, t, o: _v_weight(sde, t),
    # EDM (Karras et al. 2022, eq. 8 with Table 1): (sigma^2 + sigma_d^2)/(sigma sigma_d)^2
    # on ||D - x0||^2, sigma the scaled noise level sigma_t / alpha_t.
    "edm": lambda sde, t, o: (1.0 / _snr(sde, t) + o.sigma_data**2) / o.sigma_data**2,
    # Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on ||x0_hat - x0||^2.
    "min_snr": lambda sde, t, o: jnp.minimum(_snr(sde, t), o.min_snr_gamma) / _snr(sde, t),
    # Flow matching (Lipman et al. 2023): the velocity error ||u_hat - u||^2.
    "velocity": _velocity_weight,
}


def _uniform_times(key, sde, batch, eps, options):
    return jax.random.uniform(key, (batch,), minval=eps, maxval=sde.T)


def _log_normal_times(key, sde, batch, eps, options):
    # EDM: ln sigma ~ N(P_mean, P_std^2) for the scaled noise level sigma_t / alpha_t.
    log_sigma = options.log_normal_mean + options.log_normal_std * jax.random.normal(key, (batch,))
    return jnp.clip(sde.t_from_log_snr(-log_sigma), eps, sde.T)


def _logit_normal_times(key, sde, batch, eps, options):
    # Esser et al. (2024): t = sigmoid(u), u ~ N(m, s^2), mapped onto [eps, T].
    u = options.logit_normal_mean + options.logit_normal_std * jax.random.normal(key, (batch,))
    return eps + (sde.T - eps) * jax.nn.sigmoid(u)


# name -> sampler(key, sde, batch, eps, options) of the times t, shaped (batch,).
TIME_DISTRIBUTIONS: dict[str, Callable[..., jax.Array]] = {
    "uniform": _uniform_times,
    "log_normal": _log_normal_times,
    "logit_normal": _logit_normal_times,
}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; valid: {sorted(table)}")
    return table[name]


def resolve_weighting(weighting: str | None, likelihood_weighting: bool) -> str:
    """The weighting name: ``weighting``, or from the 2021 flag when it is ``None``."""
    if weighting is None:
        return "likelihood" if likelihood_weighting else "sigma2"
    _lookup(WEIGHTINGS, weighting, "training.weighting")
    if likelihood_weighting and weighting != "likelihood":
        raise ValueError(
            f"training.likelihood_weighting=True contradicts training.weighting={weighting!r}: "
            "set one of them (weighting='likelihood' is the flag's weighting)."
        )
    return weighting


def dsm_losses(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    *,
    likelihood_weighting: bool = False,
    reduce_mean: bool = True,
    eps: float = 1e-5,
    weighting: str | None = None,
    time_distribution: str = "uniform",
    options: LossOptions = DEFAULT_LOSS_OPTIONS,
) -> jax.Array:
    r"""Per-example continuous DSM losses, shape ``(B,)``; see the module docstring.

    Draws ``t`` from ``time_distribution`` (``uniform`` on ``[eps, T]``; ``log_normal``:
    :math:`\ln(\sigma_t/\alpha_t) \sim \mathcal N(P_{mean}, P_{std}^2)`, EDM's, clipped to
    ``[eps, T]``; ``logit_normal``: :math:`t = \epsilon + (T - \epsilon)\,\mathrm{sigmoid}(u)`,
    :math:`u \sim \mathcal N(m, s^2)`, SD3's) then ``z ~ N(0, I)`` from
    ``jax.random.split(key)``, and returns
    :math:`w(t)\,\lVert \sigma_t s_\theta(x_t, t) + z \rVert^2` (reduced over data) with
    the weight of ``weighting`` (:data:`WEIGHTINGS`: ``sigma2``, ``likelihood``, ``x0``, ``v``,
    ``edm``, ``min_snr``, ``velocity``). ``weighting=None`` follows ``likelihood_weighting``
    (``likelihood`` or ``sigma2``, the 2021 losses, computed as before). Every weighting is
    positive and every time distribution has a density on ``[eps, T]``, so the minimiser is
    the true score whatever the choice.
    """
    weighting = resolve_weighting(weighting, likelihood_weighting)
    sample_times = _lookup(TIME_DISTRIBUTIONS, time_distribution, "training.time_distribution")
    key_t, key_z = jax.random.split(key)
    t = sample_times(key_t, sde, x.shape[0], eps, options)
    z = jax.random.normal(key_z, x.shape)
    mean, sigma = sde.marginal_prob(x, t)
    sigma = batch_broadcast(sigma, x)
    score = score_fn(mean + sigma * z, t)
    if weighting == "likelihood":
        g2 = sde.sde(jnp.zeros_like(x), t)[1] ** 2
        return _reduce_over_data(jnp.square(score + z / sigma), reduce_mean) * g2
    losses = _reduce_over_data(jnp.square(score * sigma + z), reduce_mean)
    if weighting == "sigma2":
        return losses
    return losses * WEIGHTINGS[weighting](sde, t, options)


LabelFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddpm_losses(
    key: jax.Array, vpsde: VPSDE, eps_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    r"""Per-example DDPM losses (Ho et al. 2020, eq. 14, the "simple" objective).

    .. math::  \| \epsilon_\theta(\sqrt{\bar\alpha_i}\,x_0 + \sqrt{1-\bar\alpha_i}\,\epsilon,\; i)
       - \epsilon \|^2, \qquad i \sim U\{0, \dots, N-1\},

    with :math:`\bar\alpha_i` from ``vpsde.alphas_cumprod`` (and its std from
    ``vpsde.sqrt_one_minus_alphas_cumprod``). ``eps_fn(x_i, i)`` predicts
    the noise from integer step labels ``i`` (shape ``(B,)``).
    """
    key_i, key_noise = jax.random.split(key)
    labels = jax.random.randint(key_i, (x.shape[0],), 0, vpsde.N)
    alpha_bar = batch_broadcast(vpsde.alphas_cumprod[labels], x)
    std = batch_broadcast(vpsde.sqrt_one_minus_alphas_cumprod[labels], x)
    noise = jax.random.normal(key_noise, x.shape)
    perturbed = jnp.sqrt(alpha_bar) * x + std * noise
    return _reduce_over_data(jnp.square(eps_fn(perturbed, labels) - noise), reduce_mean)


def smld_losses(
    key: jax.Array, vesde: VESDE, score_fn: LabelFn, x: jax.Array, *, reduce_mean: bool = True
) -> jax.Array:
    r"""Per-example SMLD / NCSN losses (Song & Ermon 2019, eq. 6, with weight
    :math:`\lambda(\sigma) = \sigma^2`).

    .. math::  \sigma_i^2 \,\big\| s_\theta(x_0 + \sigma_i z,\; i) + z / \sigma_i \big\|^2,
       \qquad i \sim U\{0, \dots, N-1\},

    with :math:`\sigma_i` the SDE's noise levels in NCSN order, descending:
    ``vesde.discrete_sigmas[::-1]`` (label 0 is ``sigma_max``, label N-1 ``sigma_min``).
    ``score_fn(x, i)`` takes integer noise-level labels ``i`` (shape ``(B,)``).
    """
    key_i, key_noise = jax.random.split(key)
    labels = jax.random.randint(key_i, (x.shape[0],), 0, vesde.N)
    sigmas = vesde.discrete_sigmas[::-1][labels]
    sigma = batch_broadcast(sigmas, x)
    noise = jax.random.normal(key_noise, x.shape) * sigma
    target = -noise / sigma**2
    score = score_fn(x + noise, labels)
    return _reduce_over_data(jnp.square(score - target), reduce_mean) * sigmas**2


# --- Batch means: the training objectives -------------------------------------------------


def _batch_mean(per_example: Callable[..., jax.Array], name: str, what: str):
    """``name(...) = mean(per_example(...))`` over the batch, with ``per_example``'s
    arguments."""

    @functools.wraps(per_example)
    def batch_mean(*args, **kwargs) -> jax.Array:
        return jnp.mean(per_example(*args, **kwargs))

    batch_mean.__name__ = batch_mean.__qualname__ = name
    batch_mean.__doc__ = f"Batch mean of :func:`{per_example.__name__}`: {what}."
    return batch_mean


dsm_loss = _batch_mean(dsm_losses, "dsm_loss", "the continuous-time training objective")
ddpm_loss = _batch_mean(ddpm_losses, "ddpm_loss", "DDPM's training objective")
smld_loss = _batch_mean(smld_losses, "smld_loss", "SMLD's (NCSN's) training objective")
