"""Network targets: each written out from x_0 and eps by hand, converted both ways exactly,
and EDM's preconditioning against Karras et al.'s Table 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_sde import parametrization as param
from diffusion_sde.sde import EDMSDE, VESDE, VPSDE, CosineSDE, RectifiedFlow, subVPSDE

PATHS = [VPSDE(), subVPSDE(), VESDE(), CosineSDE(), EDMSDE(), RectifiedFlow()]
ids = lambda s: type(s).__name__


def setup(sde, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(6, 3))
    eps = rng.normal(size=(6, 3))
    t = np.linspace(0.05, 0.9, 6) * sde.T
    return x0, eps, t


def targets_by_hand(sde, x0, eps, t):
    """Each target from (x_0, eps) with alpha, sigma and derivatives by finite differences."""
    coeffs = lambda s: np.array(sde.marginal_coeffs(jnp.asarray(s, jnp.float32)), np.float64)
    alpha, sigma = coeffs(t)[:, :, None]
    h = 1e-3 * sde.T
    d_alpha, d_sigma = ((coeffs(t + h) - coeffs(t - h)) / (2 * h))[:, :, None]
    x = alpha * x0 + sigma * eps
    sigma_tilde = sigma / alpha
    c_skip = 0.25 / (sigma_tilde**2 + 0.25)
    c_out = sigma_tilde * 0.5 / np.sqrt(sigma_tilde**2 + 0.25)
    return x, {
        "eps": eps,
        "x0": x0,
        "v": alpha * eps - sigma * x0,
        "score": -eps / sigma,
        "velocity": d_alpha * x0 + d_sigma * eps,
        "edm": (x0 - c_skip * x / alpha) / c_out,
    }


@pytest.mark.parametrize("name", param.PARAMETRIZATIONS)
@pytest.mark.parametrize("sde", PATHS, ids=ids)
def test_conversions_both_ways(sde, name):
    x0, eps, t = setup(sde)
    x, targets = targets_by_hand(sde, x0, eps, t)
    c = param.path_coeffs(sde, jnp.asarray(t, jnp.float32), jnp.asarray(x, jnp.float32))
    xj = jnp.asarray(x, jnp.float32)
    target = param.from_data_prediction(name, c, jnp.asarray(x0, jnp.float32), xj)
    # Finite-difference derivatives: velocity to 1e-4 relative.
    np.testing.assert_allclose(target, targets[name], rtol=2e-4, atol=2e-4)
    back = param.to_data_prediction(name, c, jnp.asarray(targets[name], jnp.float32), xj)
    np.testing.assert_allclose(back, x0, rtol=1e-3, atol=1e-3)
    exact = param.to_data_prediction(name, c, target, xj)
    np.testing.assert_allclose(exact, x0, rtol=1e-4, atol=1e-4)
    score = param.to_score(name, c, target, xj)
    np.testing.assert_allclose(score, -eps / c.sigma, rtol=1e-3, atol=1e-3)


def test_edm_preconditioning_is_table_1():
    sigma = jnp.array([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = param.edm_preconditioning(sigma, 0.5)
    s = np.array([0.002, 0.5, 80.0])
    np.testing.assert_allclose(c_skip, 0.25 / (s**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, 0.5 * s / np.sqrt(0.25 + s**2), rtol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(0.25 + s**2), rtol=1e-6)
    np.testing.assert_allclose(c_noise, np.log(s) / 4, rtol=1e-6)
    # EDM's effective target has unit variance for data of std sigma_data (their eq. 140).
    key_x, key_n = jax.random.split(jax.random.PRNGKey(0))
    x0 = 0.5 * jax.random.normal(key_x, (200_000,))
    for level in (0.1, 1.0, 10.0):
        x = x0 + level * jax.random.normal(key_n, x0.shape)
        c = param.PathCoeffs(jnp.ones(()), jnp.asarray(level), None, None)
        np.testing.assert_allclose(
            jnp.std(param.from_data_prediction("edm", c, x0, x)), 1.0, rtol=0.01
        )
        np.testing.assert_allclose(jnp.std(param.network_input("edm", c, x)), 1.0, rtol=0.01)


def test_rectified_flow_velocity_is_noise_minus_data():
    x0, eps, t = setup(RectifiedFlow())
    x = (1 - t[:, None]) * x0 + t[:, None] * eps
    c = param.path_coeffs(RectifiedFlow(), jnp.asarray(t, jnp.float32), jnp.asarray(x))
    np.testing.assert_allclose(
        param.from_data_prediction("velocity", c, jnp.asarray(x0), jnp.asarray(x)),
        eps - x0,
        rtol=1e-5,
        atol=1e-5,
    )


def test_unknown_parametrization_lists_the_names():
    with pytest.raises(ValueError, match="velocity"):
        param.check_parametrization("flow")
