"""The evaluation protocol behind published numbers: sampling eps per SDE, the score used on
the probability-flow ODE, 8-bit quantisation before the features, the Inception Score."""

import importlib
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde import models, sampling
from diffusion_sde.evaluation import metrics
from diffusion_sde.sde import VESDE, VPSDE, subVPSDE

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
CONFIG_NAMES = sorted(
    p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith(("default", "_"))
)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_samples_down_to_its_sdes_eps(name):
    # The 2021 reference samples VE models down to 1e-5, VP and sub-VP ones to 1e-3.
    config = importlib.import_module(f"configs.{name}").get_config()
    # EDM's path is sampled down to its sigma_min, 0.002 (Karras et al. 2022).
    expected = {"vesde": 1e-5, "edm": 0.002}.get(config.training.sde, 1e-3)
    assert config.sampling.eps == expected
    assert config.sampling.ode_continuous_score is True


def _captured_kwargs(monkeypatch, sampling_config, sde):
    captured = {}
    fake = lambda key, sde, score_fn, shape, **kwargs: captured.update(kwargs)
    monkeypatch.setattr(sampling, "pc_sample", fake)
    monkeypatch.setattr(sampling, "ode_sample", fake)
    sampling.get_sampler(sampling_config, sde, (2, 3))(None, None)
    return captured


@pytest.mark.parametrize("method", ["pc", "ode"])
@pytest.mark.parametrize("sde, eps", [(VPSDE(), 1e-3), (subVPSDE(), 1e-3), (VESDE(), 1e-5)])
def test_get_sampler_default_eps_depends_on_the_sde(monkeypatch, method, sde, eps):
    fields = dict(method=method, predictor="euler_maruyama", corrector="none", snr=0.16)
    kwargs = _captured_kwargs(monkeypatch, ml_collections.ConfigDict(fields), sde)
    assert kwargs["eps"] == eps
    fields["eps"] = 0.02  # a config's own value wins
    assert _captured_kwargs(monkeypatch, ml_collections.ConfigDict(fields), sde)["eps"] == 0.02


@pytest.mark.parametrize(
    "sde, continuous, ode_continuous_score, ode, expected",
    [
        ("vpsde", True, True, False, True),  # continuous training: always continuous
        ("vesde", True, False, True, True),
        ("vpsde", False, True, False, False),  # DDPM in PC sampling: its own chain
        ("vpsde", False, True, True, True),  # DDPM on the ODE: continuous, as the reference
        ("vpsde", False, False, True, False),  # ... unless the config asks for the discrete
        ("vesde", False, True, True, False),  # SMLD looks sigma up by index: discrete always
    ],
)
def test_which_labels_the_samplers_and_likelihood_use(
    sde, continuous, ode_continuous_score, ode, expected
):
    config = ml_collections.ConfigDict(
        {
            "training": {"sde": sde, "continuous": continuous},
            "sampling": {"ode_continuous_score": ode_continuous_score},
        }
    )
    assert models.continuous_labels(config, ode=ode) is expected


# --- Inception Score --------------------------------------------------------------------


def test_inception_score_closed_forms():
    # Confident, evenly spread predictions over K classes: p(y) uniform, KL = log K, IS = K.
    K = 7
    logits = 50.0 * np.eye(K)[np.arange(700) % K]
    np.testing.assert_allclose(metrics.inception_score(logits)[0], K, rtol=1e-10)
    # Identical predictions: p(y|x) = p(y), IS = 1, whatever they are.
    same = np.tile(np.array([[0.3, -1.0, 2.0]]), (50, 1))
    np.testing.assert_allclose(metrics.inception_score(same)[0], 1.0, rtol=1e-12)
    # Two kinds of samples, p(y|x) = (a, 1 - a) and (1 - a, a): p(y) = (1/2, 1/2), so
    # IS = exp(a log 2a + (1 - a) log 2(1 - a)).
    a = 0.8
    half = np.log(np.array([[a, 1 - a]] * 40 + [[1 - a, a]] * 40))
    expected = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    mean, std = metrics.inception_score(half + 3.0)  # logits: log p up to a constant
    np.testing.assert_allclose(mean, expected, rtol=1e-12)
    assert std == 0.0
    # Two splits, one kind each: within a split p(y|x) = p(y), IS = 1 in both.
    np.testing.assert_allclose(metrics.inception_score(half, num_splits=2), (1.0, 0.0), atol=1e-12)
    with pytest.raises(ValueError, match="num_splits"):
        metrics.inception_score(half, num_splits=81)


