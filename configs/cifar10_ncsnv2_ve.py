"""NCSNv2 (Song & Ermon 2020) on CIFAR-10: SMLD, i.e. the VE SDE on a grid of 232
geometric noise levels from 50 down to 0.01, trained with the discrete NCSN objective
and sampled by annealed Langevin dynamics (5 steps per noise level).

    python -m diffusion_sde.main --config=configs/cifar10_ncsnv2_ve.py \\
        --workdir=runs/cifar10_ncsnv2_ve

Published: FID 10.87, IS 8.40 (Song & Ermon 2020, Table 1; their run: 300k iterations at
batch 128, EMA 0.999), with a final denoising step ``x + sigma_L^2 s(x, sigma_L)``
after the last Langevin move. This sampler has no such step: corrector-only sampling
returns the mean of the last Langevin move (``sampling.noise_removal``), which removes
only that move's noise, so expect a higher FID than published.

Laptop variant: ``--config=configs/cifar10_ncsnv2_ve.py:small`` (``nf=16``).
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
    sampling.predictor = "none"
    sampling.corrector = "ald"
    sampling.n_steps_each = 5
    sampling.snr = 0.176

    model = config.model
    model.name = "ncsnv2"
    model.scale_by_sigma = True
    model.num_scales = 232
    model.ema_rate = 0.999
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.nf = 128
    model.interpolation = "bilinear"

    optim = config.optim
    optim.weight_decay = 0
    optim.optimizer = "Adam"
    optim.lr = 1e-4
    optim.beta1 = 0.9
    optim.amsgrad = False
    optim.eps = 1e-8
    optim.warmup = 0
    optim.grad_clip = -1.0
    return default_cifar10.with_variant(config, variant)
