"""Score-based generative modelling through SDEs (Song et al., ICLR 2021) in JAX/Flax.

The public API (``docs/design.md`` states it in full): the SDEs and affine paths, the
score-matching losses, the samplers, the likelihood, and the network-to-score adapter.
The machinery lives in packages imported on demand (they pull in orbax and TensorBoard):
``diffusion_sde.training`` (state, step, checkpoints, the loop ``train_and_evaluate``) and
``diffusion_sde.evaluation`` (sample-quality metrics, feature networks, the evaluation of a
workdir).
"""

import importlib
from typing import TYPE_CHECKING

# Each public name and the module it lives in. They are imported on first use (PEP 562), so
# that ``import diffusion_sde.host_memory`` or ``python -m diffusion_sde.main`` does not
# first import JAX, Flax and every network: the entry point restarts itself with huge
# pages before any of that (``host_memory``), and a worker that needs one small module
# pays for that module alone.
_HOMES = {
    "bits_per_dim": "likelihood",
    "log_likelihood": "likelihood",
    "ddpm_loss": "losses",
    "dsm_loss": "losses",
    "smld_loss": "losses",
    "get_model": "models",
    "get_score_fn": "models",
    "edm_sample": "sampling",
    "get_sampler": "sampling",
    "ode_sample": "sampling",
    "pc_sample": "sampling",
    **dict.fromkeys(
        (
            "EDMSDE",
            "SDE",
            "VESDE",
            "VPSDE",
            "AffinePath",
            "CosineSDE",
            "RectifiedFlow",
            "ReverseSDE",
            "get_sde",
            "subVPSDE",
        ),
        "sde",
    ),
}

if TYPE_CHECKING:  # what static tools and editors read: the same names, eagerly
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


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'diffusion_sde' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"diffusion_sde.{home}"), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
