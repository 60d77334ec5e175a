"""The DSM weightings and time distributions: each loss against the paper's own form written
out by hand, each minimised by the exact score of Gaussian data on every path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffusion_sde import losses
from diffusion_sde import parametrization as param
from diffusion_sde.sde import EDMSDE, VESDE, VPSDE, CosineSDE, RectifiedFlow, subVPSDE

PATHS = [VPSDE(), subVPSDE(), VESDE(), CosineSDE(), EDMSDE(), RectifiedFlow()]
ids = lambda s: type(s).__name__
MU, DATA_STD, DIM, BATCH = 0.8, 0.6, 2, 50_000


def gaussian_score(sde, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    alpha, sigma = alpha[:, None], sigma[:, None]
    return -(x - alpha * MU) / (alpha**2 * DATA_STD**2 + sigma**2)


def check_minimum_at_one(per_example_loss):
    """loss(theta) over the family theta * exact score: minimum at theta = 1."""
    loss_at_one = per_example_loss(1.0)
    for theta in (0.9, 1.1):
        excess = per_example_loss(theta) - loss_at_one  # common random numbers
        assert np.mean(excess) > 4 * np.std(excess) / np.sqrt(BATCH), theta
    gradient = jax.jacfwd(per_example_loss)(1.0)
    curvature = jax.jacfwd(jax.jacfwd(lambda th: jnp.mean(per_example_loss(th))))(1.0)
    assert abs(np.mean(gradient)) < 4 * np.std(gradient) / np.sqrt(BATCH)
    assert abs(np.mean(gradient)) < 0.02 * curvature


def minimum_check(sde, weighting, time_distribution):
    x = MU + DATA_STD * jax.random.normal(jax.random.PRNGKey(0), (BATCH, DIM))
    key = jax.random.PRNGKey(1)
    eps = 2e-3 if isinstance(sde, EDMSDE) else 1e-3

    @jax.jit
    def per_example_loss(theta):
        score_fn = lambda x, t: theta * gaussian_score(sde, x, t)
        return losses.dsm_losses(
            key,
            sde,
            score_fn,
            x,
            weighting=weighting,
            time_distribution=time_distribution,
            eps=eps,
        )

    check_minimum_at_one(per_example_loss)


# Each path with the weighting its family trains with (every weighting once): the default run.
NATURAL = [
    (VPSDE(), "sigma2"),
    (subVPSDE(), "x0"),
    (VESDE(), "likelihood"),
    (CosineSDE(), "v"),
    (VPSDE(), "min_snr"),
    (EDMSDE(), "edm"),
    (RectifiedFlow(), "velocity"),
]


@pytest.mark.parametrize(
    ("sde", "weighting"), NATURAL, ids=[f"{type(s).__name__}-{w}" for s, w in NATURAL]
)
def test_each_weighting_is_minimised_by_the_exact_score(sde, weighting):
    minimum_check(sde, weighting, "uniform")


@pytest.mark.slow
@pytest.mark.parametrize("weighting", sorted(losses.WEIGHTINGS))
@pytest.mark.parametrize("sde", PATHS, ids=ids)
def test_every_weighting_is_minimised_by_the_exact_score(sde, weighting):
    minimum_check(sde, weighting, "uniform")


@pytest.mark.parametrize("time_distribution", ["log_normal", "logit_normal"])
@pytest.mark.parametrize("sde", [VPSDE(), EDMSDE(), RectifiedFlow()], ids=ids)
def test_every_time_distribution_is_minimised_by_the_exact_score(sde, time_distribution):
    minimum_check(sde, {EDMSDE: "edm", RectifiedFlow: "velocity"}.get(type(sde), "sigma2"),
                  time_distribution)  # fmt: skip


def by_hand_setup(sde, seed=3):
    """A data batch, the loss's own draws of t and z (same key split), x_t, and an
    arbitrary, non-optimal data predictor."""
    key = jax.random.PRNGKey(seed)
    x0 = jax.random.normal(jax.random.PRNGKey(seed + 1), (64, 3))
    key_t, key_z = jax.random.split(key)
    t = jax.random.uniform(key_t, (64,), minval=1e-3 * sde.T, maxval=sde.T)
    z = jax.random.normal(key_z, x0.shape)
    alpha, sigma = (c[:, None] for c in sde.marginal_coeffs(t))
    denoiser = lambda x, t: 0.7 * jnp.tanh(x) + 0.1 * t[:, None]
    return key, x0, t, z, alpha, sigma, denoiser


def score_of(sde, denoiser):
    def score_fn(x, t):
        alpha, sigma = (c[:, None] for c in sde.marginal_coeffs(t))
        return (alpha * denoiser(x, t) - x) / sigma**2

    return score_fn


def loss_of(weighting, sde, key, x0, denoiser):
    return losses.dsm_losses(
        key, sde, score_of(sde, denoiser), x0, weighting=weighting, eps=1e-3 * sde.T
    )


def test_edm_loss_is_karras_eq_8():
    """lambda(sigma) ||D(x + sigma n) - x||^2, lambda = (sigma^2 + sigma_d^2)/(sigma sigma_d)^2."""
    sde = EDMSDE()
    key, x0, t, z, alpha, sigma, denoiser = by_hand_setup(sde)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = jnp.mean(weight * (denoiser(x0 + sigma * z, t) - x0) ** 2, axis=-1)
    np.testing.assert_allclose(loss_of("edm", sde, key, x0, denoiser), expected, rtol=1e-3)


def test_flow_matching_loss_is_the_velocity_regression():
    """||u_hat - (z - x0)||^2 with u_hat the velocity of the data predictor."""
    sde = RectifiedFlow()
    key, x0, t, z, alpha, sigma, denoiser = by_hand_setup(sde)
    x = alpha * x0 + sigma * z
    c = param.path_coeffs(sde, t, x)
    velocity = param.from_data_prediction("velocity", c, denoiser(x, t), x)
    expected = jnp.mean((velocity - (z - x0)) ** 2, axis=-1)
    np.testing.assert_allclose(loss_of("velocity", sde, key, x0, denoiser), expected, rtol=2e-3)


@pytest.mark.parametrize("sde", [VPSDE(), CosineSDE()], ids=ids)
def test_v_x0_and_min_snr_losses_by_hand(sde):
    key, x0, t, z, alpha, sigma, denoiser = by_hand_setup(sde)
    x = alpha * x0 + sigma * z
    x0_hat = denoiser(x, t)
    v_hat = param.from_data_prediction("v", param.path_coeffs(sde, t, x), x0_hat, x)
    snr = (alpha / sigma) ** 2
    x0_error = jnp.mean((x0_hat - x0) ** 2, axis=-1)
    cases = {
        "v": jnp.mean((v_hat - (alpha * z - sigma * x0)) ** 2, axis=-1),
        "x0": x0_error,
        "min_snr": jnp.minimum(snr, 5.0)[:, 0] * x0_error,
    }
    for weighting, expected in cases.items():
        np.testing.assert_allclose(
            loss_of(weighting, sde, key, x0, denoiser), expected, rtol=2e-3, err_msg=weighting
        )


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=ids)
def test_2021_weightings_by_name_are_the_flags_bit_for_bit(sde):
    key, x0, _, _, _, _, denoiser = by_hand_setup(sde)
    score_fn = score_of(sde, denoiser)
    for flag, name in [(False, "sigma2"), (True, "likelihood")]:
        old = losses.dsm_losses(key, sde, score_fn, x0, likelihood_weighting=flag)
        new = losses.dsm_losses(key, sde, score_fn, x0, weighting=name)
        np.testing.assert_array_equal(old, new)
    with pytest.raises(ValueError, match="contradicts"):
        losses.dsm_losses(key, sde, score_fn, x0, likelihood_weighting=True, weighting="edm")
    with pytest.raises(ValueError, match="min_snr"):
        losses.dsm_losses(key, sde, score_fn, x0, weighting="snr")
    with pytest.raises(ValueError, match="logit_normal"):
        losses.dsm_losses(key, sde, score_fn, x0, time_distribution="normal")


def test_time_distributions_have_the_papers_laws():
    n = 20_000
    key = jax.random.PRNGKey(5)
    options = losses.LossOptions()
    # EDM: ln sigma ~ N(-1.2, 1.2^2) (clipping at [0.002, 80] touches 0.02% of draws).
    sde = EDMSDE()
    t = losses.TIME_DISTRIBUTIONS["log_normal"](key, sde, n, 0.002, options)
    log_sigma = np.log(np.asarray(t))
    inside = (log_sigma > np.log(0.0021)) & (log_sigma < np.log(79.0))
    assert scipy.stats.kstest(log_sigma[inside], "norm", args=(-1.2, 1.2)).pvalue > 1e-3
    # On VP the same law is on sigma_t / alpha_t.
    vp = VPSDE()
    t = losses.TIME_DISTRIBUTIONS["log_normal"](key, vp, n, 1e-5, options)
    np.testing.assert_allclose(-vp.log_snr(t)[inside], log_sigma[inside], atol=2e-3)
    # SD3: logit((t - eps)/(T - eps)) ~ N(0, 1).
    rf = RectifiedFlow()
    t = np.asarray(losses.TIME_DISTRIBUTIONS["logit_normal"](key, rf, n, 1e-3, options), float)
    u = (t - 1e-3) / (rf.T - 1e-3)
    assert scipy.stats.kstest(np.log(u / (1 - u)), "norm").pvalue > 1e-3
