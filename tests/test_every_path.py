"""Every sampler, the likelihood and inpainting on every path, with exact mixture scores;
EDM's sampler against Karras et al.'s Algorithm 2 written out."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde import controllable, likelihood
from diffusion_sde.sampling import edm_sample, edm_sigmas, get_sampler, ode_sample, pc_sample
from diffusion_sde.sde import EDMSDE, VESDE, VPSDE, CosineSDE, RectifiedFlow, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture

PATHS = {
    "vp": VPSDE(),
    "subvp": subVPSDE(),
    "ve": VESDE(sigma_max=10.0),
    "cosine": CosineSDE(),
    "edm": EDMSDE(),
    "rf": RectifiedFlow(),
}
NEW = ("cosine", "edm", "rf")
WEIGHTS = jnp.array([0.5, 0.3, 0.2])
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
STDS = jnp.array([0.1, 0.2, 0.1])
SHAPE = (1024, 2)


def check_modes(mixture, x, tv=0.06, on_mode=0.97):
    total_variation = 0.5 * float(jnp.sum(jnp.abs(mixture.mode_frequencies(x) - WEIGHTS)))
    fraction_on_mode = float(jnp.mean(mixture.standardized_distance(x) < 3.0))
    assert total_variation < tv, (total_variation, mixture.mode_frequencies(x))
    assert fraction_on_mode > on_mode, fraction_on_mode


EDM_CASES = [(name, dict(num_steps=18)) for name in PATHS] + [
    ("edm", dict(num_steps=40, s_churn=30.0, s_tmin=0.01, s_tmax=50.0, s_noise=1.003)),
    ("vp", dict(num_steps=40, s_churn=30.0)),
]


@pytest.mark.parametrize(
    ("name", "kwargs"), EDM_CASES, ids=[f"{n}-{k['num_steps']}" for n, k in EDM_CASES]
)
def test_edm_sampler_reproduces_mode_weights_on_every_path(name, kwargs):
    sde = PATHS[name]
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    x, nfe = edm_sample(jax.random.key(0), sde, mixture.score, SHAPE, **kwargs)
    check_modes(mixture, x)
    assert nfe == 2 * kwargs["num_steps"] - 1


# The PC samplers use the SDE's own time: on EDM's path a uniform grid in sigma = t, which
# needs many steps near sigma = 0; they are not the way to sample it, but they are correct.
PC_STEPS = {"cosine": 200, "edm": 1000, "rf": 200}
CASES = [
    (name, kind, kwargs)
    for name in NEW
    for kind, kwargs in [
        ("pc", dict(predictor="euler_maruyama", corrector="none")),
        ("pc", dict(predictor="reverse_diffusion", corrector="langevin")),
        ("ode", dict(method="dpm_solver_3", num_steps=15)),
        ("ode", dict(method="heun", num_steps=10)),
        ("ode", dict(method="adaptive", rtol=1e-4, atol=1e-4)),
    ]
]
# The remaining predictor-corrector and ODE methods, each on one new path.
CASES += [
    ("cosine", "pc", dict(predictor="reverse_diffusion", corrector="ald")),
    ("rf", "ode", dict(method="euler", num_steps=100)),
    ("cosine", "ode", dict(method="ddim", num_steps=20)),
    ("edm", "ode", dict(method="dpm_solver_2", num_steps=20)),
]


@pytest.mark.parametrize(
    ("name", "kind", "kwargs"),
    CASES,
    ids=[f"{n}-{k}-{'-'.join(map(str, a.values()))}" for n, k, a in CASES],
)
def test_pc_and_ode_samplers_on_the_new_paths(name, kind, kwargs):
    sde = PATHS[name]
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    eps = 2e-3 if name == "edm" else 1e-3
    if kind == "pc":
        x, nfe = pc_sample(
            jax.random.key(1), sde, mixture.score, SHAPE, num_steps=PC_STEPS[name], eps=eps,
            **kwargs,
        )  # fmt: skip
    else:
        x, nfe = ode_sample(jax.random.key(1), sde, mixture.score, SHAPE, eps=eps, **kwargs)
    check_modes(mixture, x)
    assert int(nfe) > 0


def mixture_nd(sde, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    return GaussianMixture(
        weights=jnp.array([0.6, 0.4]),
        means=jnp.asarray(rng.normal(size=(2, dim)), jnp.float32),
        stds=jnp.array([0.5, 0.7]),
        sde=sde,
    )


@pytest.mark.parametrize("name", NEW)
def test_log_likelihood_is_the_exact_mixture_density_on_the_new_paths(name):
    """The probability-flow ODE of the exact score transports p_eps to p_T: log p_eps(x)
    from the solver equals the closed-form mixture density, up to the prior's neglect of
    alpha_T x_0 (cosine, RF) and the ODE tolerance."""
    sde = PATHS[name]
    mixture = mixture_nd(sde)
    eps = 1e-3
    x = mixture.sample(jax.random.key(2), 16)
    logp, _, nfe = likelihood.log_likelihood(
        jax.random.key(3), sde, mixture.score, x, estimator="exact", eps=eps
    )
    expected = mixture.log_density(x, jnp.full((16,), eps))
    np.testing.assert_allclose(logp, expected, atol=0.03)
    assert int(nfe) > 0


@pytest.mark.parametrize("name", NEW)
def test_inpainting_on_the_new_paths_finds_the_component_of_the_known_coordinate(name):
    """Two well-separated modes in 2-D: knowing x_1 fixes the mode, inpainting x_2 must land
    on that mode's x_2."""
    sde = PATHS[name]
    means = jnp.array([[-2.0, -2.0], [2.0, 2.0]])
    mixture = GaussianMixture(jnp.array([0.5, 0.5]), means, jnp.array([0.2, 0.2]), sde)
    data = jnp.stack([jnp.where(jnp.arange(256) < 128, -2.0, 2.0), jnp.zeros(256)], axis=1)
    mask = jnp.array([[1.0, 0.0]])
    eps = 2e-3 if name == "edm" else 1e-3
    x, _ = controllable.inpaint(
        jax.random.key(4), sde, mixture.score, data, mask, num_steps=PC_STEPS[name], eps=eps,
        corrector="none", predictor="euler_maruyama",
    )  # fmt: skip
    np.testing.assert_array_equal(x[:, 0], data[:, 0])
    assert float(jnp.mean(jnp.abs(x[:, 1] - data[:, 0]) < 0.8)) > 0.97


