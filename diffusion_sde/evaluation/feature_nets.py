r"""Small CNN classifiers whose penultimate activations are the FID/KID features of small data.

The Inception network of FID was trained on ImageNet photographs; for 8x8 digits (and
28x28 MNIST) a classifier trained on the dataset itself gives more meaningful features
(as in the "LeNet FID" used for MNIST). :class:`Classifier` is

.. code-block:: text

    x -> 2x - 1 -> conv3x3(16) relu avgpool2 -> conv3x3(32) relu avgpool2 -> flatten
      -> dense(128) relu = features (128-d) -> dense(10) = logits

trained with Adam (cosine-decayed learning rate) on softmax cross-entropy, with random
one-pixel shifts as augmentation, deterministically (a fixed key), and cached with
``flax.serialization`` under :func:`cache_dir` (``$DIFFUSION_SDE_CACHE`` or
``~/.cache/diffusion_sde``) as ``<dataset>_classifier_v1.msgpack``. A missing or unreadable
cache file is retrained and rewritten. Bump :data:`CLASSIFIER_VERSION` whenever the
network or its training changes, so that old caches (and the FIDs computed with them) are
not mixed with new ones.

``digits`` (scikit-learn's bundled 8x8 digits through :func:`data.load_digits`, offline):
trained for 2,000 steps of 64 images; its test accuracy on the fixed test split is in the
README; the cached file is bit-identical from run to run.
``mnist`` is trained the same way (4,000 steps) on the TFDS ``mnist`` train split read
through :func:`data.get_dataset`; it must be prepared locally (nothing is downloaded), else
:class:`data.DatasetNotPreparedError` says how.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_sde import data as data_lib
from diffusion_sde.training import classifier as classifier_training

CACHE_ENV = "DIFFUSION_SDE_CACHE"
CLASSIFIER_VERSION = 1


def cache_dir() -> pathlib.Path:
    """``$DIFFUSION_SDE_CACHE`` when set, else ``~/.cache/diffusion_sde``."""
    return pathlib.Path(os.environ.get(CACHE_ENV) or "~/.cache/diffusion_sde").expanduser()


class Classifier(nn.Module):
    """A small CNN; ``__call__(x) -> (logits, features)`` for ``x`` in [0, 1], ``(B, H, W, C)``."""

    num_classes: int = 10
    widths: tuple[int, ...] = (16, 32)
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = 2.0 * x - 1.0
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(features), features


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """How to train the feature classifier of one dataset.

    Attributes:
      image_shape: ``(H, W, C)`` of its inputs.
      num_levels: pixel levels of integer images (17 for digits: 0..16; 256 for uint8).
      load_split: ``split -> (images float32 in [0, 1] (n, H, W, C), labels int32 (n,))``.
      num_steps, batch_size, learning_rate: Adam on softmax cross-entropy.
      seed: the training key.
    """

    image_shape: tuple[int, int, int]
    num_levels: int
    load_split: Callable[..., tuple[np.ndarray, np.ndarray]]
    num_steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0


def _load_digits(split: str, **unused: Any) -> tuple[np.ndarray, np.ndarray]:
    images, labels = data_lib.load_digits(split)
    return images.astype(np.float32) / (data_lib.DIGITS.num_levels - 1), labels


def _load_tfds(
    name: str, split: str, *, data_dir: str | None = None, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """A whole TFDS split in [0, 1] through :func:`data.get_dataset` (one ordered pass)."""
    config = {"dataset": name, "centered": False, "num_threads": 1, "prefetch_batches": 1}
    if data_dir is not None:
        config["data_dir"] = data_dir
    images, labels = [], []
    batches = data_lib.get_dataset(
        config,
        batch_size=batch_size,
        split=split,
        evaluation=True,
        process_index=0,
        process_count=1,
    )
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        images.append(batch["x"][mask])
        labels.append(batch["label"][mask])
    return np.concatenate(images), np.concatenate(labels)


CLASSIFIERS: dict[str, ClassifierSpec] = {
    "digits": ClassifierSpec((8, 8, 1), 17, _load_digits),
    "mnist": ClassifierSpec((28, 28, 1), 256, functools.partial(_load_tfds, "mnist"), 4000),
}


def _shift(key: jax.Array, images: jax.Array) -> jax.Array:
    """Translate each image by a random offset in {-1, 0, 1}^2, filling with zeros."""
    offsets = jax.random.randint(key, (images.shape[0], 2), -1, 2)

    def shift_one(image, offset):
        padded = jnp.pad(image, ((1, 1), (1, 1), (0, 0)))
        start = (1 - offset[0], 1 - offset[1], 0)
        return jax.lax.dynamic_slice(padded, start, image.shape)

    return jax.vmap(shift_one)(images, offsets)


def train_classifier(
    spec: ClassifierSpec, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Train :class:`Classifier` on ``images`` in [0, 1]; returns its ``params``.

    Deterministic: the initial parameters, the minibatches (uniform, with replacement) and
    the shifts of step ``k`` follow from ``fold_in(key(spec.seed), k)``
    (``training.classifier.fit_classifier``).
    """
    model = Classifier()
    key_init, key_train = jax.random.split(jax.random.PRNGKey(spec.seed))
    params = model.init(key_init, jnp.zeros((1, *spec.image_shape)))["params"]
    optimizer = optax.adam(optax.cosine_decay_schedule(spec.learning_rate, spec.num_steps))

    def loss_fn(params, key, x, y):
        logits, _ = model.apply({"params": params}, _shift(key, x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    data = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    params, _ = classifier_training.fit_classifier(
        key_train,
        loss_fn,
        params,
        optimizer,
        data,
        num_steps=spec.num_steps,
        batch_size=spec.batch_size,
    )
    return params


@functools.partial(jax.jit, static_argnums=0)
def _apply(model: Classifier, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    return model.apply({"params": params}, images)


def classifier_features(model: Classifier, params: Any, images: jax.Array) -> jax.Array:
    """Penultimate activations ``(B, model.feature_dim)`` of ``images`` in [0, 1], ``(B, H, W, C)``."""
    return _apply(model, params, images)[1]


def classifier_logits_from_features(params: Any, features: np.ndarray) -> np.ndarray:
    """The classifier's logits from its penultimate ``features``: its last ``Dense`` layer."""
    last = params[sorted(name for name in params if name.startswith("Dense_"))[-1]]
    return np.asarray(features, np.float32) @ np.asarray(last["kernel"]) + np.asarray(last["bias"])


def accuracy(model: Classifier, params: Any, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` (in [0, 1]) that ``model`` with ``params`` labels right."""
    logits, _ = _apply(model, params, jnp.asarray(images, jnp.float32))
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))


def _read_cache(path: pathlib.Path, abstract_params: Any) -> Any | None:
    """The parameters cached at ``path``, or None when missing or not matching the model."""
    try:
        params = flax.serialization.from_bytes(abstract_params, path.read_bytes())
    except FileNotFoundError:
        return None
    except Exception as error:  # msgpack, structure or type errors all mean "retrain"
        logging.warning("Ignoring unreadable classifier cache %s (%s); retraining.", path, error)
        return None
    shapes_ok = jax.tree.map(lambda a, b: a.shape == b.shape, params, abstract_params)
    if not all(jax.tree.leaves(shapes_ok)):
        logging.warning("Ignoring classifier cache %s with wrong shapes; retraining.", path)
        return None
    return jax.tree.map(jnp.asarray, params)


def load_classifier(
    dataset: str, *, cache_directory: str | os.PathLike | None = None, **load_kwargs: Any
) -> tuple[Classifier, Any]:
    """``(model, params)`` of the feature classifier of ``dataset``, trained once and cached.

    Args:
      dataset: a key of :data:`CLASSIFIERS` (``digits``, ``mnist``).
      cache_directory: where the parameters are cached (default :func:`cache_dir`).
      load_kwargs: passed to the dataset loader (``data_dir=`` for ``mnist``).

    Raises:
      ValueError: an unknown dataset.
      data.DatasetNotPreparedError: ``mnist`` needs training and is not prepared locally.
    """
    if dataset not in CLASSIFIERS:
        raise ValueError(f"No feature classifier for {dataset!r}; valid: {sorted(CLASSIFIERS)}")
    spec, model = CLASSIFIERS[dataset], Classifier()
    directory = pathlib.Path(cache_directory) if cache_directory else cache_dir()
    path = directory / f"{dataset}_classifier_v{CLASSIFIER_VERSION}.msgpack"
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *spec.image_shape)))
    params = _read_cache(path, abstract["params"])
    if params is None:
        logging.info("Training the %s feature classifier (cached at %s).", dataset, path)
        params = train_classifier(spec, *spec.load_split("train", **load_kwargs))
        directory.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_bytes(flax.serialization.to_bytes(params))
        temporary.replace(path)  # atomic: a concurrent reader never sees half a file
    return model, params


__all__ = [
    "CACHE_ENV",
    "CLASSIFIERS",
    "Classifier",
    "ClassifierSpec",
    "accuracy",
    "cache_dir",
    "classifier_features",
    "load_classifier",
    "train_classifier",
]
