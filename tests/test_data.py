"""The data pipeline: TFDS + grain (mocked and on real ArrayRecord files), digits, toys.

``tfds.testing.mock_data`` (policy ``USE_CODE``) replaces the ArrayRecord reader under
``tfds.data_source`` with deterministic random examples (example ``i`` is the same in every
split), so the real ``tfds.data_source`` -> grain path runs without any file or
TensorFlow. One test also writes a tiny real ArrayRecord dataset with TFDS's own
serializer, to exercise the image decoding that the mock skips.
"""

import io
import math
import sys
import time

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from diffusion_sde import data

SINGLE_HOST = {"process_index": 0, "process_count": 1}
NUM_MOCK_EXAMPLES = 20
TFDS_CASES = {"cifar10": (32, 3), "mnist": (28, 1)}


@pytest.fixture
def mock_tfds():
    with tfds.testing.mock_data(
        num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        yield


def first_batches(config, count, **kwargs):
    """The first ``count`` batches of ``get_dataset(config, **kwargs)`` (single host by default)."""
    kwargs = {**SINGLE_HOST, **kwargs}
    iterator = data.get_dataset(config, **kwargs)
    return [next(iterator) for _ in range(count)]


def image_config(name, **fields):
    size, channels = TFDS_CASES.get(name, (8, 1))
    return {"dataset": name, "image_size": size, "num_channels": channels, **fields}


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------------------
# TFDS through grain, mocked
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("name", list(TFDS_CASES))
def test_tfds_shapes_dtypes_and_ranges(mock_tfds, name, centered):
    config = image_config(name, centered=centered, random_flip=True)
    (batch,) = first_batches(config, 1, batch_size=8)
    size, channels = TFDS_CASES[name]
    assert batch["x"].shape == (8, size, size, channels) == (8, *data.data_shape(config))
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["label"].shape == (8,) and set(batch["label"]) <= set(range(10))
    assert "mask" not in batch
    # Back in [0, 1], the pixels sit on the uint8 grid k / 255.
    pixels = data.get_data_inverse_scaler(config)(batch["x"]) * 255.0
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    low, high = (-1.0, 1.0) if centered else (0.0, 1.0)
    assert low <= batch["x"].min() < low + 0.1 and high - 0.1 < batch["x"].max() <= high
    assert "tensorflow" not in sys.modules


def test_tfds_flip_mirrors_the_same_examples(mock_tfds):
    plain = first_batches(image_config("cifar10", random_flip=False), 2, batch_size=16, seed=3)
    flipped = first_batches(image_config("cifar10", random_flip=True), 2, batch_size=16, seed=3)
    x, x_flip = (np.concatenate([b["x"] for b in bs]) for bs in (plain, flipped))
    same = np.all(x == x_flip, axis=(1, 2, 3))
    mirrored = np.all(x[:, :, ::-1] == x_flip, axis=(1, 2, 3))
    assert np.all(same | mirrored)
    assert 4 <= mirrored.sum() <= 28, "about half the examples should be flipped"
    # Evaluation never flips.
    (evaluated,) = first_batches(
        image_config("cifar10", random_flip=True), 1, batch_size=16, evaluation=True
    )
    (ordered,) = first_batches(image_config("cifar10"), 1, batch_size=16, evaluation=True)
    np.testing.assert_array_equal(evaluated["x"], ordered["x"])


def test_tfds_uniform_dequantization(mock_tfds):
    config = image_config("cifar10", random_flip=True)
    (plain,) = first_batches(config, 1, batch_size=8)
    (noisy,) = first_batches({**config, "uniform_dequantization": True}, 1, batch_size=8)
    # (255 x + u) / 256 with u in [0, 1): the same examples and flips, inside their bins
    # (float32 may round u within 2**-24 of 1 up to the bin's upper edge).
    levels, original = noisy["x"] * 256.0, np.round(plain["x"] * 255.0)
    assert np.all((np.floor(levels) == original) | (np.abs(levels - original - 1) < 1e-4))
    assert 0.0 < noisy["x"].min() and noisy["x"].max() < 1.0
    assert np.std(noisy["x"] * 256.0 - np.floor(noisy["x"] * 256.0)) > 0.25
    # Evaluation adds noise only when asked, deterministically.
    eval_config = {**config, "uniform_dequantization": True}
    (clean,) = first_batches(eval_config, 1, batch_size=8, evaluation=True)
    np.testing.assert_allclose(clean["x"] * 255.0, np.round(clean["x"] * 255.0), atol=1e-3)
    asked = [
        first_batches(eval_config, 1, batch_size=8, evaluation=True, uniform_dequantization=True)
        for _ in range(2)
    ]
    assert_batches_equal(asked[0][0], asked[1][0])
    assert not np.array_equal(asked[0][0]["x"], clean["x"])


def test_tfds_deterministic_and_resumable(mock_tfds):
    config = image_config("cifar10", random_flip=True, uniform_dequantization=True)
    run = first_batches(config, 6, batch_size=8, seed=7)
    for a, b in zip(run, first_batches(config, 6, batch_size=8, seed=7), strict=True):
        assert_batches_equal(a, b)
    for k in (1, 4):
        resumed = first_batches(config, 2, batch_size=8, seed=7, start_step=k)
        assert_batches_equal(resumed[0], run[k])
        assert_batches_equal(resumed[1], run[k + 1])
    (other_seed,) = first_batches(config, 1, batch_size=8, seed=8)
    assert not np.array_equal(other_seed["x"], run[0]["x"])


def test_tfds_each_epoch_is_a_new_permutation(mock_tfds):
    config = image_config("mnist")
    epochs = first_batches(config, 3, batch_size=NUM_MOCK_EXAMPLES)
    source = tfds.data_source("mnist", split="train")
    fingerprints = {source[i]["image"].tobytes(): i for i in range(NUM_MOCK_EXAMPLES)}
    orders = [
        [fingerprints[np.round(x * 255).astype(np.uint8).tobytes()] for x in epoch["x"]]
        for epoch in epochs
    ]
    for order in orders:
        assert sorted(order) == list(range(NUM_MOCK_EXAMPLES))
    assert orders[0] != orders[1] != orders[2] and orders[0] != list(range(NUM_MOCK_EXAMPLES))


def test_tfds_evaluation_is_one_ordered_masked_pass(mock_tfds):
    batches = list(
        data.get_dataset(image_config("mnist"), batch_size=8, evaluation=True, **SINGLE_HOST)
    )
    assert len(batches) == math.ceil(NUM_MOCK_EXAMPLES / 8)
    assert all(b["x"].shape == (8, 28, 28, 1) and b["mask"].dtype == np.bool_ for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(mask, np.arange(len(mask)) < NUM_MOCK_EXAMPLES)
    x = np.concatenate([b["x"] for b in batches])[mask]
    source = tfds.data_source("mnist", split="test")
    expected = np.stack([source[i]["image"] for i in range(NUM_MOCK_EXAMPLES)]) / 255.0
    np.testing.assert_allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("evaluation", [False, True])
@pytest.mark.parametrize("name", ["cifar10", "digits", "two_moons"])
def test_host_slices_partition_the_global_batch(mock_tfds, name, evaluation):
    config = image_config(name, random_flip=True, uniform_dequantization=True)
    if name == "two_moons":
        config = {"dataset": name, "num_eval_examples": 30}
    kwargs = {"batch_size": 12, "seed": 5, "evaluation": evaluation}
    steps = 2
    whole = first_batches(config, steps, **kwargs)
    hosts = [
        first_batches(config, steps, process_index=p, process_count=4, **kwargs) for p in range(4)
    ]
    for step in range(steps):
        for key, value in whole[step].items():
            parts = [hosts[p][step][key] for p in range(4)]
            assert all(len(part) == 3 for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), value, err_msg=key)
    if name == "cifar10":  # disjoint: the 12 examples of the global batch are distinct
        flat = whole[0]["x"].reshape(12, -1)
        assert len({row.tobytes() for row in flat}) == 12


@pytest.mark.parametrize(
    ("name", "size", "channels"),
    [("celeb_a", 16, 3), ("lsun/bedroom", 8, 3), ("svhn_cropped", 16, 3)],
)
def test_tfds_crops_and_resizes(mock_tfds, name, size, channels):
    config = {"dataset": name, "image_size": size, "centered": True}
    (batch,) = first_batches(config, 1, batch_size=4)
    assert batch["x"].shape == (4, size, size, channels) == (4, *data.data_shape(config))
    assert -1.0 <= batch["x"].min() and batch["x"].max() <= 1.0
    if data.num_classes(config) is None:
        np.testing.assert_array_equal(batch["label"], 0)


# ----------------------------------------------------------------------------------------
# TFDS on real ArrayRecord files (the decoding that the mock skips)
# ----------------------------------------------------------------------------------------


def write_array_record_dataset(data_dir, name, examples_by_split):
    """Write ``examples_by_split`` as a prepared TFDS dataset, with TFDS's own serializer.

    Images are given PNG-encoded (PIL), so no TensorFlow is needed; ``dataset_info.json``
    records the splits as ``tfds build --file_format=array_record`` would.
    """
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.data_path.mkdir(parents=True, exist_ok=True)
    split_infos = []
    for split, examples in examples_by_split.items():
        template = tfds.core.ShardedFileTemplate(
            data_dir=builder.data_path,
            dataset_name=name,
            split=split,
            filetype_suffix="array_record",
        )
        writer = array_record_module.ArrayRecordWriter(
            str(template.sharded_filepath(shard_index=0, num_shards=1)), "group_size:1"
        )
        num_bytes = 0
        for example in examples:
            png = io.BytesIO()
            Image.fromarray(example["image"].squeeze()).save(png, format="PNG")
            record = builder.info.features.serialize_example({**example, "image": png.getvalue()})
            writer.write(record)
            num_bytes += len(record)
        writer.close()
        split_infos.append(
            tfds.core.SplitInfo(
                name=split,
                shard_lengths=[len(examples)],
                num_bytes=num_bytes,
                filename_template=template,
            )
        )
    builder.info.set_splits(tfds.core.SplitDict(split_infos))
    builder.info.write_to_directory(builder.data_path)


def test_real_array_record_files_decode_without_tensorflow(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(7) % 10
    examples = [
        {"id": f"test_{i}", "image": images[i], "label": labels[i]} for i in range(len(images))
    ]
    write_array_record_dataset(tmp_path, "cifar10", {"test": examples, "train": examples[:3]})
    config = image_config("cifar10", data_dir=str(tmp_path), centered=True)
    batches = list(
        data.get_dataset(config, batch_size=4, split="test", evaluation=True, **SINGLE_HOST)
    )
    assert [b["mask"].sum() for b in batches] == [4, 3]
    x = np.concatenate([b["x"] for b in batches])[:7]
    np.testing.assert_allclose(x, 2.0 * images / 255.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:7], labels)
    (train,) = first_batches(config, 1, batch_size=6)  # 3 examples: two epochs in one batch
    assert sorted(train["label"]) == [0, 0, 1, 1, 2, 2]
    assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------


def test_digits_split_is_a_fixed_partition():
    train_images, train_labels = data.load_digits("train")
    test_images, test_labels = data.load_digits("test")
    assert train_images.shape == (1500, 8, 8, 1) and test_images.shape == (297, 8, 8, 1)
    assert train_images.dtype == np.uint8 and train_images.max() == 16
    full = sklearn.datasets.load_digits()
    rows = lambda images, labels: sorted(
        map(tuple, np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1))
    )
    ours = rows(
        np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])
    )
    assert ours == rows(full.images.astype(np.uint8), full.target)
    assert set(test_labels) == set(range(10))
    with pytest.raises(ValueError, match="'train' and 'test'"):
        data.load_digits("validation")


