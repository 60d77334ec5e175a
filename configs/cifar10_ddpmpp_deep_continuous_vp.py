"""DDPM++ cont. (deep, VP): DDPM++ with 8 residual blocks per resolution, trained with
the continuous VP SDE on CIFAR-10 for 950k iterations (Song et al. 2021, Table 3).

    python -m diffusion_sde.main --config=configs/cifar10_ddpmpp_deep_continuous_vp.py \\
        --workdir=runs/cifar10_ddpmpp_deep_continuous_vp

Expected (paper, Table 3): FID 2.41, IS 9.68 (Euler-Maruyama predictor, no corrector);
with the probability-flow ODE (Table 2) 3.13 bits/dim. 106,632,579 parameters.

Laptop variant: ``--config=configs/cifar10_ddpmpp_deep_continuous_vp.py:small`` (the same
small network as the other DDPM++ variants).
"""

from __future__ import annotations

import ml_collections

from configs import cifar10_ddpmpp_continuous_vp, default_cifar10


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    config = cifar10_ddpmpp_continuous_vp.get_config()
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8
    return default_cifar10.with_variant(config, variant)
