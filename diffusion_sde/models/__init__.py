r"""Score networks and the adapter that turns a network into a score function.

Every network is a Flax linen module built from the model config, called as
``model.apply(variables, x, time_cond, y=None, train=False, rngs={"dropout": key})``
(see ``INTERFACE.md``):

- ``ncsnpp``: NCSN++ / DDPM++ (Song et al. 2021, appendix H), :class:`NCSNpp`;
- ``ddpm``: the U-Net of Ho et al. (2020), :class:`DDPM`;
- ``ncsnv2``: the RefineNet of Song & Ermon (2020), :class:`NCSNv2`;
- ``mlp``: a small MLP for low-dimensional data, :class:`MLP`.

:func:`get_score_fn` maps a network output to :math:`s_\theta(x, t) \approx
\nabla_x \log p_t(x)` with the time labels and scalings of the 2021 reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_sde.models.ddpm import DDPM
from diffusion_sde.models.mlp import MLP
from diffusion_sde.models.ncsnpp import NCSNpp
from diffusion_sde.models.ncsnv2 import NCSNv2
from diffusion_sde.sde import SDE, VESDE, VPSDE, ScoreFn, batch_broadcast, subVPSDE

__all__ = [
    "DDPM",
    "MLP",
    "MODELS",
    "NCSNpp",
    "NCSNv2",
    "VP_CONTINUOUS_TIME_SCALE",
    "count_parameters",
    "get_model",
    "get_score_fn",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ncsnpp": NCSNpp,
    "ddpm": DDPM,
    "ncsnv2": NCSNv2,
    "mlp": MLP,
}

# VP networks see continuous time as t * 999, whatever N: the 2021 reference keeps the
# label range of DDPM's 1000 steps so that a DDPM-style embedding sees the same inputs.
VP_CONTINUOUS_TIME_SCALE = 999.0


def _check_ve_labels(config: Any, continuous: bool) -> None:
    """Fail loudly on a network that cannot read the VE labels it would be fed.

    Networks look sigma up from a discrete label (``ddpm``, ``ncsnv2``, and positional
    embeddings with ``scale_by_sigma``) or embed ``log time_cond`` (Fourier features):
    the first need discrete labels, the second continuous ones (sigma itself).
    """
    if config is None:
        return
    fourier = config.get("name") in ("ncsnpp", "mlp") and config.get("embedding_type") == "fourier"
    indexed_sigma = config.get("scale_by_sigma", False) and not fourier
    if continuous and indexed_sigma:
        raise ValueError(
            f"model {config.name!r} with scale_by_sigma looks sigma up from a discrete label: "
            "it needs training.continuous=False (or Fourier features for continuous VE)"
        )
    if not continuous and fourier:
        raise ValueError(
            f"model {config.name!r} with Fourier features embeds log sigma: it needs "
            "continuous VE labels (training.continuous=True)"
        )


def get_model(model_config: ml_collections.ConfigDict) -> nn.Module:
    """The network named by ``model_config.name``, built from ``model_config``."""
    if model_config.name not in MODELS:
        raise ValueError(f"Unknown model.name {model_config.name!r}; valid: {sorted(MODELS)}")
    return MODELS[model_config.name](config=model_config)


def count_parameters(params: Any) -> int:
    """Number of scalars in a parameter pytree (arrays or ``jax.ShapeDtypeStruct`` s,
    e.g. from ``jax.eval_shape(model.init, ...)``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def get_score_fn(
    sde: SDE,
    model: nn.Module,
    variables: Any,
    *,
    continuous: bool = True,
    train: bool = False,
    dropout_key: jax.Array | None = None,
    class_labels: jax.Array | None = None,
) -> ScoreFn:
    r"""Wrap a network as a score function ``score_fn(x, t)``, ``t`` of shape ``(B,)``.

    VP and sub-VP networks predict the noise :math:`\epsilon` of
    :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` (Ho et al. 2020), so

    .. math::  s_\theta(x, t) = -\epsilon_\theta(x, c(t)) / \sigma_t,

    with time label :math:`c(t) = 999\,t` and :math:`\sigma_t` the std of
    ``sde.marginal_prob`` (``continuous``, and always for sub-VP), or, discrete (DDPM),
    :math:`c(t) = (N-1)\,t`, the step index ``i``, and :math:`\sigma_t = \sqrt{1 - \bar\alpha_i}`
    from the DDPM chain at ``i = round((N-1) t)``, as the 2021 reference does (it
    truncates; rounding is the same on the grid and safe against float error). The
    chain's std and the marginal std agree within 0.5% for ``i >= 100`` but not at the
    first steps (1.41x at ``i = 1``); the chain's makes ancestral sampling exactly DDPM.

    VE networks output the score itself (those with ``scale_by_sigma`` divide by
    :math:`\sigma` inside), fed :math:`c(t) = \sigma(t)` (``continuous``; the std of
    ``sde.marginal_prob``) or :math:`c(t) = \mathrm{round}((T - t)(N-1))`, the index into
    the descending SMLD noise levels: label 0 is :math:`\sigma_{max}` at ``t = T``.

    Args:
      sde: a ``VPSDE``, ``subVPSDE`` or ``VESDE``.
      model: a network from :func:`get_model` (any linen module with its call signature).
      variables: ``{"params": ...}``.
      continuous: continuous-time labels (continuous training) or discrete ones.
      train: run the network in training mode (dropout on; needs ``dropout_key``).
      dropout_key: the ``dropout`` rng when ``train``.
      class_labels: ``(B,)`` int labels for a class-conditional network; ``None`` is the
        null label.

    Returns:
      ``score_fn(x, t)`` returning an array shaped like ``x``.
    """
    if isinstance(sde, VESDE):
        _check_ve_labels(getattr(model, "config", None), continuous)
    rngs = {} if dropout_key is None else {"dropout": dropout_key}

    def network(x: jax.Array, time_cond: jax.Array) -> jax.Array:
        return model.apply(variables, x, time_cond, y=class_labels, train=train, rngs=rngs)

    if isinstance(sde, (VPSDE, subVPSDE)):

        def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            if continuous or isinstance(sde, subVPSDE):
                labels = VP_CONTINUOUS_TIME_SCALE * t
                std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
            else:
                # DDPM's own chain: sqrt(1 - alpha_bar_i), so that ancestral sampling with
                # this score is exactly Ho et al.'s sampler.
                labels = (sde.N - 1) * t
                std = jnp.sqrt(1.0 - sde.alphas_cumprod[jnp.round(labels).astype(jnp.int32)])
            return -network(x, labels) / batch_broadcast(std, x)

    elif isinstance(sde, VESDE):

        def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            if continuous:
                time_cond = sde.marginal_prob(jnp.zeros_like(x), t)[1]
            else:
                time_cond = jnp.round((sde.T - t) * (sde.N - 1))
            return network(x, time_cond)

    else:
        raise ValueError(
            f"get_score_fn supports VPSDE, subVPSDE and VESDE, got {type(sde).__name__}"
        )
    return score_fn
