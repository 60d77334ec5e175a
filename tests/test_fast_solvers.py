r"""The few-step solvers: UniPC's orders, the reverse-SDE solvers' weak orders, mode weights
on an exact mixture, honest NFE.

Gaussian data :math:`\mathcal N(\mu, s^2)` keeps every marginal Gaussian,
:math:`p_t = \mathcal N(\alpha_t\mu, \alpha_t^2 s^2 + \sigma_t^2)`, and its score is linear,
so a fixed-step reverse-SDE solver maps :math:`(x_T, z_0, \dots, z_{n-1})` affinely to
:math:`x_\epsilon`: the mean and variance of its samples follow exactly from the map's
Jacobian, with no Monte Carlo error, and their errors give the weak order.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_sampling_order import EPS, MU, SDES, S, exact_flow, gaussian_score

from diffusion_sde import ode_solvers, sde_solvers
from diffusion_sde.sampling import default_eps, get_sampler, ode_sample, sde_sample
from diffusion_sde.sde import EDMSDE, VESDE, VPSDE, CosineSDE, RectifiedFlow
from diffusion_sde.toy_scores import GaussianMixture

# The paths of the affine core beyond VP, sub-VP and VE.
NEW_PATHS = {"cosine": CosineSDE(), "edm": EDMSDE(), "rectified_flow": RectifiedFlow()}


def _slope(step_counts, errors) -> float:
    return -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]


# --- UniPC: order p + 1 from UniC-p, measured on Gaussian data ----------------------------


@pytest.mark.parametrize(
    "sde_name, method, step_counts, order",
    [
        ("vp", "unipc_1", (32, 64, 128), 2),
        ("vp", "unipc_1_bh2", (32, 64, 128), 2),
        ("vp", "unipc_2", (32, 64, 128), 3),
        ("vp", "unipc_3", (20, 40, 80), 4),
        ("subvp", "unipc_3", (32, 64, 128), 4),
        ("ve", "unipc_2", (32, 64, 128), 3),
        ("cosine", "unipc_3", (32, 64, 128), 4),
        ("edm", "unipc_2", (32, 64, 128), 3),
        ("rectified_flow", "unipc_2", (32, 64, 128), 3),
    ],
)
def test_unipc_convergence_order(sde_name, method, step_counts, order):
    """On the Karras grid (on the uniform log-SNR grid UniPC-3 converges faster still on
    Gaussian data, where leading error terms cancel, as for DPM-Solver-3)."""
    sde, key = (SDES | NEW_PATHS)[sde_name], jax.random.key(0)
    exact = exact_flow(sde, sde.prior_sampling(key, (64, 1)), EPS)
    errors = []
    for num_steps in step_counts:
        x, nfe = ode_sample(
            key, sde, gaussian_score(sde), (64, 1), method=method, num_steps=num_steps,
            eps=EPS, time_grid="karras",
        )  # fmt: skip
        assert nfe == num_steps
        errors.append(float(jnp.max(jnp.abs(x - exact))))
    slope = _slope(step_counts, errors)
    assert abs(slope - order) < 0.35, f"{method}: errors {errors}, slope {slope:.2f}"


def test_unipc_corrector_beats_its_predictor_at_ten_steps():
    """UniC on DPM-Solver++(3M) at 10 steps of the uniform log-SNR grid: its error is under
    half the uncorrected predictor's (measured: 0.020 against 0.048)."""
    sde, key = VPSDE(), jax.random.key(0)
    exact = exact_flow(sde, sde.prior_sampling(key, (64, 1)), EPS)
    error = {
        method: float(jnp.max(jnp.abs(ode_sample(
            key, sde, gaussian_score(sde), (64, 1), method=method, num_steps=10, eps=EPS
        )[0] - exact)))
        for method in ("dpm_solver_3", "unipc_3")
    }  # fmt: skip
    assert error["unipc_3"] < 0.5 * error["dpm_solver_3"], error


