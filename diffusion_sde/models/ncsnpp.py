r"""NCSN++ and DDPM++: the configurable U-Net of Song et al. (2021), appendix H.

One network, two named settings (the 2021 reference calls both ``ncsnpp``):

- **DDPM++** (VP/sub-VP): DDPM's U-Net with BigGAN-type residual blocks, skip connections
  rescaled by :math:`1/\sqrt 2`, sinusoidal time embedding, no FIR, no progressive growing;
- **NCSN++** (VE): the same with Gaussian Fourier features of :math:`\log\sigma`, FIR
  resampling with the kernel ``[1, 3, 3, 1]`` (StyleGAN2), a residual input pyramid
  (``progressive_input='residual'``) and the output divided by :math:`\sigma`
  (``scale_by_sigma``).

Layout, for ``L = len(ch_mult)`` resolutions (all convolutions 3x3 unless stated):

1. time embedding :math:`e = W_2\,\mathrm{act}(W_1 \phi(t))` (``conditional``), plus a
   label embedding when ``num_classes > 0``;
2. encoder: a 3x3 convolution to ``nf`` channels, then per level ``num_res_blocks``
   residual blocks of ``nf * ch_mult[level]`` channels (each followed by self-attention at
   the ``attn_resolutions``), and between levels a downsampling block (a residual block with
   ``down=True`` for BigGAN blocks), combined with the downsampled input image
   (``progressive_input``); every output is kept for a skip connection;
3. middle: residual block, attention, residual block;
4. decoder: per level ``num_res_blocks + 1`` residual blocks, each fed the concatenation
   of the current features and one skip, attention at the ``attn_resolutions``, an output
   pyramid (``progressive``) and an upsampling block between levels;
5. GroupNorm, activation and a 3x3 convolution to the image channels (initialised with
   ``init_scale``), or the output pyramid when ``progressive='output_skip'``.

Parameter count: the Fourier frequencies are a fixed buffer, not parameters (see
:class:`~diffusion_sde.models.common.GaussianFourierProjection`), unless
``model.fourier_in_params`` (needed to load a published NCSN++ checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_sde.models import common, layers
from diffusion_sde.models.convolution import resolve_conv_impl
from diffusion_sde.models.layers import SKIP_SCALE

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")

Block = Callable[..., nn.Module]


@dataclasses.dataclass(frozen=True)
class _Blocks:
    """The constructors of one configuration's blocks, the options every block shares bound
    (each call makes a new block, with its own parameters)."""

    act: common.Activation
    dtype: common.Dtype
    conv3x3: Block
    attention: Block
    res_block: Block
    upsample: Block
    downsample: Block
    # The pyramids resample with a convolution only in their 'residual' form.
    pyramid_upsample: Block
    pyramid_downsample: Block
    combine: Block

    def norm_act(self, h: jax.Array) -> jax.Array:
        """GroupNorm then the activation, before an output convolution."""
        return self.act(layers.group_norm(h, dtype=self.dtype))


def _blocks(config: ml_collections.ConfigDict) -> _Blocks:
    """Check the architecture options of ``config`` and bind them to the blocks."""
    resblock_type = common.check_option("resblock_type", config.resblock_type, RESBLOCK_TYPES)
    progressive = common.check_option("progressive", config.progressive, PROGRESSIVE)
    progressive_input = common.check_option(
        "progressive_input", config.progressive_input, PROGRESSIVE_INPUT
    )
    combine_method = common.check_option(
        "progressive_combine", config.progressive_combine, PROGRESSIVE_COMBINE
    )
    act, dtype = common.activation(config), common.compute_dtype(config)
    shared = dict(dtype=dtype, conv_impl=resolve_conv_impl(config.get("conv_impl", "auto")))
    fir = dict(fir=config.fir, fir_kernel=tuple(config.fir_kernel))
    scales = dict(init_scale=config.init_scale, skip_rescale=config.skip_rescale)
    res_block_options = dict(act=act, dropout=config.dropout, **scales, **shared)
    if resblock_type == "ddpm":
        res_block = functools.partial(layers.ResnetBlockDDPMpp, **res_block_options)
    else:
        res_block = functools.partial(layers.ResnetBlockBigGANpp, **fir, **res_block_options)
    resample = dict(with_conv=config.resamp_with_conv, **fir, **shared)
    return _Blocks(
        act=act,
        dtype=dtype,
        conv3x3=functools.partial(layers.Conv, kernel_size=3, **shared),
        attention=functools.partial(layers.AttnBlock, **scales, **shared),
        res_block=res_block,
        upsample=functools.partial(layers.Upsample, **resample),
        downsample=functools.partial(layers.Downsample, **resample),
        pyramid_upsample=functools.partial(
            layers.Upsample, with_conv=progressive == "residual", **fir, **shared
        ),
        pyramid_downsample=functools.partial(
            layers.Downsample, with_conv=progressive_input == "residual", **fir, **shared
        ),
        combine=functools.partial(layers.Combine, method=combine_method, **shared),
    )


def _encoder(
    config: ml_collections.ConfigDict,
    blocks: _Blocks,
    x: jax.Array,
    temb: jax.Array | None,
    train: bool,
) -> list[jax.Array]:
    """The encoder's outputs, each kept for a skip connection: the first convolution, the
    residual blocks of every level and the downsampling block between levels, combined
    with the downsampled input image (``progressive_input``)."""
    input_pyramid = x
    hs = [blocks.conv3x3(config.nf)(x)]
    for level, multiplier in enumerate(config.ch_mult):
        res_block = functools.partial(blocks.res_block, out_ch=config.nf * multiplier)
        hs += common.attended_blocks(hs[-1], config, res_block, blocks.attention, temb, train)
        if level == len(config.ch_mult) - 1:
            break
        if config.resblock_type == "ddpm":
            h = blocks.downsample()(hs[-1])
        else:
            h = blocks.res_block(down=True)(hs[-1], temb, train)
        if config.progressive_input == "input_skip":
            input_pyramid = blocks.pyramid_downsample()(input_pyramid)
            h = blocks.combine()(input_pyramid, h)
        elif config.progressive_input == "residual":
            input_pyramid = blocks.pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
            input_pyramid = input_pyramid + h
            if config.skip_rescale:
                input_pyramid = input_pyramid * SKIP_SCALE
            h = input_pyramid
        hs.append(h)
    return hs


def _output_pyramid(
    config: ml_collections.ConfigDict,
    blocks: _Blocks,
    h: jax.Array,
    pyramid: jax.Array | None,
    image_channels: int,
) -> tuple[jax.Array, jax.Array | None]:
    """One decoder level's step of the output pyramid (``progressive``): the features and
    the pyramid after it."""
    if config.progressive == "output_skip":
        # The pyramid accumulates image-space outputs of every level.
        out = blocks.conv3x3(image_channels, init_scale=config.init_scale)(blocks.norm_act(h))
        pyramid = out if pyramid is None else blocks.pyramid_upsample()(pyramid) + out
    elif config.progressive == "residual":
        if pyramid is None:
            pyramid = blocks.conv3x3(h.shape[-1])(blocks.norm_act(h))
        else:
            pyramid = blocks.pyramid_upsample(out_ch=h.shape[-1])(pyramid) + h
            if config.skip_rescale:
                pyramid = pyramid * SKIP_SCALE
            h = pyramid
    return h, pyramid


def _decoder(
    config: ml_collections.ConfigDict,
    blocks: _Blocks,
    h: jax.Array,
    hs: list[jax.Array],
    temb: jax.Array | None,
    train: bool,
    image_channels: int,
) -> jax.Array:
    """The decoder from the middle's output ``h``, using up the skips ``hs``, and the output
    layer: the network's output, in the compute dtype."""
    pyramid = None
    for level in reversed(range(len(config.ch_mult))):
        for _ in range(config.num_res_blocks + 1):
            h = blocks.res_block(out_ch=config.nf * config.ch_mult[level])(
                jnp.concatenate([h, hs.pop()], axis=-1), temb, train
            )
        if h.shape[1] in config.attn_resolutions:
            h = blocks.attention()(h)
        h, pyramid = _output_pyramid(config, blocks, h, pyramid, image_channels)
        if level != 0:
            if config.resblock_type == "ddpm":
                h = blocks.upsample()(h)
            else:
                h = blocks.res_block(up=True)(h, temb, train)
    assert not hs, "every skip connection is used once"
    if config.progressive == "output_skip":
        return pyramid
    return blocks.conv3x3(image_channels, init_scale=config.init_scale)(blocks.norm_act(h))


