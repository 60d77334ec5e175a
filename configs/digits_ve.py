"""8x8 handwritten digits (scikit-learn), vesde, continuous DSM, a small DDPM++ U-Net.

    python -m diffusion_sde.main --config=configs/digits_ve.py --workdir=runs/digits_ve
    python -m diffusion_sde.main --config=configs/digits_ve.py --workdir=runs/digits_ve --mode=eval

Expected on a 2-core laptop CPU: see the README's table for the measured wall time, loss
and test bits/dim; `runs/digits_ve/samples/step_*.png` shows 100 samples in which a
person recognises digits.
"""

from __future__ import annotations

import ml_collections

from configs import default_digits


def get_config() -> ml_collections.ConfigDict:
    config = default_digits.get_default_configs()
    config.training.sde = "vesde"
    config.sampling.eps = 1e-5  # VE is sampled down to t = 1e-5, as in the reference
    # VE: [0, 1] data as in the paper's VE runs, Fourier features of sigma, output / sigma.
    config.data.centered = False
    config.model.embedding_type = "fourier"
    config.model.scale_by_sigma = True
    config.model.sigma_max = 6.0  # max distance between two digits in [0, 1]^64 is about 5
    return config
