"""DDPM (Ho et al. 2020) on CIFAR-10: the DDPM U-Net trained with the discrete DDPM
objective (the VP SDE seen on its 1000-step grid) and sampled by ancestral sampling.

    python -m diffusion_sde.main --config=configs/cifar10_ddpm_vp.py \\
        --workdir=runs/cifar10_ddpm_vp

Published (Ho et al. 2020, Table 1, who trained 800k steps): FID 3.17 and IS 9.46 (of
50,000 samples, IS over 10 splits: ``--config.eval.is_splits=10``), sampling by ancestral
sampling over the 1000 steps, and a variational bound of at most 3.75 bits/dim. This code
does not compute DDPM's variational bound: ``--mode=eval`` gives the probability-flow
ODE's bits/dim of the same network (the continuous adapter, as the 2021 reference), a
different quantity. The network has 35,746,307 parameters (Ho et al.: 35.7M).

Laptop variant: ``--config=configs/cifar10_ddpm_vp.py:small`` (nf 32, two levels).
"""

from __future__ import annotations

import ml_collections

from configs import default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "ancestral_sampling"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    return default_cifar10.with_variant(config, variant)
