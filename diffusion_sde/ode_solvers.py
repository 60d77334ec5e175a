r"""Solvers of the probability-flow ODE, time grids, and Tweedie's denoiser.

The probability-flow ODE of an SDE with kernel :math:`\mathcal N(\alpha_t x_0, \sigma_t^2 I)`
(Song et al. 2021, eq. 13) is

.. math::  \frac{dx}{dt} = f(x, t) - \tfrac12 g(t)^2\, s(x, t).

With the data prediction (Tweedie's formula)
:math:`\hat x_0(x, t) = (x + \sigma_t^2 s(x, t))/\alpha_t`, the half log-SNR
:math:`\lambda_t = \log(\alpha_t/\sigma_t)` (``sde.log_snr``) and Karras et al.'s (2022)
scaled variables :math:`\tilde x = x/\alpha_t`, :math:`\tilde\sigma = \sigma_t/\alpha_t
= e^{-\lambda_t}`, the same ODE reads

.. math::  \frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - \hat x_0}{\tilde\sigma},
   \qquad\text{solved exactly by}\qquad
   x_t = \frac{\sigma_t}{\sigma_s} x_s + \sigma_t \int_{\lambda_s}^{\lambda_t}
   e^{\lambda}\,\hat x_0(x_\lambda, \lambda)\,d\lambda

(Lu et al. 2022, DPM-Solver++ eq. 9). The fixed-step solvers are steps
``(sde, score_fn, x, t, t_next, history) -> (x, history)`` looped by ``lax.scan`` over a
time grid (``TIME_GRIDS``; each has a default, chosen on the mixture benchmark):

- ``euler``: Euler in :math:`t` on :math:`dx/dt`; order 1, 1 evaluation per step,
  uniform-:math:`t` grid.
- ``ddim``: DDIM with :math:`\eta = 0` (Song et al. 2021a), which is Euler in
  :math:`(\tilde x, \tilde\sigma)` and DPM-Solver++(1); order 1, 1 evaluation, uniform
  log-SNR grid.
- ``heun``: Heun in :math:`(\tilde x, \tilde\sigma)` (Karras et al. 2022, Algorithm 1);
  order 2, 2 evaluations, uniform log-SNR grid.
- ``dpm_solver_2``, ``dpm_solver_3``: multistep DPM-Solver++(2M) and (3M) (Lu et al.
  2022); order 2 and 3, 1 evaluation, uniform log-SNR grid.

``adaptive`` is Dopri5 (order 5(4), first-same-as-last, 6 evaluations per attempted step;
``solve_ivp``'s RK45) with a PID step-size controller, from diffrax, on device; the same
integrator solves the likelihood ODE (``likelihood.py``). All work for VP, sub-VP and VE: they only use
:math:`\alpha_t`, :math:`\sigma_t` and :math:`\lambda_t`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from diffusion_sde.sde import SDE, ScoreFn

KARRAS_RHO = 7.0


# --- Time grids: (sde, num_steps, eps) -> (num_steps + 1,) times from T down to eps -------


def _grid_from_log_snr(sde: SDE, log_snrs: jax.Array, eps: float) -> jax.Array:
    ts = sde.t_from_log_snr(log_snrs)
    return ts.at[0].set(sde.T).at[-1].set(eps)  # Exact end points despite round-off.


def uniform_t_grid(sde: SDE, num_steps: int, eps: float) -> jax.Array:
    """:math:`t_i = T - i (T - \\epsilon)/n`."""
    return jnp.linspace(sde.T, eps, num_steps + 1)


def uniform_log_snr_grid(sde: SDE, num_steps: int, eps: float) -> jax.Array:
    r""":math:`\lambda_{t_i}` uniform from :math:`\lambda_T` to :math:`\lambda_\epsilon`
    (Lu et al. 2022)."""
    log_snr_T, log_snr_eps = sde.log_snr(jnp.array([sde.T, eps]))
    return _grid_from_log_snr(sde, jnp.linspace(log_snr_T, log_snr_eps, num_steps + 1), eps)


def karras_grid(sde: SDE, num_steps: int, eps: float, rho: float = KARRAS_RHO) -> jax.Array:
    r""":math:`\tilde\sigma_i^{1/\rho}` uniform from :math:`\tilde\sigma_T^{1/\rho}` to
    :math:`\tilde\sigma_\epsilon^{1/\rho}`, :math:`\tilde\sigma = \sigma_t/\alpha_t`
    (Karras et al. 2022, eq. 5)."""
    sigma_T, sigma_eps = jnp.exp(-sde.log_snr(jnp.array([sde.T, eps])))
    ramp = jnp.linspace(0.0, 1.0, num_steps + 1)
    sigmas = (sigma_T ** (1 / rho) + ramp * (sigma_eps ** (1 / rho) - sigma_T ** (1 / rho))) ** rho
    return _grid_from_log_snr(sde, -jnp.log(sigmas), eps)


TIME_GRIDS: dict[str, Callable[[SDE, int, float], jax.Array]] = {
    "uniform_t": uniform_t_grid,
    "uniform_log_snr": uniform_log_snr_grid,
    "karras": karras_grid,
}


def time_grid(sde: SDE, name: str, num_steps: int, eps: float) -> jax.Array:
    """The grid ``name`` of ``TIME_GRIDS``: ``num_steps + 1`` times from ``T`` down to ``eps``."""
    if name not in TIME_GRIDS:
        raise ValueError(f"Unknown time grid {name!r}; valid: {sorted(TIME_GRIDS)}")
    return TIME_GRIDS[name](sde, num_steps, eps)


# --- The ODE in its three forms ----------------------------------------------------------


def _batch_time(t: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.full(x.shape[:1], t, x.dtype)


def probability_flow_drift(sde: SDE, score_fn: ScoreFn, x: jax.Array, t: jax.Array) -> jax.Array:
    r""":math:`f(x, t) - \tfrac12 g(t)^2 s(x, t)` at a scalar time ``t``."""
    return sde.reverse(score_fn, probability_flow=True).sde(x, _batch_time(t, x))[0]


def data_prediction(sde: SDE, score_fn: ScoreFn, x: jax.Array, t: jax.Array) -> jax.Array:
    r"""Tweedie's :math:`\hat x_0 = \mathbb E[x_0 \mid x_t = x] = (x + \sigma_t^2 s(x, t))/\alpha_t`
    at a scalar time ``t``."""
    alpha, sigma = sde.marginal_coeffs(t)
    return (x + sigma**2 * score_fn(x, _batch_time(t, x))) / alpha


def tweedie_denoise(sde: SDE, score_fn: ScoreFn, x: jax.Array, eps: float) -> jax.Array:
    """The noise-free estimate ``data_prediction`` at the final time ``eps`` (one evaluation)."""
    return data_prediction(sde, score_fn, x, jnp.asarray(eps, x.dtype))


# --- Fixed-step solvers: (sde, score_fn, x, t, t_next, history) -> (x, history) ----------


def euler_step(sde, score_fn, x, t, t_next, history):
    r""":math:`x' = x + (t' - t)\,[f(x, t) - \tfrac12 g(t)^2 s(x, t)]`."""
    return x + (t_next - t) * probability_flow_drift(sde, score_fn, x, t), history


def ddim_step(sde, score_fn, x, t, t_next, history):
    r"""DDIM with :math:`\eta = 0` (Song et al. 2021a, eq. 12):
    :math:`x' = \alpha_{t'} \hat x_0 + \sigma_{t'} \hat\epsilon`, with
    :math:`\hat\epsilon = (x - \alpha_t \hat x_0)/\sigma_t`."""
    alpha, sigma = sde.marginal_coeffs(t)
    alpha_next, sigma_next = sde.marginal_coeffs(t_next)
    x0 = data_prediction(sde, score_fn, x, t)
    return alpha_next * x0 + sigma_next * (x - alpha * x0) / sigma, history


def heun_step(sde, score_fn, x, t, t_next, history):
    r"""Heun's method on :math:`d\tilde x/d\tilde\sigma = (\tilde x - \hat x_0)/\tilde\sigma`
    (Karras et al. 2022, Algorithm 1, lines 5--8)."""
    alpha, sigma = sde.marginal_coeffs(t)
    alpha_next, sigma_next = sde.marginal_coeffs(t_next)
    sigma_tilde, sigma_tilde_next = sigma / alpha, sigma_next / alpha_next
    x_tilde = x / alpha
    d = (x_tilde - data_prediction(sde, score_fn, x, t)) / sigma_tilde
    x_tilde_euler = x_tilde + (sigma_tilde_next - sigma_tilde) * d
    x0_next = data_prediction(sde, score_fn, alpha_next * x_tilde_euler, t_next)
    d_next = (x_tilde_euler - x0_next) / sigma_tilde_next
    return alpha_next * (x_tilde + (sigma_tilde_next - sigma_tilde) * 0.5 * (d + d_next)), history


def _dpm_solver_update(sde, x, x0, t, t_next, x0_prev, log_snr_prev, count, order):
    r"""The DPM-Solver++ step of :func:`dpm_solver_step` from ``x`` at ``t`` with its data
    prediction ``x0`` already evaluated; ``x0_prev``, ``log_snr_prev``: the last two points'."""
    alpha_next, sigma_next = sde.marginal_coeffs(t_next)
    _, sigma = sde.marginal_coeffs(t)
    log_snr, log_snr_next = sde.log_snr(t), sde.log_snr(t_next)

    h = log_snr_next - log_snr
    # Past points at lambda - r0 h and lambda - (r0 + r1) h; guarded before they exist.
    r0 = jnp.where(count >= 1, (log_snr - log_snr_prev[0]) / h, 1.0)
    r1 = jnp.where(count >= 2, (log_snr_prev[0] - log_snr_prev[1]) / h, 1.0)
    d1_0 = (x0 - x0_prev[0]) / r0  # ~ h x0'(lambda - r0 h / 2)
    d1_1 = (x0_prev[0] - x0_prev[1]) / r1
    d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0''
    effective_order = jnp.minimum(order, count + 1)
    h_x0_prime = jnp.where(effective_order >= 3, d1_0 + 0.5 * r0 * d2, d1_0)
    h_x0_prime = jnp.where(effective_order >= 2, h_x0_prime, 0.0)
    h2_x0_second = jnp.where(effective_order >= 3, d2, 0.0)

    phi_1 = jnp.expm1(-h)
    phi_2 = phi_1 / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return (
        (sigma_next / sigma) * x
        - alpha_next * phi_1 * x0
        + alpha_next * phi_2 * h_x0_prime
        - alpha_next * phi_3 * h2_x0_second
    )


