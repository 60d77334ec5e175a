"""Score-based generative modelling through SDEs (Song et al., ICLR 2021) in JAX/Flax."""

from diffusion_sde.losses import ddpm_loss, dsm_loss, smld_loss
from diffusion_sde.sde import SDE, VESDE, VPSDE, ReverseSDE, get_sde, subVPSDE

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "ReverseSDE",
    "ddpm_loss",
    "dsm_loss",
    "get_sde",
    "smld_loss",
    "subVPSDE",
]
