r"""Convergence order of the fixed-step probability-flow solvers, from a log-log slope.

For Gaussian data :math:`\mathcal N(\mu, s^2)` the probability-flow ODE keeps the
standardised coordinate fixed, so it maps :math:`x_T` to

.. math::  x_t = \alpha_t\mu + \frac{\sqrt{\alpha_t^2 s^2 + \sigma_t^2}}
   {\sqrt{\alpha_T^2 s^2 + \sigma_T^2}}\,(x_T - \alpha_T\mu).

The adaptive solver also says when it runs out of steps, and compiles without host
callbacks (so that the persistent compilation cache keeps its programs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_sde import likelihood, ode_solvers
from diffusion_sde.sampling import ode_sample
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE

MU, S, EPS = 0.5, 0.3, 1e-3
SHAPE = (64, 1)
SDES = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE()}


def gaussian_score(sde):
    def score_fn(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        alpha, sigma = alpha[:, None], sigma[:, None]
        return -(x - alpha * MU) / (alpha**2 * S**2 + sigma**2)

    return score_fn


def exact_flow(sde, x_T, t):
    alpha_T, sigma_T = sde.marginal_coeffs(jnp.asarray(sde.T))
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    scale = jnp.sqrt(alpha**2 * S**2 + sigma**2) / jnp.sqrt(alpha_T**2 * S**2 + sigma_T**2)
    return alpha * MU + scale * (x_T - alpha_T * MU)


# (method, time grid, step counts in the asymptotic range, order). dpm_solver_3 is measured
# on the Karras grid: on the uniform log-SNR grid it converges even faster (about 4) on
# Gaussian data, where the leading error terms cancel.
CASES = {
    "euler": ("uniform_t", (32, 64, 128), 1),
    "ddim": ("uniform_log_snr", (32, 64, 128), 1),
    "heun": ("karras", (16, 32, 64), 2),
    "dpm_solver_2": ("uniform_log_snr", (16, 32, 64), 2),
    "dpm_solver_3": ("karras", (32, 64, 128), 3),
}


@pytest.mark.parametrize(
    "sde_name, method",
    [("vp", method) for method in CASES]
    + [(sde, method) for sde in ("subvp", "ve") for method in ("heun", "dpm_solver_3")],
)
def test_convergence_order(sde_name, method):
    sde, (grid, step_counts, order) = SDES[sde_name], CASES[method]
    score_fn, key = gaussian_score(sde), jax.random.key(0)
    exact = exact_flow(sde, sde.prior_sampling(key, SHAPE), EPS)
    errors = []
    for num_steps in step_counts:
        x, nfe = ode_sample(
            key, sde, score_fn, SHAPE, method=method, num_steps=num_steps, eps=EPS, time_grid=grid
        )
        errors.append(float(jnp.max(jnp.abs(x - exact))))
    slope = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.3, f"{method}: errors {errors}, slope {slope:.2f}"


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_adaptive_solver_meets_its_tolerance(sde_name):
    sde = SDES[sde_name]
    key = jax.random.key(1)
    x, nfe = ode_sample(key, sde, gaussian_score(sde), SHAPE, rtol=1e-5, atol=1e-5, eps=EPS)
    exact = exact_flow(sde, sde.prior_sampling(key, SHAPE), EPS)
    np.testing.assert_allclose(x, exact, atol=2e-4)
    assert 20 < int(nfe) < 500


def test_adaptive_solver_that_runs_out_of_steps_says_so():
    sde = SDES["vp"]
    drift = lambda t, y, args: -0.5 * sde.beta(t) * y
    x_T = jnp.ones(SHAPE)
    x, nfe, reached = ode_solvers.integrate_adaptive(drift, x_T, sde.T, EPS, 1e-5, 1e-5, 3)
    assert not bool(reached) and bool(jnp.all(jnp.isnan(x))) and int(nfe) == 2 + 6 * 3
    with pytest.raises(RuntimeError, match="after 3 steps.*loosen rtol/atol"):
        ode_solvers.raise_unless_reached(reached, 3)
    # A score network with non-finite outputs: every step is rejected until the limit.
    nan_score = lambda x, t: jnp.full_like(x, jnp.nan)
    with pytest.raises(RuntimeError, match="after 4096 steps.*non-finite outputs"):
        ode_sample(jax.random.key(0), sde, nan_score, SHAPE, eps=EPS)
    with pytest.raises(RuntimeError, match="after 4096 steps"):
        likelihood.log_likelihood(jax.random.key(0), sde, nan_score, x_T)
    x, _ = jax.jit(lambda key: ode_sample(key, sde, nan_score, SHAPE, eps=EPS))(jax.random.key(0))
    assert bool(jnp.all(jnp.isnan(x)))  # under jit: NaN, no error


def test_adaptive_programs_have_no_host_callback():
    # JAX does not keep a program that calls back to the host in the persistent
    # compilation cache: each process would compile the adaptive solvers again.
    sde, x = SDES["vp"], jnp.ones(SHAPE)
    score_fn = gaussian_score(sde)
    programs = {
        "ode_sample": lambda key: ode_sample(key, sde, score_fn, SHAPE, eps=EPS)[0],
        "log_likelihood": lambda key: likelihood.log_likelihood(key, sde, score_fn, x)[0],
    }
    for name, program in programs.items():
        assert "callback" not in str(jax.make_jaxpr(program)(jax.random.key(0))), name