def dpm_solver_step(sde, score_fn, x, t, t_next, history, *, order):
    r"""Multistep DPM-Solver++ of order ``order`` (Lu et al. 2022, Algorithm 2, extended).

    Taylor-expanding :math:`\hat x_0` in :math:`\lambda` about :math:`\lambda_t` in the exact
    solution, with :math:`h = \lambda_{t'} - \lambda_t`,

    .. math::  x_{t'} = \frac{\sigma_{t'}}{\sigma_t} x_t
       - \alpha_{t'}\varphi_1 \hat x_0 + \alpha_{t'}\varphi_2\, h\hat x_0'
       - \alpha_{t'}\varphi_3\, h^2 \hat x_0'',

    :math:`\varphi_1 = e^{-h} - 1`, :math:`\varphi_2 = \varphi_1/h + 1`,
    :math:`\varphi_3 = \varphi_2/h - 1/2`. The derivatives come from divided differences of
    the data predictions at the previous one or two grid points (``history``); the first
    steps use the lower orders that the history allows.
    """
    x0_prev, log_snr_prev, count = history
    x0 = data_prediction(sde, score_fn, x, t)
    x_next = _dpm_solver_update(sde, x, x0, t, t_next, x0_prev, log_snr_prev, count, order)
    history = (
        jnp.stack([x0, x0_prev[0]]),
        jnp.stack([sde.log_snr(t), log_snr_prev[0]]),
        count + 1,
    )
    return x_next, history