@pytest.mark.parametrize("centered", [False, True])
def test_digits_scaling_and_labels(centered):
    config = {"dataset": "digits", "image_size": 8, "centered": centered}
    assert data.data_shape(config) == (8, 8, 1)
    assert data.num_classes(config) == 10 and data.num_levels(config) == 17
    batches = list(
        data.get_dataset(config, batch_size=100, split="test", evaluation=True, **SINGLE_HOST)
    )
    assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 297
    x = np.concatenate([b["x"] for b in batches])[:297]
    images, labels = data.load_digits("test")
    np.testing.assert_allclose(data.get_data_inverse_scaler(config)(x), images / 16.0, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:297], labels)
    (noisy,) = first_batches({**config, "uniform_dequantization": True}, 1, batch_size=64)
    levels = data.get_data_inverse_scaler(config)(noisy["x"]) * 17.0  # (16 x + u) / 17
    assert levels.min() > 0.0 and levels.max() < 17.0
    assert np.std(levels - np.floor(levels)) > 0.25


# ----------------------------------------------------------------------------------------
# 2-D toys
# ----------------------------------------------------------------------------------------

TOY_SAMPLES = 20_000


def toy_batch(name, **kwargs):
    (batch,) = first_batches({"dataset": name}, 1, batch_size=TOY_SAMPLES, **kwargs)
    assert batch["x"].shape == (TOY_SAMPLES, 2) and batch["x"].dtype == np.float32
    assert batch["label"].dtype == np.int32
    return batch["x"].astype(np.float64), batch["label"]


