r"""Samplers: predictor--corrector for the reverse SDE, and the probability-flow ODE.

Every sampler takes a score function ``score_fn(x, t)`` and returns ``(samples, nfe)``,
where ``nfe`` counts the score evaluations actually performed (a batch counts once).

**Predictor--corrector** (Song et al. 2021, Algorithm 1): on the grid
:math:`t_i = T - i (T - \epsilon)/(n - 1)`, :math:`i = 0, \dots, n-1` (``linspace(T, eps, n)``
as in the 2021 reference), each step first applies ``n_steps`` corrector (MCMC) moves at
:math:`t_i` and then one predictor move of the reverse SDE from :math:`t_i` to
:math:`t_{i+1}` (to :math:`0` after the last grid point). The discrete predictors and
correctors use the SDE's own discretisation with ``N = n`` (``sde.replace(N=n)``): step
``i`` is level ``n - 1 - i`` of the DDPM chain for VP, of the SMLD noise levels for VE, so
with ``n = sde.N`` they are exactly DDPM's and SMLD's samplers; the score is evaluated at
:math:`t_i`, whose ``eps > 0`` keeps :math:`\sigma_t > 0`.

**Probability-flow ODE** (``ode_sample``): see :mod:`diffusion_sde.ode_solvers`.

**Few-step reverse SDE** (``sde_sample``): see :mod:`diffusion_sde.sde_solvers`.

Randomness: ``key`` is split once into a prior key and a loop key; step ``i`` uses
``fold_in(loop_key, i)``, split into a corrector key (folded again with the corrector
move ``j``), a predictor key and a move key for the function that :func:`pc_loop` may
apply after every move (inpainting's). Independent implementations can thus replay the noise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from diffusion_sde import ode_solvers, sde_solvers
from diffusion_sde.sde import EDMSDE, SDE, VESDE, VPSDE, ScoreFn, batch_broadcast, subVPSDE


class GridPoint(NamedTuple):
    """Where a predictor--corrector step stands.

    ``t`` is the time at which the score is evaluated and ``t_next`` the time the predictor
    moves to, both ``(B,)``; ``index`` is the level of ``t`` in the SDE's discrete chain.
    """

    t: jax.Array
    t_next: jax.Array
    index: jax.Array


def _normal(key: jax.Array, x: jax.Array) -> jax.Array:
    return jax.random.normal(key, x.shape, x.dtype)


def _chain_time(sde: SDE, index: jax.Array, x: jax.Array) -> jax.Array:
    """The grid time ``index * T / (N - 1)`` of a discrete level, shaped ``(B,)``."""
    return jnp.full(x.shape[:1], index * sde.T / (sde.N - 1), x.dtype)


# --- Predictors: (key, sde, score_fn, x, point, probability_flow) -> (x, x_mean) ---------

Step = tuple[jax.Array, jax.Array]  # The new x and its mean (x without the step's noise).


def euler_maruyama_predictor(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint,
    probability_flow: bool,
) -> Step:  # fmt: skip
    r"""Euler--Maruyama on the reverse SDE (or probability-flow ODE),
    :math:`\Delta t = t_{next} - t < 0`:

    .. math::  \bar x = x + [f(x, t) - c\,g(t)^2 s(x, t)]\,\Delta t, \qquad
       x' = \bar x + g(t)\sqrt{-\Delta t}\,z,

    with :math:`c = 1` (no noise term and :math:`c = 1/2` for the probability flow).
    """
    drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, point.t)
    dt = point.t_next - point.t
    x_mean = x + batch_broadcast(dt, x) * drift
    if probability_flow:
        return x_mean, x_mean
    return x_mean + batch_broadcast(diffusion * jnp.sqrt(-dt), x) * _normal(key, x), x_mean


def reverse_diffusion_predictor(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint,
    probability_flow: bool,
) -> Step:  # fmt: skip
    r"""Reverse diffusion (Song et al. 2021, eq. 46) of the discretisation
    :math:`x_{i+1} = x_i + f_i(x_i) + G_i z_i` (``sde.discretize``):

    .. math::  \bar x = x - f_i(x) + c\,G_i^2\,s(x, t), \qquad x' = \bar x + G_i z,

    with :math:`c = 1` (no noise term and :math:`c = 1/2` for the probability flow).
    """
    # The chain's coefficients at its own level, the score at the sampler's time.
    score_at_t = lambda y, _: score_fn(y, point.t)
    f_rev, g_rev = sde.reverse(score_at_t, probability_flow).discretize(
        x, _chain_time(sde, point.index, x)
    )
    x_mean = x - f_rev
    if probability_flow:
        return x_mean, x_mean
    return x_mean + batch_broadcast(g_rev, x) * _normal(key, x), x_mean


def ancestral_sampling_predictor(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint,
    probability_flow: bool,
) -> Step:  # fmt: skip
    r"""Ancestral sampling of the discrete chain.

    VP, DDPM (Ho et al. 2020, Algorithm 2 with :math:`\sigma_i^2 = \beta_i` and
    :math:`\epsilon_\theta = -\sqrt{1 - \bar\alpha_i}\,s`):
    :math:`\bar x = (x + \beta_i s)/\sqrt{1 - \beta_i}`, :math:`x' = \bar x + \sqrt{\beta_i} z`.

    VE, SMLD (Song et al. 2021, eq. 47), with :math:`\sigma_{-1} = 0`:
    :math:`\bar x = x + (\sigma_i^2 - \sigma_{i-1}^2) s`,
    :math:`x' = \bar x + \sqrt{\sigma_{i-1}^2(\sigma_i^2 - \sigma_{i-1}^2)/\sigma_i^2}\,z`.
    """
    del probability_flow  # Rejected in `pc_sample`.
    score = score_fn(x, point.t)
    if isinstance(sde, VPSDE):
        beta = sde.discrete_betas[point.index]
        x_mean = (x + beta * score) / jnp.sqrt(1.0 - beta)
        std = jnp.sqrt(beta)
    else:
        sigmas = sde.discrete_sigmas
        sigma = sigmas[point.index]
        sigma_prev = jnp.where(point.index == 0, 0.0, sigmas[jnp.maximum(point.index - 1, 0)])
        x_mean = x + (sigma**2 - sigma_prev**2) * score
        std = jnp.sqrt(sigma_prev**2 * (sigma**2 - sigma_prev**2) / sigma**2)
    return x_mean + std * _normal(key, x), x_mean


def identity_step(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint, option: Any
) -> Step:
    """No move, ``(x, x)``: the ``none`` predictor (corrector-only sampling) and the ``none``
    corrector (predictor-only sampling)."""
    return x, x


# name -> (predictor, score evaluations per call)
PREDICTORS: dict[str, tuple[Callable, int]] = {
    "euler_maruyama": (euler_maruyama_predictor, 1),
    "reverse_diffusion": (reverse_diffusion_predictor, 1),
    "ancestral_sampling": (ancestral_sampling_predictor, 1),
    "none": (identity_step, 0),
}


# --- Correctors: one move (key, sde, score_fn, x, point, snr) -> (x, x_mean) --------------


def _ddpm_alpha(sde: SDE, index: jax.Array) -> jax.Array:
    r"""The :math:`\alpha_i = 1 - \beta_i` of DDPM's chain that scales the Langevin step on VP
    (Song et al. 2021, Algorithm 5). Sub-VP has VP's :math:`\beta(t)` and :math:`\alpha_t`,
    so it uses the same :math:`\alpha_i`; VE uses 1 (Algorithm 4)."""
    if isinstance(sde, VPSDE | subVPSDE):
        betas = VPSDE(beta_min=sde.beta_min, beta_max=sde.beta_max, N=sde.N).discrete_betas
        return 1.0 - betas[index]
    return jnp.ones(())


def _langevin_move(key, score_fn, x, point, step_size_fn):
    r"""The Langevin move :math:`\bar x = x + \epsilon s(x, t)`,
    :math:`x' = \bar x + \sqrt{2\epsilon}\,z`, with :math:`\epsilon` from ``step_size_fn``."""
    score = score_fn(x, point.t)
    noise = _normal(key, x)
    step_size = step_size_fn(score, noise)
    x_mean = x + batch_broadcast(step_size, x) * score
    return x_mean + batch_broadcast(jnp.sqrt(2.0 * step_size), x) * noise, x_mean


def langevin_corrector(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint, snr: float
) -> Step:
    r"""One move of Langevin MCMC with a step set by the signal-to-noise ratio ``snr`` =
    :math:`r` (Song et al. 2021, Algorithms 4 and 5):

    .. math::  \epsilon = 2\,\alpha_i\,(r\,\lVert z \rVert / \lVert s \rVert)^2,

    where the norms are averaged over the batch, as in the 2021 reference (a per-example
    ratio is unstable in low dimension, where :math:`\lVert s \rVert` can vanish at a mode).
    :math:`\alpha_i = 1 - \beta_i` of the DDPM chain at level ``i`` on VP and on sub-VP,
    which has VP's :math:`\beta(t)` (the 2021 reference fails on sub-VP); 1 on VE.
    """
    alpha = _ddpm_alpha(sde, point.index)

    def step_size(score, noise):
        score_norm = jnp.mean(jnp.linalg.norm(score.reshape(x.shape[0], -1), axis=-1))
        noise_norm = jnp.mean(jnp.linalg.norm(noise.reshape(x.shape[0], -1), axis=-1))
        return jnp.full(x.shape[:1], 2.0 * alpha * (snr * noise_norm / score_norm) ** 2)

    return _langevin_move(key, score_fn, x, point, step_size)


def ald_corrector(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, x: jax.Array, point: GridPoint, snr: float
) -> Step:
    r"""One move of annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) with the step

    .. math::  \epsilon = 2\,\alpha_i\,(r\,\sigma_t)^2,

    :math:`\sigma_t` the marginal std, :math:`r` = ``snr`` and :math:`\alpha_i` as in
    ``langevin_corrector``. Song & Ermon's move :math:`x + \tfrac12 a_i s + \sqrt{a_i} z`
    with :math:`a_i = \epsilon_{SE} \sigma_i^2/\sigma_L^2` is this one with
    :math:`a_i = 2\epsilon`, i.e. :math:`\epsilon_{SE} = 4 r^2 \sigma_L^2` (on VE).
    """
    alpha = _ddpm_alpha(sde, point.index)
    _, sigma = sde.marginal_coeffs(point.t)
    step_size = 2.0 * alpha * (snr * sigma) ** 2
    return _langevin_move(key, score_fn, x, point, lambda score, noise: step_size)


# name -> (corrector move, score evaluations per move)
CORRECTORS: dict[str, tuple[Callable, int]] = {
    "langevin": (langevin_corrector, 1),
    "ald": (ald_corrector, 1),
    "none": (identity_step, 0),
}


# --- The predictor-corrector sampler -----------------------------------------------------

_static = functools.partial(flax.struct.field, pytree_node=False)


@flax.struct.dataclass
class PCOptions:
    """The options of the predictor--corrector sampler, with their defaults; each is an
    argument of :func:`pc_sample` (see there). ``snr`` and ``eps`` are traced, the others
    static (a new value compiles the loop anew)."""

    predictor: str = _static(default="reverse_diffusion")
    corrector: str = _static(default="langevin")
    snr: float = 0.16
    n_steps: int = _static(default=1)
    num_steps: int | None = _static(default=None)
    probability_flow: bool = _static(default=False)
    denoise: bool = _static(default=True)
    eps: float = 1e-3


def with_pc_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function(*arguments, options: PCOptions)`` as its users call it: the fields of
    :class:`PCOptions` as keyword-only arguments (with their defaults) in place of
    ``options``, and the signature saying so."""
    signature = inspect.signature(function)
    fields = dataclasses.fields(PCOptions)
    parameters = [p for name, p in signature.parameters.items() if name != "options"] + [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type
        )
        for f in fields
    ]
    public = signature.replace(parameters=parameters)

    @functools.wraps(function)
    def with_options(*args, **kwargs):
        arguments = public.bind(*args, **kwargs)
        arguments.apply_defaults()
        values = arguments.arguments
        options = PCOptions(**{f.name: values.pop(f.name) for f in fields})
        return function(**values, options=options)

    with_options.__signature__ = public
    return with_options


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"Unknown {what} {name!r}; valid: {sorted(table)}")
    return table[name]


