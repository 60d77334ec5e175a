"""Score-based generative modelling through SDEs (Song et al., ICLR 2021) in JAX/Flax.

The public API (``docs/design.md`` states it in full): the SDEs and affine paths, the
score-matching losses, the samplers, the likelihood, and the network-to-score adapter.
The machinery lives in packages imported on demand (they pull in orbax and TensorBoard):
``diffusion_sde.training`` (state, step, checkpoints, the loop ``train_and_evaluate``) and
``diffusion_sde.evaluation`` (sample-quality metrics, feature networks, the evaluation of a
workdir).
"""

import importlib
import importlib.util

# Each public name and the module it lives in. They are imported on first use (PEP 562), so
# that ``import diffusion_sde.host_memory`` or ``python -m diffusion_sde.main`` does not
# first import JAX, Flax and every network: the entry point restarts itself with huge
# pages before any of that (``host_memory``), and a worker that needs one small module
# pays for that module alone.
_PUBLIC = {
    "likelihood": "bits_per_dim log_likelihood",
    "losses": "ddpm_loss dsm_loss smld_loss",
    "models": "get_model get_score_fn",
    "sampling": "edm_sample get_sampler ode_sample pc_sample",
    "sde": "EDMSDE SDE VESDE VPSDE AffinePath CosineSDE RectifiedFlow ReverseSDE get_sde subVPSDE",
}
_HOMES = {name: module for module, names in _PUBLIC.items() for name in names.split()}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"diffusion_sde.{home}"), name)
    elif importlib.util.find_spec(f"diffusion_sde.{name}") is not None:
        value = importlib.import_module(f"diffusion_sde.{name}")  # ``diffusion_sde.sampling``
    else:
        raise AttributeError(f"module 'diffusion_sde' has no attribute {name!r}")
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = sorted(_HOMES)
