"""Losses against hand-written formulas and against the exact score of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_sde import losses
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.training import step as step_lib

BETA_MIN, BETA_MAX, SIGMA_MIN, SIGMA_MAX, N = 0.1, 20.0, 0.01, 50.0, 1000
ALL_SDES = [VPSDE(), subVPSDE(), VESDE()]
WEIGHTINGS = [(False, True), (False, False), (True, True), (True, False)]


def numpy_sde_coefficients(name, t):
    """alpha_t, sigma_t and g(t)^2 written out from the paper (eqs. 9, 11, 12)."""
    beta = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2
    if name == "VPSDE":
        return np.exp(-integral / 2), np.sqrt(1 - np.exp(-integral)), beta
    if name == "subVPSDE":
        return np.exp(-integral / 2), 1 - np.exp(-integral), beta * (1 - np.exp(-2 * integral))
    sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
    return np.ones_like(t), sigma, sigma**2 * 2 * np.log(SIGMA_MAX / SIGMA_MIN)


def toy_score(x, t):
    """An arbitrary smooth score, the same in jax and numpy."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return -x * (1.0 + t) + 0.25 * t


def reduce_numpy(values, reduce_mean):
    flat = values.reshape(values.shape[0], -1)
    return flat.mean(-1) if reduce_mean else 0.5 * flat.sum(-1)


@pytest.mark.parametrize("likelihood_weighting,reduce_mean", WEIGHTINGS)
@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_dsm_loss_equals_formula(sde, likelihood_weighting, reduce_mean):
    x = np.random.default_rng(0).normal(size=(5, 3, 2)).astype(np.float32)
    key, eps = jax.random.PRNGKey(7), 1e-5
    loss = losses.dsm_loss(
        key,
        sde,
        toy_score,
        jnp.asarray(x),
        likelihood_weighting=likelihood_weighting,
        reduce_mean=reduce_mean,
        eps=eps,
    )
    # The same draws as the loss (documented: t, then z, from split(key)).
    key_t, key_z = jax.random.split(key)
    t = np.asarray(jax.random.uniform(key_t, (5,), minval=eps, maxval=1.0), np.float64)
    z = np.asarray(jax.random.normal(key_z, x.shape), np.float64)
    alpha, sigma, g2 = numpy_sde_coefficients(type(sde).__name__, t)
    alpha, sigma = alpha[:, None, None], sigma[:, None, None]
    s = toy_score(alpha * x + sigma * z, t)
    if likelihood_weighting:
        expected = reduce_numpy((s + z / sigma) ** 2, reduce_mean) * g2
    else:
        expected = reduce_numpy((s * sigma + z) ** 2, reduce_mean)
    np.testing.assert_allclose(loss, expected.mean(), rtol=2e-4)


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_ddpm_loss_equals_formula(reduce_mean):
    x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    key = jax.random.PRNGKey(3)
    eps_fn = lambda x, i: 0.5 * x + 1e-3 * i[:, None]
    loss = losses.ddpm_loss(key, VPSDE(N=N), eps_fn, jnp.asarray(x), reduce_mean=reduce_mean)
    key_i, key_noise = jax.random.split(key)
    i = np.asarray(jax.random.randint(key_i, (6,), 0, N))
    noise = np.asarray(jax.random.normal(key_noise, x.shape), np.float64)
    alpha_bar = np.cumprod(1 - np.linspace(BETA_MIN / N, BETA_MAX / N, N))[i][:, None]
    x_i = np.sqrt(alpha_bar) * x + np.sqrt(1 - alpha_bar) * noise
    expected = reduce_numpy((0.5 * x_i + 1e-3 * i[:, None] - noise) ** 2, reduce_mean)
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-4)


@pytest.mark.parametrize("reduce_mean", [True, False])
def test_smld_loss_equals_formula(reduce_mean):
    x = np.random.default_rng(2).normal(size=(6, 4)).astype(np.float32)
    key = jax.random.PRNGKey(4)
    score_fn = lambda x, i: -x / (1.0 + i[:, None])
    loss = losses.smld_loss(key, VESDE(N=N), score_fn, jnp.asarray(x), reduce_mean=reduce_mean)
    key_i, key_noise = jax.random.split(key)
    i = np.asarray(jax.random.randint(key_i, (6,), 0, N))
    # NCSN order: label 0 is sigma_max.
    sigma = (SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** (np.arange(N) / (N - 1)))[i][:, None]
    z = np.asarray(jax.random.normal(key_noise, x.shape), np.float64)
    s = -(x + sigma * z) / (1.0 + i[:, None])
    expected = reduce_numpy((s + z / sigma) ** 2, reduce_mean) * sigma[:, 0] ** 2
    np.testing.assert_allclose(loss, expected.mean(), rtol=1e-4)


# --- The loss is minimised by the true score ------------------------------------------------
# Data N(mu, s^2 I) perturbed by N(alpha x, sigma^2 I) is N(alpha mu, (alpha^2 s^2 + sigma^2) I).
MU, DATA_STD, DIM, BATCH = 0.8, 0.6, 2, 50_000