def _check_ddpm_chain(sde: SDE, predictor: str, corrector: str, num_steps: int) -> None:
    """DDPM's chain with N = num_steps needs beta_i = beta(t_i) / N < 1; checked when the
    SDE's parameters are concrete (not traced by an enclosing jit)."""
    uses_chain = predictor in ("reverse_diffusion", "ancestral_sampling") or corrector != "none"
    if not (uses_chain and isinstance(sde, VPSDE | subVPSDE)):
        return
    try:
        beta_max = float(sde.beta_max)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return
    if beta_max / num_steps >= 1.0:
        raise ValueError(
            f"num_steps={num_steps} is too small for the DDPM chain used by predictor "
            f"{predictor!r} / corrector {corrector!r} (beta_max / num_steps = "
            f"{beta_max / num_steps:.2f} >= 1): use num_steps > {beta_max:g}, or "
            f"predictor='euler_maruyama' with corrector='none', or ode_sample."
        )


def check_pc_options(sde: SDE, options: PCOptions, prefix: str = "") -> PCOptions:
    """``options`` with ``num_steps=None`` made ``sde.N``, after rejecting unknown names
    (the error names the field as ``prefix + "predictor"``) and undefined combinations
    before tracing, with a message saying why."""
    _lookup(PREDICTORS, options.predictor, prefix + "predictor")
    _lookup(CORRECTORS, options.corrector, prefix + "corrector")
    num_steps = sde.N if options.num_steps is None else options.num_steps
    predictor, corrector = options.predictor, options.corrector
    if predictor == "ancestral_sampling":
        if not isinstance(sde, VPSDE | VESDE):
            raise ValueError(
                f"ancestral_sampling is defined for VPSDE (DDPM) and VESDE (SMLD), not for "
                f"{type(sde).__name__}: use 'reverse_diffusion' or 'euler_maruyama'."
            )
        if options.probability_flow:
            raise ValueError(
                "ancestral_sampling has no probability-flow form: use 'reverse_diffusion' or "
                "'euler_maruyama' with probability_flow=True, or ode_sample (e.g. method='ddim')."
            )
    if num_steps < 2:
        raise ValueError(f"pc_sample needs num_steps >= 2, got {num_steps}.")
    _check_ddpm_chain(sde, predictor, corrector, num_steps)
    return options.replace(num_steps=num_steps)


