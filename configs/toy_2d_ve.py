"""2-D toy data, vesde, continuous denoising score matching with an MLP.

    python -m diffusion_sde.main --config=configs/toy_2d_ve.py --workdir=runs/toy_2d_ve
    python -m diffusion_sde.main --config=configs/toy_2d_ve.py:swiss_roll --workdir=runs/swiss_ve

Expected: about a minute on a laptop CPU for 10,000 steps; `runs/.../samples/` holds a
scatter plot of 4,000 samples in which the distribution's shape (checkerboard squares,
spiral arms, moons) is plain, and `metrics.jsonl` a loss that falls then flattens.
"""

from __future__ import annotations

import ml_collections

from configs import default_toy


def get_config(dataset: str | None = None) -> ml_collections.ConfigDict:
    config = default_toy.get_default_configs(dataset)
    config.training.sde = "vesde"
    config.sampling.eps = 1e-5  # VE is sampled down to t = 1e-5, as in the reference
    # VE: the network sees sigma(t) through Fourier features and outputs score * sigma.
    config.model.embedding_type = "fourier"
    config.model.scale_by_sigma = True
    return config
