r"""What the score networks (NCSN++/DDPM++, DDPM, NCSNv2, MLP) and the noise-conditional
classifier share, so that no network file imports another:

- config lookups that fail loudly: :func:`choose`, :func:`check_option`, the activations
  and compute dtypes a config names (:func:`activation`, :func:`compute_dtype`);
- the reference initialiser :func:`default_init`;
- the time conditioning: the features :math:`\phi(t)` of a time label (the sinusoidal
  :func:`get_timestep_embedding`, the Fourier features :class:`GaussianFourierProjection`,
  :func:`time_features` choosing by ``model.embedding_type``), the two dense layers on them
  (:func:`time_embedding`), the class-label embedding (:func:`label_embedding`) and their
  sum (:func:`conditioning`);
- the input scaling :func:`scale_input` and the output scaling by the noise level
  (:func:`divide_by_sigma`, :func:`divide_by_discrete_sigma`, the SMLD levels being those
  of :attr:`diffusion_sde.sde.VESDE.discrete_sigmas`);
- the call of every score network (:class:`ScoreNetwork`) and the residual blocks with
  attention of one U-Net level (:func:`attended_blocks`).

The functions that create layers are called inside a Flax compact method: their layers
are that module's submodules, named as if written there.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from diffusion_sde.sde import VESDE

Dtype = Any
T = TypeVar("T")
Activation = Callable[[jax.Array], jax.Array]

ACTIVATIONS: dict[str, Activation] = {
    "swish": nn.swish,
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
}
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Time features of model.embedding_type: sinusoidal of the label, or Fourier of log sigma.
EMBEDDING_TYPES = ("positional", "fourier")

# VP networks see continuous time as t * 999, whatever N: the 2021 reference keeps the
# label range of DDPM's 1000 steps so that a DDPM-style embedding sees the same inputs.
VP_CONTINUOUS_TIME_SCALE = 999.0


def choose(what: str, name: str, options: Mapping[str, T]) -> T:
    """``options[name]``, or a ``ValueError`` listing the valid names of ``what``."""
    if name not in options:
        raise ValueError(f"unknown {what} {name!r}; valid: {', '.join(map(repr, options))}")
    return options[name]


def check_option(what: str, name: str, valid: Sequence[str]) -> str:
    """Return ``name`` if it is one of ``valid``, else raise a ``ValueError`` listing them."""
    return choose(what, name, {v: v for v in valid})


def activation(config: ml_collections.ConfigDict) -> Activation:
    """The activation ``model.nonlinearity`` names (one of :data:`ACTIVATIONS`)."""
    return choose("nonlinearity", config.nonlinearity, ACTIVATIONS)


def compute_dtype(config: ml_collections.ConfigDict) -> Dtype:
    """The compute dtype ``model.dtype`` names (``'float32'``, the default, or
    ``'bfloat16'``); parameters are float32 whatever it is."""
    return choose("dtype", config.get("dtype", "float32"), DTYPES)


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    r"""The reference initialiser: ``variance_scaling(scale, "fan_avg", "uniform")``.

    A kernel of fan-in :math:`n_i` and fan-out :math:`n_o` is drawn from
    :math:`U(-a, a)` with :math:`a^2 = 3\,\mathrm{scale} / ((n_i + n_o)/2)`. ``scale = 0``
    means ``1e-10`` (an almost-zero layer that still has a direction), as in the reference.
    """
    return jax.nn.initializers.variance_scaling(
        1e-10 if scale == 0 else scale, "fan_avg", "uniform"
    )


def get_timestep_embedding(
    timesteps: jax.Array, embedding_dim: int, max_positions: int = 10_000
) -> jax.Array:
    r"""Sinusoidal embedding of (possibly non-integer) time labels (Vaswani et al. 2017;
    DDPM): with :math:`d = \lfloor D/2 \rfloor` and :math:`\omega_i = M^{-i/(d-1)}`,

    .. math::  e(t) = [\sin(\omega_0 t), \dots, \sin(\omega_{d-1} t),
                       \cos(\omega_0 t), \dots, \cos(\omega_{d-1} t)]

    (zero-padded to ``embedding_dim`` if odd). Returns float32 ``(B, embedding_dim)``.
    """
    half_dim = embedding_dim // 2
    frequencies = jnp.exp(
        -math.log(max_positions) / (half_dim - 1) * jnp.arange(half_dim, dtype=jnp.float32)
    )
    angles = timesteps.astype(jnp.float32)[:, None] * frequencies[None, :]
    embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
    if embedding_dim % 2 == 1:
        embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
    return embedding


class GaussianFourierProjection(nn.Module):
    r"""Random Fourier features of a scalar (Tancik et al. 2020; Song et al. 2021, app. H):

    .. math::  e(s) = [\sin(2\pi W s), \cos(2\pi W s)],\qquad W \sim \mathcal N(0, \sigma^2 I)

    with :math:`W \in \mathbb R^{\text{embedding\_size}}`, :math:`\sigma` = ``scale``
    (16 in NCSN++), giving ``2 * embedding_size`` features. :math:`W` is not trained (a
    buffer in the reference PyTorch code): by default it is a constant drawn from a fixed
    seed, part of the architecture, and it is *not* in ``params`` nor in the parameter
    count. With ``in_params`` it is the parameter ``W`` (drawn at init, gradient stopped),
    as in the 2021 Flax and PyTorch code, so that a published checkpoint's frequencies can
    be loaded (``model.fourier_in_params``; see :mod:`diffusion_sde.checkpoints`).
    """

    embedding_size: int = 256
    scale: float = 1.0
    seed: int = 0
    in_params: bool = False

    @nn.compact
    def __call__(self, s: jax.Array) -> jax.Array:
        if self.in_params:
            W = self.param(
                "W", jax.nn.initializers.normal(stddev=self.scale), (self.embedding_size,)
            )
            W = lax.stop_gradient(W)
        else:
            rng = np.random.default_rng(self.seed)
            W = (rng.standard_normal(self.embedding_size) * self.scale).astype(np.float32)
        s_proj = s.astype(jnp.float32)[:, None] * W[None, :] * (2 * np.pi)
        return jnp.concatenate([jnp.sin(s_proj), jnp.cos(s_proj)], axis=-1)


def time_features(
    config: ml_collections.ConfigDict,
    time_cond: jax.Array,
    *,
    fourier_size: int,
    fourier_in_params: bool = False,
) -> jax.Array:
    r""":math:`\phi` of the time labels ``time_cond`` ``(B,)``, as ``model.embedding_type``
    says: ``'positional'``, :func:`get_timestep_embedding` of width ``model.nf``;
    ``'fourier'``, the :class:`GaussianFourierProjection` of :math:`\log` ``time_cond``
    (``time_cond`` is then :math:`\sigma`), ``2 * fourier_size`` features of scale
    ``model.fourier_scale``, the frequencies a parameter if ``fourier_in_params``."""
    embedding_type = check_option("embedding_type", config.embedding_type, EMBEDDING_TYPES)
    if embedding_type == "positional":
        return get_timestep_embedding(time_cond, config.nf)
    return GaussianFourierProjection(
        embedding_size=fourier_size, scale=config.fourier_scale, in_params=fourier_in_params
    )(jnp.log(time_cond))


def time_embedding(
    features: jax.Array, width: int, act: Activation, dtype: Dtype = jnp.float32
) -> jax.Array:
    r"""The time embedding :math:`e = W_2\,\mathrm{act}(W_1 \phi)` of the features
    :math:`\phi`: two dense layers of ``width`` (:func:`default_init`)."""
    e = nn.Dense(width, kernel_init=default_init(), dtype=dtype)(features)
    return nn.Dense(width, kernel_init=default_init(), dtype=dtype)(act(e))


def label_embedding(
    y: jax.Array | None, batch_size: int, num_classes: int, features: int, dtype: Dtype
) -> jax.Array | None:
    """Embedding of class labels ``y`` (``None`` is the null label ``num_classes``), or
    ``None`` for an unconditional model (``num_classes = 0``, where ``y`` must be ``None``)."""
    if num_classes == 0:
        if y is not None:
            raise ValueError("class labels y given to a model with num_classes = 0")
        return None
    if y is None:
        y = jnp.full((batch_size,), num_classes, dtype=jnp.int32)
    # Labels 0..num_classes-1 and the null label num_classes.
    return nn.Embed(num_classes + 1, features, dtype=dtype)(y)


def conditioning(
    config: ml_collections.ConfigDict,
    features: jax.Array | None,
    y: jax.Array | None,
    batch_size: int,
    act: Activation,
    dtype: Dtype,
) -> jax.Array | None:
    r"""What the residual blocks are conditioned on, of width ``4 * model.nf``: the
    :func:`time_embedding` of ``features`` (none if ``None``) plus the
    :func:`label_embedding` of ``y`` when ``model.num_classes > 0``; ``None`` if neither."""
    width = 4 * config.nf
    temb = None if features is None else time_embedding(features, width, act, dtype)
    label_emb = label_embedding(y, batch_size, config.get("num_classes", 0), width, dtype)
    if label_emb is None:
        return temb
    return label_emb if temb is None else temb + label_emb


def scale_input(config: ml_collections.ConfigDict, x: jax.Array) -> jax.Array:
    """``x`` as the network sees it: data in [0, 1] mapped to [-1, 1] (``2x - 1``) unless
    ``model.centered`` (the data are centred already)."""
    return x if config.centered else 2.0 * x - 1.0


def divide_by_sigma(h: jax.Array, sigma: jax.Array) -> jax.Array:
    r""":math:`h / \sigma`, per example: the score of the noise-level-:math:`\sigma` kernel
    is :math:`-z / \sigma` (the NCSN output parameterisation of Song & Ermon 2020)."""
    return h / sigma.reshape((-1,) + (1,) * (h.ndim - 1))


def divide_by_discrete_sigma(
    h: jax.Array, time_cond: jax.Array, config: ml_collections.ConfigDict
) -> jax.Array:
    r""":math:`h / \sigma_i` with :math:`i` = ``time_cond`` an (integer-valued) index into the
    descending SMLD noise levels of ``model.sigma_min``, ``model.sigma_max`` and
    ``model.num_scales``: :attr:`~diffusion_sde.sde.VESDE.discrete_sigmas` reversed, so that
    label 0 is :math:`\sigma_{max}`."""
    vesde = VESDE(sigma_min=config.sigma_min, sigma_max=config.sigma_max, N=config.num_scales)
    sigmas = vesde.discrete_sigmas[::-1].astype(jnp.float32)
    return divide_by_sigma(h, sigmas[jnp.round(time_cond).astype(jnp.int32)])


class ScoreNetwork(nn.Module):
    """A score network built from the model config (``config.model``), called as
    ``model.apply(variables, x, time_cond, y=None, train=False, rngs={"dropout": key})``
    (``INTERFACE.md``): ``x`` ``(B, H, W, C)`` images or ``(B, D)`` vectors, ``time_cond``
    ``(B,)`` time labels, ``y`` optional ``(B,)`` integer class labels (``None`` is the null
    label ``num_classes``), ``train`` for dropout. Returns float32 of the shape of ``x``.
    A network defines :meth:`forward`, the body of the call."""

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        time_cond: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        return self.forward(x, time_cond, y, train)

    def forward(
        self, x: jax.Array, time_cond: jax.Array, y: jax.Array | None, train: bool
    ) -> jax.Array:
        """The network's output; its layers are created here (inside the compact call)."""
        raise NotImplementedError


def attended_blocks(
    h: jax.Array,
    config: ml_collections.ConfigDict,
    res_block: Callable[[], nn.Module],
    attention: Callable[[], nn.Module],
    temb: jax.Array | None,
    train: bool,
) -> list[jax.Array]:
    """``model.num_res_blocks`` residual blocks on ``h`` (each a new ``res_block()``, called
    with the conditioning ``temb``), each followed by an ``attention()`` block when its
    resolution is one of ``model.attn_resolutions``: the outputs of all of them (one U-Net
    encoder level)."""
    outputs = []
    for _ in range(config.num_res_blocks):
        h = res_block()(h, temb, train)
        if h.shape[1] in config.attn_resolutions:
            h = attention()(h)
        outputs.append(h)
    return outputs