def pc_nfe(options: PCOptions) -> int:
    """Score evaluations of the sampler with ``options`` (``num_steps`` set):
    ``num_steps * (predictor evaluations + n_steps * corrector evaluations)``."""
    _, predictor_nfe = PREDICTORS[options.predictor]
    _, corrector_nfe = CORRECTORS[options.corrector]
    return options.num_steps * (predictor_nfe + options.n_steps * corrector_nfe)


# after_move(key, x, x_mean, t) -> (x, x_mean): applied after every move, at the time t the
# sample stands at; key as in the module docstring.
AfterMove = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], Step]


def pc_loop(
    loop_key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    x: jax.Array,
    options: PCOptions,
    after_move: AfterMove | None = None,
) -> jax.Array:
    r"""The predictor--corrector loop from ``x`` at ``T`` (see :func:`pc_sample`), with
    ``options`` from :func:`check_pc_options`; traceable, not compiled by itself.

    ``after_move``, if given, is applied after every corrector move at :math:`t_i` and
    after the predictor's move to :math:`t_{i+1}`, as ``(x, x_mean) = after_move(key, x,
    x_mean, t)`` with ``t`` the time the sample then stands at (shape ``(B,)``) and ``key``
    ``fold_in(move_key, j)`` for corrector move ``j``, ``fold_in(move_key, n_steps)`` after
    the predictor (``move_key`` of step ``i`` as in the module docstring). Without it the
    loop is Algorithm 1 as it stands; with it, e.g. inpainting.

    Returns:
      the last ``x_mean`` (``options.denoise``) or ``x``.
    """
    predictor_fn, _ = PREDICTORS[options.predictor]
    corrector_fn, _ = CORRECTORS[options.corrector]
    num_steps, n_steps = options.num_steps, options.n_steps
    chain = sde.replace(N=num_steps)
    timesteps = jnp.linspace(sde.T, options.eps, num_steps)
    next_timesteps = jnp.append(timesteps[1:], 0.0)
    batch = jnp.ones(x.shape[:1], x.dtype)
    after = after_move or (lambda key, x, x_mean, t: (x, x_mean))

    def step(carry, inputs):
        x, _ = carry
        i, t, t_next = inputs
        # split(k, 3)[:2] is split(k, 2) (JAX's partitionable threefry): adding the third
        # key, after_move's, leaves the corrector and predictor noise as it was.
        corrector_key, predictor_key, move_key = jax.random.split(
            jax.random.fold_in(loop_key, i), 3
        )
        point = GridPoint(t * batch, t_next * batch, num_steps - 1 - i)

        def corrector_move(j, carry):
            x, _ = carry
            x, x_mean = corrector_fn(
                jax.random.fold_in(corrector_key, j), chain, score_fn, x, point, options.snr
            )
            return after(jax.random.fold_in(move_key, j), x, x_mean, point.t)

        if options.corrector != "none":  # else no move, and nothing to apply after it
            x, _ = jax.lax.fori_loop(0, n_steps, corrector_move, (x, x))
        x, x_mean = predictor_fn(predictor_key, chain, score_fn, x, point, options.probability_flow)
        key = jax.random.fold_in(move_key, n_steps)
        return after(key, x, x_mean, point.t_next), None

    steps = (jnp.arange(num_steps), timesteps, next_timesteps)
    (x, x_mean), _ = jax.lax.scan(step, (x, x), steps)
    return x_mean if options.denoise else x


