"""DDPM++ with the continuous VP SDE on MNIST (28x28, one channel, class labels kept).

The 2021 paper has no MNIST model; this is the CIFAR-10 DDPM++ recipe scaled to MNIST:
three resolutions (28, 14, 7) as 28 does not halve further, 64 channels, attention at
14x14, centred data, EMA 0.9999, Adam 2e-4 with 5000 warm-up steps.

Prepare the data once (``python -c "import tensorflow_datasets as tfds;
tfds.data_source('mnist', download=True)"`` on a machine with internet access), then

    python -m diffusion_sde.main --config=configs/mnist_ddpmpp_continuous_vp.py \\
        --workdir=runs/mnist_ddpmpp_continuous_vp

Expected: recognisable digits after about 20k iterations, and sample grids in
``runs/.../samples/``; with ``--mode=eval`` the bits/dim of the test split. Laptop
variant: ``--config=configs/mnist_ddpmpp_continuous_vp.py:small`` (16x16 images).
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
    training.n_iters = 200001

    sampling = config.sampling
    sampling.method = "pc"
    sampling.predictor = "euler_maruyama"
    sampling.corrector = "none"

    config.eval.enable_bpd = True
    config.eval.feature_extractor = "mnist"  # the project's MNIST classifier

    data = config.data
    data.dataset = "mnist"
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False  # digits are not mirror-symmetric
    data.centered = True

    model = config.model
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.normalization = "GroupNorm"
    model.nonlinearity = "swish"
    model.nf = 64
    model.ch_mult = (1, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (14,)
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
