"""The SDEs against closed forms, direct simulation and the DDPM / SMLD chains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from diffusion_sde.sde import VESDE, VPSDE, subVPSDE

BETA_MIN, BETA_MAX, SIGMA_MIN, SIGMA_MAX = 0.1, 20.0, 0.01, 50.0
ALL_SDES = [VPSDE(), subVPSDE(), VESDE()]


def numpy_beta_integral(t):
    """Independent quadrature of beta(s) = beta_min + s (beta_max - beta_min) on [0, t]."""
    return scipy.integrate.quad(lambda s: BETA_MIN + s * (BETA_MAX - BETA_MIN), 0.0, t)[0]


def numpy_marginal(name, t):
    """(alpha_t, sigma_t) from the paper's formulas, with numerical integrals."""
    if name == "VESDE":
        return 1.0, SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
    integral = numpy_beta_integral(t)
    alpha = np.exp(-0.5 * integral)
    if name == "VPSDE":
        return alpha, np.sqrt(1.0 - np.exp(-integral))
    return alpha, 1.0 - np.exp(-integral)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_marginal_prob_matches_closed_form(sde):
    t = np.array([1e-3, 0.1, 0.37, 0.8, 1.0])
    x = np.full((5, 3), 1.7, np.float32)
    mean, std = sde.marginal_prob(jnp.asarray(x), jnp.asarray(t, jnp.float32))
    expected = np.array([numpy_marginal(type(sde).__name__, ti) for ti in t])
    np.testing.assert_allclose(mean[:, 0], 1.7 * expected[:, 0], rtol=1e-5)
    np.testing.assert_allclose(std, expected[:, 1], rtol=1e-4)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_marginal_prob_matches_simulated_forward_sde(sde, optimised_jit):
    """Fine Euler--Maruyama paths of dx = f dt + g dw from a fixed x(0).

    VE starts from x(0) + sigma_min z, the convention under which sigma(t) is exact.
    """
    num_paths, num_steps = 40_000, 2_000
    x0 = jnp.array([1.5, -0.7])
    dt = 1.0 / num_steps
    key0, key = jax.random.split(jax.random.PRNGKey(0))
    x = jnp.broadcast_to(x0, (num_paths, 2))
    if isinstance(sde, VESDE):
        x = x + SIGMA_MIN * jax.random.normal(key0, x.shape)
    record = {500: 0.25, 1000: 0.5, 2000: 1.0}

    @optimised_jit
    def simulate(x):
        def step(x, i):
            t = jnp.full((num_paths,), i * dt)
            drift, diffusion = sde.sde(x, t)
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            x = x + drift * dt + diffusion[:, None] * jnp.sqrt(dt) * z
            return x, (jnp.mean(x, axis=0), jnp.std(x, axis=0))

        return jax.lax.scan(step, x, jnp.arange(num_steps))[1]

    means, stds = simulate(x)
    for step, t in record.items():
        mean, std = sde.marginal_prob(x0[None], jnp.array([t]))
        sample_mean, sample_std = means[step - 1], stds[step - 1]
        # Monte-Carlo standard errors of the mean and the std, plus O(dt) bias.
        tolerance_mean = 5 * std[0] / np.sqrt(num_paths) + 2e-3 * np.abs(mean[0])
        np.testing.assert_array_less(np.abs(sample_mean - mean[0]), tolerance_mean)
        np.testing.assert_allclose(sample_std, std[0], rtol=5 / np.sqrt(2 * num_paths) + 2e-3)


def test_vp_discretize_is_the_ddpm_chain():
    N = 1000
    sde = VPSDE(N=N)
    betas = np.linspace(BETA_MIN / N, BETA_MAX / N, N)
    i = np.array([0, 1, 17, 500, 998, 999])
    x = np.random.default_rng(0).normal(size=(len(i), 4)).astype(np.float32)
    f, G = sde.discretize(jnp.asarray(x), jnp.asarray(i / (N - 1), jnp.float32))
    # x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z  <=>  f = (sqrt(1-beta_i) - 1) x, G = sqrt(beta_i)
    np.testing.assert_allclose(x + f, np.sqrt(1 - betas[i])[:, None] * x, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-6)
    np.testing.assert_allclose(sde.discrete_betas, betas, rtol=1e-6)


def test_ddpm_alpha_bar_converges_to_marginal_at_first_order():
    """sqrt(prod_{j<=i}(1 - beta_j)) vs alpha(t_i): error O(1/N), halving when N doubles."""

    def max_error(N):
        betas = np.linspace(BETA_MIN / N, BETA_MAX / N, N)
        sqrt_alpha_bar = np.sqrt(np.cumprod(1.0 - betas))
        alpha, _ = VPSDE(N=N).marginal_coeffs(jnp.linspace(0.0, 1.0, N))
        np.testing.assert_allclose(
            np.asarray(VPSDE(N=N).alphas_cumprod), np.cumprod(1 - betas), rtol=1e-4
        )
        return np.max(np.abs(sqrt_alpha_bar - np.asarray(alpha, np.float64)))

    e1, e2 = max_error(1000), max_error(2000)
    assert e1 < 10.0 / 1000
    assert 1.7 < e1 / e2 < 2.3, (e1, e2)


