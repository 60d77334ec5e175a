"""The exact Gaussian-mixture scores against independent closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture

SDES = {"vp": VPSDE(), "subvp": subVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=5.0)}
WEIGHTS = np.array([0.6, 0.3, 0.1])
MEANS = np.array([[-1.0, 0.5], [1.5, 0.0], [0.0, -2.0]])
STDS = np.array([0.2, 0.5, 0.1])


def mixture(sde):
    return GaussianMixture(jnp.asarray(WEIGHTS), jnp.asarray(MEANS), jnp.asarray(STDS), sde)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_log_density_and_score_match_scipy_and_autodiff(sde_name):
    sde = SDES[sde_name]
    x = jax.random.normal(jax.random.key(0), (6, 2)) * 2.0
    t = jnp.array([0.0, 0.01, 0.1, 0.4, 0.7, 1.0])
    alpha, sigma = (np.asarray(c, np.float64) for c in sde.marginal_coeffs(t))
    expected = np.zeros(6)
    for w, mu, s in zip(WEIGHTS, MEANS, STDS, strict=True):
        var = alpha**2 * s**2 + sigma**2
        expected += w * np.prod(
            stats.norm.pdf(np.asarray(x), alpha[:, None] * mu, np.sqrt(var)[:, None]), -1
        )
    mix = mixture(sde)
    np.testing.assert_allclose(mix.log_density(x, t), np.log(expected), rtol=1e-5, atol=1e-5)
    autodiff = jax.grad(lambda y: jnp.sum(mix.log_density(y, t)))(x)
    np.testing.assert_allclose(mix.score(x, t), autodiff, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jnp.sum(mix.posterior(x, t), -1), 1.0, rtol=1e-6)


def test_samples_have_the_mixture_weights_and_moments():
    mix = mixture(VPSDE())
    x, components = jax.jit(mix.sample_with_components, static_argnums=1)(jax.random.key(1), 20_000)
    frequencies, distance = jax.jit(
        lambda x: (mix.mode_frequencies(x), mix.standardized_distance(x))
    )(x)
    x, components = np.asarray(x), np.asarray(components)
    np.testing.assert_allclose(np.bincount(components, minlength=3) / 20_000, WEIGHTS, atol=0.01)
    np.testing.assert_allclose(frequencies, WEIGHTS, atol=0.01)
    np.testing.assert_allclose(np.mean(x, 0), WEIGHTS @ MEANS, atol=0.02)
    for k in range(3):
        np.testing.assert_allclose(np.std(x[components == k], 0), STDS[k], rtol=0.05)
    assert 0.8 < float(np.mean(distance)) < 1.0  # E|z|/sqrt(2) = sqrt(pi)/2 for 2-D z.


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_perturbed_samples_follow_log_density(sde_name):
    """alpha_t x_0 + sigma_t z has the moments of the mixture that log_density describes."""
    sde, t = SDES[sde_name], 0.3
    mix = mixture(sde)
    x0 = mix.sample(jax.random.key(2), 50_000)
    mean, std = sde.marginal_prob(x0, jnp.full(50_000, t))
    xt = mean + std[:, None] * jax.random.normal(jax.random.key(3), x0.shape)
    alpha, sigma = (float(c) for c in sde.marginal_coeffs(jnp.array(t)))
    variance = (
        WEIGHTS @ ((alpha**2 * STDS**2 + sigma**2)[:, None] + alpha**2 * MEANS**2)
        - (alpha * WEIGHTS @ MEANS) ** 2
    )
    np.testing.assert_allclose(jnp.var(xt, 0), variance, rtol=0.03)
    # The score has zero mean under p_t (integration by parts).
    score = mix.score(xt, jnp.full(50_000, t))
    np.testing.assert_allclose(jnp.mean(score, 0), 0.0, atol=0.05 / np.sqrt(variance).min())
