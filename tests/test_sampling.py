"""Samplers with exact scores: mode weights, DDPM and SMLD as special cases, honest NFE."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde import models, ode_solvers
from diffusion_sde.sampling import get_sampler, ode_sample, pc_sample
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture

# --- Mode weights: every sampler on a 2-D mixture with unequal weights, narrow modes ------

SDES = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(sigma_max=10.0)}
WEIGHTS = jnp.array([0.5, 0.3, 0.2])
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
STDS = jnp.array([0.1, 0.2, 0.1])
SHAPE = (1024, 2)
PC_STEPS = 100


def pc_case(predictor, corrector):
    kwargs = dict(predictor=predictor, corrector=corrector, num_steps=PC_STEPS)
    if predictor == "none":  # Corrector-only sampling needs several moves per level.
        kwargs.update(n_steps=10, snr=0.3)
    return ("pc", kwargs)


ODE_STEPS = {"adaptive": None, "euler": 100, "ddim": 20, "heun": 10}
ODE_STEPS |= {"dpm_solver_2": 20, "dpm_solver_3": 15}
ALL_CASES = {
    (sde, f"pc-{p}-{c}"): pc_case(p, c)
    for sde, p, c in itertools.product(
        SDES,
        ["euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none"],
        ["langevin", "ald", "none"],
    )  # fmt: skip
    if (p, c) != ("none", "none") and (sde, p) != ("subvp", "ancestral_sampling")
} | {
    (sde, f"ode-{m}"): ("ode", dict(method=m, num_steps=n))
    for sde, (m, n) in itertools.product(SDES, ODE_STEPS.items())
}
# Every predictor, corrector and ODE method runs on some SDE in the fast suite; the full
# product is marked slow.
FAST = {
    ("vp", "pc-reverse_diffusion-langevin"), ("vp", "pc-ancestral_sampling-none"),
    ("vp", "pc-none-langevin"), ("vp", "ode-dpm_solver_3"), ("vp", "ode-heun"),
    ("vp", "ode-euler"), ("subvp", "pc-euler_maruyama-ald"), ("subvp", "pc-none-ald"),
    ("subvp", "ode-adaptive"), ("subvp", "ode-dpm_solver_2"), ("ve", "pc-reverse_diffusion-ald"),
    ("ve", "pc-ancestral_sampling-langevin"), ("ve", "pc-euler_maruyama-none"),
    ("ve", "pc-none-ald"), ("ve", "ode-ddim"), ("ve", "ode-adaptive"),
}  # fmt: skip


@pytest.mark.parametrize(
    "sde_name, case",
    [
        pytest.param(*name, marks=() if name in FAST else pytest.mark.slow, id="-".join(name))
        for name in ALL_CASES
    ],
)
def test_sampler_reproduces_mode_weights_on_modes(sde_name, case):
    sde = SDES[sde_name]
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    kind, kwargs = ALL_CASES[sde_name, case]
    sample = pc_sample if kind == "pc" else ode_sample
    x, nfe = sample(jax.random.key(0), sde, mixture.score, SHAPE, **kwargs)
    total_variation = 0.5 * float(jnp.sum(jnp.abs(mixture.mode_frequencies(x) - WEIGHTS)))
    # An exact sample is within 3 (standardised) of its mean with probability 1 - e^-9.
    on_mode = float(jnp.mean(mixture.standardized_distance(x) < 3.0))
    assert total_variation < 0.06, (total_variation, mixture.mode_frequencies(x))
    assert on_mode > 0.97
    assert int(nfe) > 0


# --- One framework: DDPM and SMLD are samplers of the discretised SDEs ---------------------


def replay_noise(key, shape, num_steps):
    """The noise pc_sample draws (its documented key scheme): prior, and per step i the
    corrector key (folded with the move j) and the predictor key."""
    prior_key, loop_key = jax.random.split(key)
    step_keys = [jax.random.split(jax.random.fold_in(loop_key, i)) for i in range(num_steps)]
    prior = np.asarray(jax.random.normal(prior_key, shape), np.float64)
    return prior, step_keys


def test_ancestral_sampling_on_vp_is_ddpm_algorithm_2():
    """Ho et al. (2020), Algorithm 2, in numpy: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t)
    eps(x_t, t)) / sqrt(alpha_t) + sqrt(beta_t) z, with z = 0 at the last step."""
    N, eps, shape = 1000, 1e-3, (4, 3)
    betas = np.linspace(1e-4, 0.02, N)  # Ho et al.'s schedule.
    alphas, alpha_bars = 1.0 - betas, np.cumprod(1.0 - betas)
    eps_network = lambda x, i, tanh: tanh(x) * (1.0 + i / N) + 0.1 * i / N

    def score_fn(x, t):  # The DDPM network's score; its label i from pc_sample's t grid.
        i = jnp.round((t - eps) / (1.0 - eps) * (N - 1))[:, None]
        abar = jnp.asarray(alpha_bars, jnp.float32)[i.astype(jnp.int32)]
        return -eps_network(x, i, jnp.tanh) / jnp.sqrt(1.0 - abar)

    key = jax.random.key(7)
    samples, nfe = pc_sample(
        key, VPSDE(N=N), score_fn, shape, predictor="ancestral_sampling", corrector="none", eps=eps
    )
    x, step_keys = replay_noise(key, shape, N)
    for step, i in enumerate(reversed(range(N))):
        z = np.asarray(jax.random.normal(step_keys[step][1], shape)) if i > 0 else 0.0
        epsilon = eps_network(x, i, np.tanh)
        x = (x - betas[i] / np.sqrt(1.0 - alpha_bars[i]) * epsilon) / np.sqrt(alphas[i])
        x = x + np.sqrt(betas[i]) * z
    assert nfe == N
    np.testing.assert_allclose(samples, x, rtol=1e-4, atol=1e-4)


class _TanhEpsNetwork(nn.Module):
    """A stand-in DDPM network eps(x, i) = tanh(x) (1 + i / N) + 0.1 i / N of its label i."""

    N: int

    @nn.compact
    def __call__(self, x, time_cond, y=None, train=False):
        i = time_cond[:, None]
        return jnp.tanh(x) * (1.0 + i / self.N) + 0.1 * i / self.N


def test_ancestral_sampling_through_the_discrete_adapter_is_ddpm_algorithm_2():
    """The network through models.get_score_fn(continuous=False), not a hand-made score:
    its label and std must be those of the level the predictor is at, at every step."""
    N, shape = 1000, (4, 3)
    sde = VPSDE(N=N)
    betas = np.linspace(0.1 / N, 20.0 / N, N)
    alphas, alpha_bars = 1.0 - betas, np.cumprod(1.0 - betas)
    network = _TanhEpsNetwork(N)
    score_fn = models.get_score_fn(sde, network, {"params": {}}, continuous=False)
    key = jax.random.key(11)
    samples, nfe = pc_sample(
        key, sde, score_fn, shape, predictor="ancestral_sampling", corrector="none", eps=1e-3
    )
    x, step_keys = replay_noise(key, shape, N)
    for step, i in enumerate(reversed(range(N))):
        z = np.asarray(jax.random.normal(step_keys[step][1], shape)) if i > 0 else 0.0
        epsilon = np.tanh(x) * (1.0 + i / N) + 0.1 * i / N
        x = (x - betas[i] / np.sqrt(1.0 - alpha_bars[i]) * epsilon) / np.sqrt(alphas[i])
        x = x + np.sqrt(betas[i]) * z
    assert nfe == N
    np.testing.assert_allclose(samples, x, rtol=1e-4, atol=1e-4)


def test_corrector_only_ald_on_ve_is_smld_algorithm_1():
    """Song & Ermon (2019), Algorithm 1, in numpy: for sigma_1 > ... > sigma_L, step
    alpha_i = epsilon sigma_i^2 / sigma_L^2, T moves x += alpha_i/2 s(x, sigma_i) + sqrt(alpha_i) z."""
    L, moves, epsilon, shape = 10, 5, 2e-5, (6, 2)
    sigmas = np.geomspace(1.0, 0.01, L)
    mu, s = np.array([0.3, -0.5]), 0.2
    sde = VESDE(sigma_min=0.01, sigma_max=1.0, N=L)

    def score_fn(x, t):  # The noise-conditional score of Gaussian data N(mu, s^2 I).
        sigma = sde.marginal_coeffs(t)[1][:, None]
        return -(x - jnp.asarray(mu, x.dtype)) / (s**2 + sigma**2)

    key = jax.random.key(3)
    samples, nfe = pc_sample(
        key, sde, score_fn, shape, predictor="none", corrector="ald",
        snr=np.sqrt(epsilon) / (2 * sigmas[-1]), n_steps=moves, num_steps=L, eps=0.0, denoise=False,
    )  # fmt: skip
    x, step_keys = replay_noise(key, shape, L)
    for i, sigma in enumerate(sigmas):
        alpha = epsilon * sigma**2 / sigmas[-1] ** 2
        for j in range(moves):
            z = np.asarray(jax.random.normal(jax.random.fold_in(step_keys[i][0], j), shape))
            x = x + alpha / 2 * (-(x - mu) / (s**2 + sigma**2)) + np.sqrt(alpha) * z
    assert nfe == L * moves
    np.testing.assert_allclose(samples, x, rtol=1e-4, atol=1e-5)


# --- NFE is the number of score evaluations actually made ---------------------------------


@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("pc", dict(predictor="reverse_diffusion", corrector="langevin", n_steps=2)),
        ("pc", dict(predictor="euler_maruyama", corrector="none")),
        ("pc", dict(predictor="none", corrector="ald")),
        ("pc", dict(predictor="reverse_diffusion", corrector="none", probability_flow=True)),
        ("ode", dict(method="adaptive", rtol=1e-4, atol=1e-4, denoise=True)),
        ("ode", dict(method="heun", denoise=True)),
        ("ode", dict(method="dpm_solver_3")),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_nfe_counts_every_score_evaluation(kind, kwargs):
    """Counts calls from inside the compiled program, on image-shaped data (B, H, W, C)."""
    sde, calls = VPSDE(N=30), []

    def score_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x  # The score of N(0, I) data, which the VP marginals keep.

    sample = pc_sample if kind == "pc" else ode_sample
    x, nfe = sample(jax.random.key(0), sde, score_fn, (2, 3, 3, 1), **kwargs)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert x.shape == (2, 3, 3, 1) and bool(jnp.all(jnp.isfinite(x)))
    assert int(nfe) == len(calls) > 0


def test_samplers_shard_over_devices_with_the_same_samples():
    """Data-parallel sampling: an outer jit with the batch sharded over every device (8 CPU
    devices in tests) gives the samples of the unsharded call."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sde, score_fn, shape = VPSDE(N=25), lambda x, t: -x, (2 * len(jax.devices()), 3)
    sharded = jax.jit(
        lambda key: pc_sample(key, sde, score_fn, shape)[0], out_shardings=batch_sharding
    )
    x = sharded(jax.random.key(4))
    assert x.sharding.is_equivalent_to(batch_sharding, x.ndim)
    np.testing.assert_allclose(x, pc_sample(jax.random.key(4), sde, score_fn, shape)[0], atol=1e-5)