def test_checkerboard_lies_on_the_dark_squares():
    x, label = toy_batch("checkerboard")
    assert np.all(np.abs(x) <= 4.0) and np.all(label == 0)
    squares = np.floor((x + 4.0) / 2.0).astype(int)
    assert np.all(squares.sum(axis=1) % 2 == 0)
    counts = np.unique(squares[:, 0] * 4 + squares[:, 1], return_counts=True)[1]
    assert len(counts) == 8 and np.all(np.abs(counts / TOY_SAMPLES - 1 / 8) < 0.01)
    np.testing.assert_allclose(np.var(x, axis=0), 16 / 3, rtol=0.03)


def test_swiss_roll_follows_the_spiral():
    x, label = toy_batch("swiss_roll")
    assert np.all(label == 0)
    # Mean noiseless radius t / 5 with E[t] = 3 pi; noise 0.2 biases it by ~ sigma^2 / 2r.
    assert abs(np.mean(5.0 * np.linalg.norm(x, axis=1)) - 3 * np.pi) < 0.15
    exact, _ = data.sample_swiss_roll(np.random.default_rng(0), 1000, noise=0.0)
    t = 5.0 * np.linalg.norm(exact.astype(np.float64), axis=1)  # the angle equals the radius
    angle_error = np.angle(np.exp(1j * (np.arctan2(exact[:, 1], exact[:, 0]) - t)))
    assert np.all(np.abs(angle_error) < 1e-4) and 1.5 * np.pi - 1e-4 < t.min()
    assert t.max() < 4.5 * np.pi + 1e-4


