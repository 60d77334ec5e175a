"""NCSN++ cont. (VE): NCSN++ trained with the continuous VE SDE on CIFAR-10
(Song et al. 2021, section 4.4 and appendix H).

    python -m diffusion_sde.main --config=configs/cifar10_ncsnpp_continuous_ve.py \\
        --workdir=runs/cifar10_ncsnpp_continuous_ve

Expected after 1.3M iterations at batch 128 (paper, Table 3): FID 2.38, IS 9.83 with the
PC sampler (reverse-diffusion predictor, Langevin corrector, snr 0.16, 1000 steps).
The network has 62,758,787 parameters (the README's table of parameter counts; the Fourier frequencies are a
fixed buffer, not parameters).

Laptop variant: ``--config=configs/cifar10_ncsnpp_continuous_ve.py:small``.
"""

from __future__ import annotations

import ml_collections

from configs import default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = True

    sampling = config.sampling
    sampling.method = "pc"
    sampling.eps = 1e-5  # VE is sampled down to t = 1e-5, as in the reference
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = True
    model.ema_rate = 0.999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 4
    model.attn_resolutions = (16,)
    model.resamp_with_conv = True
    model.conditional = True
    model.fir = True
    model.fir_kernel = [1, 3, 3, 1]
    model.skip_rescale = True
    model.resblock_type = "biggan"
    model.progressive = "none"
    model.progressive_input = "residual"
    model.progressive_combine = "sum"
    model.attention_type = "ddpm"
    model.init_scale = 0.0
    model.embedding_type = "fourier"
    model.fourier_scale = 16
    model.conv_size = 3
    return default_cifar10.with_variant(config, variant)
