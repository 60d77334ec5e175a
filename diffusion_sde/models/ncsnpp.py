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
:class:`~diffusion_sde.models.layers.GaussianFourierProjection`), unless
``model.fourier_in_params`` (needed to load a published NCSN++ checkpoint).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_sde.models import layers
from diffusion_sde.models.layers import SKIP_SCALE

RESBLOCK_TYPES = ("ddpm", "biggan")
PROGRESSIVE = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINE = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")


def resolve_conv_impl(conv_impl: str) -> str:
    """Check a ``conv_impl`` name (one of ``layers.CONV_IMPLS``; ``'auto'``, the default,
    chooses per convolution and backend) and return it."""
    return layers.check_option("conv_impl", conv_impl, layers.CONV_IMPLS)


def get_sigmas(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    r"""The SMLD noise levels :math:`\sigma_i`, geometric and *descending* from
    ``sigma_max`` to ``sigma_min`` (index ``i`` is the discrete VE time label)."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


class NCSNpp(nn.Module):
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
        ch_mult = tuple(config.ch_mult)
        num_res_blocks = config.num_res_blocks
        attn_resolutions = tuple(config.attn_resolutions)
        num_resolutions = len(ch_mult)
        init_scale = config.init_scale
        skip_rescale = config.skip_rescale
        fir, fir_kernel = config.fir, tuple(config.fir_kernel)
        resblock_type = layers.check_option("resblock_type", config.resblock_type, RESBLOCK_TYPES)
        progressive = layers.check_option("progressive", config.progressive, PROGRESSIVE)
        progressive_input = layers.check_option(
            "progressive_input", config.progressive_input, PROGRESSIVE_INPUT
        )
        combine_method = layers.check_option(
            "progressive_combine", config.progressive_combine, PROGRESSIVE_COMBINE
        )
        embedding_type = layers.check_option(
            "embedding_type", config.embedding_type, EMBEDDING_TYPES
        )
        act = layers.choose("nonlinearity", config.nonlinearity, layers.ACTIVATIONS)
        dtype = layers.choose("dtype", config.get("dtype", "float32"), layers.DTYPES)
        conv_impl = resolve_conv_impl(config.get("conv_impl", "auto"))
        num_classes = config.get("num_classes", 0)

        # Bind the options every block shares.
        common = dict(dtype=dtype, conv_impl=conv_impl)
        conv3x3 = functools.partial(layers.Conv, kernel_size=3, **common)
        AttnBlock = functools.partial(
            layers.AttnBlock, init_scale=init_scale, skip_rescale=skip_rescale, **common
        )
        Upsample = functools.partial(
            layers.Upsample,
            with_conv=config.resamp_with_conv,
            fir=fir,
            fir_kernel=fir_kernel,
            **common,
        )
        Downsample = functools.partial(
            layers.Downsample,
            with_conv=config.resamp_with_conv,
            fir=fir,
            fir_kernel=fir_kernel,
            **common,
        )
        # The pyramids resample with a convolution only in their 'residual' form.
        pyramid_upsample = functools.partial(
            layers.Upsample,
            with_conv=progressive == "residual",
            fir=fir,
            fir_kernel=fir_kernel,
            **common,
        )
        pyramid_downsample = functools.partial(
            layers.Downsample,
            with_conv=progressive_input == "residual",
            fir=fir,
            fir_kernel=fir_kernel,
            **common,
        )
        block_options = dict(
            act=act,
            dropout=config.dropout,
            init_scale=init_scale,
            skip_rescale=skip_rescale,
            **common,
        )
        if resblock_type == "ddpm":
            ResnetBlock = functools.partial(layers.ResnetBlockDDPMpp, **block_options)
        else:
            ResnetBlock = functools.partial(
                layers.ResnetBlockBigGANpp, fir=fir, fir_kernel=fir_kernel, **block_options
            )

        def output_norm_act(h):
            return act(layers.group_norm(h, dtype=dtype))

        # ---- time (noise-level) embedding and class label embedding
        if embedding_type == "fourier":
            # time_cond is sigma; the features are those of log sigma.
            used_sigmas = time_cond
            temb = layers.GaussianFourierProjection(
                embedding_size=nf,
                scale=config.fourier_scale,
                in_params=config.get("fourier_in_params", False),
            )(jnp.log(time_cond))
        else:
            temb = layers.get_timestep_embedding(time_cond, nf)
            used_sigmas = None
        if config.conditional:
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(temb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init(), dtype=dtype)(act(temb))
        else:
            temb = None
        if num_classes > 0:
            if y is None:
                y = jnp.full((x.shape[0],), num_classes, dtype=jnp.int32)
            # Labels 0..num_classes-1 and the null label num_classes.
            label_emb = nn.Embed(num_classes + 1, nf * 4, dtype=dtype)(y)
            temb = label_emb if temb is None else temb + label_emb
        elif y is not None:
            raise ValueError("class labels y given to a model with num_classes = 0")

        if not config.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        image_channels = x.shape[-1]
        x = x.astype(dtype)

        # ---- encoder
        input_pyramid = x if progressive_input != "none" else None
        hs = [conv3x3(nf)(x)]
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in attn_resolutions:
                    h = AttnBlock()(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    h = Downsample()(hs[-1])
                else:
                    h = ResnetBlock(down=True)(hs[-1], temb, train)
                if progressive_input == "input_skip":
                    input_pyramid = pyramid_downsample()(input_pyramid)
                    h = layers.Combine(method=combine_method, **common)(input_pyramid, h)
                elif progressive_input == "residual":
                    input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
                    input_pyramid = input_pyramid + h
                    if skip_rescale:
                        input_pyramid = input_pyramid * SKIP_SCALE
                    h = input_pyramid
                hs.append(h)

        # ---- middle
        h = hs[-1]
        h = ResnetBlock()(h, temb, train)
        h = AttnBlock()(h)
        h = ResnetBlock()(h, temb, train)

        # ---- decoder
        pyramid = None
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train
                )
            if h.shape[1] in attn_resolutions:
                h = AttnBlock()(h)

            if progressive == "output_skip":
                # The pyramid accumulates image-space outputs of every level.
                out = conv3x3(image_channels, init_scale=init_scale)(output_norm_act(h))
                pyramid = out if pyramid is None else pyramid_upsample()(pyramid) + out
            elif progressive == "residual":
                if pyramid is None:
                    pyramid = conv3x3(h.shape[-1])(output_norm_act(h))
                else:
                    pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid) + h
                    if skip_rescale:
                        pyramid = pyramid * SKIP_SCALE
                    h = pyramid

            if i_level != 0:
                if resblock_type == "ddpm":
                    h = Upsample()(h)
                else:
                    h = ResnetBlock(up=True)(h, temb, train)
        assert not hs, "every skip connection is used once"

        # ---- output
        if progressive == "output_skip":
            h = pyramid
        else:
            h = conv3x3(image_channels, init_scale=init_scale)(output_norm_act(h))
        h = h.astype(jnp.float32)

        if config.scale_by_sigma:
            # Divide by sigma: the score of the noise-level-sigma kernel is -z / sigma.
            if used_sigmas is None:
                sigmas = get_sigmas(config.sigma_min, config.sigma_max, config.num_scales)
                used_sigmas = jnp.asarray(sigmas, jnp.float32)[time_cond.astype(jnp.int32)]
            h = h / used_sigmas.reshape((-1,) + (1,) * (h.ndim - 1))
        return h