def test_gaussian_mixture_components():
    x, label = toy_batch("gaussian_mixture")
    assert data.num_classes({"dataset": "gaussian_mixture"}) == 8
    for k in range(8):
        members = x[label == k]
        assert abs(len(members) / TOY_SAMPLES - 1 / 8) < 0.01
        mean = 4.0 * np.array([np.cos(2 * np.pi * k / 8), np.sin(2 * np.pi * k / 8)])
        np.testing.assert_allclose(members.mean(axis=0), mean, atol=0.05)
        np.testing.assert_allclose(members.std(axis=0), 0.5, rtol=0.05)


def test_two_moons_means_and_support():
    x, label = toy_batch("two_moons")
    assert set(label) == {0, 1} and abs(np.mean(label) - 0.5) < 0.02
    np.testing.assert_allclose(x[label == 0].mean(axis=0), [0.0, 2 / np.pi], atol=0.03)
    np.testing.assert_allclose(x[label == 1].mean(axis=0), [1.0, 0.5 - 2 / np.pi], atol=0.03)
    exact, moon = data.sample_two_moons(np.random.default_rng(0), 1000, noise=0.0)
    center = np.where(moon[:, None] == 0, [0.0, 0.0], [1.0, 0.5])
    np.testing.assert_allclose(np.linalg.norm(exact - center, axis=1), 1.0, atol=1e-5)
    assert np.all(np.where(moon == 0, exact[:, 1], 0.5 - exact[:, 1]) >= -1e-6)