def test_unipc_b_h_matters_only_for_the_first_order_corrector():
    """For p >= 2 UniC's weights solve R_p a = g_p / B(h) exactly and B(h) cancels from
    B(h) a; for p = 1 the paper fixes a_1 = 1/2, so bh1 (B = -h) and bh2 (B = e^-h - 1)
    differ by O(h^2) per step."""
    sde, key = VPSDE(), jax.random.key(0)
    x_T = sde.prior_sampling(key, (64, 1))
    run = lambda order, variant: _solve_with_step(
        functools.partial(ode_solvers.unipc_step, order=order, variant=variant),
        ode_solvers._unipc_history, sde, x_T, 10,
    )  # fmt: skip
    for order in (2, 3):
        np.testing.assert_allclose(run(order, "bh1"), run(order, "bh2"), atol=1e-5)
    assert float(jnp.max(jnp.abs(run(1, "bh1") - run(1, "bh2")))) > 1e-3


def _solve_with_step(step, init_history, sde, x, num_steps):
    ts = ode_solvers.time_grid(sde, "uniform_log_snr", num_steps, EPS)
    score_fn, history = gaussian_score(sde), init_history(x)
    for t, t_next in zip(ts[:-1], ts[1:], strict=True):
        x, history = step(sde, score_fn, x, t, t_next, history)
    return x


# --- Reverse-SDE solvers: weak order from exact moments -----------------------------------


def _exact_marginal(sde, t):
    alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
    return float(alpha * MU), float(alpha**2 * S**2 + sigma**2)


def solver_moments(sde, method, num_steps, grid):
    """Mean and variance of ``x_eps`` for ``x_T ~ p_T`` exactly (not the prior: the prior's
    mismatch would floor the errors), from the affine map's Jacobian."""
    score_fn = gaussian_score(sde)

    def solve(x_T, noise):
        x = sde_solvers.solve_fixed_step(
            method, sde, score_fn, x_T.reshape(1, 1), lambda i, y: noise[i].reshape(1, 1),
            num_steps, EPS, grid, denoise=False,
        )  # fmt: skip
        return x[0, 0]

    mean_T, var_T = _exact_marginal(sde, sde.T)
    zeros = jnp.zeros((num_steps,))
    d_x, d_noise = jax.jacfwd(solve, argnums=(0, 1))(jnp.asarray(mean_T), zeros)
    return float(solve(jnp.asarray(mean_T), zeros)), float(d_x**2 * var_T + jnp.sum(d_noise**2))


@pytest.mark.parametrize(
    "sde_name, method, grid, order",
    [
        ("vp", "dpm_solver_1_sde", "uniform_log_snr", 1),
        ("vp", "dpm_solver_2_sde", "uniform_log_snr", 2),
        ("vp", "dpm_solver_2_sde", "karras", 2),
        ("subvp", "dpm_solver_2_sde", "uniform_log_snr", 2),
        ("ve", "dpm_solver_1_sde", "karras", 1),
        ("ve", "dpm_solver_2_sde", "uniform_log_snr", 2),
        ("cosine", "dpm_solver_2_sde", "uniform_log_snr", 2),
        ("edm", "dpm_solver_2_sde", "uniform_log_snr", 2),
        ("rectified_flow", "dpm_solver_2_sde", "uniform_log_snr", 2),
    ],
)
def test_dpm_solver_sde_weak_order(sde_name, method, grid, order):
    """The variance's error falls as h^order; the mean is exact (the data prediction of
    Gaussian data is affine and the mean's recursion has no discretisation error)."""
    sde = (SDES | NEW_PATHS)[sde_name]
    mean, var = _exact_marginal(sde, EPS)
    step_counts = (40, 80, 160)
    moments = [solver_moments(sde, method, n, grid) for n in step_counts]
    var_errors = [abs(v - var) for _, v in moments]
    assert max(abs(m - mean) for m, _ in moments) < 1e-4
    slope = _slope(step_counts, var_errors)
    assert abs(slope - order) < 0.3, f"{method}: variance errors {var_errors}, slope {slope:.2f}"