def _unic_coefficients(h: jax.Array, ratios: list[jax.Array], variant: str) -> jax.Array:
    r"""UniC's weights :math:`a_p` (Zhao et al. 2023, eq. 8 and Algorithm 2), ``p = len(ratios)``.

    ``ratios`` are :math:`r_m = (\lambda_{s_m} - \lambda_{s_0})/h`, the past points' then
    the new point's (:math:`r_p = 1`). Row :math:`k` of :math:`R_p` is
    :math:`(r_1^{k-1}, \dots, r_p^{k-1})`, and :math:`a_p = R_p^{-1} g_p / B(h)` with
    :math:`g_k = k!\,\psi_k(-h)`, the Taylor remainders :math:`\psi_1(z) = (e^z - 1)/z - 1`,
    :math:`\psi_{k+1}(z) = \psi_k(z)/z - 1/(k+1)!`; ``bh1``: :math:`B(h) = -h`, ``bh2``:
    :math:`B(h) = e^{-h} - 1`. For ``p = 1`` the paper takes :math:`a_1 = 1/2`.
    """
    if len(ratios) == 1:
        return jnp.full((1,), 0.5, h.dtype)
    hh = -h
    b_h = hh if variant == "bh1" else jnp.expm1(hh)
    psi, factorial, rhs = jnp.expm1(hh) / hh - 1.0, 1.0, []
    for k in range(len(ratios)):
        rhs.append(psi * factorial / b_h)
        factorial *= k + 2
        psi = psi / hh - 1.0 / factorial
    r = jnp.stack(ratios)
    matrix = jnp.stack([r**k for k in range(len(ratios))])
    return jnp.linalg.solve(matrix, jnp.stack(rhs))