class NCSNpp(common.ScoreNetwork):
    r"""NCSN++/DDPM++ score network, built from the model config (``config.model``).

    Fields read from ``config`` (the reference's names): ``nf``, ``ch_mult``,
    ``num_res_blocks``, ``attn_resolutions``, ``dropout``, ``resamp_with_conv``,
    ``conditional``, ``fir``, ``fir_kernel``, ``skip_rescale``, ``resblock_type``,
    ``progressive``, ``progressive_input``, ``progressive_combine``, ``embedding_type``,
    ``fourier_scale``, ``init_scale``, ``scale_by_sigma``, ``nonlinearity``,
    ``centered``; ``sigma_min``, ``sigma_max``, ``num_scales`` (only for
    ``scale_by_sigma`` with positional embedding). Optional, with defaults:
    ``num_classes`` (0), ``dtype`` (``'float32'``), ``conv_impl`` (``'auto'``),
    ``fourier_in_params`` (False: the Fourier frequencies a constant, not a parameter). Image
    size and channels are those of ``x`` (``image_size`` is not read).

    Call: ``model.apply(variables, x, time_cond, y=None, train=False, rngs={'dropout':
    key})`` with ``x`` of shape ``(B, H, W, C)``, ``time_cond`` of shape ``(B,)`` (the
    noise level :math:`\sigma` for Fourier features, whose input is :math:`\log\sigma`; a
    time label such as :math:`999 t` or an integer noise index for positional
    embedding) and ``y`` optional ``(B,)`` integer labels (``num_classes`` is the null
    label, and ``y=None`` means null). Returns float32 of the shape of ``x``; divided by
    :math:`\sigma` (``time_cond`` itself, or ``sigmas[time_cond]`` with positional
    embedding) when ``scale_by_sigma``.
    """

    def forward(
        self, x: jax.Array, time_cond: jax.Array, y: jax.Array | None, train: bool
    ) -> jax.Array:
        config = self.config
        blocks = _blocks(config)
        # ---- time (noise-level) embedding and class label embedding
        features = common.time_features(
            config,
            time_cond,
            fourier_size=config.nf,
            fourier_in_params=config.get("fourier_in_params", False),
        )
        temb = common.conditioning(
            config,
            features if config.conditional else None,
            y,
            x.shape[0],
            blocks.act,
            blocks.dtype,
        )
        # ---- encoder, middle, decoder
        hs = _encoder(
            config, blocks, common.scale_input(config, x).astype(blocks.dtype), temb, train
        )
        h = blocks.res_block()(hs[-1], temb, train)
        h = blocks.attention()(h)
        h = blocks.res_block()(h, temb, train)
        h = _decoder(config, blocks, h, hs, temb, train, image_channels=x.shape[-1])
        h = h.astype(jnp.float32)
        if not config.scale_by_sigma:
            return h
        if config.embedding_type == "fourier":
            return common.divide_by_sigma(h, time_cond)  # time_cond is sigma
        return common.divide_by_discrete_sigma(h, time_cond, config)