# --- Time grids ---------------------------------------------------------------------------


@pytest.mark.parametrize("sde_name, grid", list(itertools.product(SDES, ode_solvers.TIME_GRIDS)))
def test_time_grids_are_uniform_in_their_variable(sde_name, grid):
    sde, eps = SDES[sde_name], 1e-3
    ts = np.asarray(ode_solvers.time_grid(sde, grid, 12, eps), np.float64)
    assert ts.shape == (13,) and ts[0] == sde.T and np.isclose(ts[-1], eps)
    assert np.all(np.diff(ts) < 0)
    log_snr = np.asarray(sde.log_snr(jnp.asarray(ts)), np.float64)
    variable = {"uniform_t": ts, "uniform_log_snr": log_snr, "karras": np.exp(-log_snr / 7.0)}
    steps = np.diff(variable[grid])
    np.testing.assert_allclose(steps, steps.mean(), rtol=2e-3)


# --- Configuration and errors -------------------------------------------------------------


def test_get_sampler_builds_the_same_samplers_from_a_config():
    sde, score_fn, key = VPSDE(N=50), lambda x, t: -x, jax.random.key(2)
    config = ml_collections.ConfigDict(
        dict(method="pc", predictor="reverse_diffusion", corrector="langevin", snr=0.16,
             n_steps_each=1, noise_removal=True, probability_flow=False)
    )  # fmt: skip
    x, nfe = get_sampler(config, sde, (8, 2))(key, score_fn)
    expected, _ = pc_sample(key, sde, score_fn, (8, 2))
    np.testing.assert_array_equal(x, expected)
    assert nfe == 100
    config.method, config.ode_method, config.num_steps = "ode", "dpm_solver_2", 7
    config.time_grid = "karras"
    x, nfe = get_sampler(config, sde, (8, 2))(key, score_fn)
    expected, _ = ode_sample(
        key, sde, score_fn, (8, 2), method="dpm_solver_2", num_steps=7, time_grid="karras",
        denoise=True,
    )  # fmt: skip
    np.testing.assert_array_equal(x, expected)
    assert nfe == 8  # 7 steps and the final denoising evaluation.


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pc_sample(None, subVPSDE(), None, (1, 1), predictor="ancestral_sampling"),
         "ancestral_sampling is defined for VPSDE"),
        (lambda: pc_sample(None, VPSDE(), None, (1, 1), predictor="ancestral_sampling",
                           probability_flow=True), "no probability-flow form"),
        (lambda: pc_sample(None, VPSDE(), None, (1, 1), predictor="ddpm"),
         r"Unknown predictor 'ddpm'; valid: \['ancestral_sampling', 'euler_maruyama', "),
        (lambda: pc_sample(None, VPSDE(), None, (1, 1), corrector="hmc"),
         r"Unknown corrector 'hmc'; valid: \['ald', 'langevin', 'none'\]"),
        (lambda: pc_sample(None, VPSDE(), None, (1, 1), num_steps=20),
         "num_steps=20 is too small for the DDPM chain"),
        (lambda: ode_sample(None, VPSDE(), None, (1, 1), method="rk4"),
         r"Unknown ODE method 'rk4'; valid: \['adaptive', 'ddim', 'dpm_solver_2', "),
        (lambda: ode_sample(None, VPSDE(), None, (1, 1), method="heun", time_grid="cosine"),
         r"Unknown time grid 'cosine'; valid: \['karras', 'uniform_log_snr', 'uniform_t'\]"),
        (lambda: get_sampler(ml_collections.ConfigDict(dict(method="sdf")), VPSDE(), (1, 1)),
         r"Unknown sampling.method 'sdf'; valid: \['edm', 'ode', 'pc', 'sde'\]"),
        (lambda: get_sampler(ml_collections.ConfigDict(
            dict(method="pc", predictor="reverse_diffusion", corrector="langevine", snr=0.1)),
            VPSDE(), (1, 1)), "Unknown sampling.corrector 'langevine'"),
    ],
)  # fmt: skip
def test_undefined_requests_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