@functools.partial(jax.jit, static_argnames=("score_fn", "shape"))
def _pc_samples(key, sde, score_fn, shape, options):
    prior_key, loop_key = jax.random.split(key)
    x = sde.prior_sampling(prior_key, shape)
    return pc_loop(loop_key, sde, score_fn, x, options)


@with_pc_options
def pc_sample(
    key: jax.Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], *, options: PCOptions
) -> tuple[jax.Array, int]:
    r"""Predictor--corrector sampling of the reverse SDE (Song et al. 2021, Algorithm 1).

    Starting from :math:`x \sim p_T` (``sde.prior_sampling``), for each :math:`t_i` of
    ``linspace(T, eps, num_steps)``: ``n_steps`` corrector moves at :math:`t_i`, then one
    predictor move to :math:`t_{i+1}` (to 0 after the last point). The discrete predictors
    and correctors use ``sde.replace(N=num_steps)``, level ``num_steps - 1 - i`` at step
    ``i`` (see the module docstring); for VP this needs ``num_steps > beta_max``.

    The keyword arguments are the fields of :class:`PCOptions`, with its defaults.

    Args:
      key: PRNG key (split and folded with the step index as in the module docstring).
      sde: the forward SDE.
      score_fn: ``score_fn(x, t)``; a static argument of the compiled loop: pass the same
        function object (or a bound method of the same object) to reuse the compilation, or
        call the sampler inside your own ``jax.jit``.
      shape: ``(B, *dims)`` of the samples.
      predictor: one of ``PREDICTORS``: ``euler_maruyama``, ``reverse_diffusion``,
        ``ancestral_sampling`` (VP and VE only), ``none``.
      corrector: one of ``CORRECTORS``: ``langevin``, ``ald``, ``none``.
      snr: the signal-to-noise ratio :math:`r` of the corrector's step size.
      n_steps: corrector moves per grid point.
      num_steps: number of grid points; ``None`` means ``sde.N``.
      probability_flow: let the predictor follow the probability-flow ODE instead.
      denoise: return the mean of the last update, without its noise (as the reference and
        DDPM, whose last step adds no noise); costs no extra evaluation.
      eps: the last grid time.

    Returns:
      ``(samples, nfe)``: samples of shape ``shape`` and
      ``nfe = num_steps * (predictor evaluations + n_steps * corrector evaluations)``.
    """
    options = check_pc_options(sde, options)
    return _pc_samples(key, sde, score_fn, tuple(shape), options), pc_nfe(options)