def _unic_correct(sde, x_prev, t_prev, x0_prev, log_snr_prev, x0, t, count, order, variant):
    r"""UniC-:math:`p` (Zhao et al. 2023, Algorithm 2 in data prediction, eq. 8): corrects the
    predicted :math:`\tilde x_t` from :math:`x_{s_0}` (``x_prev`` at ``t_prev``) with the new
    data prediction :math:`\hat x_0(\tilde x_t, t)` (``x0``), reusing it, no new evaluation:

    .. math::  x_t^c = \frac{\sigma_t}{\sigma_{s_0}} x_{s_0} - \alpha_t \varphi_1 m_0
       - \alpha_t B(h) \Big(\sum_{m=1}^{p-1} a_m D_m + a_p (\hat x_0 - m_0)\Big),

    :math:`m_0 = \hat x_0(x_{s_0})`, :math:`D_m = (m_m - m_0)/r_m` from the ``p - 1`` points
    before :math:`s_0`, :math:`\varphi_1 = e^{-h} - 1`, and ``p = min(order, count)``: the
    order of the predictor step being corrected.
    """
    alpha, sigma = sde.marginal_coeffs(t)
    _, sigma_prev = sde.marginal_coeffs(t_prev)
    log_snr_s0 = log_snr_prev[0]
    h = sde.log_snr(t) - log_snr_s0
    m0 = x0_prev[0]
    # r_m of the points before s_0 (negative); placeholders where the history is too short,
    # so that every R_p stays invertible (their corrections are discarded below).
    ratios = [jnp.where(count > m, (log_snr_prev[m] - log_snr_s0) / h, -float(m)) for m in (1, 2)]
    differences = [(x0_prev[m] - m0) / ratios[m - 1] for m in (1, 2)]
    linear = (sigma / sigma_prev) * x_prev - alpha * jnp.expm1(-h) * m0
    b_h = -h if variant == "bh1" else jnp.expm1(-h)
    corrected = {}
    for p in range(1, order + 1):
        weights = _unic_coefficients(h, ratios[: p - 1] + [jnp.ones_like(h)], variant)
        correction = weights[-1] * (x0 - m0)
        for m in range(1, p):
            correction = correction + weights[m - 1] * differences[m - 1]
        corrected[p] = linear - alpha * b_h * correction
    x_corrected = corrected[1]
    for p in range(2, order + 1):
        x_corrected = jnp.where(count >= p, corrected[p], x_corrected)
    return x_corrected


def unipc_step(sde, score_fn, x, t, t_next, history, *, order, variant):
    r"""UniPC (Zhao et al. 2023): the UniC-:math:`p` corrector on the DPM-Solver++(pM)
    predictor, data prediction, 1 evaluation per step.

    The data prediction at the predicted :math:`\tilde x_t` first corrects it
    (:func:`_unic_correct`, order :math:`p + 1`) and is then reused by the multistep
    DPM-Solver++ predictor (:func:`dpm_solver_step`) from the corrected :math:`x_t^c` to
    ``t_next``. The last step is not corrected (that would need one more evaluation), as in
    the paper. ``history``: data predictions and log-SNRs at the last three grid points,
    the corrected point and time before ``t``, and the number of steps taken.
    """
    x0_prev, log_snr_prev, x_prev, t_prev, count = history
    x0 = data_prediction(sde, score_fn, x, t)
    corrected = _unic_correct(
        sde, x_prev, t_prev, x0_prev, log_snr_prev, x0, t, count, order, variant
    )
    x = jnp.where(count >= 1, corrected, x)
    x_next = _dpm_solver_update(sde, x, x0, t, t_next, x0_prev, log_snr_prev, count, order)
    history = (
        jnp.concatenate([x0[None], x0_prev[:-1]]),
        jnp.concatenate([sde.log_snr(t)[None], log_snr_prev[:-1]]),
        x,
        t,
        count + 1,
    )
    return x_next, history


