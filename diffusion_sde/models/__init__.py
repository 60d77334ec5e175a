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

from diffusion_sde import parametrization as param
from diffusion_sde.models.classifier import NoiseConditionalClassifier, classifier_log_prob_fn
from diffusion_sde.models.common import VP_CONTINUOUS_TIME_SCALE
from diffusion_sde.models.ddpm import DDPM
from diffusion_sde.models.mlp import MLP
from diffusion_sde.models.ncsnpp import NCSNpp
from diffusion_sde.models.ncsnv2 import NCSNv2
from diffusion_sde.sde import (
    EDMSDE,
    SDE,
    VESDE,
    VPSDE,
    CosineSDE,
    RectifiedFlow,
    ScoreFn,
    batch_broadcast,
    subVPSDE,
)

__all__ = [
    "DDPM",
    "MLP",
    "MODELS",
    "NCSNpp",
    "NCSNv2",
    "NoiseConditionalClassifier",
    "VP_CONTINUOUS_TIME_SCALE",
    "chain_level",
    "classifier_log_prob_fn",
    "continuous_labels",
    "count_parameters",
    "default_parametrization",
    "get_model",
    "get_score_fn",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "ncsnpp": NCSNpp,
    "ddpm": DDPM,
    "ncsnv2": NCSNv2,
    "mlp": MLP,
}


# What a network predicts on each path unless model.parametrization says otherwise: the
# 2021 reference's noise prediction (VP, sub-VP) and score (VE), EDM's preconditioned F on
# EDM's path, the flow-matching velocity on rectified flow, and noise on the cosine path
# (Nichol & Dhariwal's).
DEFAULT_PARAMETRIZATION: dict[type[SDE], str] = {
    VPSDE: "eps",
    subVPSDE: "eps",
    CosineSDE: "eps",
    VESDE: "score",
    EDMSDE: "edm",
    RectifiedFlow: "velocity",
}

# Paths whose continuous network label is the noise level sigma_t (as VE's); the others
# take 999 t.
_SIGMA_LABELLED = (VESDE, EDMSDE)


def default_parametrization(sde: SDE) -> str:
    """The network target of :data:`DEFAULT_PARAMETRIZATION` for ``sde``'s type."""
    if type(sde) not in DEFAULT_PARAMETRIZATION:
        raise ValueError(
            f"get_score_fn needs a path of diffusion_sde.sde (VPSDE, subVPSDE and VESDE; "
            f"CosineSDE, EDMSDE, RectifiedFlow), got {type(sde).__name__}"
        )
    return DEFAULT_PARAMETRIZATION[type(sde)]


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
    parametrization: str | None = None,
    sigma_data: float | None = None,
) -> ScoreFn:
    r"""Wrap a network as a score function ``score_fn(x, t)``, ``t`` of shape ``(B,)``: one
    function of the path and what the network predicts.

    The network output is read as the target ``parametrization`` (``eps``, ``x0``, ``v``,
    ``score``, ``velocity`` or ``edm``; see :mod:`diffusion_sde.parametrization`) and turned
    into the score :math:`s = (\alpha_t\hat x_0 - x)/\sigma_t^2`. ``None`` takes
    ``model.config.parametrization`` when the model's config sets it, else the path's default
    (:data:`DEFAULT_PARAMETRIZATION`: noise for VP, sub-VP and cosine, the score for VE,
    EDM's F on EDM's path, the velocity on rectified flow). For ``edm`` the network sees
    :math:`c_{in}\tilde x` and EDM's preconditioning uses ``sigma_data`` (``None``:
    ``model.config.sigma_data``, else 0.5).

    Time labels, continuous: :math:`c(t) = 999\,t` on VP, sub-VP, cosine and rectified flow,
    as the 2021 reference for VP; the noise level :math:`\sigma_t` on VE and EDM; for ``edm``
    EDM's :math:`c_{noise} = \tfrac14\ln\tilde\sigma` (:math:`\tilde\sigma` itself for a
    network with Fourier features, which embed its log). So with the defaults:

    - VP and sub-VP networks predict the noise :math:`\epsilon` (Ho et al. 2020),
      :math:`s_\theta(x, t) = -\epsilon_\theta(x, c(t)) / \sigma_t`.
    - discrete (DDPM): at the chain level :math:`k` = :func:`chain_level` of ``t``, the label
      is :math:`c = k`, the integer step the network was trained on (``losses.ddpm_loss``),
      and :math:`\sigma = \sqrt{1 - \bar\alpha_k}` of the DDPM chain. On the samplers' grid
      this is the level the predictor uses, so ancestral sampling with this score is
      exactly Ho et al.'s Algorithm 2. (The 2021 reference takes the same std but feeds
      the fractional label :math:`(N-1) t = k + \epsilon (N - 1 - k)`, 0.999 at level 0.)
      Off the grid (ODE solvers, likelihood) the label and std are piecewise constant in
      ``t``; the evaluation code uses the continuous adapter there by default
      (``sampling.ode_continuous_score``), as the reference does.
    - VE networks output the score itself (those with ``scale_by_sigma`` divide by
      :math:`\sigma` inside), fed :math:`c(t) = \sigma(t)` (``continuous``) or
      :math:`c(t) = N - 1 - k`, :math:`k` = :func:`chain_level` of ``t``: the index into the
      descending SMLD noise levels (label 0 is :math:`\sigma_{max}` at ``t = T``).

    Args:
      sde: any path of :mod:`diffusion_sde.sde`.
      model: a network from :func:`get_model` (any linen module with its call signature).
      variables: ``{"params": ...}``.
      continuous: continuous-time labels (continuous training) or discrete ones (VPSDE with
        ``eps`` and VESDE with ``score`` only).
      train: run the network in training mode (dropout on; needs ``dropout_key``).
      dropout_key: the ``dropout`` rng when ``train``.
      class_labels: ``(B,)`` int labels for a class-conditional network; ``None`` is the
        null label.
      parametrization: what the network predicts (see above).
      sigma_data: EDM's :math:`\sigma_{data}` for ``edm``.

    Returns:
      ``score_fn(x, t)`` returning an array shaped like ``x``.
    """
    config = getattr(model, "config", None)
    config_get = (lambda name: config.get(name)) if config is not None else (lambda name: None)
    if parametrization is None:
        parametrization = config_get("parametrization") or default_parametrization(sde)
    if sigma_data is None:
        sigma_data = config_get("sigma_data") or param.SIGMA_DATA
    if isinstance(sde, subVPSDE):
        continuous = True  # sub-VP has no discrete chain; the 2021 reference's behaviour.
    _check_score_fn(sde, config, parametrization, continuous)
    rngs = {} if dropout_key is None else {"dropout": dropout_key}

    def network(x: jax.Array, time_cond: jax.Array) -> jax.Array:
        return model.apply(variables, x, time_cond, y=class_labels, train=train, rngs=rngs)

    if not continuous:
        return _discrete_score_fn(sde, network)
    fourier = config_get("embedding_type") == "fourier"
    return _continuous_score_fn(sde, network, parametrization, sigma_data, fourier)


