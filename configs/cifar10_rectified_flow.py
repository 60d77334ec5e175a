"""Rectified flow (Liu et al. 2023; conditional OT flow matching, Lipman et al. 2023) on
CIFAR-10: alpha = 1 - t, sigma = t, a DDPM++ network (as ``cifar10_ddpmpp_continuous_vp``)
predicting the velocity z - x0, the flow-matching loss at uniform t, and the adaptive
RK45 (Dopri5) ODE solver, as Liu et al. sample their 1-rectified flow.

    python -m diffusion_sde.main --config=configs/cifar10_rectified_flow.py \\
        --workdir=runs/cifar10_rectified_flow

Expected (Liu et al. 2023, Table 1, 1-rectified flow with their DDPM++): FID 2.58 with
127 NFE of RK45. Not reproduced here. ``--config.training.time_distribution=logit_normal``
is SD3's time distribution.

Laptop variant: ``--config=configs/cifar10_rectified_flow.py:small``.
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_ddpmpp_continuous_vp, default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = cifar10_ddpmpp_continuous_vp.get_config()
    training = config.training
    training.sde = "rectified_flow"
    training.weighting = "velocity"
    training.time_distribution = "uniform"
    training.logit_normal_mean = 0.0
    training.logit_normal_std = 1.0
    config.model.parametrization = "velocity"
    sampling = config.sampling
    sampling.method = "ode"
    sampling.ode_method = "adaptive"
    sampling.rtol = 1e-5
    sampling.atol = 1e-5
    sampling.noise_removal = False
    return default_cifar10.with_variant(config, variant)
