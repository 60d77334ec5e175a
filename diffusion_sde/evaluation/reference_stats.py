"""Reference statistics of a dataset split for FID and KID.

    python -m diffusion_sde.evaluation.reference_stats --config=configs/digits_vp.py --out=runs/digits_train.npz
    python -m diffusion_sde.evaluation.reference_stats --config=configs/cifar10_ddpmpp_continuous_vp.py \\
        --extractor=inception_v3 --inception_weights=PATH/pt_inception-2015-12-05-6726825d.pth \\
        --out=runs/cifar10_train_inception.npz

reads the split (``--split``, default ``train``) of the config's ``data.dataset`` through
:func:`data.get_dataset` (one ordered pass, no flip, no dequantization), maps it back to
[0, 1], and writes an ``.npz`` with

- ``mu`` (D,), ``sigma`` (D, D): float64 mean and unbiased covariance of all its features;
- ``features`` (K, D) float32: a uniformly random subset of ``K = min(N, --max_features)``
  feature vectors (reservoir sampling, ``--seed``), for KID;
- ``num_examples``, ``extractor``, ``dataset``, ``split``.

The extractor defaults to ``digits`` for the digits (offline: its classifier trains in
seconds on first use), ``mnist`` for MNIST, and ``inception_v3`` otherwise (which needs
pytorch-fid's weights file, see :mod:`diffusion_sde.evaluation.inception`).
:func:`metrics.sample_quality` takes the file's path as its reference. Runs on one
process (every example is read by this host).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from diffusion_sde import data as data_lib
from diffusion_sde.evaluation import metrics

# data.dataset -> its default feature extractor (inception_v3 for any other dataset).
DEFAULT_EXTRACTORS = {"digits": "digits", "mnist": "mnist"}


def default_extractor(dataset: str) -> str:
    """The feature extractor used for ``dataset`` unless one is named."""
    return DEFAULT_EXTRACTORS.get(dataset, "inception_v3")


def compute_reference_statistics(
    data_config: Mapping[str, Any],
    extractor: metrics.FeatureExtractor,
    *,
    split: str = "train",
    max_features: int = 10_000,
    batch_size: int = 500,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``mu``, ``sigma`` of the features of a whole split, and a random subset of the features.

    Args:
      data_config: the config's ``data`` group.
      extractor: from :func:`metrics.get_feature_extractor`.
      split: the split to read; max_features: size of the kept subset (for KID);
      batch_size: examples read per step; seed: the subset's random draws.

    Returns:
      The arrays described in the module docstring.
    """
    rng = np.random.default_rng(seed)
    reservoir = np.zeros((max_features, extractor.feature_dim), np.float32)
    count = 0
    inverse_scaler = data_lib.get_data_inverse_scaler(data_config)
    batches = data_lib.get_dataset(
        data_config,
        batch_size=batch_size,
        split=split,
        evaluation=True,
        uniform_dequantization=False,
        process_index=0,
        process_count=1,
    )

    def feature_batches() -> Iterator[np.ndarray]:
        nonlocal count
        for batch in batches:
            images = inverse_scaler(batch["x"][np.asarray(batch["mask"], bool)])
            features = extractor(np.clip(images, 0.0, 1.0))
            # Reservoir sampling (Algorithm R): example i replaces slot j ~ U{0..i} if j < K.
            index = count + np.arange(len(features))
            slots = np.where(index < max_features, index, rng.integers(0, index + 1))
            for position in np.flatnonzero(slots < max_features):
                reservoir[slots[position]] = features[position]
            count += len(features)
            yield features

    mu, sigma = metrics.feature_statistics(feature_batches())
    return {
        "mu": mu,
        "sigma": sigma,
        "features": reservoir[: min(count, max_features)],
        "num_examples": np.int64(count),
        "extractor": np.str_(extractor.name),
        "dataset": np.str_(data_config["dataset"]),
        "split": np.str_(split),
    }


def save_statistics(statistics: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``statistics`` to the ``.npz`` at ``path`` (atomically)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    np.savez(temporary, **statistics)
    temporary.replace(path)


def main(argv: list[str]) -> None:
    from absl import flags, logging

    del argv
    flags_ = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    config = flags_.config
    name = flags_.extractor or default_extractor(config.data.dataset)
    kwargs: dict[str, Any] = {}
    if name == "inception_v3":
        kwargs["weights_path"] = flags_.inception_weights
    elif name == "mnist":
        kwargs["data_dir"] = config.data.get("data_dir")
    extractor = metrics.get_feature_extractor(name, **kwargs)
    statistics = compute_reference_statistics(
        config.data,
        extractor,
        split=flags_.split,
        max_features=flags_.max_features,
        batch_size=flags_.batch_size,
        seed=flags_.seed,
    )
    save_statistics(statistics, flags_.out)
    print(
        f"{flags_.out}: {name} features of {int(statistics['num_examples'])} examples of "
        f"{config.data.dataset}/{flags_.split} (mu, sigma; {len(statistics['features'])} kept "
        "for KID)"
    )


def _define_flags() -> None:
    # Defined only when run as a program: diffusion_sde.main defines --config too, and both
    # modules may be imported into one process (tests, notebooks).
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Configuration (data.dataset).")
    flags.DEFINE_string("out", None, "Path of the .npz to write.")
    flags.DEFINE_enum(
        "extractor",
        None,
        sorted(metrics.FEATURE_EXTRACTORS),
        "Feature extractor (default: digits, mnist, or inception_v3 by dataset).",
    )
    flags.DEFINE_string(
        "inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or an .npz."
    )
    flags.DEFINE_string("split", "train", "Dataset split.")
    flags.DEFINE_integer("max_features", 10_000, "Feature vectors kept for KID.")
    flags.DEFINE_integer("batch_size", 500, "Examples per step.")
    flags.DEFINE_integer("seed", 0, "Seed of the kept subset.")
    flags.mark_flags_as_required(["config", "out"])


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
