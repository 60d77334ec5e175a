"""NCSN++ with SMLD (discrete VE SDE) on CelebA at 64x64, the 2021 reference's CelebA
configuration (``configs/ncsnpp/celeba.py`` there): 140x140 centre crop resized to 64x64,
random flips, data in [0, 1], sigma_max 90, PC sampling with snr 0.17.

Prepare the data once (TFDS needs the manual download of CelebA described at
https://www.tensorflow.org/datasets/catalog/celeb_a), then

    python -m diffusion_sde.main --config=configs/celeba_ncsnpp_ve.py \\
        --workdir=runs/celeba_ncsnpp_ve

Expected: the paper reports samples only (Song et al. 2021, figure 11); training takes
1.3M iterations at batch 128 on TPU-class hardware. Laptop variant:
``--config=configs/celeba_ncsnpp_ve.py:small`` (16x16 images, a 32-channel U-Net).
"""

from __future__ import annotations

import ml_collections

from configs import default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = default_cifar10.get_default_configs()
    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.method = "pc"
    sampling.eps = 1e-5  # VE is sampled down to t = 1e-5, as in the reference
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.17

    config.eval.enable_sampling = True
    config.eval.begin_ckpt = 1

    data = config.data
    data.dataset = "celeb_a"
    data.image_size = 64
    data.random_flip = True

    model = config.model
    model.name = "ncsnpp"
    model.sigma_max = 90
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
    model.embedding_type = "positional"
    model.fourier_scale = 16
    model.conv_size = 3
    return default_cifar10.with_variant(config, variant)
