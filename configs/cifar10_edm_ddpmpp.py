"""EDM's CIFAR-10 recipe (Karras et al. 2022, config F, unconditional, "DDPM++" column):
the sigma path (alpha = 1, sigma = t on [0.002, 80]), EDM's preconditioning of a DDPM++
network with ch_mult (2, 2, 2), EDM's loss (weight (sigma^2 + sigma_d^2)/(sigma sigma_d)^2,
ln sigma ~ N(-1.2, 1.2^2)) and EDM's deterministic Heun sampler (18 steps, 35 evaluations).

    python -m diffusion_sde.main --config=configs/cifar10_edm_ddpmpp.py \\
        --workdir=runs/cifar10_edm_ddpmpp

Expected (paper, Table 2): FID 1.97 after 200 Mimg (390,625 steps at batch 512), 35 NFE.
Not reproduced here. Differences from EDM's training that this code does not have:
the non-leaking augmentation pipeline (p = 0.12 on CIFAR-10), the EMA half-life ramp-up
(a fixed EMA rate of half-life 0.5 Mimg is used) and EDM's weight initialisation; the
network is this code's DDPM++ (NCSN++ module) with EDM's channels, blocks, attention and
dropout, which computes EDM's DDPM++ SongUNet exactly: EDM's published
edm-cifar10-32x32-uncond-vp loads into this config (``checkpoints``, format ``edm``; README
"Published checkpoints").

Laptop variant: ``--config=configs/cifar10_edm_ddpmpp.py:small`` (16x16, a small U-Net,
batch 16; see ``default_cifar10.with_variant``).
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_ddpmpp_continuous_vp, default_cifar10, default_digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = cifar10_ddpmpp_continuous_vp.get_config()
    training, model, optim = config.training, config.model, config.optim
    training.sde = "edm"
    training.weighting = "edm"
    training.time_distribution = "log_normal"
    training.log_normal_mean = -1.2  # P_mean
    training.log_normal_std = 1.2  # P_std
    training.batch_size = 512
    training.n_iters = 390_625  # 200 Mimg
    training.reduce_mean = False  # EDM sums the loss over pixels
    model.parametrization = "edm"
    model.sigma_data = 0.5
    model.sigma_min = 0.002
    model.sigma_max = 80  # an int field in the 2021 defaults
    model.ch_mult = (2, 2, 2)
    model.nf = 128
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.dropout = 0.13
    model.ema_rate = 0.5 ** (1.0 / (0.5e6 / 512))  # half-life 0.5 Mimg: 0.99929
    optim.lr = 1e-3
    optim.warmup = 19_531  # 10 Mimg of learning-rate ramp-up
    optim.grad_clip = -1.0  # EDM does not clip gradients
    config.sampling.eps = 0.002  # sigma_min
    default_digits.edm_sampler(config, num_steps=18)
    return default_cifar10.with_variant(config, variant)
