"""The affine paths (cosine, EDM, rectified flow) against closed forms and a simulated
forward SDE; the affine-path formulas for f and g against the 2021 SDEs' closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffusion_sde.sde import (
    EDMSDE,
    SDE,
    VESDE,
    VPSDE,
    CosineSDE,
    RectifiedFlow,
    get_sde,
    subVPSDE,
)

NEW_PATHS = [CosineSDE(), EDMSDE(), RectifiedFlow()]
ids = lambda s: type(s).__name__
S = 0.008  # Nichol & Dhariwal's offset


def closed_form(sde, t):
    """(alpha, sigma, f, g^2) written out by hand from each paper."""
    t = np.asarray(t, np.float64)
    if isinstance(sde, CosineSDE):
        phi = (t + S) / (1 + S) * np.pi / 2
        alpha_bar = np.cos(phi) ** 2 / np.cos(S / (1 + S) * np.pi / 2) ** 2
        beta = np.pi / (1 + S) * np.tan(phi)  # -d log alpha_bar / dt
        return np.sqrt(alpha_bar), np.sqrt(1 - alpha_bar), -0.5 * beta, beta
    if isinstance(sde, EDMSDE):
        return np.ones_like(t), t, np.zeros_like(t), 2 * t
    return 1 - t, t, -1 / (1 - t), 2 * t / (1 - t)


def times(sde, n=7):
    return np.linspace(0.01, 0.98, n) * sde.T


@pytest.mark.parametrize("sde", NEW_PATHS, ids=ids)
def test_marginals_drift_and_diffusion_match_closed_forms(sde):
    t = times(sde)
    alpha, sigma, f, g2 = closed_form(sde, t)
    x = jnp.full((len(t), 3), 1.7)
    mean, std = sde.marginal_prob(x, jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(mean[:, 0], 1.7 * alpha, rtol=1e-5)
    np.testing.assert_allclose(std, sigma, rtol=1e-5)
    drift, diffusion = sde.sde(x, jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(drift[:, 0], 1.7 * f, rtol=1e-4)
    np.testing.assert_allclose(diffusion**2, g2, rtol=1e-4)


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=ids)
def test_affine_path_formulas_give_the_2021_sdes(sde):
    """f = d log alpha / dt and g^2 = d sigma^2/dt - 2 f sigma^2 from the marginals alone
    equal the closed-form drift and diffusion of the 2021 SDEs."""
    t = jnp.linspace(0.01, 1.0, 9)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(9, 2)), jnp.float32)
    drift, diffusion = SDE.sde(sde, x, t)
    expected_drift, expected_diffusion = sde.sde(x, t)
    np.testing.assert_allclose(drift, expected_drift, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(diffusion, expected_diffusion, rtol=1e-5)


@pytest.mark.parametrize("sde", NEW_PATHS, ids=ids)
def test_marginals_match_simulated_forward_sde(sde, optimised_jit):
    """Euler--Maruyama paths of dx = f x dt + g dw from a fixed x(0) (from sigma at 1% of T
    for EDM, x(0) + N(0, sigma^2) there) reproduce alpha_t x(0) and sigma_t."""
    num_paths, num_steps = 40_000, 2_000
    x0 = jnp.array([1.5, -0.7])
    t0 = 0.0 if not isinstance(sde, EDMSDE) else 0.01 * sde.T
    t_end = 0.9 * sde.T  # RF and cosine are stiff next to T
    dt = (t_end - t0) / num_steps
    key0, key = jax.random.split(jax.random.PRNGKey(0))
    mean0, std0 = sde.marginal_prob(x0[None], jnp.array([t0]))
    x = mean0 + std0[0] * jax.random.normal(key0, (num_paths, 2))

    @optimised_jit
    def simulate(x):
        def step(x, i):
            t = jnp.full((num_paths,), t0 + i * dt)
            drift, diffusion = sde.sde(x, t)
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            x = x + drift * dt + diffusion[:, None] * jnp.sqrt(dt) * z
            return x, (jnp.mean(x, axis=0), jnp.std(x, axis=0))

        return jax.lax.scan(step, x, jnp.arange(num_steps))[1]

    means, stds = simulate(x)
    for step in (500, 1000, 2000):
        t = t0 + step * dt
        mean, std = sde.marginal_prob(x0[None], jnp.array([t], jnp.float32))
        tolerance_mean = 5 * std[0] / np.sqrt(num_paths) + 3e-3 * np.abs(mean[0])
        np.testing.assert_array_less(np.abs(means[step - 1] - mean[0]), tolerance_mean)
        np.testing.assert_allclose(stds[step - 1], std[0], rtol=5 / np.sqrt(2 * num_paths) + 3e-3)


@pytest.mark.parametrize("sde", NEW_PATHS, ids=ids)
def test_log_snr_and_its_inverse(sde):
    t = times(sde, 30)
    alpha, sigma, _, _ = closed_form(sde, t)
    log_snr = sde.log_snr(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(log_snr, np.log(alpha / sigma), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sde.t_from_log_snr(log_snr), t, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("sde", NEW_PATHS, ids=ids)
def test_prior_is_normal_with_the_std_at_T(sde):
    scale = closed_form(sde, sde.T)[1]
    z = np.random.default_rng(2).normal(size=(4, 3, 5), scale=7.0).astype(np.float32)
    expected = scipy.stats.norm.logpdf(z, scale=scale).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), expected, rtol=1e-5)
    samples = sde.prior_sampling(jax.random.PRNGKey(3), (20_000, 2))
    np.testing.assert_allclose(np.std(samples), scale, rtol=0.02)


def test_end_times_keep_alpha_positive():
    assert 0 < float(CosineSDE().marginal_coeffs(jnp.array(CosineSDE().T))[0]) < 0.01
    np.testing.assert_allclose(RectifiedFlow().marginal_coeffs(jnp.array(0.999))[0], 1e-3, 1e-3)
    assert EDMSDE().T == 80.0


def test_get_sde_builds_every_path_and_lists_names():
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(
            training=dict(sde="edm"),
            model=dict(sigma_min=0.002, sigma_max=80.0, num_scales=18, beta_min=0.1, beta_max=20.0),
        )
    )
    assert get_sde(config) == EDMSDE(N=18)
    for name, kind in [("cosine", CosineSDE), ("rectified_flow", RectifiedFlow)]:
        config.training.sde = name
        assert isinstance(get_sde(config), kind)
    config.training.sde = "flow"
    with pytest.raises(ValueError, match="rectified_flow"):
        get_sde(config)