# --- The probability-flow ODE sampler ----------------------------------------------------


def ode_sample(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    *,
    method: str = "adaptive",
    num_steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    eps: float = 1e-3,
    denoise: bool = False,
    time_grid: str | None = None,
) -> tuple[jax.Array, jax.Array | int]:
    r"""Sample by integrating the probability-flow ODE (Song et al. 2021, eq. 13)

    .. math::  \frac{dx}{dt} = f(x, t) - \tfrac12 g(t)^2\,s(x, t)

    from :math:`x_T \sim p_T` (drawn with ``key``) down to :math:`t = \epsilon`.

    Args:
      key: PRNG key of the prior sample :math:`x_T` = ``sde.prior_sampling(key, shape)``
        (the ODE itself is deterministic).
      sde, score_fn, shape: as in ``pc_sample``.
      method: one of ``ode_solvers.METHODS``: ``adaptive`` (Dopri5 with a PID step-size
        controller, in diffrax, on device), ``euler``, ``heun``, ``ddim``,
        ``dpm_solver_2``, ``dpm_solver_3``; see :mod:`diffusion_sde.ode_solvers`.
      num_steps: steps of a fixed-step method; ``None`` means ``sde.N``. Ignored by
        ``adaptive``.
      rtol, atol: tolerances of ``adaptive`` (at most 4,096 steps, else a ``RuntimeError``;
        NaN samples under ``jit``).
      eps: the final time.
      denoise: finish with Tweedie's denoiser at :math:`\epsilon`,
        :math:`\hat x_0 = (x + \sigma_\epsilon^2 s(x, \epsilon))/\alpha_\epsilon`
        (one more evaluation).
      time_grid: ``uniform_t``, ``uniform_log_snr`` or ``karras`` (``ode_solvers.TIME_GRIDS``);
        ``None`` picks the method's default. Ignored by ``adaptive``.

    Returns:
      ``(samples, nfe)``; ``nfe`` is a Python int for fixed-step methods and a scalar
      array (every evaluation of the adaptive solver counted) for ``adaptive``.
    """
    num_steps = sde.N if num_steps is None else num_steps
    ode_solvers.check_method(method, time_grid)
    samples, adaptive_nfe, reached = _ode_loop(
        key, sde, score_fn, tuple(shape), method, num_steps, rtol, atol, eps, denoise, time_grid
    )
    if method == "adaptive":
        ode_solvers.raise_unless_reached(reached)
        return samples, adaptive_nfe + int(denoise)
    return samples, ode_solvers.fixed_step_nfe(method, num_steps) + int(denoise)


@functools.partial(
    jax.jit, static_argnames=("score_fn", "shape", "method", "num_steps", "denoise", "time_grid")
)
def _ode_loop(key, sde, score_fn, shape, method, num_steps, rtol, atol, eps, denoise, time_grid):
    x = sde.prior_sampling(key, shape)
    adaptive_nfe = reached = None
    if method == "adaptive":
        x, adaptive_nfe, reached = ode_solvers.solve_adaptive(
            sde, score_fn, x, eps=eps, rtol=rtol, atol=atol
        )
    else:
        x = ode_solvers.solve_fixed_step(method, sde, score_fn, x, num_steps, eps, time_grid)
    if denoise:
        x = ode_solvers.tweedie_denoise(sde, score_fn, x, eps)
    return x, adaptive_nfe, reached


# --- Few-step reverse-SDE solvers ---------------------------------------------------------


