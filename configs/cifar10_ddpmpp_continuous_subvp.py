"""DDPM++ cont. (sub-VP): DDPM++ trained with the continuous sub-VP SDE on CIFAR-10
(Song et al. 2021, eq. 12): the VP config with ``training.sde = 'subvpsde'``.

    python -m diffusion_sde.main --config=configs/cifar10_ddpmpp_continuous_subvp.py \\
        --workdir=runs/cifar10_ddpmpp_continuous_subvp

Expected after 1.3M iterations at batch 128 (paper, Table 3): FID 2.61, IS 9.56
(Euler-Maruyama predictor, no corrector); with the probability-flow ODE (Table 2)
3.02 bits/dim. 61,804,419 parameters, as the VP model.

Laptop variant: ``--config=configs/cifar10_ddpmpp_continuous_subvp.py:small``.
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_ddpmpp_continuous_vp, default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = cifar10_ddpmpp_continuous_vp.get_config()
    config.training.sde = "subvpsde"
    return default_cifar10.with_variant(config, variant)
