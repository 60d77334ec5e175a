"""NCSN++ cont. (deep, VE): NCSN++ with 8 residual blocks per resolution, trained with
the continuous VE SDE on CIFAR-10 for 950k iterations: the paper's best sample quality.

    python -m diffusion_sde.main --config=configs/cifar10_ncsnpp_deep_continuous_ve.py \\
        --workdir=runs/cifar10_ncsnpp_deep_continuous_ve

Expected (Song et al. 2021, Table 3 and abstract): FID 2.20, IS 9.89 with the PC
sampler (reverse-diffusion predictor, Langevin corrector, snr 0.16). 107,586,947
parameters.

Laptop variant: ``--config=configs/cifar10_ncsnpp_deep_continuous_ve.py:small``.
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_ncsnpp_continuous_ve, default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = cifar10_ncsnpp_continuous_ve.get_config()
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return default_cifar10.with_variant(config, variant)