def _unipc_history(x: jax.Array):
    """Data predictions and log-SNRs at the last three grid points, the last corrected
    point and its time (placeholders, unused until they exist), and the step count."""
    return (
        jnp.zeros((3,) + x.shape, x.dtype),
        jnp.zeros((3,), x.dtype),
        jnp.zeros_like(x),
        jnp.ones((), x.dtype),
        jnp.zeros((), jnp.int32),
    )


def _no_history(x: jax.Array):
    return ()


def _dpm_history(x: jax.Array):
    """Data predictions and log-SNRs at the last two grid points, and how many exist."""
    return jnp.zeros((2,) + x.shape, x.dtype), jnp.zeros((2,), x.dtype), jnp.zeros((), jnp.int32)


# name -> (step, initial history, evaluations per step, default time grid)
FIXED_STEP_SOLVERS: dict[str, tuple[Callable, Callable, int, str]] = (
    {
        "euler": (euler_step, _no_history, 1, "uniform_t"),
        "ddim": (ddim_step, _no_history, 1, "uniform_log_snr"),
        "heun": (heun_step, _no_history, 2, "uniform_log_snr"),
    }
    | {
        f"dpm_solver_{order}": (
            functools.partial(dpm_solver_step, order=order),
            _dpm_history,
            1,
            "uniform_log_snr",
        )
        for order in (2, 3)
    }
    | {
        f"unipc_{order}{suffix}": (
            functools.partial(unipc_step, order=order, variant=variant),
            _unipc_history,
            1,
            "uniform_log_snr",
        )
        for order, suffix, variant in (
            (1, "", "bh1"),
            (1, "_bh2", "bh2"),
            (2, "", "bh1"),
            (3, "", "bh1"),
        )
    }
)
METHODS: tuple[str, ...] = ("adaptive", *FIXED_STEP_SOLVERS)


def check_method(
    method: str, grid: str | None = None, *, kind: str = "ODE", methods=METHODS
) -> None:
    """Raise a ``ValueError`` listing the valid names if ``method`` is not one of ``methods``
    (the solvers of ``kind``; this module's by default) or ``grid`` is not a time grid."""
    if method not in methods:
        raise ValueError(f"Unknown {kind} method {method!r}; valid: {sorted(methods)}")
    if grid is not None and grid not in TIME_GRIDS:
        raise ValueError(f"Unknown time grid {grid!r}; valid: {sorted(TIME_GRIDS)}")


def fixed_step_nfe(method: str, num_steps: int, solvers=FIXED_STEP_SOLVERS) -> int:
    """Score evaluations of ``num_steps`` steps of a fixed-step method of ``solvers`` (a
    ``FIXED_STEP_SOLVERS`` table; this module's by default)."""
    return solvers[method][2] * num_steps


def solve_fixed_step(
    method: str,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    num_steps: int,
    eps: float,
    grid: str | None = None,
) -> jax.Array:
    """Integrate the probability-flow ODE from ``x`` at ``T`` to ``eps`` in ``num_steps``
    steps of ``method`` on the time grid ``grid`` (``None``: the method's default)."""
    step, init_history, _, default_grid = FIXED_STEP_SOLVERS[method]
    ts = time_grid(sde, grid or default_grid, num_steps, eps)

    def body(carry, times):
        x, history = carry
        return step(sde, score_fn, x, *times, history), None

    (x, _), _ = jax.lax.scan(body, (x, init_history(x)), (ts[:-1], ts[1:]))
    return x


# --- Adaptive ----------------------------------------------------------------------------


def _rms_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in leaves) / sum(leaf.size for leaf in leaves))


def _initial_step(vector_field, t0, t1, state0, f0, rtol, atol, error_order: int):
    """Hairer, Norsett & Wanner (1993, sec. II.4)'s first step, as ``solve_ivp`` picks it
    (both trial steps clamped to the interval), signed towards ``t1``. Costs one evaluation,
    at ``t0 + h0``: ``f0`` is given."""
    direction, length = jnp.sign(t1 - t0), jnp.abs(t1 - t0)
    scale = jax.tree.map(lambda y: atol + rtol * jnp.abs(y), state0)
    scaled = lambda tree: _rms_norm(jax.tree.map(jnp.divide, tree, scale))
    d0, d1 = scaled(state0), scaled(f0)
    h0 = jnp.minimum(jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1), length)
    state1 = jax.tree.map(lambda y, f: y + direction * h0 * f, state0, f0)
    f1 = vector_field(t0 + direction * h0, state1, None)
    d2 = scaled(jax.tree.map(jnp.subtract, f1, f0)) / h0
    largest = jnp.maximum(d1, d2)
    h1 = jnp.where(
        largest <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / largest) ** (1 / (error_order + 1))
    )
    return direction * jnp.minimum(jnp.minimum(100 * h0, h1), length)


