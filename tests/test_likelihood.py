"""Log-likelihood and bits/dim against closed forms: exact Gaussian-mixture densities,
Gaussian flows whose divergence integral is known, and counted score evaluations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_sde.likelihood import bits_per_dim, log_likelihood
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture

ALL_SDES = [VPSDE(), subVPSDE(), VESDE()]
EPS = 1e-5


def mixture(sde, dim, seed=0):
    """Unequal weights, narrow components, weighted mean zero.

    A zero mean keeps p_T close to the prior (the first-order mismatch vanishes), so the
    likelihood error measures the solver, not the prior.
    """
    rng = np.random.default_rng(seed)
    weights = np.array([0.5, 0.3, 0.2], np.float32)
    means = rng.uniform(-1.0, 1.0, (3, dim)).astype(np.float32)
    means -= weights @ means
    stds = np.array([0.05, 0.1, 0.07], np.float32)
    return GaussianMixture(weights=weights, means=means, stds=stds, sde=sde)


def samples_at(key, data, n, t):
    """Samples of p_t: x = alpha_t x_0 + sigma_t z."""
    data_key, noise_key = jax.random.split(key)
    x0 = data.sample(data_key, n)
    alpha, sigma = data.sde.marginal_coeffs(jnp.full((n,), t))
    return alpha[:, None] * x0 + sigma[:, None] * jax.random.normal(noise_key, x0.shape)


@pytest.mark.parametrize("dim", [2, 5])
@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_exact_estimator_matches_mixture_density(sde, dim):
    data, batch = mixture(sde, dim), 32
    x = samples_at(jax.random.PRNGKey(0), data, batch, EPS)
    logp, z, nfe = log_likelihood(jax.random.PRNGKey(1), sde, data.score, x, estimator="exact")
    true = data.log_density(x, jnp.full((batch,), EPS))
    assert np.max(np.abs(logp - true)) / dim < 0.01
    # With the exact p_T in place of the prior, what remains is the ODE solver's error. Its
    # tolerance bounds the RMS error over the batch, not each example's: test the mean.
    solver_logp = logp - sde.prior_logp(z) + data.log_density(z, jnp.full((batch,), sde.T))
    assert np.mean(np.abs(solver_logp - true)) / dim < 1e-3
    assert nfe > 0


def rotated_gaussian(dim, seed=0):
    """Covariance U diag(lambda) U^T with a random rotation, so that the Jacobian of
    the flow is not diagonal and Rademacher probes have non-zero variance."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eigenvalues = np.geomspace(0.02, 3.0, dim)
    return rotation.astype(np.float32), eigenvalues.astype(np.float32)


@pytest.mark.parametrize(
    ("estimator", "num_probes"), [("rademacher", 1), ("gaussian", 1), ("gaussian", 4)]
)
def test_hutchinson_estimators_are_unbiased_with_known_variance(estimator, num_probes):
    r"""Zero-mean Gaussian data N(0, Sigma) under VP: p_t = N(0, V_t), V_t = alpha^2 Sigma
    + sigma^2 I, and the flow's Jacobian -beta/2 (I - V_t^{-1}) does not depend on x. Its
    time integral is A = U diag(log(v_T / v_eps) / 2) U^T per eigenvalue v = alpha^2
    lambda + sigma^2, so each example's error eps^T A eps - tr A is independent with mean
    0 and variance 2 sum_{i != j} A_ij^2 (Rademacher) or 2 ||A||_F^2 (Gaussian), over K."""
    sde, dim, n = VPSDE(), 4, 2000
    rotation, eigenvalues = rotated_gaussian(dim)

    def score(x, t):
        alpha, sigma = sde.marginal_coeffs(t)
        inverse_v = 1.0 / (alpha[:, None] ** 2 * eigenvalues + sigma[:, None] ** 2)
        return -((x @ rotation) * inverse_v) @ rotation.T

    def v(t):
        alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
        return alpha**2 * eigenvalues + sigma**2

    x = jax.random.normal(jax.random.PRNGKey(0), (n, dim)) * np.sqrt(v(EPS)) @ rotation.T
    exact, _, _ = log_likelihood(jax.random.PRNGKey(1), sde, score, x, estimator="exact")
    closed = -0.5 * np.sum(np.log(2 * np.pi * v(EPS))) - 0.5 * np.sum(
        (x @ rotation) ** 2 / v(EPS), axis=1
    )
    np.testing.assert_allclose(exact, closed, atol=2e-3)

    estimate, _, _ = log_likelihood(
        jax.random.PRNGKey(2), sde, score, x, estimator=estimator, num_probes=num_probes
    )
    errors = np.asarray(estimate - exact, np.float64)
    A = rotation @ np.diag(0.5 * np.log(v(1.0) / v(EPS))) @ rotation.T
    off_diagonal = A - np.diag(np.diag(A))
    theory_var = 2 * np.sum((off_diagonal if estimator == "rademacher" else A) ** 2) / num_probes
    assert abs(errors.mean()) < 4 * np.sqrt(theory_var / n)
    assert 0.8 < errors.var() / theory_var < 1.25


