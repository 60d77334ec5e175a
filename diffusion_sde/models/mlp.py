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

from diffusion_sde.models import common


class MLP(common.ScoreNetwork):
    """MLP score network; see the module docstring.

    ``__call__(x, time_cond, y=None, train=False)``: ``x`` (B, D), ``time_cond`` (B,),
    ``y`` optional (B,) int labels; ``train`` has no effect (no dropout). Returns float32
    of shape (B, D).
    """

    def forward(
        self, x: jax.Array, time_cond: jax.Array, y: jax.Array | None, train: bool
    ) -> jax.Array:
        config = self.config
        act, dtype = common.activation(config), common.compute_dtype(config)
        nf = config.nf
        dense = lambda features, scale=1.0: nn.Dense(
            features, kernel_init=common.default_init(scale), dtype=dtype
        )

        # ---- time and label embedding
        features = common.time_features(config, time_cond, fourier_size=nf // 2)
        temb = common.conditioning(config, features, y, x.shape[0], act, dtype)

        # ---- residual blocks
        h = dense(nf)(common.scale_input(config, x).astype(dtype))
        for _ in range(config.num_layers):
            inner = dense(nf)(act(h)) + dense(nf)(act(temb))
            h = h + dense(nf)(act(inner))

        h = dense(x.shape[-1], config.get("init_scale", 0.0))(act(h)).astype(jnp.float32)
        if not config.scale_by_sigma:
            return h
        if config.embedding_type == "fourier":
            return common.divide_by_sigma(h, time_cond)  # time_cond is sigma
        return common.divide_by_discrete_sigma(h, time_cond, config)