def test_adaptive_sde_solver_samples_the_gaussian_marginal():
    """100k one-dimensional samples: mean and variance within 5 standard errors."""
    sde, n = VPSDE(), 100_000
    x, nfe = sde_sample(
        jax.random.key(0), sde, gaussian_score(sde), (n, 1), method="adaptive", eps=EPS
    )
    mean, var = _exact_marginal(sde, 0.0)  # Tweedie's denoiser targets x_0.
    np.testing.assert_allclose(float(jnp.mean(x)), mean, atol=5 * np.sqrt(var / n))
    # Denoised samples have the variance of E[x_0 | x_eps]: s^2 alpha^2 s^2 / v_eps.
    alpha, _ = sde.marginal_coeffs(jnp.asarray(EPS))
    denoised_var = var * float(alpha**2 * S**2) / _exact_marginal(sde, EPS)[1]
    np.testing.assert_allclose(float(jnp.var(x)), denoised_var, rtol=5 * np.sqrt(2 / n) + 0.01)
    assert 10 < int(nfe) < 1000


# --- Exact mixture: mode weights, every path of the core -----------------------------------------------

WEIGHTS = jnp.array([0.5, 0.3, 0.2])
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
STDS = jnp.array([0.1, 0.2, 0.1])
MIXTURE_SDES = {"vp": VPSDE(), "subvp": SDES["subvp"], "ve": VESDE(sigma_max=10.0)} | NEW_PATHS
CASES = {
    "unipc_3-15": ("ode", dict(method="unipc_3", num_steps=15)),
    "unipc_2-10": ("ode", dict(method="unipc_2", num_steps=10)),
    "dpm_solver_2_sde-20": ("sde", dict(method="dpm_solver_2_sde", num_steps=20)),
    "adaptive": ("sde", dict(method="adaptive")),
    "adaptive_per_example": ("sde", dict(method="adaptive_per_example")),
}


@pytest.mark.parametrize("sde_name", sorted(MIXTURE_SDES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_solver_reproduces_mode_weights(sde_name, case):
    sde = MIXTURE_SDES[sde_name]
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    kind, kwargs = CASES[case]
    sample = ode_sample if kind == "ode" else sde_sample
    x, nfe = sample(
        jax.random.key(0), sde, mixture.score, (1024, 2), eps=default_eps(sde), **kwargs
    )
    total_variation = 0.5 * float(jnp.sum(jnp.abs(mixture.mode_frequencies(x) - WEIGHTS)))
    on_mode = float(jnp.mean(mixture.standardized_distance(x) < 3.0))
    assert total_variation < 0.06, (total_variation, mixture.mode_frequencies(x))
    assert on_mode > 0.97
    assert int(nfe) > 0


# --- NFE and configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("ode", dict(method="unipc_3", num_steps=7)),
        ("ode", dict(method="unipc_1_bh2", num_steps=5, denoise=True)),
        ("sde", dict(method="dpm_solver_2_sde", num_steps=6)),
        ("sde", dict(method="adaptive", denoise=True)),
        ("sde", dict(method="adaptive_per_example", denoise=False)),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_nfe_counts_every_score_evaluation(kind, kwargs):
    """Counts calls from inside the compiled program, on image-shaped data (B, H, W, C)."""
    sde, calls = VPSDE(N=30), []

    def score_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x

    sample = ode_sample if kind == "ode" else sde_sample
    x, nfe = sample(jax.random.key(0), sde, score_fn, (2, 3, 3, 1), **kwargs)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert x.shape == (2, 3, 3, 1) and bool(jnp.all(jnp.isfinite(x)))
    assert int(nfe) == len(calls) > 0


def test_get_sampler_builds_sde_samplers_from_a_config():
    sde, score_fn, key = VPSDE(N=50), lambda x, t: -x, jax.random.key(2)
    config = ml_collections.ConfigDict(
        dict(method="sde", sde_method="dpm_solver_2_sde", num_steps=7, time_grid="karras")
    )
    x, nfe = get_sampler(config, sde, (8, 2))(key, score_fn)
    expected, _ = sde_sample(
        key, sde, score_fn, (8, 2), method="dpm_solver_2_sde", num_steps=7, time_grid="karras"
    )
    np.testing.assert_array_equal(x, expected)
    assert nfe == 7
    with pytest.raises(ValueError, match=r"Unknown reverse-SDE method 'heun'; valid: \["):
        get_sampler(ml_collections.ConfigDict(dict(method="sde", sde_method="heun")), sde, (1, 1))
