"""8x8 handwritten digits, the cosine schedule (Nichol & Dhariwal 2021) with v-prediction and
the v loss (Salimans & Ho 2022), sampled with EDM's Heun sampler (18 steps, 35
evaluations); the network, optimiser and steps of ``digits_vp``.

    python -m diffusion_sde.main --config=configs/digits_cosine_v.py --workdir=runs/digits_cosine_v
    python -m diffusion_sde.main --config=configs/digits_cosine_v.py --workdir=runs/digits_cosine_v --mode=eval

``--config=configs/digits_cosine_v.py:small`` is a one-minute smoke run. Expected: the
README's table of diffusion families on digits.
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    config.training.sde = "cosine"
    config.training.weighting = "v"  # ||v_hat - v||^2
    config.training.time_distribution = "uniform"
    config.model.parametrization = "v"
    config.sampling.eps = 1e-3
    default_digits.edm_sampler(config)
    return default_digits.with_family(config, variant)
