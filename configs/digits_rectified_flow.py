"""8x8 handwritten digits, rectified flow / conditional OT flow matching (Liu et al. 2023;
Lipman et al. 2023): alpha = 1 - t, sigma = t, the network predicts the velocity z - x0,
trained with the flow-matching loss at uniform t, sampled with EDM's Heun sampler (18
steps, 35 evaluations); the network, optimiser and steps of ``digits_vp``.

    python -m diffusion_sde.main --config=configs/digits_rectified_flow.py --workdir=runs/digits_rf
    python -m diffusion_sde.main --config=configs/digits_rectified_flow.py --workdir=runs/digits_rf --mode=eval

``--config=configs/digits_rectified_flow.py:small`` is a one-minute smoke run;
``--config.training.time_distribution=logit_normal`` is SD3's variant. Expected: the
README's table of diffusion families on digits.
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    config.training.sde = "rectified_flow"
    config.training.weighting = "velocity"  # ||u_hat - (z - x0)||^2
    config.training.time_distribution = "uniform"
    config.training.logit_normal_mean = 0.0
    config.training.logit_normal_std = 1.0
    config.model.parametrization = "velocity"
    config.sampling.eps = 1e-3
    default_digits.edm_sampler(config)
    return default_digits.with_family(config, variant)
