"""DDPM++ cont. (VP): DDPM++ trained with the continuous VP SDE on CIFAR-10
(Song et al. 2021, section 4.4 and appendix H).

    python -m diffusion_sde.main --config=configs/cifar10_ddpmpp_continuous_vp.py \\
        --workdir=runs/cifar10_ddpmpp_continuous_vp

Expected after 1.3M iterations at batch 128 (paper, Table 3): FID 2.55, IS 9.58 with the
Euler-Maruyama predictor and no corrector (1000 steps); with the probability-flow ODE
(Table 2, last checkpoint) 3.16 bits/dim on uniformly dequantized test data. The network
has 61,804,419 parameters (the README's table of parameter counts).

Laptop variant: ``--config=configs/cifar10_ddpmpp_continuous_vp.py:small`` (see
``default_cifar10.with_variant``): a 32-channel, two-level DDPM++ at batch 16 that trains
at a few steps per second on a CPU; its samples are only smoke tests.
"""

from __future__ import annotations

import ml_collections

from configs import default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"

    config.data.centered = True

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = False
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "none"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    return default_cifar10.with_variant(config, variant)