def gaussian_model(sde, mean, std):
    """Score of N(mean, std^2 I) at time 0 pushed to time t, and ``(alpha_t, v_t)``."""

    def variance(t):
        alpha, sigma = sde.marginal_coeffs(jnp.asarray(t))
        return alpha, alpha**2 * std**2 + sigma**2

    def score(x, t):
        alpha, var = variance(t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return -(x - alpha.reshape(shape) * mean) / var.reshape(shape)

    return score, variance


@pytest.mark.parametrize("centered", [True, False])
def test_bits_per_dim_matches_closed_form(centered):
    r"""An isotropic Gaussian model N(m, s^2 I) in the model's space y = a x + b, x in
    [0, 1]. Under VP its probability flow is affine: x_t - alpha_t m = sqrt(v_t / v_eps)
    (y - alpha_eps m), v_t = alpha_t^2 s^2 + sigma_t^2, so with the N(0, I) prior

        log p(y) = log N(z; 0, I) + (D / 2) log(v_T / v_eps),
        bpd = -(log p(y) / D + log a - log 256) / ln 2,

    at the cell midpoint y = a (n + 1/2) / 256 + b (``dequantize=False``); uniform
    dequantisation, u ~ U[0, 1), leaves E y at the midpoint and adds Var(y) =
    a^2 / (12 256^2) per dimension, scaled by v_T / v_eps, to E|z|^2. (The Jacobian is proportional to I, so one Rademacher probe is exact.)
    """
    sde, batch, shape, levels = VPSDE(), 2048, (4, 4, 1), 256
    a, b = (2.0, -1.0) if centered else (1.0, 0.0)
    mean, std = (0.1, 3.0 / levels) if centered else (0.55, 1.5 / levels)
    score, variance = gaussian_model(sde, mean, std)
    (alpha_eps, v_eps), (alpha_T, v_T) = (map(float, variance(t)) for t in (EPS, sde.T))
    ratio, dim = v_T / v_eps, np.prod(shape)

    # Data one model std off the model's mean: dequantisation noise with a wrong mean
    # (not centred on the cell) then shifts E|z|^2 at first order.
    y = mean + std * (1.0 + np.random.default_rng(0).normal(size=(batch, *shape)))
    pixels = np.clip(np.floor(((y - b) / a) * levels), 0, levels - 1).astype(np.uint8)
    midpoint_y = a * (pixels + 0.5) / levels + b
    z = alpha_T * mean + np.sqrt(ratio) * (midpoint_y - alpha_eps * mean)
    z_squares = np.sum(np.reshape(z**2, (batch, -1)), axis=1, dtype=np.float64)

    def closed_bpd(z_squares):
        logp_y = -0.5 * dim * np.log(2 * np.pi) - 0.5 * z_squares + 0.5 * dim * np.log(ratio)
        return -(logp_y / dim + np.log(a) - np.log(levels)) / np.log(2)

    key = jax.random.PRNGKey(0)
    bpd, nfe = bits_per_dim(key, sde, score, pixels, centered=centered, dequantize=False)
    np.testing.assert_allclose(bpd, closed_bpd(z_squares), atol=2e-4)
    assert bpd.shape == (batch,) and nfe > 0

    bpd, _ = bits_per_dim(key, sde, score, pixels, centered=centered)
    dequantized_z_squares = z_squares + dim * ratio * a**2 / (12 * levels**2)
    differences = np.asarray(bpd, np.float64) - closed_bpd(dequantized_z_squares)
    standard_error = differences.std() / np.sqrt(batch)
    assert abs(differences.mean()) < 4 * standard_error
    # The check has the power to see a missing or mis-scaled dequantisation.
    assert np.mean(closed_bpd(dequantized_z_squares) - closed_bpd(z_squares)) > 8 * standard_error


@pytest.mark.parametrize("estimator", ["exact", "gaussian"])
def test_nfe_counts_every_score_evaluation(estimator):
    sde = VESDE()
    data, count = mixture(sde, 2), []

    def counting_score(x, t):
        jax.debug.callback(lambda: count.append(1))
        return data.score(x, t)

    x = samples_at(jax.random.PRNGKey(0), data, 8, EPS)
    _, _, nfe = log_likelihood(jax.random.PRNGKey(1), sde, counting_score, x, estimator=estimator)
    jax.effects_barrier()
    assert jnp.issubdtype(nfe.dtype, jnp.integer)
    assert int(nfe) == len(count) > 0


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(ValueError, match="exact.*gaussian.*rademacher"):
        log_likelihood(jax.random.PRNGKey(0), VPSDE(), None, jnp.zeros((1, 2)), estimator="x")
