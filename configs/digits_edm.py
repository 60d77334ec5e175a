"""8x8 handwritten digits, EDM (Karras et al. 2022): the sigma path (alpha = 1, sigma = t on
[0.002, 80]), the preconditioned network F (c_skip, c_out, c_in, c_noise), EDM's loss weight
and log-normal noise levels, and EDM's Heun sampler (18 steps, 35 evaluations); the
network, optimiser and steps of ``digits_vp``.

    python -m diffusion_sde.main --config=configs/digits_edm.py --workdir=runs/digits_edm
    python -m diffusion_sde.main --config=configs/digits_edm.py --workdir=runs/digits_edm --mode=eval

``--config=configs/digits_edm.py:small`` is a one-minute smoke run. Expected: the README's
table of diffusion families on digits (bits/dim, digits FID, sampler and NFE).
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    training, model = config.training, config.model
    training.sde = "edm"
    training.weighting = "edm"  # (sigma^2 + sigma_d^2) / (sigma sigma_d)^2 on ||D - x0||^2
    training.time_distribution = "log_normal"  # ln sigma ~ N(P_mean, P_std^2)
    training.log_normal_mean = -1.2
    training.log_normal_std = 1.2
    model.parametrization = "edm"
    model.sigma_data = 0.5
    model.sigma_min = 0.002
    model.sigma_max = 80.0
    config.sampling.eps = 0.002  # the last noise level, sigma_min
    default_digits.edm_sampler(config)
    return default_digits.with_family(config, variant)
