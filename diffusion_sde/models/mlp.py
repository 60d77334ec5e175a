r"""A residual MLP score network for low-dimensional data ``x`` of shape ``(B, D)``.

.. math::
   e &= W_2\,\mathrm{act}(W_1 \phi(\mathrm{time\_cond})) \;[+\; E_y],\\
   h_0 &= A x, \qquad
   h_{l+1} = h_l + B_l\,\mathrm{act}\big(C_l\,\mathrm{act}(h_l) + V_l\,\mathrm{act}(e)\big),
   \quad l < L,\\
   \mathrm{out} &= W_o\,\mathrm{act}(h_L),

the residual blocks of the image U-Nets (time embedding added between the two layers)
with dense layers in place of convolutions. :math:`\phi` is the sinusoidal embedding of
DDPM (``embedding_type='positional'``; for VP time labels such as :math:`999 t` and
discrete indices) or Gaussian Fourier features of :math:`\log` ``time_cond``
(``'fourier'``; for continuous VE, where ``time_cond`` is :math:`\sigma`), as in NCSN++.
The output layer starts at zero scale (``init_scale``), so an untrained network outputs
almost zero. With ``scale_by_sigma`` the output is divided by :math:`\sigma`
(``time_cond`` itself with Fourier features, else ``sigmas[time_cond]``).

Config fields (``model.*``):

- ``nf``: hidden width (and width of :math:`\phi`; the embedding :math:`e` has ``4 nf``);
- ``num_layers``: number of residual blocks :math:`L`;
- ``nonlinearity`` (``swish``), ``embedding_type``, ``fourier_scale`` (16 as NCSN++),
  ``centered`` (False maps data from [0, 1] to [-1, 1]; toy data set it True),
  ``scale_by_sigma`` with ``sigma_min``, ``sigma_max``, ``num_scales``;
- optional: ``num_classes`` (0; label ``num_classes`` is the null label),
  ``init_scale`` (0.0), ``dtype`` (``float32``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_sde.models import layers
from diffusion_sde.models.ddpm import divide_by_discrete_sigma, label_embedding

EMBEDDING_TYPES = ("positional", "fourier")


class MLP(nn.Module):
    """MLP score network; see the module docstring.

    ``__call__(x, time_cond, y=None, train=False)``: ``x`` (B, D), ``time_cond`` (B,),
    ``y`` optional (B,) int labels; ``train`` has no effect (no dropout). Returns float32
    of shape (B, D).
    """

    config: ml_collections.ConfigDict

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        time_cond: jax.Array,
        y: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        config = self.config
        nf = config.nf
        act = layers.choose("nonlinearity", config.nonlinearity, layers.ACTIVATIONS)
        dtype = layers.choose("dtype", config.get("dtype", "float32"), layers.DTYPES)
        embedding_type = layers.check_option(
            "embedding_type", config.embedding_type, EMBEDDING_TYPES
        )
        dense = lambda features, scale=1.0: nn.Dense(
            features, kernel_init=layers.default_init(scale), dtype=dtype
        )

        # ---- time and label embedding
        if embedding_type == "fourier":
            temb = layers.GaussianFourierProjection(
                embedding_size=nf // 2, scale=config.fourier_scale
            )(jnp.log(time_cond))
        else:
            temb = layers.get_timestep_embedding(time_cond, nf)
        temb = dense(4 * nf)(temb.astype(dtype))
        temb = dense(4 * nf)(act(temb))
        label_emb = label_embedding(y, x.shape[0], config.get("num_classes", 0), 4 * nf, dtype)
        if label_emb is not None:
            temb = temb + label_emb

        # ---- residual blocks
        h = x if config.centered else 2.0 * x - 1.0
        h = dense(nf)(h.astype(dtype))
        for _ in range(config.num_layers):
            inner = dense(nf)(act(h)) + dense(nf)(act(temb))
            h = h + dense(nf)(act(inner))

        h = dense(x.shape[-1], config.get("init_scale", 0.0))(act(h)).astype(jnp.float32)
        if config.scale_by_sigma:
            if embedding_type == "fourier":
                h = h / time_cond.reshape(-1, 1)
            else:
                h = divide_by_discrete_sigma(h, time_cond, config)
        return h
