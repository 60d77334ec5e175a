r"""Datasets: built-in offline data, and TFDS image datasets read through grain.

Every dataset is reached through :func:`get_dataset`, which yields batches

``{"x": float32 (local_batch, *data_shape(config)), "label": int32 (local_batch,)}``

already in *model space*: images are scaled to :math:`[0, 1]` and, when
``data.centered``, mapped to :math:`[-1, 1]` (:func:`get_data_scaler`). The training
loop must therefore not apply the scaler again; the inverse scaler maps samples back
to :math:`[0, 1]` for display and bits/dim.

Datasets (``data.dataset``; see :data:`BUILTIN_DATASETS` and :data:`TFDS_DATASETS`):

- 2-D toys, sampled fresh for every step from ``(seed, split, step)``, shape ``(2,)``:
  ``checkerboard``, ``swiss_roll``, ``gaussian_mixture``, ``two_moons`` (their
  parameters are in the docstrings of the ``sample_*`` functions);
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, pixels
  0..16, 17 levels, labels 0..9), split once and for all into 1,500 train and 297 test
  images (:func:`load_digits`); scaled by ``x / 16``;
- TFDS image datasets, read with ``tfds.data_source`` (random access, ArrayRecord
  files; no TensorFlow needed) and ``grain.MapDataset``: ``cifar10``, ``mnist``,
  ``fashion_mnist``, ``svhn_cropped``, ``celeb_a``, ``lsun/<category>``. Nothing is ever
  downloaded: a dataset that is not prepared under ``data.data_dir`` raises
  :class:`DatasetNotPreparedError` with the command that prepares it.

Preprocessing of images follows the 2021 reference (``score_sde/datasets.py``), in
this order: ``uint8 -> x / 255`` (``x / 16`` for digits); crop and resize to
``data.image_size`` (antialiased bilinear, PIL; CelebA: center crop 140x140 first;
LSUN: shorter side to ``image_size`` then center crop, which is the reference's path at
size 128; at other sizes it cropped first and resized bicubically); random horizontal flip
(``data.random_flip``, training only); uniform dequantization
(``data.uniform_dequantization``: ``x <- (x (L - 1) + u) / L``, ``u ~ U[0, 1)``, with
``L`` = :func:`num_levels`, i.e. ``(255 x + u) / 256`` for ``uint8`` images; in float32 a
``u`` within ``2**-24`` of 1 can round onto the upper bin edge); finally the
scaler (``2 x - 1`` when ``data.centered``).

Order and sharding. Training batches are infinite and shuffled (a new permutation each
epoch); the global batch at step ``k`` holds the examples ``k B .. (k + 1) B - 1`` of a
stream that is a pure function of ``seed``, and host ``p`` of ``P`` reads the contiguous
slice ``k B + p b .. k B + (p + 1) b - 1`` of it (``b = B / P``). Per-example randomness
(flip, dequantization noise) is keyed by the example's position in the global stream.
Hence concatenating the hosts' batches in process order gives the single-host batch, and
``start_step=k`` starts at the batch an uninterrupted run sees at step ``k``, without
replaying anything (grain's ``MapDataset`` is random access).

Evaluation batches (``evaluation=True``) make one pass over the split in order: every
batch has the full ``local_batch`` size and a boolean ``"mask"`` key; the last global
batch is padded by wrapping around to the first examples of the split, with ``mask``
False on the padding (so every host runs the same number of same-shaped steps).

Optional config fields (defaults in parentheses): ``data.centered`` (False),
``data.random_flip`` (False), ``data.uniform_dequantization`` (False), ``data.data_dir``
(TFDS's default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``), ``data.image_size``
(the native size, where there is one), ``data.num_channels`` (checked against the
dataset), ``data.num_eval_examples`` (toys' evaluation set, 10,000), ``data.num_threads``
(4), ``data.prefetch_batches`` (4) and ``data.num_workers`` (0: no worker processes) for
grain's reader.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_sde import errors

Batch = dict[str, np.ndarray]
ToySampler = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]

DEFAULT_NUM_THREADS = 4
DEFAULT_PREFETCH_BATCHES = 4
DEFAULT_TOY_EVAL_EXAMPLES = 10_000


class DatasetNotPreparedError(errors.UserError, FileNotFoundError):
    """A TFDS dataset is not prepared (as ArrayRecord files) under the data directory."""


# ----------------------------------------------------------------------------------------
# 2-D toy distributions
# ----------------------------------------------------------------------------------------


def sample_checkerboard(
    rng: np.random.Generator, num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    r"""Uniform samples on the dark squares of a 4x4 checkerboard covering :math:`[-4, 4]^2`.

    Square :math:`(i, j) \in \{0..3\}^2` is :math:`[-4 + 2i, -2 + 2i) \times [-4 + 2j, -2 + 2j)`;
    it is dark when :math:`i + j` is even (8 dark squares, each of probability 1/8). Mean
    0, per-coordinate variance :math:`16/3`. Labels are all 0.
    """
    i = rng.integers(0, 4, num_samples)
    j = 2 * rng.integers(0, 2, num_samples) + i % 2
    corner = np.stack([i, j], axis=-1) * 2.0 - 4.0
    x = corner + 2.0 * rng.random((num_samples, 2))
    return x.astype(np.float32), np.zeros(num_samples, np.int32)


def sample_swiss_roll(
    rng: np.random.Generator, num_samples: int, *, noise: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    r"""The 2-D Swiss roll :math:`x = (t \cos t, t \sin t) / 5 + \text{noise} \cdot \varepsilon`.

    :math:`t = \tfrac32 \pi (1 + 2u)`, :math:`u \sim U[0, 1)`, so :math:`t \in [1.5\pi, 4.5\pi)`
    (mean :math:`3\pi`) and the noiseless radius :math:`|x| = t / 5`;
    :math:`\varepsilon \sim \mathcal N(0, I)` (as FFJORD's ``swissroll``: scikit-learn's
    roll with noise 1, divided by 5). Labels are all 0.
    """
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.random(num_samples))
    x = np.stack([t * np.cos(t), t * np.sin(t)], axis=-1) / 5.0
    x = x + noise * rng.standard_normal((num_samples, 2))
    return x.astype(np.float32), np.zeros(num_samples, np.int32)


def sample_gaussian_mixture(
    rng: np.random.Generator,
    num_samples: int,
    *,
    num_components: int = 8,
    radius: float = 4.0,
    std: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    r"""An equal-weight mixture of isotropic Gaussians with means on a circle.

    :math:`p(x) = \frac1K \sum_k \mathcal N(x; \mu_k, \text{std}^2 I)`,
    :math:`\mu_k = \text{radius}\,(\cos 2\pi k / K, \sin 2\pi k / K)`, by default
    :math:`K = 8`, radius 4, std 0.5. The label is the component :math:`k`.
    """
    k = rng.integers(0, num_components, num_samples)
    angle = 2.0 * np.pi * k / num_components
    means = radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    x = means + std * rng.standard_normal((num_samples, 2))
    return x.astype(np.float32), k.astype(np.int32)


def sample_two_moons(
    rng: np.random.Generator, num_samples: int, *, noise: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    r"""Two interleaved half circles (scikit-learn's ``make_moons``, with random angles).

    Moon 0: :math:`(\cos\theta, \sin\theta)`; moon 1: :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)`;
    :math:`\theta \sim U[0, \pi]`, each moon with probability 1/2, plus
    :math:`\text{noise} \cdot \mathcal N(0, I)`. Moon means: :math:`(0, 2/\pi)` and
    :math:`(1, \tfrac12 - 2/\pi)`. The label is the moon index.
    """
    moon = rng.integers(0, 2, num_samples)
    theta = np.pi * rng.random(num_samples)
    outer = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    inner = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], axis=-1)
    x = np.where(moon[:, None] == 0, outer, inner)
    x = x + noise * rng.standard_normal((num_samples, 2))
    return x.astype(np.float32), moon.astype(np.int32)


# name -> (sampler, number of classes or None when every label is 0).
TOY_DATASETS: dict[str, tuple[ToySampler, int | None]] = {
    "checkerboard": (sample_checkerboard, None),
    "swiss_roll": (sample_swiss_roll, None),
    "gaussian_mixture": (sample_gaussian_mixture, 8),
    "two_moons": (sample_two_moons, 2),
}


# ----------------------------------------------------------------------------------------
# Images: digits and TFDS
# ----------------------------------------------------------------------------------------

DIGITS_NUM_TRAIN = 1500
# A fixed split: the 1,797 digits ordered by raw PCG64 draws, whose stream NumPy keeps
# stable across versions (unlike Generator.permutation's algorithm).
DIGITS_SPLIT_SEED = 0


@functools.cache
def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, as ``(images uint8 (n, 8, 8, 1), labels int32 (n,))``.

    Pixels are integers 0..16 (17 levels). ``split`` is ``"train"`` (1,500 images) or
    ``"test"`` (297 images): a fixed pseudo-random partition of the 1,797 digits.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits has the splits 'train' and 'test', not {split!r}.")
    # Imported here: scikit-learn takes about a second to import, which every process that
    # trains on a toy or a TFDS dataset would otherwise pay.
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()
    order = np.argsort(np.random.PCG64(DIGITS_SPLIT_SEED).random_raw(len(digits.images)))
    indices = order[:DIGITS_NUM_TRAIN] if split == "train" else order[DIGITS_NUM_TRAIN:]
    images = digits.images[indices].astype(np.uint8)[..., None]
    return images, digits.target[indices].astype(np.int32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of a float (H, W, C) image (PIL, channel by channel)."""
    if image.shape[:2] == (height, width):
        return image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c])).resize(
                (width, height), resample=Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def _resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to ``size x size`` (the reference's ``resize_op`` for CIFAR-10 and SVHN)."""
    return _resize(image, size, size)


def _celeba_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center crop 140x140 of the 218x178 CelebA image, then resize (the reference's)."""
    return _resize(_center_crop(image, 140, 140), size, size)


def _resize_shorter_side_and_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (aspect kept), then center crop ``size x size``."""
    height, width = image.shape[:2]
    ratio = size / min(height, width)
    image = _resize(image, max(size, round(height * ratio)), max(size, round(width * ratio)))
    return _center_crop(image, size, size)


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    """What the pipeline needs to know about an image dataset.

    Attributes:
      num_channels: channels of the stored images.
      num_classes: number of labels, or None when the dataset has none (label 0).
      native_size: stored height = width, or None when it varies or is not square.
      eval_split: the split the reference evaluates on.
      crop_and_resize: ``(float image in [0, 1], image_size) -> image_size x image_size``.
      num_levels: quantisation levels of the stored pixels (256 for uint8).
    """

    num_channels: int
    num_classes: int | None
    native_size: int | None
    eval_split: str
    crop_and_resize: Callable[[np.ndarray, int], np.ndarray]
    num_levels: int = 256


DIGITS = ImageDataset(1, 10, 8, "test", _resize_square, num_levels=17)

# TFDS names; ``lsun`` stands for ``lsun/<category>``.
TFDS_DATASETS: dict[str, ImageDataset] = {
    "cifar10": ImageDataset(3, 10, 32, "test", _resize_square),
    "mnist": ImageDataset(1, 10, 28, "test", _resize_square),
    "fashion_mnist": ImageDataset(1, 10, 28, "test", _resize_square),
    "svhn_cropped": ImageDataset(3, 10, 32, "test", _resize_square),
    "celeb_a": ImageDataset(3, None, None, "validation", _celeba_crop_resize),
    "lsun": ImageDataset(3, None, None, "validation", _resize_shorter_side_and_crop),
}

# Every built-in (offline) dataset.
BUILTIN_DATASETS: dict[str, ImageDataset | tuple[ToySampler, int | None]] = {
    **TOY_DATASETS,
    "digits": DIGITS,
}


def _valid_names() -> str:
    names = [*BUILTIN_DATASETS, *(n for n in TFDS_DATASETS if n != "lsun"), "lsun/<category>"]
    return ", ".join(names)


def _lsun_categories() -> list[str]:
    return [config.name for config in tfds.builder_cls("lsun").BUILDER_CONFIGS]


def _image_dataset(data_config: Mapping[str, Any]) -> ImageDataset:
    """The :class:`ImageDataset` of an image dataset name; a ValueError for a toy or unknown name."""
    name = data_config["dataset"]
    if name == "digits":
        return DIGITS
    family, _, category = name.partition("/")
    if family == "lsun":
        if category not in _lsun_categories():
            raise ValueError(
                f"Unknown LSUN category {category!r} in data.dataset={name!r}; valid: "
                f"{', '.join(_lsun_categories())}."
            )
        return TFDS_DATASETS["lsun"]
    if name in TFDS_DATASETS:
        return TFDS_DATASETS[name]
    raise ValueError(f"Unknown dataset data.dataset={name!r}; valid names: {_valid_names()}.")


def _is_toy(data_config: Mapping[str, Any]) -> bool:
    return data_config["dataset"] in TOY_DATASETS


def _image_size(data_config: Mapping[str, Any], dataset: ImageDataset) -> int:
    size = data_config.get("image_size") or dataset.native_size
    if size is None:
        raise ValueError(
            f"data.image_size must be set for data.dataset={data_config['dataset']!r}."
        )
    if data_config["dataset"] == "digits" and size != DIGITS.native_size:
        raise ValueError(f"digits are 8x8 images: data.image_size must be 8, not {size}.")
    return int(size)


# ----------------------------------------------------------------------------------------
# Helpers on a data config
# ----------------------------------------------------------------------------------------


def data_shape(data_config: Mapping[str, Any]) -> tuple[int, ...]:
    """Shape of one example: ``(2,)`` for toys, ``(image_size, image_size, channels)`` for images.

    Raises ValueError for an unknown name, or when ``data.num_channels`` disagrees with
    the dataset.
    """
    if _is_toy(data_config):
        return (2,)
    dataset = _image_dataset(data_config)
    channels = data_config.get("num_channels") or dataset.num_channels
    if channels != dataset.num_channels:
        raise ValueError(
            f"data.num_channels={channels} but {data_config['dataset']!r} has "
            f"{dataset.num_channels} channel(s)."
        )
    size = _image_size(data_config, dataset)
    return (size, size, dataset.num_channels)


def num_classes(data_config: Mapping[str, Any]) -> int | None:
    """Number of labels, or None when the dataset has none (its labels are all 0)."""
    if _is_toy(data_config):
        return TOY_DATASETS[data_config["dataset"]][1]
    return _image_dataset(data_config).num_classes


def num_levels(data_config: Mapping[str, Any]) -> int | None:
    """Quantisation levels of the stored pixels: 256 (uint8 images), 17 (digits), None (toys).

    Bits/dim of data in :math:`[0, 1]` with ``L`` levels dequantizes with bins of width
    :math:`1 / L`.
    """
    if _is_toy(data_config):
        return None
    return _image_dataset(data_config).num_levels


def eval_split(data_config: Mapping[str, Any]) -> str:
    """The split the reference evaluates on: ``test``, or ``validation`` (CelebA, LSUN)."""
    if _is_toy(data_config):
        return "test"
    return _image_dataset(data_config).eval_split


def get_data_scaler(data_config: Mapping[str, Any]) -> Callable[[Any], Any]:
    """Map data in :math:`[0, 1]` to model space: ``2 x - 1`` when ``data.centered``, else identity.

    Toys live in model space already: identity. :func:`get_dataset` applies this itself.
    """
    if not _is_toy(data_config) and data_config.get("centered", False):
        return lambda x: 2.0 * x - 1.0
    return lambda x: x


def get_data_inverse_scaler(data_config: Mapping[str, Any]) -> Callable[[Any], Any]:
    """Inverse of :func:`get_data_scaler`: model space back to :math:`[0, 1]`."""
    if not _is_toy(data_config) and data_config.get("centered", False):
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x


# ----------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------


def _resolved_data_dir(data_dir: str | None) -> str:
    if data_dir:
        return os.fspath(data_dir)
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _open_tfds(name: str, split: str, data_dir: str | None):
    """``tfds.data_source`` without any download, or a DatasetNotPreparedError saying what to do."""
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds reports a missing dataset with KeyError,
        # NotImplementedError (files in TFRecord format), AssertionError, ... depending on what
        # is on disk; all of them mean "not readable here", and the cause is kept below.
        directory = _resolved_data_dir(data_dir)
        raise DatasetNotPreparedError(
            f"Cannot read TFDS dataset {name!r} (split {split!r}) from data_dir {directory!r}: "
            f"{type(error).__name__}: {error}\n"
            "This code reads TFDS datasets with tfds.data_source (ArrayRecord files, no "
            "TensorFlow) and never downloads. Prepare the dataset once, on a machine with "
            "TensorFlow and internet access (pip install tensorflow tensorflow-datasets):\n"
            f"    tfds build {name} --file_format=array_record --data_dir={directory}\n"
            "or in Python:\n"
            f"    tfds.builder({name!r}, data_dir={directory!r}, "
            "file_format='array_record').download_and_prepare()\n"
            f"then copy {os.path.join(directory, name.split('/')[0])} to this machine and point "
            "data.data_dir at its parent (--config.data.data_dir=...)."
        ) from error


class _ArraySource:
    """Random-access source over in-memory ``images`` and ``labels`` (grain's protocol)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}


def _preprocess(
    example: dict[str, Any],
    rng: np.random.Generator,
    *,
    dataset: ImageDataset,
    image_size: int,
    random_flip: bool,
    uniform_dequantization: bool,
    scaler: Callable[[np.ndarray], np.ndarray],
) -> dict[str, np.ndarray]:
    """One stored example -> ``{"x": float32 (H, W, C) in model space, "label": int32[, "mask"]}``."""
    x = np.asarray(example["image"], np.float32) / (dataset.num_levels - 1)
    x = dataset.crop_and_resize(x, image_size)
    # The coin is drawn even without flipping so the noise below does not depend on it.
    if rng.random() < 0.5 and random_flip:
        x = x[:, ::-1]
    if uniform_dequantization:
        levels = dataset.num_levels
        x = (x * (levels - 1) + rng.random(x.shape, dtype=np.float32)) / levels
    out = {
        "x": np.ascontiguousarray(scaler(x), dtype=np.float32),
        "label": np.int32(example.get("label", 0)),
    }
    if "mask" in example:
        out["mask"] = example["mask"]
    return out


def _add_mask(index: int, example: dict[str, Any], *, num_examples: int) -> dict[str, Any]:
    return {**example, "mask": np.bool_(index < num_examples)}


def _toy_batches(
    sampler: ToySampler,
    *,
    seed: int,
    split: str,
    start_step: int,
    global_batch: int,
    lo: int,
    hi: int,
    num_examples: int | None,
) -> Iterator[Batch]:
    """Global batch k drawn from ``rng(seed, crc32(split), k)``; this host keeps ``[lo:hi]``."""
    split_id = zlib.crc32(split.encode())
    num_steps = None if num_examples is None else math.ceil(num_examples / global_batch)
    step = start_step
    while num_steps is None or step < num_steps:
        x, label = sampler(np.random.default_rng([seed, split_id, step]), global_batch)
        batch = {"x": x[lo:hi], "label": label[lo:hi]}
        if num_examples is not None:
            batch["mask"] = (step * global_batch + np.arange(lo, hi)) < num_examples
        yield batch
        step += 1


def get_dataset(
    data_config: Mapping[str, Any],
    *,
    batch_size: int,
    split: str = "train",
    seed: int = 0,
    start_step: int = 0,
    evaluation: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    uniform_dequantization: bool | None = None,
) -> Iterator[Batch]:
    """Batches of ``data_config.dataset`` for this host, in model space.

    Args:
      data_config: the ``data`` group of the config (a ConfigDict or a dict); see the
        module docstring for its fields.
      batch_size: the global batch size ``B`` over all hosts.
      split: a split name (TFDS split syntax such as ``"train[:90%]"`` works for TFDS);
        toys use it only to pick an independent random stream.
      seed: seeds the shuffle and the per-example randomness (0 <= seed < 2**32).
      start_step: index of the first batch to yield (resuming at step ``k`` yields what an
        uninterrupted run yields from step ``k`` on).
      evaluation: False: infinite, shuffled, flipped batches. True: one ordered pass, no
        flip, with a ``"mask"`` key (bool; False on the padding of the last batch).
      process_index, process_count: this host and the number of hosts (default
        ``jax.process_index()``, ``jax.process_count()``).
      uniform_dequantization: add ``U[0, 1)`` noise to the pixel levels; None means
        ``data.uniform_dequantization`` in training and False in evaluation.

    With ``data.num_workers > 0`` (grain worker processes), absl flags must be parsed
    (``absl.app.run`` does it) and the iterator should be ``close()``-d after use.

    Returns:
      An iterator of ``{"x": float32 (B / P, *data_shape), "label": int32 (B / P,)}`` (plus
      ``"mask"`` in evaluation).

    Raises:
      ValueError: unknown dataset, bad split, or ``batch_size`` not divisible by the
        number of hosts.
      DatasetNotPreparedError: a TFDS dataset missing from the data directory.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"The global batch size {batch_size} must be a positive multiple of the number "
            f"of processes {process_count} (each reads batch_size / process_count examples)."
        )
    if start_step < 0 or not 0 <= seed < 2**32:
        raise ValueError(f"Need start_step >= 0 and 0 <= seed < 2**32; got {start_step}, {seed}.")
    local_batch = batch_size // process_count
    shape = data_shape(data_config)  # validates the name, size and channels
    if uniform_dequantization is None:
        uniform_dequantization = not evaluation and data_config.get("uniform_dequantization", False)

    if _is_toy(data_config):
        num_examples = None
        if evaluation:
            num_examples = data_config.get("num_eval_examples", DEFAULT_TOY_EVAL_EXAMPLES)
        return _toy_batches(
            TOY_DATASETS[data_config["dataset"]][0],
            seed=seed,
            split=split,
            start_step=start_step,
            global_batch=batch_size,
            lo=process_index * local_batch,
            hi=(process_index + 1) * local_batch,
            num_examples=num_examples,
        )

    return _image_batches(
        data_config,
        shape=shape,
        batch_size=batch_size,
        split=split,
        seed=seed,
        start_step=start_step,
        evaluation=evaluation,
        process_index=process_index,
        process_count=process_count,
        uniform_dequantization=uniform_dequantization,
    )


def _image_batches(
    data_config, *, shape, batch_size, split, seed, start_step, evaluation, process_index,
    process_count, uniform_dequantization,
) -> Iterator[Batch]:  # fmt: skip
    """The grain pipeline of an image dataset (digits or TFDS) behind :func:`get_dataset`."""
    local_batch = batch_size // process_count
    dataset = _image_dataset(data_config)
    if data_config["dataset"] == "digits":
        source = _ArraySource(*load_digits(split))
    else:
        source = _open_tfds(data_config["dataset"], split, data_config.get("data_dir"))
    shuffle_seed, augment_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    preprocess = functools.partial(
        _preprocess,
        dataset=dataset,
        image_size=shape[0],
        random_flip=not evaluation and data_config.get("random_flip", False),
        uniform_dequantization=uniform_dequantization,
        scaler=get_data_scaler(data_config),
    )

    examples = grain.MapDataset.source(source)
    if evaluation:
        # Pad the pass to whole global batches by wrapping around; mask the padding.
        num_examples = len(source)
        if num_examples == 0:
            raise ValueError(f"Split {split!r} of {data_config['dataset']!r} is empty.")
        padded = math.ceil(num_examples / batch_size) * batch_size
        examples = examples.repeat(math.ceil(padded / num_examples))[:padded]
        examples = examples.map_with_index(functools.partial(_add_mask, num_examples=num_examples))
    else:
        # Shuffle, then repeat: grain's shuffle sees the global index and draws a new
        # permutation for each epoch.
        examples = examples.shuffle(seed=shuffle_seed).repeat()
    examples = examples.random_map(preprocess, seed=augment_seed)
    # Cut the global stream into local-size chunks: global batch k is chunks k P .. k P + P - 1,
    # and host p owns chunk k P + p.
    batches = examples.batch(local_batch)[process_index::process_count]
    read_options = grain.ReadOptions(
        num_threads=data_config.get("num_threads", DEFAULT_NUM_THREADS),
        prefetch_buffer_size=data_config.get("prefetch_batches", DEFAULT_PREFETCH_BATCHES),
    )
    batches = batches[start_step:].to_iter_dataset(read_options)
    num_workers = data_config.get("num_workers", 0)
    if num_workers:
        # Worker processes sidestep the GIL; grain keeps the order (and so determinism).
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(batches)


__all__ = [
    "BUILTIN_DATASETS",
    "DatasetNotPreparedError",
    "ImageDataset",
    "TFDS_DATASETS",
    "TOY_DATASETS",
    "data_shape",
    "eval_split",
    "get_data_inverse_scaler",
    "get_data_scaler",
    "get_dataset",
    "load_digits",
    "num_classes",
    "num_levels",
    "sample_checkerboard",
    "sample_gaussian_mixture",
    "sample_swiss_roll",
    "sample_two_moons",
]