def algorithm_2(sde, denoiser, sigmas, x, noises, gammas, s_noise):
    """Karras et al. (2022) Algorithm 2, line by line, in numpy, on EDM's path."""
    for i in range(len(sigmas) - 1):
        sigma_hat = sigmas[i] * (1 + gammas[i])
        x_hat = x + np.sqrt(sigma_hat**2 - sigmas[i] ** 2) * s_noise * noises[i]
        d = (x_hat - denoiser(x_hat, sigma_hat)) / sigma_hat
        x = x_hat + (sigmas[i + 1] - sigma_hat) * d
        if sigmas[i + 1] != 0:
            d_prime = (x - denoiser(x, sigmas[i + 1])) / sigmas[i + 1]
            x = x_hat + (sigmas[i + 1] - sigma_hat) * (0.5 * d + 0.5 * d_prime)
    return x


def test_edm_sampler_is_algorithm_2():
    sde = EDMSDE()
    # Data N(mu, s^2): D(x; sigma) = (s^2 x + sigma^2 mu)/(s^2 + sigma^2), score accordingly.
    mu, s = 0.3, 0.5

    def score_fn(x, t):
        return -(x - mu) / (s**2 + t[:, None] ** 2)

    denoiser = lambda x, sigma: (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)
    num_steps, s_churn, s_tmin, s_tmax, s_noise = 10, 20.0, 0.05, 10.0, 1.007
    key = jax.random.key(5)
    x, nfe = edm_sample(
        key, sde, score_fn, (8, 2), num_steps=num_steps, s_churn=s_churn, s_tmin=s_tmin,
        s_tmax=s_tmax, s_noise=s_noise,
    )  # fmt: skip
    prior_key, loop_key = jax.random.split(key)
    x_T = np.asarray(sde.prior_sampling(prior_key, (8, 2)), np.float64)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(loop_key, i), (8, 2))) for i in
              range(num_steps)]  # fmt: skip
    # Karras eq. 5 and the churn schedule, written out.
    i = np.arange(num_steps)
    sigmas = (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(edm_sigmas(sde, num_steps, 0.002)[:-1], sigmas, rtol=1e-5)
    sigmas = np.append(sigmas, 0.0)
    gamma = min(s_churn / num_steps, np.sqrt(2) - 1)
    gammas = np.where((sigmas[:-1] >= s_tmin) & (sigmas[:-1] <= s_tmax), gamma, 0.0)
    expected = algorithm_2(sde, denoiser, sigmas, x_T, noises, gammas, s_noise)
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4)
    assert nfe == 2 * num_steps - 1


def test_edm_sampler_nfe_is_counted_from_inside():
    calls = []

    def score_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return -x / (1.0 + t[:, None, None, None] ** 2)

    x, nfe = edm_sample(jax.random.key(0), EDMSDE(), score_fn, (2, 3, 3, 1), num_steps=7)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert nfe == len(calls) == 13


def test_get_sampler_builds_edm_sample_from_a_config():
    config = ml_collections.ConfigDict(
        dict(method="edm", num_steps=12, s_churn=5.0, eps=0.002, noise_removal=True)
    )
    sde = EDMSDE()
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    x, nfe = get_sampler(config, sde, (16, 2))(jax.random.key(0), mixture.score)
    expected, _ = edm_sample(jax.random.key(0), sde, mixture.score, (16, 2), num_steps=12,
                             s_churn=5.0, eps=0.002)  # fmt: skip
    np.testing.assert_array_equal(x, expected)
    assert nfe == 23
    with pytest.raises(ValueError, match="'edm'"):
        get_sampler(ml_collections.ConfigDict(dict(method="karras")), sde, (16, 2))