class _PIDControllerWithFirstStep(diffrax.PIDController):
    """diffrax's PID controller starting with a given (traced) first step, ``first_step``:
    its length, since ``diffeqsolve`` integrates backward solves in reversed time."""

    first_step: jax.Array | None = None

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        del dt0  # diffeqsolve's, None
        dt0 = jnp.abs(self.first_step)
        return super().init(terms, t0, t1, y0, dt0, args, func, error_order)


def integrate_adaptive(vector_field, state0, t0, t1, rtol, atol, max_steps: int = 4096):
    """Dopri5 with a PID controller from ``t0`` to ``t1`` (either direction), on device.

    Returns ``(state1, nfe, reached)`` with ``nfe`` the exact number of ``vector_field``
    calls: ``2 + 6 * attempted steps``, the same accounting as ``solve_ivp``'s RK45;
    ``reached`` is false (and ``state1`` NaN) when ``t1`` was not reached in ``max_steps``
    attempted steps: :func:`raise_unless_reached` turns it into an error outside ``jit``.
    The solve has no host callback (diffrax's ``throw=False``; the first step given to the
    controller, not as a traced ``dt0`` whose sign diffrax checks), so that the program it
    is part of can be kept in the persistent compilation cache: JAX does not keep programs
    that call back to the host. To make it
    exact we evaluate the first stage ourselves and hand it to the solver as its
    first-same-as-last value, and pick the first step ourselves. Left alone, diffrax
    re-evaluates the first stage on every attempt until a step is accepted (which its
    statistics cannot tell apart) and, for the wrapped term ``diffeqsolve`` builds, skips
    its initial step-size selection for a fixed ``dt0 = 0.01``.
    """
    term, solver = diffrax.ODETerm(vector_field), diffrax.Dopri5()
    f0 = vector_field(t0, state0, None)
    first_step, _ = solver.init(term, t0, t1, state0, None)
    dt0 = _initial_step(vector_field, t0, t1, state0, f0, rtol, atol, error_order=4)
    solution = diffrax.diffeqsolve(
        term,
        solver,
        t0=t0,
        t1=t1,
        dt0=None,  # a traced dt0 would put a host callback (its sign check) in the program
        y0=state0,
        stepsize_controller=_PIDControllerWithFirstStep(rtol=rtol, atol=atol, first_step=dt0),
        solver_state=(jnp.zeros_like(first_step), f0),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        throw=False,
    )
    reached = solution.result == diffrax.RESULTS.successful
    state1 = jax.tree.map(lambda y: jnp.where(reached, y[0], jnp.nan), solution.ys)
    # f0, the initial step's probe, and len(c) new stages per attempted step.
    nfe = 2 + len(solver.tableau.c) * solution.stats["num_steps"]
    return state1, nfe, reached


def raise_unless_reached(reached, max_steps: int = 4096) -> None:
    """Raise a ``RuntimeError`` that says what to do when an adaptive solve stopped at
    ``max_steps`` (``reached`` false); nothing under ``jit``, where ``reached`` is traced
    and the failed solve's NaN results tell instead."""
    if isinstance(reached, jax.core.Tracer) or bool(reached):
        return
    raise RuntimeError(
        f"The adaptive ODE solver stopped after {max_steps} steps without reaching the end "
        "time: loosen rtol/atol, or check the score network for non-finite outputs."
    )


def solve_adaptive(
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    *,
    eps: float,
    rtol: float,
    atol: float,
    max_steps: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """Integrate the probability-flow ODE from ``x`` at ``T`` to ``eps`` with
    :func:`integrate_adaptive` (Dopri5, PID controller, on device). Returns
    ``(x, nfe, reached)`` with ``nfe`` the exact number of score evaluations and ``reached``
    as :func:`integrate_adaptive`'s."""
    drift = lambda t, y, args: probability_flow_drift(sde, score_fn, y, t)
    return integrate_adaptive(drift, x, sde.T, eps, rtol, atol, max_steps)