def _check_score_fn(sde: SDE, config: Any, parametrization: str, continuous: bool) -> None:
    """Fail loudly on a parametrisation, label kind and network that do not go together."""
    param.check_parametrization(parametrization)
    scale_by_sigma = config is not None and config.get("scale_by_sigma")
    if scale_by_sigma and parametrization not in ("score", "eps"):
        raise ValueError(
            f"model.scale_by_sigma divides the network output by sigma, the score "
            f"parametrisation of NCSN; with model.parametrization={parametrization!r} set "
            "model.scale_by_sigma=False"
        )
    if not continuous:
        discrete = {VPSDE: "eps", VESDE: "score"}
        if discrete.get(type(sde)) != parametrization:
            raise ValueError(
                f"Discrete labels (training.continuous=False) are defined for VPSDE with "
                f"parametrization 'eps' (DDPM) and VESDE with 'score' (SMLD), not "
                f"{type(sde).__name__} with {parametrization!r}; use training.continuous=True."
            )
    if isinstance(sde, VESDE):
        _check_ve_labels(config, continuous)


Network = Callable[[jax.Array, jax.Array], jax.Array]


def _discrete_score_fn(sde: VPSDE | VESDE, network: Network) -> ScoreFn:
    """The score at the discrete chain's level of ``t`` (see :func:`get_score_fn`): DDPM's
    noise prediction over its chain std for VP, SMLD's score at its noise index for VE."""
    if isinstance(sde, VPSDE):

        def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            level = chain_level(sde, t)
            std = sde.sqrt_one_minus_alphas_cumprod[level]
            return -network(x, level.astype(t.dtype)) / batch_broadcast(std, x)

        return score_fn

    def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return network(x, (sde.N - 1 - chain_level(sde, t)).astype(t.dtype))

    return score_fn


def _continuous_score_fn(
    sde: SDE, network: Network, parametrization: str, sigma_data: float, fourier: bool
) -> ScoreFn:
    """The score from a network of continuous labels (see :func:`get_score_fn`)."""

    def labels(t: jax.Array, coeffs: param.PathCoeffs, x: jax.Array) -> jax.Array:
        if parametrization == "edm":
            sigma_tilde = (coeffs.sigma / coeffs.alpha).reshape(t.shape)
            return sigma_tilde if fourier else param.edm_preconditioning(sigma_tilde)[3]
        if isinstance(sde, _SIGMA_LABELLED):
            return sde.marginal_prob(jnp.zeros_like(x), t)[1]
        return VP_CONTINUOUS_TIME_SCALE * t

    def score_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        coeffs = param.path_coeffs(sde, t, x, derivatives=param.needs_derivatives(parametrization))
        inputs = param.network_input(parametrization, coeffs, x, sigma_data)
        output = network(inputs, labels(t, coeffs, x))
        return param.to_score(parametrization, coeffs, output, x, sigma_data)

    return score_fn