def sde_sample(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    *,
    method: str = "dpm_solver_2_sde",
    num_steps: int | None = None,
    rtol: float = 0.05,
    atol: float = 0.0078,
    eps: float = 1e-3,
    denoise: bool = True,
    time_grid: str | None = None,
) -> tuple[jax.Array, jax.Array | int]:
    r"""Sample the reverse SDE :math:`dx = [f - g^2 s]\,dt + g\,d\bar w` from
    :math:`x_T \sim p_T` down to :math:`t = \epsilon` with a few-step solver.

    Args:
      key: PRNG key, split into the prior's and the loop's; step (or attempt) ``i`` draws
        its noise from ``fold_in(loop_key, i)``.
      sde, score_fn, shape: as in ``pc_sample``.
      method: one of ``sde_solvers.METHODS``: ``dpm_solver_1_sde``, ``dpm_solver_2_sde``
        (SDE-DPM-Solver++(1) and (2M)), ``adaptive`` (Jolicoeur-Martineau et al. 2021 with
        one step size for the batch), ``adaptive_per_example`` (theirs, one per example).
      num_steps: steps of a fixed-step method; ``None`` means ``sde.N``. Ignored by
        ``adaptive``.
      rtol, atol: ``adaptive``'s tolerances (the paper's :math:`\epsilon_{rel}` and
        :math:`\epsilon_{abs}`; its defaults for data in [-1, 1]).
      eps: the final time.
      denoise: fixed-step methods: the last step without its noise (no extra evaluation,
        as ``pc_sample``); ``adaptive``: Tweedie's denoiser at :math:`\epsilon` (one more
        evaluation, as the paper).
      time_grid: one of ``ode_solvers.TIME_GRIDS``; ``None`` picks the method's default.

    Returns:
      ``(samples, nfe)``; ``nfe`` a Python int for fixed-step methods and a scalar array
      (2 per attempted step, + 1 for ``denoise``) for ``adaptive``.
    """
    num_steps = sde.N if num_steps is None else num_steps
    sde_solvers.check_method(method, time_grid)
    samples, adaptive_nfe = _sde_loop(
        key, sde, score_fn, tuple(shape), method, num_steps, rtol, atol, eps, denoise, time_grid
    )
    if method in sde_solvers.ADAPTIVE_SOLVERS:
        return samples, adaptive_nfe + int(denoise)
    return samples, sde_solvers.fixed_step_nfe(method, num_steps)


@functools.partial(
    jax.jit, static_argnames=("score_fn", "shape", "method", "num_steps", "denoise", "time_grid")
)
def _sde_loop(key, sde, score_fn, shape, method, num_steps, rtol, atol, eps, denoise, time_grid):
    prior_key, loop_key = jax.random.split(key)
    x = sde.prior_sampling(prior_key, shape)
    if method in sde_solvers.ADAPTIVE_SOLVERS:
        x, nfe = sde_solvers.solve_adaptive(
            sde, score_fn, x, loop_key, eps=eps, rtol=rtol, atol=atol,
            per_example=sde_solvers.ADAPTIVE_SOLVERS[method],
        )  # fmt: skip
        if denoise:
            x = ode_solvers.tweedie_denoise(sde, score_fn, x, eps)
        return x, nfe
    noise_fn = lambda i, y: _normal(jax.random.fold_in(loop_key, i), y)
    x = sde_solvers.solve_fixed_step(
        method, sde, score_fn, x, noise_fn, num_steps, eps, time_grid, denoise
    )
    return x, None


# --- EDM's sampler -----------------------------------------------------------------------


def edm_sigmas(sde: SDE, num_steps: int, eps: float, rho: float = 7.0) -> jax.Array:
    r"""EDM's noise levels (Karras et al. 2022, eq. 5) on the scaled noise level
    :math:`\tilde\sigma = \sigma_t/\alpha_t`: ``num_steps`` levels with
    :math:`\tilde\sigma_i^{1/\rho}` uniform from :math:`\tilde\sigma_T` to
    :math:`\tilde\sigma_\epsilon`, then :math:`\tilde\sigma_N = 0`; shape ``(num_steps + 1,)``."""
    sigma_max, sigma_min = jnp.exp(-sde.log_snr(jnp.array([sde.T, eps], jnp.float32)))
    ramp = jnp.linspace(0.0, 1.0, num_steps)
    inv_rho = 1.0 / rho
    sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return jnp.append(sigmas, 0.0)


def _edm_denoiser(sde: SDE, score_fn: ScoreFn, x_tilde: jax.Array, sigma: jax.Array):
    r""":math:`D(\tilde x; \tilde\sigma)`: the data prediction at the time ``t`` of the path
    whose :math:`\sigma_t/\alpha_t` is ``sigma``, at :math:`x = \alpha_t \tilde x`."""
    t = sde.t_from_log_snr(-jnp.log(sigma))
    alpha, _ = sde.marginal_coeffs(t)
    return ode_solvers.data_prediction(sde, score_fn, alpha * x_tilde, t)


