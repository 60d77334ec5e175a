"""Controllable generation with exact Gaussian-mixture scores: inpainting, colorization,
classifier guidance, classifier-free guidance and the noise-conditional classifier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_sde import controllable
from diffusion_sde.controllable import (
    DECOUPLING_MATRIX,
    classifier_free_guided_score,
    classifier_guided_score,
    colorize,
    decouple,
    inpaint,
)
from diffusion_sde.models.classifier import NoiseConditionalClassifier, classifier_log_prob_fn
from diffusion_sde.sampling import pc_sample
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE
from diffusion_sde.toy_scores import GaussianMixture
from diffusion_sde.training.classifier import train_classifier


def tv_tolerance(probabilities, n, sampler_error=0.02):
    """4 binomial standard deviations per mode (each exceeded with probability 6e-5), halved
    as in the total variation, plus the sampler's own discretisation error."""
    p = np.asarray(probabilities)
    return 0.5 * float(np.sum(4.0 * np.sqrt(p * (1.0 - p) / n))) + sampler_error


def component_score(mixture, labels):
    """The exact score of component ``labels[b]`` alone, for each example ``b``."""

    def score(x, t):
        alpha, sigma = mixture.sde.marginal_coeffs(t)
        mean = alpha[:, None] * mixture.means[labels]
        variance = alpha**2 * mixture.stds[labels] ** 2 + sigma**2
        return (mean - x) / variance[:, None]

    return score


# --- Inpainting ----------------------------------------------------------------------------

# x = (known, unknown). Two groups of three components, far apart in the known coordinate
# (+-10) and close in the unknown one (-2, 0, 2; std 0.2): conditioning on the known value
# selects a group, whose unknown modes have weights w_k / sum_group w. The noisy known
# coordinate identifies the group long before the unknown one commits to a mode, the regime
# in which the replacement method samples the true conditional (see controllable's
# docstring for its bias otherwise). Its example there, measured with the exact score, 200 PC
# steps and 2,000 samples: the mode x_2 = 3 of conditional weight 0.25 (0.55 unconditionally)
# receives 0.45 of the samples on VP and VE, 0.47 on sub-VP.
INPAINT_MEANS = jnp.array([[k, u] for k in (-10.0, 10.0) for u in (-2.0, 0.0, 2.0)])
INPAINT_WEIGHTS = jnp.array([0.04, 0.06, 0.3, 0.36, 0.18, 0.06])
INPAINT_STDS = jnp.full((6,), 0.2)
INPAINT_CASES = {
    "vp": (VPSDE(), dict(predictor="reverse_diffusion", corrector="langevin")),
    "subvp": (subVPSDE(), dict(predictor="euler_maruyama", corrector="ald")),
    "ve": (VESDE(sigma_max=30.0), dict(predictor="ancestral_sampling", corrector="langevin")),
}


def conditional_weights(weights, means, stds, known_value):
    """p(component | x_known) ∝ w_k N(x_known; mu_k,known, s_k^2), the weights of the
    conditional mixture p(x_unknown | x_known) (isotropic components)."""
    w, mu, s = (np.asarray(a, np.float64) for a in (weights, means, stds))
    log_w = np.log(w) - np.log(s) - 0.5 * ((known_value - mu[:, 0]) / s) ** 2
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


@pytest.mark.parametrize("sde_name", list(INPAINT_CASES))
def test_inpainting_keeps_known_entries_and_samples_the_conditional(sde_name):
    sde, kwargs = INPAINT_CASES[sde_name]
    mixture = GaussianMixture(INPAINT_WEIGHTS, INPAINT_MEANS, INPAINT_STDS, sde)
    n = 1000
    known_values = jnp.repeat(jnp.array([-10.0, 10.0]), n)
    data = jnp.stack([known_values, jnp.full_like(known_values, jnp.nan)], axis=-1)
    mask = jnp.array([1.0, 0.0])
    x, nfe = inpaint(jax.random.key(0), sde, mixture.score, data, mask, num_steps=100, **kwargs)
    np.testing.assert_array_equal(x[:, 0], known_values)
    assert nfe == 200 and bool(jnp.all(jnp.isfinite(x)))
    # Unconditioned, the unknown coordinate would have the marginal weights (0.4, 0.24, 0.36).
    marginal = np.asarray(INPAINT_WEIGHTS).reshape(2, 3).sum(0)
    for group, known_value in enumerate((-10.0, 10.0)):
        samples = x[group * n : (group + 1) * n]
        expected = conditional_weights(INPAINT_WEIGHTS, INPAINT_MEANS, INPAINT_STDS, known_value)
        frequencies = np.asarray(mixture.mode_frequencies(samples))
        total_variation = 0.5 * np.abs(frequencies - expected).sum()
        tolerance = tv_tolerance(expected, n)
        print(f"{sde_name} x_known={known_value}: TV {total_variation:.4f} < {tolerance:.4f}")
        assert total_variation < tolerance, (frequencies, expected)
        expected_unknown = expected[3 * group : 3 * group + 3]
        assert 0.5 * np.abs(marginal - expected_unknown).sum() > 2 * tolerance
        assert float(jnp.mean(mixture.standardized_distance(samples) < 3.0)) > 0.97


