"""FID, KID, the feature extractors (digits classifier, FID Inception) and their file readers.

Fréchet distances are checked against the closed form for Gaussians, KID against a
direct double loop; the digits classifier is trained once per test run into a temporary
cache (no test reads or writes the user's cache). The ``.pth`` reader reads two small files
written by torch itself (zip and legacy layouts), and the Inception network runs on a
full-size synthetic weights file that our own pickler writes in torch's zip layout, with
names and shapes taken from the Flax parameter tree.
"""

import base64
import collections
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import subprocess
import sys
import types
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import tensorflow_datasets as tfds

from diffusion_sde import data
from diffusion_sde.evaluation import feature_nets, inception, metrics, reference_stats

ROOT = pathlib.Path(__file__).parents[1]
# Measured: 99.33% (295 of 297) on the test split; a margin for other XLA versions/CPUs.
DIGITS_MIN_TEST_ACCURACY = 0.98
# torchvision's Inception3 has 27,161,264 parameters with the auxiliary classifier
# (3,326,696) and the 1000-way fc (2,049,000): the pool3 trunk has 21,785,568
# (conv kernels and batch-norm scales and offsets; running statistics not counted).
FID_INCEPTION_POOL3_PARAMS = 27_161_264 - 3_326_696 - 2_049_000


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """No test touches ~/.cache: the default cache directory is a fresh temporary one."""
    monkeypatch.setenv(feature_nets.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def digits_cache(trained_digits_classifier):
    """A cache directory holding the trained digits classifier (trained once per test run,
    shared with the other test modules: read here, never written)."""
    return trained_digits_classifier


@pytest.fixture(scope="module")
def digits_extractor(digits_cache):
    return metrics.get_feature_extractor("digits", cache_directory=digits_cache)


# ----------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------


def test_feature_statistics_match_numpy_in_one_array_or_batches():
    features = np.random.default_rng(0).standard_normal((101, 5)) * [1, 2, 3, 4, 5] + 7.0
    mu, sigma = metrics.feature_statistics(features.astype(np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-5)
    batched = metrics.feature_statistics(np.array_split(features, [1, 30, 31, 90]))
    np.testing.assert_allclose(batched[0], features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(batched[1], np.cov(features, rowvar=False), rtol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(features[:1])


def gaussian_closed_form(mu1, variances1, mu2, variances2):
    """FD of Gaussians whose covariances commute, in their common eigenbasis."""
    return float(
        np.sum((np.asarray(mu1) - mu2) ** 2)
        + np.sum((np.sqrt(variances1) - np.sqrt(variances2)) ** 2)
    )


def test_frechet_distance_one_dimensional():
    # N(1, 2^2) vs N(-0.5, 3^2): (1.5)^2 + (2 - 3)^2.
    assert metrics.frechet_distance([1.0], [[4.0]], [-0.5], [[9.0]]) == pytest.approx(3.25)
    assert metrics.frechet_distance(np.array(1.0), 4.0, -0.5, 9.0) == pytest.approx(3.25)


def test_frechet_distance_commuting_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.0, 3.0, 6)
    b[0] = 0.0  # a singular covariance
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    expected = gaussian_closed_form(mu1, a, mu2, b)
    diagonal = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert diagonal == pytest.approx(expected, rel=1e-10)
    rotation, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    sigma1, sigma2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_agrees_with_sqrtm_on_random_covariances():
    rng = np.random.default_rng(2)
    factors = rng.standard_normal((2, 8, 8))
    sigma1, sigma2 = factors[0] @ factors[0].T, factors[1] @ factors[1].T
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    trace_sqrt = np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2) - 2 * trace_sqrt
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert got == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(got, rel=1e-9)


def test_frechet_distance_of_sample_statistics_converges_to_closed_form():
    rng = np.random.default_rng(3)
    n, a, b = 200_000, np.array([1.0, 0.25, 4.0]), np.array([2.0, 1.0, 0.5])
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.5, 0.0])
    x = mu1 + np.sqrt(a) * rng.standard_normal((n, 3))
    y = mu2 + np.sqrt(b) * rng.standard_normal((n, 3))
    estimate = metrics.frechet_distance(
        *metrics.feature_statistics(x), *metrics.feature_statistics(y)
    )
    # The closed form is about 2.25; the Monte Carlo error at this n is about 0.01.
    assert estimate == pytest.approx(gaussian_closed_form(mu1, a, mu2, b), abs=0.05)


