"""2-D toy data, vpsde, continuous denoising score matching with an MLP.

    python -m diffusion_sde.main --config=configs/toy_2d_vp.py --workdir=runs/toy_2d_vp
    python -m diffusion_sde.main --config=configs/toy_2d_vp.py:swiss_roll --workdir=runs/swiss_vp

Expected: about a minute on a laptop CPU for 10,000 steps; `runs/.../samples/` holds a
scatter plot of 4,000 samples in which the distribution's shape (checkerboard squares,
spiral arms, moons) is plain, and `metrics.jsonl` a loss that falls then flattens.
"""

from __future__ import annotations

import ml_collections

from configs import default_toy


def get_config(dataset: str | None = None) -> ml_collections.ConfigDict:
    config = default_toy.get_default_configs(dataset)
    config.training.sde = "vpsde"
    return config