def gaussian_score(sde, x, t):
    alpha, sigma = sde.marginal_coeffs(t)
    alpha, sigma = alpha[:, None], sigma[:, None]
    return -(x - alpha * MU) / (alpha**2 * DATA_STD**2 + sigma**2)


def check_minimum_at_one(per_example_loss):
    """loss(theta) over the family theta * exact: minimum at theta = 1, beyond MC error."""
    loss_at_one = per_example_loss(1.0)
    for theta in (0.9, 1.1):
        excess = per_example_loss(theta) - loss_at_one  # common random numbers
        standard_error = np.std(excess) / np.sqrt(BATCH)
        assert np.mean(excess) > 4 * standard_error, (theta, np.mean(excess), standard_error)
    gradient = jax.jacfwd(per_example_loss)(1.0)
    # The gradient at 1 vanishes in expectation; relative to the curvature scale it is small.
    curvature = jax.jacfwd(jax.jacfwd(lambda th: jnp.mean(per_example_loss(th))))(1.0)
    assert abs(np.mean(gradient)) < 4 * np.std(gradient) / np.sqrt(BATCH)
    assert abs(np.mean(gradient)) < 0.02 * curvature


def gaussian_data(seed):
    return MU + DATA_STD * jax.random.normal(jax.random.PRNGKey(seed), (BATCH, DIM))


@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_dsm_minimised_by_exact_score(sde, likelihood_weighting):
    x, key = gaussian_data(0), jax.random.PRNGKey(1)

    @jax.jit
    def per_example_loss(theta):
        score_fn = lambda x, t: theta * gaussian_score(sde, x, t)
        return losses.dsm_losses(key, sde, score_fn, x, likelihood_weighting=likelihood_weighting)

    check_minimum_at_one(per_example_loss)


def test_ddpm_loss_minimised_by_exact_noise_predictor():
    sde, x, key = VPSDE(N=N), gaussian_data(2), jax.random.PRNGKey(3)

    @jax.jit
    def per_example_loss(theta):
        def eps_fn(x_i, i):
            alpha_bar = sde.alphas_cumprod[i][:, None]
            exact = -(x_i - jnp.sqrt(alpha_bar) * MU) / (alpha_bar * DATA_STD**2 + 1 - alpha_bar)
            return -theta * jnp.sqrt(1 - alpha_bar) * exact

        return losses.ddpm_losses(key, sde, eps_fn, x)

    check_minimum_at_one(per_example_loss)


def test_smld_loss_minimised_by_exact_score():
    sde, x, key = VESDE(N=N), gaussian_data(4), jax.random.PRNGKey(5)

    @jax.jit
    def per_example_loss(theta):
        def score_fn(x_i, i):
            sigma = sde.discrete_sigmas[::-1][i][:, None]
            return -theta * (x_i - MU) / (DATA_STD**2 + sigma**2)

        return losses.smld_losses(key, sde, score_fn, x)

    check_minimum_at_one(per_example_loss)


class _NullLabelProbe:
    """A stand-in network whose noise prediction is 1 where the label is the null label."""

    class config:  # noqa: N801 - mimics ``model.config``
        num_classes = 10

    def apply(self, variables, x, time_cond, y=None, train=False, rngs=None):
        dropped = (y == self.config.num_classes).astype(x.dtype)
        return jnp.broadcast_to(dropped[:, None], x.shape)


@pytest.mark.parametrize("label_dropout", [0.0, 0.3])
def test_label_dropout_replaces_that_fraction_of_labels_by_the_null_label(label_dropout):
    """DDPM loss of the probe: E||1{dropped} - z||^2 = p + 1 per dimension."""
    loss_fn = step_lib.get_loss_fn(
        VPSDE(),
        _NullLabelProbe(),
        continuous=False,
        reduce_mean=True,
        label_dropout=label_dropout,
    )
    batch = {"x": jnp.zeros((40_000, 1)), "label": jnp.arange(40_000) % 10}
    loss = float(loss_fn({}, jax.random.key(0), batch))
    np.testing.assert_allclose(loss, 1.0 + label_dropout, atol=0.03)
    # Evaluation (train=False) never drops labels.
    eval_fn = step_lib.get_loss_fn(
        VPSDE(),
        _NullLabelProbe(),
        continuous=False,
        reduce_mean=True,
        train=False,
        label_dropout=label_dropout,
    )
    np.testing.assert_allclose(float(eval_fn({}, jax.random.key(0), batch)), 1.0, atol=0.03)


def test_label_dropout_needs_a_conditional_model_and_a_probability():
    probe = _NullLabelProbe()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        step_lib.get_loss_fn(VPSDE(), probe, label_dropout=1.0)
    unconditional = type("Model", (), {"config": type("C", (), {"num_classes": 0})})()
    with pytest.raises(ValueError, match="class-conditional model"):
        step_lib.get_loss_fn(VPSDE(), unconditional, label_dropout=0.1)