def test_ve_discretize_is_smld():
    N = 1000
    sde = VESDE(N=N)
    sigmas = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** (np.arange(N) / (N - 1))
    i = np.array([0, 1, 2, 400, 999])
    x = np.ones((len(i), 3), np.float32)
    f, G = sde.discretize(jnp.asarray(x), jnp.asarray(i / (N - 1), jnp.float32))
    previous = np.where(i == 0, 0.0, sigmas[np.maximum(i - 1, 0)])
    np.testing.assert_allclose(G, np.sqrt(sigmas[i] ** 2 - previous**2), rtol=2e-4)
    np.testing.assert_array_equal(f, 0.0)
    np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-4)


def test_subvp_definition_and_variance_below_vp():
    vp, subvp = VPSDE(), subVPSDE()
    t = np.linspace(1e-4, 1.0, 50)
    x = np.random.default_rng(1).normal(size=(50, 2)).astype(np.float32)
    drift, diffusion = subvp.sde(jnp.asarray(x), jnp.asarray(t, jnp.float32))
    beta_t = BETA_MIN + t * (BETA_MAX - BETA_MIN)
    integrals = np.array([numpy_beta_integral(ti) for ti in t])
    np.testing.assert_allclose(drift, -0.5 * beta_t[:, None] * x, rtol=1e-5)
    np.testing.assert_allclose(diffusion**2, beta_t * (1 - np.exp(-2 * integrals)), rtol=1e-4)
    _, std_vp = vp.marginal_coeffs(jnp.asarray(t))
    _, std_subvp = subvp.marginal_coeffs(jnp.asarray(t))
    assert np.all(np.asarray(std_subvp) <= np.asarray(std_vp))
    # sub-VP's marginal variance is VP's squared: (1 - e^{-int beta})^2 <= 1 - e^{-int beta}.
    np.testing.assert_allclose(std_subvp, std_vp**2, rtol=1e-5)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_prior_logp_is_normal_density(sde):
    z = np.random.default_rng(2).normal(size=(4, 3, 5), scale=7.0).astype(np.float32)
    scale = SIGMA_MAX if isinstance(sde, VESDE) else 1.0
    expected = scipy.stats.norm.logpdf(z, scale=scale).reshape(4, -1).sum(-1)
    np.testing.assert_allclose(sde.prior_logp(jnp.asarray(z)), expected, rtol=1e-5)
    samples = sde.prior_sampling(jax.random.PRNGKey(3), (20_000, 2))
    np.testing.assert_allclose(np.std(samples), scale, rtol=0.02)


def score(x, t):
    return -x * (1.0 + t[:, None]) + 0.3


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_reverse_drift_and_probability_flow(sde):
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, 2)), jnp.float32)
    t = jnp.linspace(0.05, 0.95, 6)
    f, g = sde.sde(x, t)
    f_i, G_i = sde.discretize(x, t)
    s = score(x, t)
    for probability_flow, weight in [(False, 1.0), (True, 0.5)]:
        rsde = sde.reverse(score, probability_flow=probability_flow)
        drift, diffusion = rsde.sde(x, t)
        np.testing.assert_allclose(drift, f - weight * g[:, None] ** 2 * s, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(diffusion, 0.0 if probability_flow else g, rtol=1e-6)
        rev_f, rev_G = rsde.discretize(x, t)
        np.testing.assert_allclose(
            rev_f, f_i - weight * G_i[:, None] ** 2 * s, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(rev_G, 0.0 if probability_flow else G_i, rtol=1e-6)


@pytest.mark.parametrize("sde", ALL_SDES, ids=lambda s: type(s).__name__)
def test_log_snr_and_its_inverse(sde):
    t = np.linspace(1e-3, 1.0, 30)
    alpha, sigma = np.array([numpy_marginal(type(sde).__name__, ti) for ti in t]).T
    log_snr = sde.log_snr(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(log_snr, np.log(alpha / sigma), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sde.t_from_log_snr(log_snr), t, rtol=1e-3, atol=1e-5)


def test_sdes_are_jit_arguments_without_recompiling():
    traces = []

    @jax.jit
    def std_at_half(sde):
        traces.append(type(sde))
        return sde.marginal_prob(jnp.zeros((1, 1)), jnp.array([0.5]))[1]

    a, b = std_at_half(VESDE(sigma_max=50.0)), std_at_half(VESDE(sigma_max=10.0))
    assert len(traces) == 1 and not np.allclose(a, b)
    np.testing.assert_allclose(b, 0.01 * np.sqrt(1000.0), rtol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 -- frozen dataclass
        VPSDE().beta_min = 1.0


def test_one_minus_exp_is_accurate_for_small_and_large_arguments():
    from diffusion_sde.sde import one_minus_exp

    y = np.logspace(-9, 2, 60)
    np.testing.assert_allclose(one_minus_exp(jnp.asarray(y, jnp.float32)), -np.expm1(-y), rtol=2e-6)
