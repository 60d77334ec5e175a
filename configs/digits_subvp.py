"""8x8 handwritten digits (scikit-learn), subvpsde, continuous DSM, a small DDPM++ U-Net.

    python -m diffusion_sde.main --config=configs/digits_subvp.py --workdir=runs/digits_subvp
    python -m diffusion_sde.main --config=configs/digits_subvp.py --workdir=runs/digits_subvp --mode=eval

Expected on a 2-core laptop CPU: see the README's table for the measured wall time, loss
and test bits/dim; `runs/digits_subvp/samples/step_*.png` shows 100 samples in which a
person recognises digits.
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config() -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    config.training.sde = "subvpsde"
    return config