@pytest.mark.parametrize(
    "sde_name, kwargs",
    [
        ("vp", dict(predictor="reverse_diffusion", corrector="langevin", n_steps=2)),
        ("subvp", dict(predictor="euler_maruyama", corrector="none", probability_flow=True)),
        ("ve", dict(predictor="none", corrector="ald")),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(map(str, value.values())),
)
def test_score_sees_known_entries_forward_diffused_to_its_time(sde_name, kwargs):
    """Every score evaluation at time t sees the known entries distributed as
    p_0t(x_t | x_0) = N(alpha_t x_0, sigma_t^2): standardised, mean 0 and variance 1 (a
    replacement at the wrong time or with the wrong constants fails), one call per nfe."""
    sde = {
        "vp": VPSDE(N=25),
        "subvp": subVPSDE(N=25),
        "ve": VESDE(sigma_min=0.05, sigma_max=5.0, N=25),
    }[sde_name]
    calls = []

    def score_fn(x, t):
        jax.debug.callback(lambda x, t: calls.append((np.asarray(x), np.asarray(t))), x, t)
        return -x  # Any score: only what it is shown matters here.

    data = jnp.broadcast_to(jnp.array([3.0, -1.0, 0.5, 2.0]).reshape(1, 2, 2, 1), (512, 2, 2, 1))
    mask = jnp.array([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 2, 2, 1)
    x, nfe = inpaint(jax.random.key(1), sde, score_fn, data, mask, num_steps=25, **kwargs)
    jax.effects_barrier()
    np.testing.assert_array_equal(np.where(mask, x, 0.0), np.where(mask, data, 0.0))
    assert nfe == len(calls) > 0
    known = np.broadcast_to(np.asarray(mask, bool), data.shape)
    standardized = []
    for x_seen, t in calls:
        alpha, sigma = (np.asarray(c, np.float64) for c in sde.marginal_coeffs(jnp.asarray(t)))
        z = (x_seen - alpha[:, None, None, None] * np.asarray(data)) / sigma[:, None, None, None]
        standardized.append(z[known])
    z = np.concatenate(standardized)
    assert abs(z.mean()) < 4.0 / np.sqrt(z.size)
    assert abs(z.var() - 1.0) < 4.0 * np.sqrt(2.0 / z.size)


# --- Colorization --------------------------------------------------------------------------


def test_decoupling_matrix_is_orthogonal_with_the_grey_axis_first():
    M = np.asarray(DECOUPLING_MATRIX, np.float64)
    np.testing.assert_allclose(M @ M.T, np.eye(3), atol=1e-7)
    np.testing.assert_allclose(M[0], np.full(3, 1.0 / np.sqrt(3.0)), atol=1e-7)
    rgb = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
    np.testing.assert_allclose(controllable.couple(decouple(rgb)), rgb, atol=1e-6)
    np.testing.assert_allclose(decouple(rgb)[..., 0], rgb.sum(-1) / np.sqrt(3.0), atol=1e-6)


def test_colorization_keeps_the_grey_level_and_samples_the_colours():
    """Pixels i.i.d. N(mu, Sigma) in RGB with Sigma = M^T diag(v) M: in the decoupled space
    grey and chroma are independent, so the colourings' chroma channels are N((M mu)_c, v_c)
    whatever the grey level (a score mapped with M^T in place of M fails this)."""
    M = jnp.asarray(DECOUPLING_MATRIX)
    mu = jnp.array([0.3, -0.2, 0.1])
    variances = jnp.array([0.5, 0.04, 0.25])
    covariance = M.T @ jnp.diag(variances) @ M
    sde = VPSDE(N=100)

    def score_fn(x, t):  # -(alpha^2 Sigma + sigma^2 I)^{-1} (x - alpha mu), per pixel
        alpha, sigma = sde.marginal_coeffs(t)
        perturbed = alpha[:, None, None] ** 2 * covariance + sigma[:, None, None] ** 2 * jnp.eye(3)
        residual = x - alpha[:, None, None, None] * mu
        return -jnp.einsum("bij,bhwj->bhwi", jnp.linalg.inv(perturbed), residual)

    rgb = (
        mu
        + jax.random.normal(jax.random.key(0), (256, 2, 2, 3)) @ jnp.linalg.cholesky(covariance).T
    )
    gray = rgb.mean(-1, keepdims=True)
    colour, nfe = colorize(jax.random.key(1), sde, score_fn, gray, num_steps=100)
    assert colour.shape == (256, 2, 2, 3) and nfe == 200
    np.testing.assert_allclose(colour.mean(-1, keepdims=True), gray, atol=1e-6)
    np.testing.assert_allclose(decouple(colour)[..., :1], np.sqrt(3.0) * gray, atol=1e-6)
    chroma = np.asarray(decouple(colour)[..., 1:]).reshape(-1, 2)
    n = chroma.shape[0]
    expected_mean, expected_var = np.asarray(M @ mu)[1:], np.asarray(variances)[1:]
    print(f"chroma mean {chroma.mean(0)} (exact {expected_mean}), var {chroma.var(0)} "
          f"(exact {expected_var})")  # fmt: skip
    # Standard errors of the mean and of the variance of n Gaussian values, with room for
    # the sampler's error (the score is exact).
    assert np.all(np.abs(chroma.mean(0) - expected_mean) < 4 * np.sqrt(expected_var / n) + 0.01)
    np.testing.assert_allclose(chroma.var(0), expected_var, rtol=4 * np.sqrt(2 / n) + 0.05)


# --- Guidance ------------------------------------------------------------------------------

WEIGHTS = jnp.array([0.5, 0.3, 0.2])
MEANS = jnp.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]])
STDS = jnp.array([0.3, 0.5, 0.3])


