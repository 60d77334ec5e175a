r"""Few-step solvers of the reverse-time SDE: DPM-Solver++ SDE and an adaptive solver.

The reverse SDE of a forward SDE with kernel :math:`\mathcal N(\alpha_t x_0, \sigma_t^2 I)`
(Anderson 1982; Song et al. 2021, eq. 6) is

.. math::  dx = [f(x, t) - g(t)^2 s(x, t)]\,dt + g(t)\,d\bar w .

In the half log-SNR :math:`\lambda_t = \log(\alpha_t/\sigma_t)` and the data prediction
:math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t` (``ode_solvers.data_prediction``) its linear
part integrates exactly (Lu et al. 2022, DPM-Solver++ sec. 5 and App. B): from :math:`s`
to :math:`t`, :math:`h = \lambda_t - \lambda_s > 0`,

.. math::  x_t = \frac{\sigma_t}{\sigma_s} e^{-h} x_s
   + 2\alpha_t \int_{\lambda_s}^{\lambda_t} e^{-2(\lambda_t - \lambda)}\,
   \hat x_0(x_\lambda, \lambda)\,d\lambda + \sigma_t\sqrt{1 - e^{-2h}}\;z ,

which needs only :math:`\alpha_t`, :math:`\sigma_t`, :math:`\lambda_t` and the score, so it
holds for every path with ``marginal_coeffs`` and ``log_snr`` (VP, sub-VP, VE).

Fixed-step solvers are steps ``(sde, score_fn, x, t, t_next, noise, history) -> (x, x_mean,
history)`` (``noise`` a standard normal draw shaped like ``x``, ``x_mean`` the step without
it) looped by ``lax.scan`` over a time grid of ``ode_solvers.TIME_GRIDS``:

- ``dpm_solver_1_sde``: SDE-DPM-Solver++(1), :math:`\hat x_0` constant over the step; order 1,
  1 evaluation per step.
- ``dpm_solver_2_sde``: SDE-DPM-Solver++(2M), :math:`\hat x_0` linear in :math:`\lambda`
  through the previous step's data prediction (multistep); 1 evaluation per step.

``adaptive``: Jolicoeur-Martineau et al. (2021, "Gotta Go Fast", Algorithm 1): per example,
an Euler--Maruyama proposal and a stochastic improved-Euler step with the same noise, whose
difference is the error estimate; the improved-Euler result is kept (extrapolation) when the
scaled error is at most 1, and the step size follows :math:`h \leftarrow \min(t - \epsilon,
\theta h E^{-r})`. Two evaluations per attempt, in a ``lax.while_loop`` on device.
``adaptive_per_example`` is the paper's, each example with its own time and step size;
``adaptive`` takes one step size for the batch from the error over all of it. In 2-D the
per-example error of one attempt depends on its noise draw so much that rejecting large
draws (and drawing again) narrows the modes: on the 2-D mixture benchmark it is 3-4x the
sliced-Wasserstein noise floor at any tolerance, the batch-wide one at the floor with half
the NFE (``experiments/benchmarks/samplers.py``); in 16-D both are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_sde import ode_solvers
from diffusion_sde.ode_solvers import data_prediction, time_grid
from diffusion_sde.sde import SDE, ScoreFn, batch_broadcast

# Jolicoeur-Martineau et al.'s (2021) defaults: safety factor theta, exponent r, first step.
ADAPTIVE_SAFETY = 0.9
ADAPTIVE_EXPONENT = 0.9
ADAPTIVE_INITIAL_STEP = 0.01


# --- Fixed-step: (sde, score_fn, x, t, t_next, noise, history) -> (x, x_mean, history) ----


def dpm_solver_sde_step(sde, score_fn, x, t, t_next, noise, history, *, order):
    r"""SDE-DPM-Solver++(1) (``order=1``) or (2M) (``order=2``) from ``t`` to ``t_next``
    (Lu et al. 2022, DPM-Solver++ eqs. 17--18): with :math:`h = \lambda_{t'} - \lambda_t`,

    .. math::  x_{t'} = \frac{\sigma_{t'}}{\sigma_t} e^{-h} x_t
       + \alpha_{t'}(1 - e^{-2h})\Big[\hat x_0 + \frac{1}{2r}(\hat x_0 - \hat x_0^{prev})\Big]
       + \sigma_{t'}\sqrt{1 - e^{-2h}}\,z,

    :math:`r = (\lambda_t - \lambda_{prev})/h` from the previous grid point (``history``); the
    bracket's second term is left out for ``order=1`` and at the first step.
    """
    x0_prev, log_snr_prev, count = history
    alpha_next, sigma_next = sde.marginal_coeffs(t_next)
    _, sigma = sde.marginal_coeffs(t)
    log_snr = sde.log_snr(t)
    h = sde.log_snr(t_next) - log_snr
    x0 = data_prediction(sde, score_fn, x, t)
    one_minus_exp_2h = -jnp.expm1(-2.0 * h)
    x0_term = x0
    if order >= 2:
        r = jnp.where(count >= 1, (log_snr - log_snr_prev) / h, 1.0)
        x0_term = jnp.where(count >= 1, x0 + (x0 - x0_prev) / (2.0 * r), x0)
    x_mean = (sigma_next / sigma) * jnp.exp(-h) * x + alpha_next * one_minus_exp_2h * x0_term
    x_next = x_mean + sigma_next * jnp.sqrt(one_minus_exp_2h) * noise
    return x_next, x_mean, (x0, log_snr, count + 1)


def _dpm_sde_history(x: jax.Array):
    """The previous grid point's data prediction and log-SNR, and the step count."""
    return jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros((), jnp.int32)


# name -> (step, initial history, evaluations per step, default time grid)
FIXED_STEP_SOLVERS: dict[str, tuple[Callable, Callable, int, str]] = {
    f"dpm_solver_{order}_sde": (
        functools.partial(dpm_solver_sde_step, order=order),
        _dpm_sde_history,
        1,
        "uniform_log_snr",
    )
    for order in (1, 2)
}
# name -> one step size per example (the paper's) or one for the whole batch.
ADAPTIVE_SOLVERS: dict[str, bool] = {"adaptive": False, "adaptive_per_example": True}
METHODS: tuple[str, ...] = (*ADAPTIVE_SOLVERS, *FIXED_STEP_SOLVERS)


# The checks and counts of ode_solvers, on this module's tables.
check_method = functools.partial(ode_solvers.check_method, kind="reverse-SDE", methods=METHODS)
fixed_step_nfe = functools.partial(ode_solvers.fixed_step_nfe, solvers=FIXED_STEP_SOLVERS)


def solve_fixed_step(
    method: str,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    noise_fn: Callable[[jax.Array, jax.Array], jax.Array],
    num_steps: int,
    eps: float,
    grid: str | None = None,
    denoise: bool = True,
) -> jax.Array:
    """Integrate the reverse SDE from ``x`` at ``T`` to ``eps`` in ``num_steps`` steps of
    ``method`` on the time grid ``grid`` (``None``: the method's default).

    ``noise_fn(i, x)`` is the standard normal draw of step ``i``. ``denoise``: the last step
    without its noise (its mean; no extra evaluation), as ``pc_sample``'s ``denoise``.
    """
    step, init_history, _, default_grid = FIXED_STEP_SOLVERS[method]
    ts = time_grid(sde, grid or default_grid, num_steps, eps)

    def body(carry, inputs):
        x, _, history = carry
        i, t, t_next = inputs
        return step(sde, score_fn, x, t, t_next, noise_fn(i, x), history), None

    steps = (jnp.arange(num_steps), ts[:-1], ts[1:])
    (x, x_mean, _), _ = jax.lax.scan(body, (x, x, init_history(x)), steps)
    return x_mean if denoise else x


# --- Adaptive ---------------------------------------------------------------------------


def _per_example_rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


def solve_adaptive(
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    key: jax.Array,
    *,
    eps: float,
    rtol: float,
    atol: float,
    max_steps: int = 4096,
    initial_step: float = ADAPTIVE_INITIAL_STEP,
    safety: float = ADAPTIVE_SAFETY,
    exponent: float = ADAPTIVE_EXPONENT,
    per_example: bool = True,
) -> tuple[jax.Array, jax.Array]:
    r"""The adaptive reverse-SDE solver of Jolicoeur-Martineau et al. (2021, Algorithm 1),
    on device; ``per_example``: each example with its own time and step size (the paper's),
    else one for the batch, from the rms of the per-example errors.

    One attempt from :math:`t` with step :math:`h` and noise :math:`z`, with the reverse
    drift :math:`\mu = f - g^2 s`:

    .. math::  x' = x - h\,\mu(x, t) + \sqrt h\,g(t)\,z, \qquad
       \tilde x = x - h\,\mu(x', t - h) + \sqrt h\,g(t - h)\,z, \qquad
       x'' = \tfrac12 (x' + \tilde x),

    error :math:`E = \lVert (x' - x'') / \delta \rVert_{rms}` with
    :math:`\delta = \max(\epsilon_{abs}, \epsilon_{rel}\max(|x'|, |x'_{prev}|))`
    (:math:`x'_{prev}` the last accepted proposal); accept :math:`x \leftarrow x''` if
    :math:`E \le 1`; then :math:`h \leftarrow \min(t - \epsilon, \theta h E^{-r})`.

    Returns ``(x, nfe)``: ``nfe`` = 2 x the attempts of the batch (every attempt evaluates
    the score twice on the whole batch, finished examples included), a scalar array.
    Stops when every example reached ``eps`` or after ``max_steps`` attempts.
    """
    batch = x.shape[:1]
    reverse = sde.reverse(score_fn)

    def attempt(state):
        i, x, x_prev, t, h = state
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        drift, diffusion = reverse.sde(x, t)
        k1 = -batch_broadcast(h, x) * drift + batch_broadcast(diffusion * jnp.sqrt(h), x) * z
        x_euler = x + k1
        drift2, diffusion2 = reverse.sde(x_euler, t - h)
        k2 = -batch_broadcast(h, x) * drift2 + batch_broadcast(diffusion2 * jnp.sqrt(h), x) * z
        x_heun = x + 0.5 * (k1 + k2)
        tolerance = jnp.maximum(atol, rtol * jnp.maximum(jnp.abs(x_euler), jnp.abs(x_prev)))
        error = _per_example_rms((x_euler - x_heun) / tolerance)
        if not per_example:  # One step size for the batch: the error over all of it.
            error = jnp.full(batch, jnp.sqrt(jnp.mean(jnp.square(error))), error.dtype)
        accept = error <= 1.0
        x = jnp.where(batch_broadcast(accept, x), x_heun, x)
        x_prev = jnp.where(batch_broadcast(accept, x), x_euler, x_prev)
        t = jnp.where(accept, t - h, t)
        # Examples that have arrived keep h = 0 (and an error of 0).
        grown = safety * h * jnp.where(h > 0, error, 1.0) ** -exponent
        h = jnp.minimum(jnp.maximum(t - eps, 0.0), grown)
        return i + 1, x, x_prev, t, h

    def running(state):
        i, _, _, t, _ = state
        return (i < max_steps) & jnp.any(t - eps > 1e-6)

    t0 = jnp.full(batch, sde.T, x.dtype)
    h0 = jnp.full(batch, jnp.minimum(initial_step, sde.T - eps), x.dtype)
    attempts, x, _, _, _ = jax.lax.while_loop(running, attempt, (0, x, x, t0, h0))
    return x, 2 * attempts
