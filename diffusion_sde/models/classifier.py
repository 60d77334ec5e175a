r"""The noise-conditional classifier :math:`p_t(y \mid x_t)` of forward-diffused data, and
the adapter ``classifier_log_prob_fn`` that turns it into a log-probability function for
classifier guidance (``controllable.classifier_guided_score`` takes any such function).
Training it: ``diffusion_sde.training.classifier``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_sde.models import common, layers
from diffusion_sde.models.common import VP_CONTINUOUS_TIME_SCALE
from diffusion_sde.sde import SDE, batch_broadcast

LogProbFn = Callable[[jax.Array, jax.Array], jax.Array]


class NoiseConditionalClassifier(nn.Module):
    r"""A classifier :math:`p_t(y \mid x_t)` of forward-diffused data.

    ``__call__(x, t) -> (B, num_classes)`` logits, ``t`` the SDE time ``(B,)``. Its input is
    ``x`` as the caller scales it (:func:`classifier_log_prob_fn` passes
    :math:`x / \sqrt{\alpha_t^2 + \sigma_t^2}`, of order one on every SDE). The time enters as
    in the score networks: the sinusoidal embedding of ``999 t`` (DDPM's label range), two
    dense layers to :math:`e`, added to every block through a dense projection.

    - Images ``(B, H, W, C)``: a 3x3 convolution, then per entry of ``channel_multipliers``
      a DDPM residual block (:class:`layers.ResnetBlockDDPMpp`, no dropout) with
      ``features * multiplier`` channels, each but the last followed by 2x2 average
      pooling; then group normalisation, global average pooling and a dense layer.
    - Vectors ``(B, D)``: a dense layer, ``len(channel_multipliers)`` residual dense blocks
      :math:`h \leftarrow h + W\,\mathrm{act}(U\,\mathrm{act}(h) + V\,\mathrm{act}(e))`, a dense
      layer.
    """

    num_classes: int
    features: int = 32
    channel_multipliers: Sequence[int] = (1, 2)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        act = nn.swish
        dense = lambda features: nn.Dense(features, kernel_init=common.default_init())
        features = common.get_timestep_embedding(VP_CONTINUOUS_TIME_SCALE * t, self.features)
        temb = common.time_embedding(features, 4 * self.features, act)
        if x.ndim == 4:
            h = layers.Conv(self.features)(x)
            for level, multiplier in enumerate(self.channel_multipliers):
                h = layers.ResnetBlockDDPMpp(
                    act=act, out_ch=self.features * multiplier, dropout=0.0, init_scale=1.0
                )(h, temb)
                if level < len(self.channel_multipliers) - 1:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
            h = jnp.mean(act(layers.group_norm(h)), axis=(1, 2))
        elif x.ndim == 2:
            h = dense(self.features)(x)
            for _ in self.channel_multipliers:
                inner = dense(self.features)(act(h)) + dense(self.features)(act(temb))
                h = h + dense(self.features)(act(inner))
            h = act(h)
        else:
            raise ValueError(f"expected images (B, H, W, C) or vectors (B, D), got {x.shape}")
        return dense(self.num_classes)(h)


def classifier_input(sde: SDE, x: jax.Array, t: jax.Array) -> jax.Array:
    r""":math:`x / \sqrt{\alpha_t^2 + \sigma_t^2}`: of order one at every ``t`` for data of
    order one (VE's :math:`x_t` reaches :math:`\sigma_{max}`)."""
    alpha, sigma = sde.marginal_coeffs(t)
    return x / batch_broadcast(jnp.sqrt(alpha**2 + sigma**2), x)


def classifier_log_prob_fn(sde: SDE, model: nn.Module, params: Any) -> LogProbFn:
    r"""``log_prob_fn(x, t) -> (B, num_classes)``: :math:`\log p_t(y \mid x)` of a trained
    :class:`NoiseConditionalClassifier` (log-softmax of its logits at the scaled input)."""

    def log_prob_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, classifier_input(sde, x, t), t)
        return jax.nn.log_softmax(logits, axis=-1)

    return log_prob_fn