def exact_log_prob_fn(mixture):
    """log p_t(y | x): the log posterior of the components."""
    return lambda x, t: jax.nn.log_softmax(mixture.component_log_densities(x, t), axis=-1)


def test_classifier_guided_score_is_the_component_score():
    """grad log p_t(x) + grad log p_t(y | x) = grad log p_t(x | y), pointwise."""
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, VPSDE())
    x = 2.0 * jax.random.normal(jax.random.key(0), (12, 2))
    t = jnp.linspace(0.01, 1.0, 12)
    labels = jnp.arange(12) % 3
    guided = classifier_guided_score(mixture.score, exact_log_prob_fn(mixture), labels, 1.0)
    expected = component_score(mixture, labels)
    np.testing.assert_allclose(jax.jit(guided)(x, t), jax.jit(expected)(x, t), atol=1e-4)


@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_classifier_guidance_samples_the_chosen_component(sde_name):
    sde = {"vp": VPSDE(N=100), "ve": VESDE(sigma_max=10.0, N=100)}[sde_name]
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    labels = jnp.arange(600) % 3
    guided = classifier_guided_score(mixture.score, exact_log_prob_fn(mixture), labels, 1.0)
    x, nfe = pc_sample(jax.random.key(2), sde, guided, (600, 2))
    assigned = jnp.argmax(mixture.posterior(x, jnp.zeros(600)), axis=-1)
    hits = float(jnp.mean(assigned == labels))
    print(f"{sde_name}: {hits:.4f} of the samples in the chosen component")
    assert hits > 0.97
    assert nfe == 200


def test_classifier_free_guidance_interpolates_exactly():
    """Scale 0 is unconditional and scale 1 conditional sampling, bit for bit with the same
    key; at scale 1 with exact component scores the samples are in the chosen component."""
    sde = VPSDE(N=50)
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    labels = jnp.arange(300) % 3
    conditional = component_score(mixture, labels)
    sample = lambda score_fn: pc_sample(jax.random.key(3), sde, score_fn, (300, 2))[0]
    for scale, target in ((0.0, mixture.score), (1.0, conditional)):
        guided = classifier_free_guided_score(conditional, mixture.score, scale)
        np.testing.assert_array_equal(sample(guided), sample(target))
    x = sample(conditional)
    assigned = jnp.argmax(mixture.posterior(x, jnp.zeros(300)), axis=-1)
    hits = float(jnp.mean(assigned == labels))
    print(f"scale 1: {hits:.4f} of the samples in the chosen component")
    assert hits > 0.97
    # Scale 2: the score s_u + 2 (s_c - s_u), pointwise.
    guided = jax.jit(classifier_free_guided_score(conditional, mixture.score, 2.0))
    expected = jax.jit(lambda y, t: 2.0 * conditional(y, t) - mixture.score(y, t))
    t, y = jnp.full((300,), 0.3), jax.random.normal(jax.random.key(4), (300, 2))
    np.testing.assert_allclose(guided(y, t), expected(y, t), rtol=1e-5, atol=1e-5)


