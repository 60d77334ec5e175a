"""get_score_fn as one function of (path, parametrization): what the network is fed and how
its output becomes the score; and each family trains and samples end to end on a toy."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import toy_2d_vp
from diffusion_sde import models
from diffusion_sde import parametrization as param
from diffusion_sde.evaluation import evaluate
from diffusion_sde.sde import EDMSDE, VESDE, VPSDE, CosineSDE, RectifiedFlow, get_sde, subVPSDE
from diffusion_sde.training import loop
from diffusion_sde.training import step as step_lib


class Recorder:
    """A stand-in network: records its inputs and returns a fixed function of them."""

    def __init__(self, **config):
        self.config = ml_collections.ConfigDict(config)
        self.calls = []

    def apply(self, variables, x, time_cond, y=None, train=False, rngs=None):
        self.calls.append((x, time_cond))
        return jnp.sin(x) + 0.1 * time_cond[:, None]


X = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)


def times(sde):
    return jnp.linspace(0.1, 0.9, 5) * sde.T


@pytest.mark.parametrize(
    ("sde", "default"),
    [
        (VPSDE(), "eps"),
        (subVPSDE(), "eps"),
        (CosineSDE(), "eps"),
        (VESDE(), "score"),
        (EDMSDE(), "edm"),
        (RectifiedFlow(), "velocity"),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else v,
)
@pytest.mark.parametrize("name", [None, *param.PARAMETRIZATIONS])
def test_network_input_labels_and_output_conversion(sde, default, name):
    model = Recorder(name="mlp", embedding_type="positional")
    t = times(sde)
    score = models.get_score_fn(sde, model, {}, parametrization=name)(X, t)
    name = name or default
    (x_in, labels), = model.calls  # fmt: skip
    alpha, sigma = (np.asarray(c, np.float64)[:, None] for c in sde.marginal_coeffs(t))
    sigma_tilde = sigma / alpha
    if name == "edm":
        np.testing.assert_allclose(x_in, X / alpha / np.sqrt(sigma_tilde**2 + 0.25), rtol=1e-5)
        np.testing.assert_allclose(labels, np.log(sigma_tilde[:, 0]) / 4, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(x_in, X)
        expected = sigma[:, 0] if isinstance(sde, VESDE | EDMSDE) else 999.0 * np.asarray(t)
        np.testing.assert_allclose(labels, expected, rtol=1e-5)
    output = jnp.sin(x_in) + 0.1 * labels[:, None]
    c = param.path_coeffs(sde, t, X)
    np.testing.assert_allclose(score, param.to_score(name, c, output, X), rtol=1e-5, atol=1e-5)


def test_parametrization_from_the_model_config_and_fourier_edm_labels():
    sde = EDMSDE()
    t = times(sde)
    model = Recorder(name="ncsnpp", embedding_type="fourier", parametrization="x0")
    models.get_score_fn(sde, model, {})(X, t)
    np.testing.assert_allclose(model.calls[0][1], t, rtol=1e-6)  # sigma, and x0 read as such
    model = Recorder(name="ncsnpp", embedding_type="fourier", parametrization="edm")
    models.get_score_fn(sde, model, {})(X, t)
    np.testing.assert_allclose(model.calls[0][1], t, rtol=1e-6)  # sigma~ = sigma: log inside


def test_bad_requests_fail_with_the_valid_names():
    with pytest.raises(ValueError, match="velocity"):
        models.get_score_fn(VPSDE(), Recorder(), {}, parametrization="flow")
    with pytest.raises(ValueError, match="continuous=True"):
        models.get_score_fn(RectifiedFlow(), Recorder(), {}, continuous=False)
    with pytest.raises(ValueError, match="scale_by_sigma=False"):
        models.get_score_fn(EDMSDE(), Recorder(scale_by_sigma=True), {})


FAMILIES = {
    "edm": dict(sde="edm", weighting="edm", time_distribution="log_normal", parametrization="edm"),
    "rectified_flow": dict(sde="rectified_flow", weighting="velocity",
                           time_distribution="logit_normal", parametrization="velocity"),
    "cosine_v": dict(sde="cosine", weighting="v", time_distribution="uniform",
                     parametrization="v"),
}  # fmt: skip


def family_config(family):
    fields = FAMILIES[family]
    config = toy_2d_vp.get_config()
    config.model.nf = 16
    config.model.num_layers = 1
    config.model.parametrization = fields["parametrization"]
    config.model.sigma_min, config.model.sigma_max = 0.002, 80.0
    config.training.sde = fields["sde"]
    config.training.weighting = fields["weighting"]
    config.training.time_distribution = fields["time_distribution"]
    return config


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loss_decreases_over_training_steps(family):
    """The config's loss through get_loss_fn and get_step_fn: 30 Adam steps on the
    toy lower the loss on a fixed batch."""
    config = family_config(family)
    sde = get_sde(config)
    model = models.get_model(config.model)
    x = jax.random.normal(jax.random.key(0), (256, 2)) * 0.5 + 1.0
    params = model.init(jax.random.key(1), x[:1], jnp.zeros((1,)), train=False)["params"]
    loss_fn = step_lib.get_loss_fn(sde, model, reduce_mean=True, train=False,
                                   **step_lib.loss_config(config))  # fmt: skip
    optimizer = optax.adam(3e-3)
    state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, params,
                                optimizer.init(params), jax.random.key(2))  # fmt: skip
    step_fn = jax.jit(step_lib.get_step_fn(loss_fn, optimizer, 0.9))
    batch = {"x": x}
    mean_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, k, batch))(
        jax.random.split(jax.random.key(3), 8))))  # fmt: skip
    before = mean_loss(params)
    for _ in range(30):
        state, metrics = step_fn(state, batch)
        assert np.isfinite(metrics["loss"])
    after = mean_loss(state.params)
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_trains_samples_and_scores_likelihood_on_a_toy(tmp_path, family):
    fields = FAMILIES[family]
    config = toy_2d_vp.get_config()
    config.model.nf = 16
    config.model.num_layers = 1
    config.model.parametrization = fields["parametrization"]
    config.model.sigma_min, config.model.sigma_max = 0.002, 80.0
    config.training.update(
        sde=fields["sde"], batch_size=64, n_iters=10, n_jitted_steps=5, snapshot_freq=10,
        snapshot_freq_for_preemption=10, log_freq=5, eval_freq=10, snapshot_num_samples=16,
    )  # fmt: skip
    config.training.weighting = fields["weighting"]
    config.training.time_distribution = fields["time_distribution"]
    config.sampling.method = "edm"
    config.sampling.num_steps = 6
    config.sampling.eps = 0.002 if family == "edm" else 1e-3
    state = loop.train_and_evaluate(config, tmp_path)
    assert int(state.step) == 10
    samples = np.load(tmp_path / "samples" / "step_00000010.npz")["samples"]
    assert samples.shape == (16, 2) and np.all(np.isfinite(samples))
    config.eval.update(batch_size=64, bpd_num_batches=1, bpd_num_passes=1, rtol=1e-3, atol=1e-3)
    result = evaluate.evaluate(config, tmp_path)["bpd"]
    assert np.isfinite(result["mean"]) and result["num_examples"] == 64


def test_unknown_weighting_or_time_distribution_in_a_config_fails_before_tracing():
    config = toy_2d_vp.get_config()
    model = models.get_model(config.model)
    for field, value, valid in [("weighting", "snr", "min_snr"),
                                ("time_distribution", "normal", "log_normal")]:  # fmt: skip
        config = toy_2d_vp.get_config()
        config.training[field] = value
        with pytest.raises(ValueError, match=valid):
            step_lib.get_loss_fn(get_sde(config), model, **step_lib.loss_config(config))