# --- Quantisation -----------------------------------------------------------------------


def test_quantize_clips_then_floors_or_rounds_to_8_bits():
    values = np.array([-0.5, 0.0, 0.49, 0.5, 0.999, 1.0, 254.5, 255.0, 600.0]) / 255.0
    floor = metrics.quantize(values, 256, "floor")
    assert floor.dtype == np.uint8
    np.testing.assert_array_equal(floor, [0, 0, 0, 0, 0, 1, 254, 255, 255])
    np.testing.assert_array_equal(
        metrics.quantize(values, 256, "round"), [0, 0, 0, 1, 1, 1, 255, 255, 255]
    )
    # Pixels that are exact levels stay on them (n / 255 * 255 may be n - 4e-14).
    levels = np.arange(256)
    np.testing.assert_array_equal(metrics.quantize(levels / 255.0, 256, "floor"), levels)
    np.testing.assert_array_equal(metrics.quantize(np.arange(17) / 16.0, 17), np.arange(17))
    with pytest.raises(ValueError, match="NaN or infinite: the sampler diverged"):
        metrics.quantize(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="valid: \\['floor', 'round'\\]"):
        metrics.quantize(values, 256, "nearest")


def test_sample_quality_feeds_the_quantised_samples_to_the_features():
    seen = []

    def features_fn(images):
        seen.append(np.asarray(images))
        return jnp.reshape(images, (images.shape[0], -1))

    extractor = metrics.FeatureExtractor(
        "pixels", features_fn, feature_dim=4, logits_fn=lambda features: features
    )
    samples = np.random.default_rng(0).uniform(-0.1, 1.1, size=(8, 2, 2, 1))
    reference = np.random.default_rng(1).uniform(size=(32, 4))
    result = metrics.sample_quality(samples, reference, extractor, kid_subset_size=8)
    expected = metrics.quantize(samples, 256, "floor") / 255.0
    np.testing.assert_allclose(seen[0], expected, rtol=1e-7)
    assert result["rounding"] == "floor" and result["num_samples"] == 8
    logits = expected.reshape(8, -1)
    assert result["inception_score"] == pytest.approx(metrics.inception_score(logits)[0])
    # rounding=None feeds the floats as they are (not the published protocol).
    seen.clear()
    metrics.sample_quality(samples, reference, extractor, rounding=None, kid_subset_size=8)
    np.testing.assert_allclose(seen[0], samples, rtol=1e-7)


def test_sample_shards_are_reused_only_for_the_sampler_that_drew_them(tmp_path):
    # An FID must come from the samples of the sampler asked for: shards drawn by another
    # sampler are set aside (kept), not reused.
    from diffusion_sde.evaluation import evaluate

    config = importlib.import_module("configs.digits_vp").get_config()
    out = tmp_path / "samples_step_00000010"
    assert evaluate._sample_folder(config, out) == out
    (out / "shard_00000.npz").write_bytes(b"pc samples")
    assert evaluate._sample_folder(config, out) == out  # same sampler: resume
    assert (out / "shard_00000.npz").exists()

    config.sampling.method, config.sampling.ode_method = "ode", "dpm_solver_3"
    evaluate._sample_folder(config, out)
    assert not list(out.glob("shard_*.npz"))
    aside = tmp_path / "samples_step_00000010.previous_1"
    assert (aside / "shard_00000.npz").read_bytes() == b"pc samples"

    config.seed += 1  # another seed draws other samples too
    evaluate._sample_folder(config, out)
    assert (tmp_path / "samples_step_00000010.previous_2" / "sampler.json").exists()

    legacy = tmp_path / "samples_step_00000020"  # shards of an older version, no record
    legacy.mkdir()
    (legacy / "shard_00000.npz").write_bytes(b"unknown sampler")
    evaluate._sample_folder(config, legacy)
    assert (tmp_path / "samples_step_00000020.previous_1" / "shard_00000.npz").exists()