def test_frechet_distance_rejects_bad_shapes_and_values():
    with pytest.raises(ValueError, match="Shapes disagree"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


# ----------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------


def mmd2_by_loops(x, y):
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, term by term."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_direct_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((7, 3)) + 0.3
    # Subsets of the full size are permutations: every estimate equals the full-set one.
    mean, std = metrics.kernel_inception_distance(x, y, num_subsets=3, subset_size=50)
    assert mean == pytest.approx(mmd2_by_loops(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((2, 400, 16))
    same_mean, same_std = metrics.kernel_inception_distance(
        x, y, num_subsets=10, subset_size=200, seed=1
    )
    shifted_mean, _ = metrics.kernel_inception_distance(
        x, y + 0.5, num_subsets=10, subset_size=200, seed=1
    )
    # A shift of 0.5 in each of the 16 coordinates: MMD^2 is about 1.
    assert abs(same_mean) < 0.02 and same_std < 0.02
    assert shifted_mean > 0.3


def test_kid_caps_the_subset_size_and_checks_shapes():
    rng = np.random.default_rng(6)
    mean, _ = metrics.kernel_inception_distance(
        rng.standard_normal((5, 2)), rng.standard_normal((40, 2)), num_subsets=2
    )
    assert np.isfinite(mean)
    with pytest.raises(ValueError, match=r"\(N1, D\)"):
        metrics.kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 3)))


# ----------------------------------------------------------------------------------------
# Feature extractors: digits
# ----------------------------------------------------------------------------------------


def test_digits_classifier_reaches_its_test_accuracy(digits_cache):
    model, params = feature_nets.load_classifier("digits", cache_directory=digits_cache)
    images, labels = data.load_digits("test")
    test_accuracy = feature_nets.accuracy(model, params, images / 16.0, labels)
    assert test_accuracy >= DIGITS_MIN_TEST_ACCURACY
    assert (digits_cache / "digits_classifier_v1.msgpack").is_file()


def test_classifier_cache_is_replaced_when_unreadable_and_reused(digits_cache, monkeypatch):
    path = digits_cache / "digits_classifier_v1.msgpack"
    assert path.read_bytes() != b"not msgpack"
    _, params = feature_nets.load_classifier("digits", cache_directory=digits_cache)
    monkeypatch.setenv(feature_nets.CACHE_ENV, str(digits_cache))  # the default directory
    monkeypatch.setattr(feature_nets, "train_classifier", None)  # a reload must not train
    _, again = feature_nets.load_classifier("digits")
    jax.tree.map(np.testing.assert_array_equal, params, again)


def test_digits_fid_of_test_split_is_far_below_noise(digits_extractor):
    train, _ = data.load_digits("train")
    test, _ = data.load_digits("test")
    reference = metrics.feature_statistics(digits_extractor(train))  # uint8 levels 0..16
    stats = {"mu": reference[0], "sigma": reference[1], "extractor": "digits"}
    real = metrics.sample_quality(test / 16.0, stats, digits_extractor)
    noise_images = np.random.default_rng(7).random((297, 8, 8, 1))
    noise = metrics.sample_quality(noise_images, stats, digits_extractor)
    assert real["fid"] < 0.1 * noise["fid"]
    assert real["kid_mean"] is None and real["num_samples"] == 297
    json.dumps(real)


def test_sample_quality_with_reference_features_gives_kid(digits_extractor):
    train, _ = data.load_digits("train")
    test, _ = data.load_digits("test")
    result = metrics.sample_quality(
        test / 16.0, digits_extractor(train), digits_extractor, kid_subsets=10
    )
    assert set(result) == {
        "fid",
        "kid_mean",
        "kid_std",
        "inception_score",
        "inception_score_std",
        "is_splits",
        "num_samples",
        "num_reference",
        "extractor",
        "rounding",
    }
    assert result["num_reference"] == 1500 and abs(result["kid_mean"]) < 0.05
    # Real digits, confidently classified and spread evenly over the 10 classes.
    assert 8.0 < result["inception_score"] <= 10.0
    assert json.loads(json.dumps(result)) == result
    with pytest.raises(ValueError, match="inception_v3"):
        metrics.sample_quality(
            test / 16.0, {"mu": 0, "sigma": 0, "extractor": "inception_v3"}, digits_extractor
        )


def test_feature_extractor_scales_levels_and_batches(digits_extractor):
    images, _ = data.load_digits("test")
    features = digits_extractor(images[:10])
    assert features.shape == (10, 128) and features.dtype == np.float32
    small_batches = dataclasses.replace(digits_extractor, batch_size=3)
    np.testing.assert_allclose(small_batches(images[:10] / 16.0), features, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="8, 8, 1"):
        digits_extractor(np.zeros((2, 28, 28, 1)))


