"""8x8 handwritten digits (scikit-learn), vpsde, continuous DSM, a small DDPM++ U-Net.

    python -m diffusion_sde.main --config=configs/digits_vp.py --workdir=runs/digits_vp
    python -m diffusion_sde.main --config=configs/digits_vp.py --workdir=runs/digits_vp --mode=eval

Expected on a 2-core laptop CPU: see the README's table for the measured wall time, loss
and test bits/dim; `runs/digits_vp/samples/step_*.png` shows 100 samples in which a
person recognises digits.
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config() -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    config.training.sde = "vpsde"
    return config