# --- The noise-conditional classifier ------------------------------------------------------

# The classifier tests use RBG keys: XLA:CPU compiles threefry, which every parameter
# initialiser calls, slowly (about 20 s for the small convolutional classifier, under load).
rbg_key = lambda seed: jax.random.key(seed, impl="rbg")


def test_train_classifier_learns_the_noise_conditional_posterior():
    """Trained for 300 steps on forward-diffused samples of a 3-component mixture, the
    classifier labels nearly clean samples (t = 0.01) almost perfectly, and at every noise
    level its cross-entropy on fresh x_t ~ p_t is near that of the exact posterior (the
    Bayes classifier); its log-probabilities drive ``classifier_guided_score``."""
    sde = VPSDE()
    mixture = GaussianMixture(WEIGHTS, MEANS, STDS, sde)
    x, labels = jax.jit(mixture.sample_with_components, static_argnums=1)(jax.random.key(5), 4096)
    model = NoiseConditionalClassifier(num_classes=3, features=32)
    params, losses = train_classifier(
        rbg_key(6), sde, (x, labels), model=model, num_steps=300, batch_size=128,
        learning_rate=3e-3,
    )  # fmt: skip
    assert losses.shape == (300,) and np.all(np.isfinite(losses))
    log_prob_fn = classifier_log_prob_fn(sde, model, params)

    @jax.jit
    def evaluate(key, t):
        x, labels = mixture.sample_with_components(key, 4000)
        t = jnp.full((4000,), t)
        mean, std = sde.marginal_prob(x, t)
        x_t = mean + std[:, None] * jax.random.normal(jax.random.fold_in(key, 1), x.shape)
        log_probs = {"classifier": log_prob_fn(x_t, t), "bayes": exact_log_prob_fn(mixture)(x_t, t)}
        accuracy = {k: jnp.mean(jnp.argmax(v, -1) == labels) for k, v in log_probs.items()}
        cross_entropy = {
            k: -jnp.mean(jnp.take_along_axis(v, labels[:, None], -1)) for k, v in log_probs.items()
        }
        guided = classifier_guided_score(mixture.score, log_prob_fn, labels, 1.0)(x_t, t)
        return accuracy, cross_entropy, guided

    for t in (0.6, 0.3, 0.01):
        accuracy, cross_entropy, guided = evaluate(jax.random.key(7), t)
        print(f"t = {t}: accuracy {accuracy}, cross-entropy {cross_entropy}")
        assert cross_entropy["classifier"] < cross_entropy["bayes"] + 0.05
        assert bool(jnp.all(jnp.isfinite(guided)))
    assert accuracy["classifier"] > 0.98 and accuracy["bayes"] > 0.98  # at t = 0.01


def test_classifier_on_images_and_batch_iterators():
    """The convolutional path on images, and training from an iterator of {"x", "label"}
    batches (which stops when the iterator does)."""
    sde = VESDE(sigma_max=5.0)
    images = NoiseConditionalClassifier(num_classes=4, features=8, channel_multipliers=(1, 2))
    x, t = jnp.zeros((3, 4, 4, 1)), jnp.full((3,), 0.5)
    params = jax.jit(images.init)(rbg_key(8), x, t)["params"]
    log_probs = jax.jit(classifier_log_prob_fn(sde, images, params))(x, t)
    assert log_probs.shape == (3, 4)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
    vectors = NoiseConditionalClassifier(num_classes=2, features=8, channel_multipliers=(1,))
    batches = [
        {"x": np.full((8, 2), i % 2 - 0.5, np.float32), "label": np.full(8, i % 2)}
        for i in range(4)
    ]
    params, losses = train_classifier(rbg_key(9), sde, iter(batches), model=vectors, num_steps=10)
    assert losses.shape == (4,) and np.all(np.isfinite(losses))
