"""get_score_fn against hand computation, with a stub network that echoes its inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde import models
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE

BETA_MIN, BETA_MAX, SIGMA_MIN, SIGMA_MAX = 0.1, 20.0, 0.01, 50.0
T_VALUES = np.array([0.013, 0.25, 0.5, 0.871], np.float32)
WEIGHT = 2.0  # the stub's one parameter


class EchoNetwork(nn.Module):
    """out = w x + time_cond + 1000 (y or -1) + 1e6 train: every input readable from it."""

    @nn.compact
    def __call__(self, x, time_cond, y=None, train=False):
        w = self.param("w", nn.initializers.constant(WEIGHT), ())
        label = -1.0 if y is None else y.astype(jnp.float32)
        label = jnp.reshape(label, (-1,) + (1,) * (x.ndim - 1))
        time_cond = time_cond.reshape((-1,) + (1,) * (x.ndim - 1))
        out = w * x + time_cond + 1000.0 * label
        if train:
            out = out + 1e6 + jax.random.uniform(self.make_rng("dropout"), ())
        return out


def make_score_fn(sde, continuous, **kwargs):
    model = EchoNetwork()
    variables = {"params": {"w": jnp.asarray(WEIGHT)}}
    return models.get_score_fn(sde, model, variables, continuous=continuous, **kwargs)


def data(shape=(4, 3, 2, 1)):
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def vp_std(name, t):
    integral = BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2
    return np.sqrt(1 - np.exp(-integral)) if name == "vp" else 1 - np.exp(-integral)


@pytest.mark.parametrize("N", [1000, 10])
@pytest.mark.parametrize("continuous", [True, False])
@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_vp_score_is_minus_output_over_std(name, continuous, N):
    sde = (VPSDE if name == "vp" else subVPSDE)(beta_min=BETA_MIN, beta_max=BETA_MAX, N=N)
    x = data()
    t = T_VALUES.astype(np.float64)
    # Continuous labels (and sub-VP's always) are 999 t whatever N (the reference's
    # DDPM-range convention); discrete VP labels are the chain level k = floor((N - 1) t)
    # (the integer step DDPM trains on) and the std is the DDPM chain's sqrt(1 - alpha_bar_k).
    if continuous or name == "subvp":
        labels, std = 999.0 * t, vp_std(name, t)
    else:
        labels = np.floor((N - 1) * t)
        alpha_bar = np.cumprod(1 - np.linspace(BETA_MIN / N, BETA_MAX / N, N))
        std = np.sqrt(1 - alpha_bar[labels.astype(int)])
    output = WEIGHT * x + labels[:, None, None, None] - 1000.0  # y=None: the null label
    expected = -output / std[:, None, None, None]
    score = make_score_fn(sde, continuous)(jnp.asarray(x), jnp.asarray(T_VALUES))
    np.testing.assert_allclose(score, expected, rtol=2e-5)


@pytest.mark.parametrize("N", [1000, 10])
@pytest.mark.parametrize("continuous", [True, False])
def test_ve_score_is_output_with_sigma_or_index_label(continuous, N):
    sde = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, N=N)
    x = data()
    t = T_VALUES.astype(np.float64)
    if continuous:
        labels = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** t
    else:
        labels = N - 1 - np.floor(t * (N - 1))  # index into the descending sigmas
    expected = WEIGHT * x + labels[:, None, None, None] - 1000.0  # y=None: the null label
    score = make_score_fn(sde, continuous)(jnp.asarray(x), jnp.asarray(T_VALUES))
    np.testing.assert_allclose(score, expected, rtol=2e-5)


def test_ve_discrete_label_indexes_the_sigma_of_time_t():
    # Label round((T - t)(N - 1)) picks sigma_max at t = T and sigma_min at t = 0 from the
    # descending SMLD levels, i.e. the sigma(t) of the VE SDE on its grid.
    sde = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, N=11)
    t = np.linspace(0.0, 1.0, 11).astype(np.float32)
    labels = make_score_fn(sde, False)(jnp.zeros((11, 1)), jnp.asarray(t))[:, 0] + 1000.0
    descending = SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** (np.arange(11) / 10)
    np.testing.assert_allclose(descending[np.asarray(labels).astype(int)], sde.sigma(t), rtol=1e-5)


class ConstantNetwork(nn.Module):
    """out = 1 everywhere: the score is -1 / (the std the adapter divides by)."""

    @nn.compact
    def __call__(self, x, time_cond, y=None, train=False):
        return jnp.ones_like(x)


def sampler_grid(N, eps):
    """The time of every grid point of pc_sample (linspace(T, eps, N), as its loop builds
    it), with the chain level k = N - 1 - i that its predictor uses at point i."""
    return jnp.linspace(1.0, eps, N), N - 1 - np.arange(N)


def test_discrete_vp_std_is_the_predictors_chain_level_on_the_sampler_grid():
    # On linspace(1, 1e-3, 1000) the adapter must divide by sqrt(1 - alpha_bar_k) of the
    # level k the predictor uses, at every one of the 1000 levels; rounding 999 t (the
    # earlier code) took level k + 1 for k < 499, a 1.48x larger score at the last step.
    N = 1000
    sde = VPSDE(beta_min=BETA_MIN, beta_max=BETA_MAX, N=N)
    t, levels = sampler_grid(N, 1e-3)
    score_fn = models.get_score_fn(sde, ConstantNetwork(), {"params": {}}, continuous=False)
    std = -1.0 / np.asarray(jax.jit(score_fn)(jnp.ones((N, 1)), t))[:, 0]
    alpha_bar = np.cumprod(1.0 - np.linspace(BETA_MIN / N, BETA_MAX / N, N))  # float64
    np.testing.assert_allclose(std, np.sqrt(1.0 - alpha_bar[levels]), rtol=1e-6)
    # The network is fed the integer level it was trained on (EchoNetwork at x = 0 outputs
    # label - 1000).
    echo = make_score_fn(sde, False)(jnp.zeros((N, 1)), t)[:, 0]
    np.testing.assert_allclose(-np.asarray(echo) * std + 1000.0, levels, atol=1e-3)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_discrete_ve_label_is_the_predictors_noise_level_on_the_sampler_grid(eps):
    # Label i (the i-th largest sigma) at grid point i, for the reference's VE eps (1e-5)
    # and for eps = 1e-3, where rounding (T - t)(N - 1) = i - i eps gave i - 1 for i > 500.
    N = 1000
    sde = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, N=N)
    t, levels = sampler_grid(N, eps)
    labels = make_score_fn(sde, False)(jnp.zeros((N, 1)), t)[:, 0] + 1000.0  # null label
    np.testing.assert_array_equal(np.asarray(labels), N - 1 - levels)


def test_chain_level_at_the_chain_times_is_their_index():
    for N in (10, 1000):
        t = jnp.arange(N) / (N - 1)
        np.testing.assert_array_equal(models.chain_level(VPSDE(N=N), t), np.arange(N))


def test_class_labels_train_and_dropout_key_reach_the_network():
    sde = VESDE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    x, t = jnp.zeros((4, 2)), jnp.full((4,), 0.5)
    sigma = SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** 0.5
    null = make_score_fn(sde, True)(x, t)
    np.testing.assert_allclose(null, sigma - 1000.0, rtol=1e-6)
    labels = jnp.array([0, 1, 2, 3])
    labelled = make_score_fn(sde, True, class_labels=labels)(x, t)
    np.testing.assert_allclose(labelled[:, 0], sigma + 1000.0 * np.arange(4), rtol=1e-6)
    key = jax.random.PRNGKey(3)
    trained = make_score_fn(sde, True, train=True, dropout_key=key)(x, t)
    assert np.all(np.asarray(trained) > 9e5)  # the train flag arrived
    again = make_score_fn(sde, True, train=True, dropout_key=key)(x, t)
    other = make_score_fn(sde, True, train=True, dropout_key=jax.random.PRNGKey(4))(x, t)
    np.testing.assert_array_equal(trained, again)
    assert not np.array_equal(trained, other)


def test_score_fn_jits_with_the_sde_as_argument():
    x, t = jnp.asarray(data()), jnp.asarray(T_VALUES)
    for sde in (VPSDE(), subVPSDE(), VESDE()):
        for continuous in (True, False):
            eager = make_score_fn(sde, continuous)(x, t)
            jitted = jax.jit(lambda s, x, t, c=continuous: make_score_fn(s, c)(x, t))(sde, x, t)
            np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_unsupported_sde_is_an_error():
    with pytest.raises(ValueError, match="VPSDE, subVPSDE and VESDE"):
        make_score_fn(object(), True)


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "ddpm", "scale_by_sigma": True},
        {"name": "ncsnv2", "scale_by_sigma": True},
        {"name": "mlp", "scale_by_sigma": True, "embedding_type": "positional"},
        {"name": "ncsnpp", "scale_by_sigma": True, "embedding_type": "positional"},
    ],
    ids=lambda f: f["name"],
)
def test_sigma_lookup_networks_refuse_continuous_ve(fields):
    model = models.MODELS[fields["name"]](config=ml_collections.ConfigDict(fields))
    with pytest.raises(ValueError, match="training.continuous=False"):
        models.get_score_fn(VESDE(), model, {}, continuous=True)
    models.get_score_fn(VESDE(), model, {}, continuous=False)  # fine
    models.get_score_fn(VPSDE(), model, {}, continuous=True)  # VP is not concerned


@pytest.mark.parametrize("name", ["mlp", "ncsnpp"])
def test_fourier_networks_refuse_discrete_ve(name):
    config = ml_collections.ConfigDict({"name": name, "embedding_type": "fourier"})
    model = models.MODELS[name](config=config)
    with pytest.raises(ValueError, match="training.continuous=True"):
        models.get_score_fn(VESDE(), model, {}, continuous=False)
    models.get_score_fn(VESDE(), model, {}, continuous=True)  # fine


def test_score_fn_of_a_real_network_jits():
    config = ml_collections.ConfigDict(
        dict(
            name="mlp",
            nf=16,
            num_layers=1,
            nonlinearity="swish",
            embedding_type="positional",
            fourier_scale=16.0,
            centered=True,
            scale_by_sigma=False,
            sigma_min=SIGMA_MIN,
            sigma_max=SIGMA_MAX,
            num_scales=1000,
            num_classes=0,
            dtype="float32",
        )
    )
    model = models.get_model(config)
    x, t = jnp.ones((3, 2)), jnp.array([0.1, 0.5, 0.9])
    variables = model.init(jax.random.PRNGKey(0), x, t)
    sde = VPSDE()
    score = jax.jit(models.get_score_fn(sde, model, variables))(x, t)
    std = sde.marginal_prob(x, t)[1][:, None]
    np.testing.assert_allclose(score, -model.apply(variables, x, 999.0 * t) / std, rtol=1e-5)