def test_reference_statistics_of_digits(digits_extractor):
    config = {"dataset": "digits", "centered": True}
    stats = reference_stats.compute_reference_statistics(
        config, digits_extractor, max_features=100, batch_size=256
    )
    all_features = digits_extractor(data.load_digits("train")[0])
    mu, sigma = metrics.feature_statistics(all_features)
    np.testing.assert_allclose(stats["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], sigma, rtol=1e-4, atol=1e-6)
    assert stats["features"].shape == (100, 128) and int(stats["num_examples"]) == 1500
    # The kept features are distinct rows of the split's features.
    distances = np.abs(stats["features"][:, None] - all_features[None]).max(-1)
    matches = distances.min(1) < 1e-4
    assert matches.all() and len(set(distances.argmin(1))) == 100


@pytest.mark.slow  # about 10 s: a fresh Python process importing JAX and TFDS
def test_reference_stats_command(digits_cache, tmp_path):
    out = tmp_path / "digits_train.npz"
    command = [sys.executable, "-m", "diffusion_sde.evaluation.reference_stats"]
    command += ["--config=configs/digits_vp.py", f"--out={out}", "--max_features=50"]
    env = {**os.environ, feature_nets.CACHE_ENV: str(digits_cache), "JAX_PLATFORMS": "cpu"}
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    with np.load(out) as stats:
        assert stats["mu"].shape == (128,) and stats["features"].shape == (50, 128)
        assert str(stats["extractor"]) == "digits" and int(stats["num_examples"]) == 1500


@pytest.mark.slow  # about 10 s: compiles a 28x28 training step
def test_mnist_classifier_trains_through_the_tfds_pipeline(tmp_path, monkeypatch):
    spec = dataclasses.replace(feature_nets.CLASSIFIERS["mnist"], num_steps=2)
    monkeypatch.setitem(feature_nets.CLASSIFIERS, "mnist", spec)
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        extractor = metrics.get_feature_extractor("mnist")
    assert (tmp_path / "cache" / "mnist_classifier_v1.msgpack").is_file()
    assert extractor(np.zeros((3, 28, 28, 1), np.uint8)).shape == (3, 128)


def test_extractor_errors(tmp_path):
    with pytest.raises(ValueError, match=r"digits.*inception_v3.*mnist"):
        metrics.get_feature_extractor("lenet")
    with pytest.raises(data.DatasetNotPreparedError, match="tfds build mnist"):
        metrics.get_feature_extractor("mnist", data_dir=str(tmp_path / "no_tfds"))
    with pytest.raises(FileNotFoundError, match="pytorch-fid/releases/download/fid_weights"):
        metrics.get_feature_extractor("inception_v3", weights_path=tmp_path / "missing.pth")


# ----------------------------------------------------------------------------------------
# torch.save files, written here without torch
# ----------------------------------------------------------------------------------------


# Made with torch 2.13 (a real torch.save, zip and legacy layouts), zlib-compressed:
#     w = torch.arange(24, dtype=torch.float32)
#     state_dict = collections.OrderedDict(
#         [("conv.weight", w.reshape(2, 3, 2, 2)), ("transposed", w.reshape(6, 4).t()),
#          ("tail", w[20:]), ("bn.num_batches_tracked", torch.tensor(7)),
#          ("half", torch.tensor([0.5, -2.0], dtype=torch.float16))])
#     torch.save(state_dict, buffer, _use_new_zipfile_serialization=not legacy)
TORCH_SAVE_ZIP = (
    "eNqlVTtv01AUvnFcJzXQF9BCgba8EyghSQ1xeLWNkEEyEiGAFLG4rmNiC9fOtW/KY6qAIthgQUyIEZjYYKN/AQbE"
    "0AGJATEx8Ac4N26D7dJWwFW+OIr8PY51znFZjrMIJZNoxelBfUh1NcOc1Y/WVKJmGjcsqdSFroXOHKNpjmXpGjEd"
    "2+MvujXd1WtnTY3wGKUrOJaqbgAxzbFnMzd1s24QzGjEAd2M0iSm5fGKq083TaumEN32HFeZzfM4nkpVE0Dz4E61"
    "rmPWp/CS5ajksv8njzuqMbgni7lqnFo0mjghbyM4eUlGKZmR4wCG4M6UvFFm4XeMYP6RQUNtIHhjBW+q8kAjrmp7"
    "DcfTa7jLAF+DNToMzmgpdYMSULkHuEeOyewD3Ovz+wjeXMFbqizlq6aFt0aZ/ZfkLTI7jwfk2Dze5rO2EzxYwTuq"
    "/cCatjN2c0aZVolm6J4CIbQbkGCnr7NU7QXHrreL3dUqNoeHwAAqGYZo6bQvPELw7gre04pjqNZ1vDckcx7+asvs"
    "a8nk8X6QgYdzgFbIzOODNGfKl0sTfKiCDzczZTmRfDJwNbEIFIryqr0ygIbbvZK57rgzKlFmddeDnpBKOyItEzo5"
    "avL2x+I9GotidZNBVPhtstQZimqZdXtGt4lUGlvLZ7VzXKABxm/i7wxYMGsG6EXj7QDTt4nu0GaXSif/xXf5WCYh"
    "lk4zzJ/+up0DF27NDF3oTGgqj2al0on/COCrzo3D1wR8AHOAF4AFwBcAmoRdABgBZAETgDJgCtAAzAEeAh4DngFe"
    "AF4C3gDeTdLK7k4u2lMgNLVOZfvCleWk0si6lSWW2NSn8embQ4WT6/icCvvkpZL4z08QiWiBet9/VX1M549d07s7"
    "0EHt+fiv/hnjqfuH5/Wr6/fvEMr/HqBW6Z7umjBBd1S6vRWzJpUyfxkmKwpFQRRFoVA8fiwriIWxY9lsISsWckIx"
    "J+TEXFEQxoqFPE35s5J+nYIcqVbKGA3bzhncMz0rkkffQ1F2cIEMhJijDFptM0VFgktgMCTyJCiyYvNEdYKD3BvS"
    "6YujlQskSg9OS1eI/jSOIrMf5QYnIMxtsBFuLsoNdnCY+znKzUe5wf7rDnGvdKBox0fJwbYYCpE/Bsh/btiyzHGj"
    "y+0dP9Jmdkau5xj/eotbXhdca3O8X8rgv3k6OJ/T2brfv/cX1J8CfA=="
)
TORCH_SAVE_LEGACY = (
    "eNp9kktv00AUhW3HScB9EKCUlGd4OzyiAE5IVrQSqpCGRxs23iDjOENsMHauPQkCqVI2qQorlixYdNklS5b9KWz5"
    "CUgsOI5D1UgRI39jezxzzpnrGSqfNf/Pt/XfpTd7GyuVofL0Vwb9Fkm6WZAkqReFInRC3xrwKPbCgGRMMBfwxfeE"
    "8LnFg45nB6TsmBoGxYcet2LvI48ps0WqbmYxGLthJCjLFDODNy8QlGOqqSYaYdClPFP7fXg6sPG5I+ASa8+jDo94"
    "55HnCI2kcotk3ZzDCicMBpX33Ou6ghRHhJHjVqy+8PxYsyLe7nt+xxI8iMPIGtzTKKPrZj6JgJl2l5OaLtHW/dAW"
    "L9JBjbLmIuY0jbpRf2A0atW7zapBuXFap9dHwOIzQUc2maQzhWWAIuiozuaZimdZkPbJTSLOCZpv0UJaiMgO4l4Y"
    "8w4tukjhqu5Ml2Nuql6AOuRy23ScyUzdphOp5klBSy06Na6WsD2flv+ndnqiVtxkS0wd0QqTR3QmVTor6FyLzpvL"
    "WNYOKkH/ndW2hePy2EJY5y2SXki1JzV6gp9zUKKLU3aGUbtvGFSCnQy7SwhfLqc2lwVdadHVcWDX9l/TtSnRxxg6"
    "EL0+vYdGrd6s0w2IKhDVk4ooIyone7iZit8SdLtFd5LT8jI5oTMyybPqoswyyvCKLKUtP7kXpcNt+BDdKi4wBLtg"
    "H/wE0pokFUAJVMEq2ACvQA8MwQ74Ar6CXbAHvoMfa8o/i4a0/xf/Od3H"
)


@pytest.mark.parametrize("blob", [TORCH_SAVE_ZIP, TORCH_SAVE_LEGACY], ids=["zip", "legacy"])
def test_torch_file_reader_on_real_torch_files(tmp_path, blob):
    path = tmp_path / "state_dict.pth"
    path.write_bytes(zlib.decompress(base64.b64decode(blob)))
    state_dict = inception.read_state_dict(path)
    values = np.arange(24, dtype=np.float32)
    np.testing.assert_array_equal(state_dict["conv.weight"], values.reshape(2, 3, 2, 2))
    np.testing.assert_array_equal(state_dict["transposed"], values.reshape(6, 4).T)
    np.testing.assert_array_equal(state_dict["tail"], values[20:])  # offset into a storage
    assert state_dict["bn.num_batches_tracked"] == 7
    assert state_dict["bn.num_batches_tracked"].dtype == np.int64
    np.testing.assert_array_equal(state_dict["half"], np.array([0.5, -2.0], np.float16))


def test_torch_file_reader_refuses_other_globals_and_other_files(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": collections.Counter()}))
    with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
        inception.read_state_dict(path)
    path.write_text("<html>Not Found</html>")
    with pytest.raises(ValueError, match="not a torch.save file"):
        inception.read_state_dict(path)


class _Storage:
    def __init__(self, key, array):
        self.key, self.array = key, np.ascontiguousarray(array).reshape(-1)


class _Tensor:
    """Pickles as torch does: ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``."""

    def __init__(self, storage, size, rebuild):
        stride = tuple(int(s) for s in np.cumprod((1, *size[:0:-1]))[::-1])  # C order
        self.args = (storage, 0, tuple(size), stride, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self):
        return self.rebuild, self.args


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules ``torch`` and ``torch._utils`` with the names a torch pickle refers to."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch.FloatStorage = type("FloatStorage", (), {"__module__": "torch"})
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


def write_torch_zip(path, arrays, torch):
    """``torch.save`` of the float32 ``{name: array}`` in the zip layout, by our own pickler."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.array.size)
            return None

    storages = {name: _Storage(str(key), array) for key, (name, array) in enumerate(arrays.items())}
    state_dict = collections.OrderedDict(
        (name, _Tensor(storages[name], array.shape, torch._utils._rebuild_tensor_v2))
        for name, array in arrays.items()
    )
    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(state_dict)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pt_inception/data.pkl", buffer.getvalue())
        archive.writestr("pt_inception/byteorder", "little")
        for storage in storages.values():
            archive.writestr(f"pt_inception/data/{storage.key}", storage.array.tobytes())
        archive.writestr("pt_inception/version", "3\n")


# ----------------------------------------------------------------------------------------
# The FID Inception
# ----------------------------------------------------------------------------------------


def test_fid_inception_parameter_count():
    variables = inception.abstract_variables()
    count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    assert count(variables["params"]) == FID_INCEPTION_POOL3_PARAMS == 21_785_568
    shapes = inception.state_dict_shapes()
    assert len(shapes) == 5 * 94  # 94 conv + batch-norm layers, 5 tensors each
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)


def test_fid_inception_pools_like_tensorflow():
    x = jnp.ones((1, 5, 5, 1))
    # count_include_pad=False: the border averages only real pixels, so ones stay ones.
    np.testing.assert_array_equal(inception._avg_pool_3x3(x), x)
    ramp = -jnp.arange(25.0).reshape(1, 5, 5, 1)  # negative: a zero padding would win the max
    pooled = inception._max_pool_3x3(ramp, 1, 1)
    assert pooled.shape == ramp.shape and float(pooled[0, 0, 0, 0]) == 0.0
    assert float(pooled[0, 4, 4, 0]) == -18.0


def test_fid_inception_runs_on_a_synthetic_pth_file(tmp_path, fake_torch):
    rng = np.random.default_rng(8)
    arrays = {}
    for name, shape in inception.state_dict_shapes().items():  # from our own param tree
        if name.endswith("running_var"):
            values = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("conv.weight"):
            values = rng.standard_normal(shape) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            values = 0.1 * rng.standard_normal(shape)
        arrays[name] = values.astype(np.float32)
    arrays["fc.weight"] = (0.02 * rng.standard_normal((1008, 2048))).astype(np.float32)
    arrays["fc.bias"] = (0.1 * rng.standard_normal(1008)).astype(np.float32)
    path = tmp_path / "pt_inception.pth"
    write_torch_zip(path, arrays, fake_torch)

    state_dict = inception.read_state_dict(path)
    variables = inception.variables_from_state_dict(state_dict)
    kernel = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    np.testing.assert_array_equal(
        kernel, arrays["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0)
    )
    extractor = metrics.get_feature_extractor("inception_v3", weights_path=path)
    images = rng.integers(0, 256, (2, 16, 16, 1), dtype=np.uint8)  # grey, small: resized
    features = extractor(images)
    assert features.shape == (2, 2048) and np.all(np.isfinite(features))
    assert np.all(features >= 0) and features.std() > 0  # means of ReLU outputs
    # The IS logits: the graph's last layer on the same pool3 features.
    logits = extractor.logits_fn(features)
    expected = features.astype(np.float64) @ arrays["fc.weight"].T + arrays["fc.bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 1008)

    del state_dict["Mixed_5b.branch1x1.conv.weight"]
    with pytest.raises(ValueError, match="missing entries"):
        inception.variables_from_state_dict(state_dict)