@functools.partial(jax.jit, static_argnames=("score_fn", "shape", "num_steps"))
def _edm_loop(key, sde, score_fn, shape, num_steps, rho, s_churn, s_tmin, s_tmax, s_noise, eps):
    sigmas = edm_sigmas(sde, num_steps, eps, rho)
    prior_key, loop_key = jax.random.split(key)
    alpha_T, _ = sde.marginal_coeffs(jnp.asarray(sde.T, jnp.float32))
    x = sde.prior_sampling(prior_key, shape) / alpha_T  # x~ = x / alpha, std sigma~_T
    gamma_max = jnp.minimum(s_churn / num_steps, jnp.sqrt(2.0) - 1.0)
    denoiser = functools.partial(_edm_denoiser, sde, score_fn)

    def churn(i, x, sigma):
        # Algorithm 2, lines 4-6: raise the noise level by gamma and add the matching noise.
        gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        noise = s_noise * _normal(jax.random.fold_in(loop_key, i), x)
        # sqrt(sigma_hat^2 - sigma^2) written so that round-off cannot make it negative.
        return x + sigma * jnp.sqrt(gamma * (2.0 + gamma)) * noise, sigma_hat

    def heun_step(x, inputs):
        # Algorithm 2, lines 7-10: an Euler step and its second-order correction.
        i, sigma, sigma_next = inputs
        x_hat, sigma_hat = churn(i, x, sigma)
        d = (x_hat - denoiser(x_hat, sigma_hat)) / sigma_hat
        x_euler = x_hat + (sigma_next - sigma_hat) * d
        d_next = (x_euler - denoiser(x_euler, sigma_next)) / sigma_next
        return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next), None

    steps = (jnp.arange(num_steps - 1), sigmas[:-2], sigmas[1:-1])
    x, _ = jax.lax.scan(heun_step, x, steps)
    # The last step, to sigma = 0, is Euler's: x = D(x_hat; sigma_hat), the denoised sample.
    x_hat, sigma_hat = churn(num_steps - 1, x, sigmas[-2])
    return denoiser(x_hat, sigma_hat)


def edm_sample(
    key: jax.Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    *,
    num_steps: int = 18,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    eps: float | None = None,
) -> tuple[jax.Array, int]:
    r"""EDM's sampler (Karras et al. 2022, Algorithm 2): Heun's method on the ODE
    :math:`d\tilde x/d\tilde\sigma = (\tilde x - D(\tilde x; \tilde\sigma))/\tilde\sigma` on
    the grid of :func:`edm_sigmas`, with "churn": at levels :math:`S_{tmin} \le
    \tilde\sigma_i \le S_{tmax}` the noise level is first raised to
    :math:`\hat\sigma = (1 + \gamma)\tilde\sigma_i`, :math:`\gamma = \min(S_{churn}/N,
    \sqrt2 - 1)`, by adding noise of std :math:`S_{noise}\sqrt{\hat\sigma^2 - \tilde\sigma_i^2}`.
    ``s_churn=0`` is the deterministic sampler (Algorithm 1); EDM's CIFAR-10 setting is
    ``num_steps=18``, 35 evaluations.

    On any path: :math:`\tilde x = x/\alpha_t`, :math:`\tilde\sigma = \sigma_t/\alpha_t` and
    :math:`D` is the data prediction :math:`(x + \sigma_t^2 s(x, t))/\alpha_t` at the time
    with that :math:`\tilde\sigma` (``sde.t_from_log_snr``); on ``EDMSDE`` these are EDM's
    own variables. A raised level :math:`\hat\sigma` above :math:`\tilde\sigma_T` asks the
    score at a time past ``T`` (as EDM asks its network for :math:`\sigma > \sigma_{max}`).

    Args:
      key: PRNG key: split into the prior key and the churn key (folded with the step).
      sde, score_fn, shape: as in :func:`pc_sample`.
      num_steps: noise levels above 0 (steps); the last step, to :math:`\tilde\sigma = 0`,
        is Euler's and returns the denoised sample.
      rho: the grid's exponent (7 in EDM).
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (Table 5).
      eps: the smallest time (:math:`\tilde\sigma_{min}` = that of ``eps``); ``None`` is
        :func:`default_eps`.

    Returns:
      ``(samples, nfe)`` with ``nfe = 2 num_steps - 1``.
    """
    if num_steps < 1:
        raise ValueError(f"edm_sample needs num_steps >= 1, got {num_steps}.")
    eps = default_eps(sde) if eps is None else eps
    samples = _edm_loop(
        key, sde, score_fn, tuple(shape), num_steps, rho, s_churn, s_tmin, s_tmax, s_noise, eps
    )
    return samples, 2 * num_steps - 1


# --- From a config -----------------------------------------------------------------------

