r"""The U-Net of Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models",
as the 2021 reference's ``ddpm`` model defines it.

The network predicts the noise :math:`\epsilon_\theta(x_i, i)` of
:math:`x_i = \sqrt{\bar\alpha_i} x_0 + \sqrt{1 - \bar\alpha_i}\,\epsilon` (``get_score_fn``
divides by :math:`-\sqrt{1-\bar\alpha}` for VP SDEs); with ``scale_by_sigma`` (VE, discrete
labels) it instead divides its output by :math:`\sigma_i`, the ``time_cond``-th of the
descending SMLD noise levels, as NCSN does.

Layout, for ``L = len(ch_mult)`` resolutions (PixelCNN++-style; appendix B of Ho et al.):

1. time embedding :math:`e = W_2\,\mathrm{swish}(W_1 \phi(\mathrm{time\_cond}))`, with
   :math:`\phi` the sinusoidal embedding of width ``nf`` and :math:`e` of width ``4 nf``
   (omitted when ``conditional`` is False), plus a label embedding when
   ``num_classes > 0`` (label ``num_classes`` is the null label);
2. encoder: a 3x3 convolution to ``nf`` channels, then per level ``num_res_blocks``
   residual blocks of ``nf * ch_mult[level]`` channels, each followed by self-attention
   at the ``attn_resolutions``, and a downsampling (a stride-2 convolution if
   ``resamp_with_conv``, else average pooling) between levels; every output is kept;
3. middle: residual block, attention, residual block;
4. decoder: per level ``num_res_blocks + 1`` residual blocks on the concatenation of the
   features and one skip, each followed by self-attention at the ``attn_resolutions``,
   and a nearest-neighbour upsampling (then a 3x3 convolution if ``resamp_with_conv``);
5. GroupNorm(32), swish and a 3x3 convolution to the image channels initialised at
   zero scale.

The decoder attends after every block as Ho et al.'s TensorFlow code does (``unet.py``),
which gives their 35.7M parameters on CIFAR-10 (35,746,307 exactly); so does the diffusers
port of their checkpoint. The 2021 reference's port attends once per decoder level, after
the blocks: 35,218,947 parameters. ``model.decoder_attention`` chooses: ``'every_block'``
(the default) or ``'once_per_level'`` (to load the 2021 reference's checkpoints).

Residual blocks are those of Ho et al.: GroupNorm(32), swish, conv, plus the projected
time embedding, GroupNorm(32), swish, dropout, conv (zero-scale init), and a 1x1
projection of the shortcut when the width changes.

Config fields (``model.*``): ``nf``, ``ch_mult``, ``num_res_blocks``,
``attn_resolutions``, ``dropout``, ``resamp_with_conv``, ``conditional``, ``centered``,
``scale_by_sigma`` (with ``sigma_min``, ``sigma_max``, ``num_scales``), ``nonlinearity``
(``swish``); optional ``num_classes`` (0), ``dtype`` (``float32``) and ``conv_impl``
(``auto``, see :mod:`diffusion_sde.models.convolution`) and ``decoder_attention``
(``every_block``). ``normalization`` is always
GroupNorm with 32 groups, so every width must be a multiple of 32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from diffusion_sde.models import common, layers
from diffusion_sde.models.convolution import resolve_conv_impl

# Ho et al.'s blocks: GroupNorm with 32 groups, plain sums, zero-scale last layers.
NUM_GROUPS = 32
# Where the decoder attends: after every residual block (Ho et al.) or once per level.
DECODER_ATTENTION = ("every_block", "once_per_level")


class DDPM(common.ScoreNetwork):
    """DDPM U-Net score network; see the module docstring.

    ``__call__(x, time_cond, y=None, train=False)``: ``x`` (B, H, W, C) images,
    ``time_cond`` (B,) time labels (the DDPM step ``(N - 1) t``, ``999 t``, or a
    noise-level index with ``scale_by_sigma``), ``y`` optional (B,) int labels. Returns
    float32 shaped like ``x``.
    """

    def forward(
        self, x: jax.Array, time_cond: jax.Array, y: jax.Array | None, train: bool
    ) -> jax.Array:
        config = self.config
        nf = config.nf
        act, dtype = common.activation(config), common.compute_dtype(config)
        shared = dict(dtype=dtype, conv_impl=resolve_conv_impl(config.get("conv_impl", "auto")))
        decoder_attention = common.check_option(
            "decoder_attention", config.get("decoder_attention", "every_block"), DECODER_ATTENTION
        )
        conv3x3 = functools.partial(layers.Conv, kernel_size=3, **shared)
        ResnetBlock = functools.partial(
            layers.ResnetBlockDDPMpp,
            act=act,
            dropout=config.dropout,
            skip_rescale=False,
            init_scale=0.0,
            num_groups=NUM_GROUPS,
            **shared,
        )
        AttnBlock = functools.partial(
            layers.AttnBlock, num_groups=NUM_GROUPS, skip_rescale=False, init_scale=0.0, **shared
        )

        # ---- time and label embedding
        features = common.get_timestep_embedding(time_cond, nf) if config.conditional else None
        temb = common.conditioning(config, features, y, x.shape[0], act, dtype)

        # ---- encoder
        hs = [conv3x3(nf)(common.scale_input(config, x).astype(dtype))]
        for level, multiplier in enumerate(config.ch_mult):
            res_block = functools.partial(ResnetBlock, out_ch=nf * multiplier)
            hs += common.attended_blocks(hs[-1], config, res_block, AttnBlock, temb, train)
            if level != len(config.ch_mult) - 1:
                hs.append(layers.Downsample(with_conv=config.resamp_with_conv, **shared)(hs[-1]))

        # ---- middle
        h = ResnetBlock()(hs[-1], temb, train)
        h = AttnBlock()(h)
        h = ResnetBlock()(h, temb, train)

        # ---- decoder
        attend = lambda h: h.shape[1] in config.attn_resolutions
        for level in reversed(range(len(config.ch_mult))):
            for _ in range(config.num_res_blocks + 1):
                h = ResnetBlock(out_ch=nf * config.ch_mult[level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train
                )
                if decoder_attention == "every_block" and attend(h):
                    h = AttnBlock()(h)
            if decoder_attention == "once_per_level" and attend(h):
                h = AttnBlock()(h)
            if level != 0:
                h = layers.Upsample(with_conv=config.resamp_with_conv, **shared)(h)
        assert not hs, "every skip connection is used once"

        # ---- output
        h = act(layers.group_norm(h, NUM_GROUPS, dtype))
        h = conv3x3(x.shape[-1], init_scale=0.0)(h).astype(jnp.float32)
        if config.scale_by_sigma:
            h = common.divide_by_discrete_sigma(h, time_cond, config)
        return h