def test_toys_are_fresh_per_step_deterministic_and_split_dependent():
    config = {"dataset": "two_moons"}
    run = first_batches(config, 3, batch_size=16, seed=1)
    assert not np.array_equal(run[0]["x"], run[1]["x"])
    assert_batches_equal(first_batches(config, 1, batch_size=16, seed=1, start_step=2)[0], run[2])
    (test,) = first_batches(config, 1, batch_size=16, seed=1, split="test")
    assert not np.array_equal(test["x"], run[0]["x"])
    evaluation = list(
        data.get_dataset(
            {**config, "num_eval_examples": 40}, batch_size=16, evaluation=True, **SINGLE_HOST
        )
    )
    assert [b["mask"].sum() for b in evaluation] == [16, 16, 8]
    assert data.data_shape(config) == (2,) and data.num_levels(config) is None


# ----------------------------------------------------------------------------------------
# Helpers and errors
# ----------------------------------------------------------------------------------------


def test_scalers_round_trip():
    x = np.linspace(0.0, 1.0, 11)
    centered = data.get_data_scaler({"dataset": "cifar10", "centered": True})
    np.testing.assert_allclose(centered(x), 2 * x - 1)
    inverse = data.get_data_inverse_scaler({"dataset": "cifar10", "centered": True})
    np.testing.assert_allclose(inverse(centered(x)), x)
    np.testing.assert_array_equal(data.get_data_scaler({"dataset": "mnist"})(x), x)
    assert data.num_levels({"dataset": "cifar10"}) == 256
    assert data.num_classes({"dataset": "celeb_a", "image_size": 64}) is None
    assert data.eval_split({"dataset": "lsun/church_outdoor"}) == "validation"


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="imagenet") as error:
        data.get_dataset({"dataset": "imagenet"}, batch_size=8, **SINGLE_HOST)
    for name in ["checkerboard", "swiss_roll", "gaussian_mixture", "two_moons", "digits"]:
        assert name in str(error.value)
    for name in ["cifar10", "mnist", "fashion_mnist", "svhn_cropped", "celeb_a", "lsun/<category>"]:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="church_outdoor"):
        data.data_shape({"dataset": "lsun/castle", "image_size": 64})


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match=r"batch size 10 .* processes 4"):
        data.get_dataset({"dataset": "digits"}, batch_size=10, process_index=0, process_count=4)
    with pytest.raises(ValueError, match="image_size must be 8"):
        data.data_shape({"dataset": "digits", "image_size": 32})
    with pytest.raises(ValueError, match="num_channels=3"):
        data.data_shape({"dataset": "mnist", "image_size": 28, "num_channels": 3})
    with pytest.raises(ValueError, match="image_size must be set"):
        data.data_shape({"dataset": "celeb_a"})


def test_missing_tfds_dataset_fails_fast_with_the_prepare_command(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset must never download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    start = time.monotonic()
    config = image_config("cifar10", data_dir=str(tmp_path))
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.get_dataset(config, batch_size=8, **SINGLE_HOST)
    assert time.monotonic() - start < 10.0
    message = str(error.value)
    assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message
    assert "data.data_dir" in message and "TensorFlow" in message
    assert not any(path.is_file() for path in tmp_path.rglob("*")), "nothing was written"
