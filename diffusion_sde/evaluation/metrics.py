r"""Sample-quality metrics: Fréchet distance (FID) and kernel distance (KID) of network features.

Both compare the features :math:`\phi(x) \in \mathbb R^d` of generated samples with those of
data, extracted by a :class:`FeatureExtractor`:

- FID (Heusel et al. 2017): the Fréchet (2-Wasserstein) distance between the Gaussians
  fitted to the two feature sets, :func:`frechet_distance` of :func:`feature_statistics`;
- KID (Binkowski et al. 2018): the unbiased squared MMD with the cubic polynomial kernel,
  averaged over random subsets, :func:`kernel_inception_distance`;
- IS (Salimans et al. 2016): :math:`\exp \mathbb E_x \mathrm{KL}(p(y|x) \| p(y))` of the
  same network's class logits, :func:`inception_score`.

The protocol behind published numbers (the 2021 reference, clean-fid, EDM): samples are
clipped to [0, 1] and quantised to 8-bit pixels (:func:`quantize`) before the network sees
them, as the training images were; :func:`sample_quality` does this.

Feature extractors (:data:`FEATURE_EXTRACTORS`, chosen by :func:`get_feature_extractor`):

- ``inception_v3``: pool3 of the FID Inception-v3 (2048-d; weights file supplied by the
  user, see :mod:`diffusion_sde.evaluation.inception`), for natural images of any size;
- ``digits``: the 128-d penultimate layer of a small CNN trained on the 8x8 digits
  (:mod:`diffusion_sde.evaluation.feature_nets`; trained once, in seconds, and cached), offline;
- ``mnist``: the same classifier trained on TFDS ``mnist`` when it is prepared locally.

FIDs and KIDs are comparable only between numbers computed with the same extractor (and,
for FID, similar sample sizes: the estimator is biased upwards for small ``N``).
``python -m diffusion_sde.evaluation.reference_stats`` writes the statistics of a training split.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde.evaluation import feature_nets, inception

# ----------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------


def feature_statistics(
    features: np.ndarray | jax.Array | Iterable[np.ndarray | jax.Array],
) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and unbiased covariance of features, in float64 (as pytorch-fid and TTUR).

    .. math::  \mu = \frac1N \sum_i \phi_i, \qquad
               \Sigma = \frac1{N - 1} \sum_i (\phi_i - \mu)(\phi_i - \mu)^\top.

    Args:
      features: an ``(N, D)`` array, or an iterable of ``(n_k, D)`` batches (merged with
        Chan et al.'s pairwise update, so a large set never has to fit in memory).

    Returns:
      ``(mu (D,), sigma (D, D))``.
    """
    if isinstance(features, np.ndarray | jax.Array):
        features = [features]
    count, mean, scatter = 0, None, None
    for batch in features:
        batch = np.asarray(batch, np.float64)
        if batch.ndim != 2:
            raise ValueError(f"Features must have shape (N, D), got {batch.shape}.")
        if len(batch) == 0:
            continue
        batch_mean = batch.mean(axis=0)
        centered = batch - batch_mean
        batch_scatter = centered.T @ centered
        if mean is None:
            count, mean, scatter = len(batch), batch_mean, batch_scatter
            continue
        # Chan, Golub & LeVeque (1979): merge (count, mean, scatter) with the batch's.
        total = count + len(batch)
        delta = batch_mean - mean
        mean = mean + delta * (len(batch) / total)
        scatter = scatter + batch_scatter + np.outer(delta, delta) * (count * len(batch) / total)
        count = total
    if count < 2:
        raise ValueError(f"Need at least 2 feature vectors for a covariance, got {count}.")
    return mean, scatter / (count - 1)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition (rounding negatives to 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    r"""Fréchet distance between :math:`\mathcal N(\mu_1, \Sigma_1)` and :math:`\mathcal N(\mu_2, \Sigma_2)`.

    .. math::  d^2 = \lVert \mu_1 - \mu_2 \rVert^2
               + \operatorname{Tr}\bigl(\Sigma_1 + \Sigma_2 - 2 (\Sigma_1 \Sigma_2)^{1/2}\bigr).

    Computed by the eigendecomposition route rather than ``scipy.linalg.sqrtm`` of the
    non-symmetric product: :math:`\Sigma_1 \Sigma_2` is similar to the symmetric PSD matrix
    :math:`M = \Sigma_1^{1/2} \Sigma_2 \Sigma_1^{1/2}` (:math:`\Sigma_1 \Sigma_2 =
    \Sigma_1^{1/2} M \Sigma_1^{-1/2}` when :math:`\Sigma_1` is invertible, and by continuity
    otherwise), so :math:`\operatorname{Tr}(\Sigma_1 \Sigma_2)^{1/2} = \sum_k \sqrt{\lambda_k(M)}`
    with :math:`\lambda_k(M) \ge 0`. Two symmetric eigendecompositions give a real result
    even for singular covariances (fewer samples than dimensions), with no imaginary part
    to discard and no ``eps`` offset; rounding makes eigenvalues that should be 0 slightly
    negative, and they are rounded to 0. For identical inputs the result is 0 up to rounding
    (it may be :math:`-10^{-12}`-small).

    Args:
      mu1, mu2: means ``(D,)``; sigma1, sigma2: covariances ``(D, D)`` (symmetric PSD).

    Returns:
      :math:`d^2` (what the literature calls FID), a Python float.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(sigma, np.float64)) for sigma in (sigma1, sigma2))
    dim = mu1.shape[0]
    if any(a.shape != (dim,) for a in (mu1, mu2)) or any(
        s.shape != (dim, dim) for s in (sigma1, sigma2)
    ):
        raise ValueError(
            f"Shapes disagree: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}; need (D,) and (D, D)."
        )
    for name, value in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} has non-finite entries.")
    sqrt_sigma1 = _psd_sqrt(sigma1)
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None)))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# ----------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """:math:`k(x, y) = (x \\cdot y / d + 1)^3` for all pairs of rows."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    m, n = len(x), len(y)
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    return float(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2.0 * k_xy.sum() / (m * n)
    )


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    r"""KID: the unbiased squared MMD with the cubic polynomial kernel, over random subsets.

    With :math:`k(x, y) = (x^\top y / d + 1)^3` (Binkowski et al. 2018) and subsets
    :math:`X` of size :math:`m`, :math:`Y` of size :math:`n`,

    .. math::  \widehat{\mathrm{MMD}}^2_u = \frac{1}{m(m-1)} \sum_{i \ne j} k(x_i, x_j)
               + \frac{1}{n(n-1)} \sum_{i \ne j} k(y_i, y_j)
               - \frac{2}{mn} \sum_{i, j} k(x_i, y_j),

    an unbiased estimate of :math:`\mathrm{MMD}^2` (so it can be negative, and is 0 in
    expectation for identical distributions). Each of ``num_subsets`` estimates draws
    ``min(subset_size, N1, N2)`` rows of each set without replacement, as the reference
    implementation does.

    Args:
      features1, features2: ``(N1, D)`` and ``(N2, D)``.
      num_subsets, subset_size: the subsets; seed: seeds their draws (NumPy ``default_rng``).

    Returns:
      ``(mean, std)`` of the subset estimates (std with ``ddof=0``, as the reference).
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"Need (N1, D) and (N2, D) features, got {x.shape} and {y.shape}.")
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs subsets of at least 2 rows; got sets of {len(x)}, {len(y)}.")
    rng = np.random.default_rng(seed)
    estimates = [
        _mmd2_unbiased(
            x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)]
        )
        for _ in range(num_subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


# ----------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------


def inception_score(logits: np.ndarray, num_splits: int = 1) -> tuple[float, float]:
    r"""Inception Score (Salimans et al. 2016) of class ``logits`` ``(N, K)``:

    .. math::  \mathrm{IS} = \exp\Big(\frac1N \sum_n \mathrm{KL}\big(p(y|x_n)\,\|\,\hat p(y)\big)\Big),
       \qquad \hat p(y) = \frac1N \sum_n p(y|x_n),

    with :math:`p(y|x) = \mathrm{softmax}(\text{logits})`, on each of ``num_splits`` equal
    consecutive parts of the samples. ``num_splits=1`` (all samples at once) is TF-GAN's
    ``classifier_score_from_logits``, used by the 2021 reference; Salimans et al. use 10.

    Returns:
      ``(mean, std)`` over the splits (std 0 for one split).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < num_splits or num_splits < 1:
        raise ValueError(
            f"inception_score needs logits (N, K) with N >= num_splits >= 1, got "
            f"{logits.shape} and num_splits={num_splits}."
        )
    scores = []
    for part in np.array_split(logits, num_splits):
        log_p = part - np.logaddexp.reduce(part, axis=1, keepdims=True)
        log_marginal = np.log(np.mean(np.exp(log_p), axis=0))
        kl = np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------------------
# Quantisation
# ----------------------------------------------------------------------------------------

ROUNDINGS = ("floor", "round")


def quantize(images: np.ndarray, num_levels: int = 256, rounding: str = "floor") -> np.ndarray:
    r"""Float images in [0, 1] to integer pixel levels :math:`0 \dots L - 1` (uint8 for
    :math:`L \le 256`), clipped first:

    - ``floor``: :math:`\lfloor (L-1)\,\mathrm{clip}(x, 0, 1) \rfloor`, the 2021 reference's
      ``np.clip(x * 255, 0, 255).astype(np.uint8)``;
    - ``round``: :math:`\lfloor (L-1)\,\mathrm{clip}(x, 0, 1) + \tfrac12 \rfloor`, EDM's
      ``(x * 127.5 + 128).clip(0, 255).to(torch.uint8)`` for :math:`x \in [-1, 1]`.

    Raises:
      ValueError: non-finite values (a diverged sampler: they have no pixel value), or an
        unknown ``rounding``.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"Unknown rounding {rounding!r}; valid: {list(ROUNDINGS)}")
    images = np.asarray(images, np.float64)
    bad = int(np.sum(~np.isfinite(images)))
    if bad:
        raise ValueError(
            f"{bad} sample values are NaN or infinite: the sampler diverged. Check the "
            "checkpoint (loss in metrics.jsonl) and the sampler settings (e.g. sampling.snr)."
        )
    scaled = np.clip(images, 0.0, 1.0) * (num_levels - 1)
    # 1e-9 keeps data that are exact levels (n / 255 * 255 = n - 4e-14 in floats) on them.
    levels = np.floor(scaled + (0.5 if rounding == "round" else 1e-9))
    return levels.astype(np.uint8 if num_levels <= 256 else np.uint16)


# ----------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """A network mapping images to feature vectors, called as ``extractor(images) -> (N, D)``.

    Attributes:
      name: the key in :data:`FEATURE_EXTRACTORS`; stored with reference statistics.
      features_fn: float32 ``(B, H, W, C)`` in [0, 1] -> ``(B, feature_dim)`` (jitted).
      feature_dim: ``D``.
      image_shape: the ``(H, W, C)`` it requires, or None when any size works.
      num_levels: integer images are pixel levels ``0 .. num_levels - 1`` (256 for uint8
        images; 17 for the digits, whose pixels are 0..16) and are divided by
        ``num_levels - 1``; float images are taken to be in [0, 1].
      batch_size: images per call of ``features_fn``; the last batch is padded to this
        size (so one compilation serves all) unless all images fit in one batch.
      logits_fn: ``(N, D)`` features -> ``(N, K)`` class logits of the same network (for
        :func:`inception_score`), or None when it has no classifier layer.
    """

    name: str
    features_fn: Callable[[jax.Array], jax.Array]
    feature_dim: int
    image_shape: tuple[int, int, int] | None = None
    num_levels: int = 256
    batch_size: int = 250
    logits_fn: Callable[[np.ndarray], np.ndarray] | None = None

    def __call__(self, images: np.ndarray | jax.Array) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or (self.image_shape and images.shape[1:] != self.image_shape):
            expected = self.image_shape or "(H, W, C)"
            raise ValueError(
                f"The {self.name!r} extractor needs images (N, *{expected}), got {images.shape}."
            )
        if np.issubdtype(images.dtype, np.integer):
            images = images.astype(np.float32) / (self.num_levels - 1)
        images = images.astype(np.float32, copy=False)
        batch_size = min(self.batch_size, len(images))
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            padded = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
            outputs.append(np.asarray(self.features_fn(jnp.asarray(padded)))[: len(batch)])
        if not outputs:
            return np.zeros((0, self.feature_dim), np.float32)
        return np.concatenate(outputs).astype(np.float32, copy=False)


def _classifier_extractor(
    dataset: str,
    *,
    cache_directory: str | os.PathLike | None = None,
    batch_size: int = 500,
    **load_kwargs: Any,
) -> FeatureExtractor:
    model, params = feature_nets.load_classifier(
        dataset, cache_directory=cache_directory, **load_kwargs
    )
    spec = feature_nets.CLASSIFIERS[dataset]
    return FeatureExtractor(
        name=dataset,
        features_fn=functools.partial(feature_nets.classifier_features, model, params),
        feature_dim=model.feature_dim,
        image_shape=spec.image_shape,
        num_levels=spec.num_levels,
        batch_size=batch_size,
        logits_fn=functools.partial(feature_nets.classifier_logits_from_features, params),
    )


def _inception_extractor(
    *, weights_path: str | os.PathLike | None = None, batch_size: int = 50
) -> FeatureExtractor:
    features_fn, logits_fn = inception.load_inception_classifier(weights_path)
    return FeatureExtractor(
        name="inception_v3",
        features_fn=features_fn,
        feature_dim=inception.FEATURE_DIM,
        batch_size=batch_size,
        logits_fn=logits_fn,
    )


FEATURE_EXTRACTORS: dict[str, Callable[..., FeatureExtractor]] = {
    "digits": functools.partial(_classifier_extractor, "digits"),
    "mnist": functools.partial(_classifier_extractor, "mnist"),
    "inception_v3": _inception_extractor,
}


def get_feature_extractor(name: str, **kwargs: Any) -> FeatureExtractor:
    """The feature extractor ``name`` (a key of :data:`FEATURE_EXTRACTORS`).

    Keyword arguments: ``digits`` and ``mnist`` take ``cache_directory`` (default
    ``$DIFFUSION_SDE_CACHE`` or ``~/.cache/diffusion_sde``) and ``batch_size``, ``mnist``
    also ``data_dir`` (its TFDS directory); ``inception_v3`` takes ``weights_path`` (the
    pytorch-fid ``.pth`` or an ``.npz``; default in the cache directory) and ``batch_size``.

    Raises:
      ValueError: an unknown name (the message lists the valid ones).
      FileNotFoundError: the Inception weights are missing (the message says where to get them).
      data.DatasetNotPreparedError: ``mnist`` must be trained and is not prepared locally.
    """
    if name not in FEATURE_EXTRACTORS:
        raise ValueError(f"Unknown feature extractor {name!r}; valid: {sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](**kwargs)


# ----------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------


def _reference(reference: Any) -> dict[str, Any]:
    """Reference statistics as a dict with ``mu``, ``sigma`` and optionally ``features``."""
    if isinstance(reference, str | os.PathLike):
        with np.load(reference, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    if isinstance(reference, Mapping):
        if "mu" not in reference or "sigma" not in reference:
            raise ValueError(f"Reference statistics need 'mu' and 'sigma'; got {list(reference)}.")
        return dict(reference)
    features = np.asarray(reference)
    mu, sigma = feature_statistics(features)
    return {"mu": mu, "sigma": sigma, "features": features, "num_examples": len(features)}


def sample_quality(
    samples: np.ndarray | jax.Array,
    reference: Any,
    extractor: FeatureExtractor,
    *,
    rounding: str | None = "floor",
    is_splits: int = 1,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """FID, KID and IS of ``samples`` against reference data, through ``extractor``.

    Args:
      samples: ``(N, H, W, C)`` in [0, 1] data space (apply the data inverse scaler first),
        or integer pixel levels ``0 .. extractor.num_levels - 1``.
      reference: the reference's features ``(M, D)``; or its statistics, a mapping with
        ``mu``, ``sigma`` and optionally ``features`` (for KID) and ``extractor`` (checked
        against ``extractor.name``); or the path of such an ``.npz`` (as written by
        ``python -m diffusion_sde.evaluation.reference_stats``).
      extractor: from :func:`get_feature_extractor`.
      rounding: float samples are clipped and quantised to ``extractor.num_levels`` pixel
        levels by :func:`quantize` with this rounding (``floor``, the 2021 reference's, or
        ``round``) before the features; ``None`` feeds them as they are (not the published
        protocol).
      is_splits: see :func:`inception_score`.
      kid_subsets, kid_subset_size, seed: see :func:`kernel_inception_distance`.

    Returns:
      A JSON-serialisable dict: ``fid``, ``kid_mean``, ``kid_std`` (None without reference
      features), ``inception_score`` and ``inception_score_std`` (None when the extractor
      has no logits), ``is_splits``, ``num_samples``, ``num_reference`` (None when
      unknown), ``extractor`` and ``rounding``.
    """
    reference = _reference(reference)
    if "extractor" in reference and str(reference["extractor"]) != extractor.name:
        raise ValueError(
            f"The reference statistics were computed with {str(reference['extractor'])!r} "
            f"features, not {extractor.name!r}."
        )
    samples = np.asarray(samples)
    if rounding is not None and not np.issubdtype(samples.dtype, np.integer):
        samples = quantize(samples, extractor.num_levels, rounding)
    features = extractor(samples)
    mu, sigma = feature_statistics(features)
    if np.shape(reference["mu"]) != mu.shape:
        raise ValueError(
            f"Reference features are {np.shape(reference['mu'])}-d, {extractor.name!r} gives "
            f"{mu.shape}."
        )
    fid = frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    kid_mean = kid_std = None
    if reference.get("features") is not None:
        kid_mean, kid_std = kernel_inception_distance(
            features,
            reference["features"],
            num_subsets=kid_subsets,
            subset_size=kid_subset_size,
            seed=seed,
        )
    is_mean = is_std = None
    if extractor.logits_fn is not None:
        is_mean, is_std = inception_score(extractor.logits_fn(features), is_splits)
    num_reference = reference.get("num_examples")
    return {
        "fid": fid,
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "is_splits": int(is_splits),
        "num_samples": len(features),
        "num_reference": None if num_reference is None else int(num_reference),
        "extractor": extractor.name,
        "rounding": rounding,
    }


__all__ = [
    "FEATURE_EXTRACTORS",
    "FeatureExtractor",
    "feature_statistics",
    "frechet_distance",
    "ROUNDINGS",
    "get_feature_extractor",
    "inception_score",
    "kernel_inception_distance",
    "quantize",
    "sample_quality",
]
