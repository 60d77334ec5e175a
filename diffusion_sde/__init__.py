"""Score-based generative modelling through SDEs (Song et al., ICLR 2021) in JAX/Flax.

The public API of ``DESIGN.md`` (extended in the README): the SDEs and affine paths, the score-matching losses, the samplers, the
likelihood, and the network-to-score adapter. Training and evaluation of a workdir live in
``diffusion_sde.train`` and ``diffusion_sde.evaluate`` (imported on demand: they pull in
orbax and TensorBoard).
"""

from diffusion_sde.likelihood import bits_per_dim, log_likelihood
from diffusion_sde.losses import ddpm_loss, dsm_loss, smld_loss
from diffusion_sde.models import get_model, get_score_fn
from diffusion_sde.sampling import edm_sample, get_sampler, ode_sample, pc_sample
from diffusion_sde.sde import (
    EDMSDE,
    SDE,
    VESDE,
    VPSDE,
    AffinePath,
    CosineSDE,
    RectifiedFlow,
    ReverseSDE,
    get_sde,
    subVPSDE,
)

__all__ = [
    "EDMSDE",
    "SDE",
    "VESDE",
    "VPSDE",
    "AffinePath",
    "CosineSDE",
    "RectifiedFlow",
    "ReverseSDE",
    "bits_per_dim",
    "ddpm_loss",
    "dsm_loss",
    "edm_sample",
    "get_model",
    "get_sampler",
    "get_score_fn",
    "get_sde",
    "log_likelihood",
    "ode_sample",
    "pc_sample",
    "smld_loss",
    "subVPSDE",
]