# The last sampling time when the config gives none, as in the 2021 reference: VE models
# are sampled down to t = 1e-5 (sigma(1e-5) is sigma_min to 0.01%), VP and sub-VP ones to
# 1e-3 (below it the VP std falls under 1% and the score's scale 1 / sigma_t explodes).
# With N = 1000 discrete levels, both keep every grid point on its own chain level
# (``models.chain_level``).
DEFAULT_EPS: dict[type[SDE], float] = {VPSDE: 1e-3, subVPSDE: 1e-3, VESDE: 1e-5}


def default_eps(sde: SDE) -> float:
    """The default last sampling time of ``sde``'s type (:data:`DEFAULT_EPS`; ``sigma_min``
    for ``EDMSDE``, whose time is the noise level; 1e-3 else)."""
    if isinstance(sde, EDMSDE):
        return sde.sigma_min
    return DEFAULT_EPS.get(type(sde), 1e-3)


Sampler = Callable[[jax.Array, ScoreFn], tuple[jax.Array, Any]]


def get_sampler(sampling_config: Any, sde: SDE, shape: tuple[int, ...]) -> Sampler:
    """Build ``sampler(key, score_fn) -> (samples, nfe)`` from ``config.sampling``.

    Fields (the 2021 reference's names first; a missing optional field takes the default):

    - ``method``: ``'pc'`` (``pc_sample``), ``'ode'`` (``ode_sample``), ``'sde'``
      (``sde_sample``) or ``'edm'`` (``edm_sample``).
    - ``noise_removal`` (bool, default True): ``denoise``.
    - ``num_steps`` (default None = ``sde.N``), ``eps`` (default :func:`default_eps`: 1e-5
      for VE, 1e-3 for VP and sub-VP, as the 2021 reference).
    - pc: ``predictor``, ``corrector``, ``snr``, ``n_steps_each``, ``probability_flow``
      (default False).
    - ode: ``ode_method`` (default ``'adaptive'``), ``rtol``, ``atol`` (default 1e-5),
      ``time_grid`` (default None = the method's own).
    - sde: ``sde_method`` (default ``'dpm_solver_2_sde'``), ``sde_rtol`` (0.05), ``sde_atol``
      (0.0078) of ``adaptive``, ``time_grid``.
    - ``'edm'`` (``edm_sample``): ``num_steps`` (None: 18), ``rho`` (7), ``s_churn`` (0),
      ``s_tmin`` (0), ``s_tmax`` (inf), ``s_noise`` (1); ``noise_removal`` does not apply
      (the last step is the denoiser).

    Names and combinations are validated here, so a typo or an undefined combination
    fails before anything is compiled.
    """
    field = lambda name, default: sampling_config.get(name, default)
    method = sampling_config.get("method", "pc").lower()
    common = dict(
        num_steps=field("num_steps", None),
        eps=field("eps", default_eps(sde)),
        denoise=field("noise_removal", True),
    )
    if method == "pc":
        options = PCOptions(
            predictor=sampling_config.predictor.lower(),
            corrector=sampling_config.corrector.lower(),
            snr=sampling_config.snr,
            n_steps=field("n_steps_each", 1),
            probability_flow=field("probability_flow", False),
            **common,
        )
        check_pc_options(sde, options, prefix="sampling.")
        kwargs = dataclasses.asdict(options)
        return lambda key, score_fn: pc_sample(key, sde, score_fn, shape, **kwargs)
    if method == "ode":
        kwargs = dict(
            method=field("ode_method", "adaptive").lower(),
            rtol=field("rtol", 1e-5),
            atol=field("atol", 1e-5),
            time_grid=field("time_grid", None),
            **common,
        )
        ode_solvers.check_method(kwargs["method"], kwargs["time_grid"])
        return lambda key, score_fn: ode_sample(key, sde, score_fn, shape, **kwargs)
    if method == "sde":
        kwargs = dict(
            method=field("sde_method", "dpm_solver_2_sde").lower(),
            rtol=field("sde_rtol", 0.05),
            atol=field("sde_atol", 0.0078),
            time_grid=field("time_grid", None),
            **common,
        )
        sde_solvers.check_method(kwargs["method"], kwargs["time_grid"])
        return lambda key, score_fn: sde_sample(key, sde, score_fn, shape, **kwargs)
    if method == "edm":
        kwargs = dict(
            num_steps=field("num_steps", None) or 18,
            rho=field("rho", 7.0),
            s_churn=field("s_churn", 0.0),
            s_tmin=field("s_tmin", 0.0),
            s_tmax=field("s_tmax", float("inf")),
            s_noise=field("s_noise", 1.0),
            eps=common["eps"],
        )
        if kwargs["num_steps"] < 1:
            raise ValueError(f"sampling.num_steps must be >= 1, got {kwargs['num_steps']}")
        return lambda key, score_fn: edm_sample(key, sde, score_fn, shape, **kwargs)
    raise ValueError(f"Unknown sampling.method {method!r}; valid: ['edm', 'ode', 'pc', 'sde']")
