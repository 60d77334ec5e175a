"""Score-based generative modelling through SDEs (Song et al., ICLR 2021) in JAX/Flax.

The public API (``docs/design.md`` states it in full): the SDEs and affine paths, the
score-matching losses, the samplers, the likelihood, and the network-to-score adapter.
The machinery lives in packages imported on demand (they pull in orbax and TensorBoard):
``diffusion_sde.training`` (state, step, checkpoints, the loop ``train_and_evaluate``) and
``diffusion_sde.evaluation`` (sample-quality metrics, feature networks, the evaluation of a
workdir).
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
