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
    "chain_level",
    "continuous_labels",
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


# Float32 round-off of t (N - 1) / T at a chain time t_k = k T / (N - 1) is below 1.2e-4
# for N <= 1000 (two roundings of relative size 6e-8); the samplers' grid points lie
# eps (N - 1 - k) / T >= 0 above their level.
_LEVEL_ROUNDOFF = 2.5e-4


def chain_level(sde: SDE, t: jax.Array) -> jax.Array:
    r"""The level :math:`k` of the SDE's discrete chain (DDPM for VP, SMLD for VE) at time ``t``:
    the largest :math:`k` with :math:`t_k = k T / (N - 1) \le t` (up to float round-off),
    clipped to :math:`[0, N - 1]`.

    On the samplers' grid ``linspace(T, eps, N)``, point :math:`i` is
    :math:`t_i = \epsilon + k (T - \epsilon)/(N - 1)` with :math:`k = N - 1 - i`, so
    :math:`(N - 1) t_i / T = k + \epsilon (N - 1 - k)/T`: its level is exactly :math:`k`, the
    level the predictors and correctors use, whenever :math:`\epsilon (N - 1) / T < 0.99975`
    (``sampling.eps`` 1e-3 for VP with N = 1000, 1e-5 for VE). The 2021 reference truncates
    :math:`(N - 1) t` as well for VP (and rounds for VE, which agrees at its eps = 1e-5).
    """
    level = jnp.floor(t * (sde.N - 1) / sde.T + _LEVEL_ROUNDOFF)
    return jnp.clip(level, 0, sde.N - 1).astype(jnp.int32)


def continuous_labels(config: ml_collections.ConfigDict, *, ode: bool) -> bool:
    """Whether the samplers and the likelihood feed the network continuous labels.

    A continuously trained model always takes them. A discretely trained VP (DDPM) model
    takes its discrete labels and chain stds in predictor--corrector sampling, and on the
    probability-flow ODE (``ode``: ``sampling.method='ode'`` and the likelihood) the
    continuous adapter (label :math:`999 t`, the marginal std) when
    ``sampling.ode_continuous_score`` (default True), as the 2021 reference does: the
    discrete adapter's label and std are piecewise constant in ``t``, which an ODE solver
    integrates badly. A discretely trained VE (SMLD) model keeps its discrete labels: its
    network looks sigma up by index and cannot read a continuous sigma.
    """
    if config.training.continuous:
        return True
    vp = config.training.sde.lower() == "vpsde"
    return ode and vp and bool(config.sampling.get("ode_continuous_score", True))


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

    .. math::  s_\theta(x, t) = -\epsilon_\theta(x, c(t)) / \sigma_t.

    - ``continuous`` (and always for sub-VP): time label :math:`c(t) = 999\,t` and
      :math:`\sigma_t` the std of ``sde.marginal_prob``, as the 2021 reference.
    - discrete (DDPM): at the chain level :math:`k` = :func:`chain_level` of ``t``, the label
      is :math:`c = k`, the integer step the network was trained on (``losses.ddpm_loss``),
      and :math:`\sigma = \sqrt{1 - \bar\alpha_k}` of the DDPM chain. On the samplers' grid
      this is the level the predictor uses, so ancestral sampling with this score is
      exactly Ho et al.'s Algorithm 2. (The 2021 reference takes the same std but feeds
      the fractional label :math:`(N-1) t = k + \epsilon (N - 1 - k)`, 0.999 at level 0.)
      Off the grid (ODE solvers, likelihood) the label and std are piecewise constant in
      ``t``; the evaluation code uses the continuous adapter there by default
      (``sampling.ode_continuous_score``), as the reference does.

    VE networks output the score itself (those with ``scale_by_sigma`` divide by
    :math:`\sigma` inside), fed :math:`c(t) = \sigma(t)` (``continuous``; the std of
    ``sde.marginal_prob``) or :math:`c(t) = N - 1 - k`, :math:`k` = :func:`chain_level` of
    ``t``: the index into the descending SMLD noise levels (label 0 is
    :math:`\sigma_{max}` at ``t = T``).

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
                level = chain_level(sde, t)
                labels = level.astype(t.dtype)
                std = sde.sqrt_one_minus_alphas_cumprod[level]
            return -network(x, labels) / batch_broadcast(std, x)

    elif isinstance(sde, VESDE):

        def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            if continuous:
                time_cond = sde.marginal_prob(jnp.zeros_like(x), t)[1]
            else:
                time_cond = (sde.N - 1 - chain_level(sde, t)).astype(t.dtype)
            return network(x, time_cond)

    else:
        raise ValueError(
            f"get_score_fn supports VPSDE, subVPSDE and VESDE, got {type(sde).__name__}"
        )
    return score_fn
