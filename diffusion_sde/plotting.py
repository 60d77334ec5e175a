"""Pictures a person can look at: image grids and 2-D scatter plots, saved as PNG."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, *, padding: int | None = None, upscale: int = 1) -> np.ndarray:
    """Tile ``(B, H, W, C)`` images with values in [0, 1] into one ``uint8`` image.

    The grid is as square as possible; ``upscale`` enlarges each pixel (small images such
    as 8x8 digits are unreadable at their own size). ``padding`` white pixels separate the
    images (default: half an enlarged pixel, at least one, so that neighbours stay apart).
    """
    if padding is None:
        padding = max(1, upscale // 2)
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.ndim != 4:
        raise ValueError(f"image_grid expects (B, H, W, C) images, got shape {images.shape}")
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.ones(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        np.float32,
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    grid = (grid * 255.0 + 0.5).astype(np.uint8)
    return grid[..., 0] if channels == 1 else grid


def save_image_grid(images: np.ndarray, path: str | pathlib.Path, *, upscale: int = 1) -> None:
    """Save ``(B, H, W, C)`` images in [0, 1] as one PNG grid."""
    Image.fromarray(image_grid(images, upscale=upscale)).save(path)


def save_scatter(points: np.ndarray, path: str | pathlib.Path, *, title: str = "") -> None:
    """Save a scatter plot of ``(B, 2)`` points (2-D toy data) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = np.asarray(points)
    figure, axis = plt.subplots(figsize=(4, 4), dpi=100)
    axis.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    axis.set_aspect("equal")
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def save_samples(samples: np.ndarray, path_stem: str | pathlib.Path, *, title: str = "") -> None:
    """Save samples as ``<stem>.npz`` and a picture ``<stem>.png``: an image grid for
    ``(B, H, W, C)`` data in [0, 1], a scatter plot for ``(B, 2)`` data."""
    path_stem = pathlib.Path(path_stem)
    # The picture first, then the arrays (atomically): a resumed run takes a shard whose
    # .npz exists as done.
    if samples.ndim == 4:
        upscale = max(1, 64 // samples.shape[1])
        save_image_grid(samples, path_stem.with_suffix(".png"), upscale=upscale)
    elif samples.ndim == 2 and samples.shape[1] == 2:
        save_scatter(samples, path_stem.with_suffix(".png"), title=title)
    save_npz(path_stem.with_suffix(".npz"), samples=samples)


def save_npz(path: str | pathlib.Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` under a temporary name, then renamed into place: a killed
    run never leaves a half-written file that a resumed one would take as finished."""
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(temporary, **arrays)
    temporary.replace(path)
