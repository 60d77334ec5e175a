r"""Building blocks of the score networks (NCSN++, DDPM++, DDPM).

Every block is a Flax linen module (or a pure function) on NHWC images with float32
parameters and computation in ``dtype`` (float32 or bfloat16). The blocks follow the
architecture descriptions of

- Ho, Jain & Abbeel (2020), *Denoising Diffusion Probabilistic Models*, appendix B
  (residual blocks, self-attention),
- Song et al. (2021), *Score-Based Generative Modeling through SDEs*, appendix H
  (NCSN++/DDPM++: BigGAN-type residual blocks, FIR resampling, skip rescaling by
  :math:`1/\sqrt 2`, progressive growing),
- Karras et al. (2020), *StyleGAN2*: FIR up/down-sampling through ``upfirdn2d``.

Initialisation follows the reference implementation: every convolution and dense kernel
is drawn from ``variance_scaling(scale, "fan_avg", "uniform")``
(:func:`~diffusion_sde.models.common.default_init`), biases are zero, and a block's last
layer uses ``init_scale`` (0 in NCSN++/DDPM++, which ``default_init`` turns into ``1e-10``
so the block starts close to the identity).

Every convolution takes ``conv_impl``, the implementation of
:func:`diffusion_sde.models.convolution.conv2d` (equal up to float32 round-off, with the
same parameters). The time embeddings are in :mod:`diffusion_sde.models.common`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_sde.models.common import Dtype, check_option, default_init
from diffusion_sde.models.convolution import DIMENSION_NUMBERS, conv2d

# 1/sqrt(2): the skip rescaling of NCSN++/DDPM++, keeping the variance of x + h at that of x.
SKIP_SCALE = 1.0 / math.sqrt(2.0)
# The reference initialises its 1x1 "NIN" projections (attention q, k, v and the DDPM
# block's channel-changing shortcut) with variance scale 0.1, its other layers with 1.
NIN_INIT_SCALE = 0.1


# ----------------------------------------------------------------------------- convolutions


class _Convolution(nn.Module):
    """The parameters of :class:`Conv` and :class:`FIRConv`: a ``kernel_size`` x
    ``kernel_size`` kernel to ``features`` channels, initialised by :func:`default_init`
    (``init_scale``), and a zero bias."""

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    def convolve(
        self, x: jax.Array, convolution: Callable[[jax.Array, jax.Array], jax.Array]
    ) -> jax.Array:
        """``convolution(x, kernel)`` plus the bias, in ``dtype``."""
        k = self.kernel_size
        kernel = self.param(
            "kernel", default_init(self.init_scale), (k, k, x.shape[-1], self.features)
        )
        y = convolution(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class Conv(_Convolution):
    """A ``kernel_size`` x ``kernel_size`` convolution of stride ``stride`` with SAME padding
    (``conv3x3``, ``conv1x1`` and the NIN layers of the reference; a 1x1 convolution *is*
    NIN), kernel initialised by :func:`default_init` (``init_scale``) and a zero bias."""

    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.convolve(
            x,
            lambda x, kernel: conv2d(x, kernel, stride=self.stride, conv_impl=self.conv_impl),
        )


# ---------------------------------------------------------------- FIR resampling (StyleGAN2)


def fir_kernel_1d(fir_kernel: Sequence[float]) -> np.ndarray:
    """The separable FIR filter :math:`k / \\sum k` of a 1-D kernel such as ``[1, 3, 3, 1]``;
    the 2-D filter is its outer product (StyleGAN2's ``_setup_kernel``)."""
    k = np.asarray(fir_kernel, dtype=np.float64)
    if k.ndim != 1 or k.size == 0:
        raise ValueError(f"fir_kernel must be a non-empty 1-D sequence, got {fir_kernel!r}")
    return k / k.sum()


def _upfirdn_1d(
    x: jax.Array, k: np.ndarray, *, up: int, down: int, pad: tuple[int, int], axis: int
) -> jax.Array:
    # Zero insertion (up - 1 zeros after every sample) and padding, in one lax.pad.
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (pad[0], pad[1] + up - 1, up - 1)
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    # A true convolution with k (the correlation with k reversed), keeping every down-th output.
    length = x.shape[axis] - len(k) + 1
    out_length = (length - 1) // down + 1
    taps = k[::-1]
    terms = [
        float(taps[j]) * lax.slice_in_dim(x, j, j + down * (out_length - 1) + 1, down, axis)
        for j in range(len(k))
        if taps[j] != 0
    ]
    return functools.reduce(jnp.add, terms)


def upfirdn2d(
    x: jax.Array,
    fir_kernel: np.ndarray,
    *,
    up: int = 1,
    down: int = 1,
    pad: tuple[int, int] = (0, 0),
) -> jax.Array:
    r"""StyleGAN2's ``upfirdn2d`` on NHWC images with a separable filter.

    Upsample by inserting ``up - 1`` zeros after every sample, zero-pad by ``pad`` (the
    same on both spatial axes; negative crops), convolve with the 2-D filter
    :math:`k k^\top` (``fir_kernel`` is the 1-D :math:`k`, used as given) and keep every
    ``down``-th sample. The output has :math:`(n\,\mathrm{up} + p_0 + p_1 - |k|)/\mathrm{down}
    + 1` samples per axis (integer division). Written as shifted slices: a fixed short
    filter is a handful of multiply-adds, cheap and exact in every dtype.
    """
    for axis in (1, 2):
        x = _upfirdn_1d(x, fir_kernel, up=up, down=down, pad=pad, axis=axis)
    return x


def upsample_2d(x: jax.Array, fir_kernel: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR upsampling by ``factor`` (StyleGAN2's ``upsample_2d``): zero insertion, then the
    filter with gain ``factor**2`` so a constant keeps its value (away from the border,
    where the zero padding of the reference enters)."""
    k = fir_kernel_1d(fir_kernel) * factor
    p = len(k) - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, fir_kernel: Sequence[float], factor: int = 2) -> jax.Array:
    """FIR downsampling by ``factor`` (StyleGAN2's ``downsample_2d``): filter, keep every
    ``factor``-th sample."""
    k = fir_kernel_1d(fir_kernel)
    p = len(k) - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Nearest-neighbour upsampling: every pixel repeated ``factor`` x ``factor`` times."""
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
    return x.reshape(b, h * factor, w * factor, c)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
    """Average pooling over ``factor`` x ``factor`` blocks."""
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


def upsample_conv_2d(
    x: jax.Array, kernel: jax.Array, fir_kernel: Sequence[float], factor: int = 2
) -> jax.Array:
    r"""Fused upsampling and convolution (StyleGAN2's ``upsample_conv_2d``): a transposed
    convolution of stride ``factor`` (written as the correlation of the zero-inserted,
    :math:`(k-1)`-padded input with ``kernel``) followed by the FIR filter with gain
    ``factor**2``. Equal to :func:`upsample_2d` then a SAME convolution, except that the
    zero padding is applied once, at the start, so the two differ on the border."""
    kh, kw, _, _ = kernel.shape
    x = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((kh - 1, kh - 1), (kw - 1, kw - 1)),
        lhs_dilation=(factor, factor),
        dimension_numbers=DIMENSION_NUMBERS,
    )
    k = fir_kernel_1d(fir_kernel) * factor
    p = len(k) - factor - (kw - 1)
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(
    x: jax.Array,
    kernel: jax.Array,
    fir_kernel: Sequence[float],
    factor: int = 2,
    conv_impl: str = "xla",
) -> jax.Array:
    """Fused convolution and downsampling (StyleGAN2's ``conv_downsample_2d``): the FIR
    filter over the padded input, then a VALID convolution of stride ``factor``. Equal to
    a SAME convolution then :func:`downsample_2d` away from the border."""
    _, kw, _, _ = kernel.shape
    p = len(fir_kernel) - factor + (kw - 1)
    x = upfirdn2d(x, fir_kernel_1d(fir_kernel), pad=((p + 1) // 2, p // 2))
    return conv2d(x, kernel, stride=factor, padding="VALID", conv_impl=conv_impl)


class FIRConv(_Convolution):
    """A convolution fused with FIR up- (``up``) or down-sampling (``down``) by 2
    (the reference's ``up_or_down_sampling.Conv2d``), same parameters as :class:`Conv`."""

    up: bool = False
    down: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up == self.down:
            raise ValueError("FIRConv resamples: set exactly one of up and down")
        if self.up:
            return self.convolve(x, lambda x, kernel: upsample_conv_2d(x, kernel, self.fir_kernel))
        return self.convolve(
            x,
            lambda x, kernel: conv_downsample_2d(
                x, kernel, self.fir_kernel, conv_impl=self.conv_impl
            ),
        )


class _Resample(nn.Module):
    """The options of :class:`Upsample` and :class:`Downsample`: output channels (``None``:
    the input's), whether to convolve, FIR or naive resampling, and its kernel."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"


class Upsample(_Resample):
    """Upsampling by 2: nearest neighbour (then a 3x3 convolution if ``with_conv``), as in
    DDPM; or, with ``fir``, FIR upsampling (fused with the convolution if ``with_conv``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            h = naive_upsample_2d(x)
            if self.with_conv:
                h = Conv(out_ch, dtype=self.dtype, conv_impl=self.conv_impl)(h)
            return h
        if not self.with_conv:
            return upsample_2d(x, self.fir_kernel)
        return FIRConv(
            out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype, conv_impl=self.conv_impl
        )(x)


class Downsample(_Resample):
    """Downsampling by 2: a 3x3 convolution of stride 2 if ``with_conv`` else 2x2 average
    pooling, as in DDPM; or, with ``fir``, FIR downsampling (fused with the convolution if
    ``with_conv``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        if not self.fir:
            if self.with_conv:
                return Conv(out_ch, stride=2, dtype=self.dtype, conv_impl=self.conv_impl)(x)
            return naive_downsample_2d(x)
        if not self.with_conv:
            return downsample_2d(x, self.fir_kernel)
        return FIRConv(
            out_ch,
            down=True,
            fir_kernel=self.fir_kernel,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
        )(x)


# ------------------------------------------------------------------ normalisation, attention


class GroupNorm(nn.Module):
    r"""Group normalisation (Wu & He 2018) of channels-last ``x``: per example and group of
    ``C / num_groups`` consecutive channels, mean :math:`\mu` and variance
    :math:`\sigma^2 = E[x^2] - \mu^2` over the pixels and the group's channels, then
    :math:`\gamma_c (x - \mu) / \sqrt{\sigma^2 + \epsilon} + \beta_c`.

    The same computation and parameters (``scale`` and ``bias``, shape ``(C,)``) as
    ``flax.linen.GroupNorm`` with its default fast variance, arranged for XLA: the pixel sums
    :math:`\sum x` and :math:`\sum x^2` per channel come first (one pass over ``x``, no
    transposition into groups), the group statistics are then formed on ``(B, C)`` arrays,
    and the normalisation is one elementwise pass, which XLA fuses with the activation
    that follows. Statistics in float32, the result in ``dtype``.
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels do not split into {self.num_groups} groups; "
                "use a channel count that is a multiple of the group count"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        pixel_axes = tuple(range(1, x.ndim - 1))
        group_size = channels // self.num_groups
        count = group_size * math.prod(x.shape[1:-1])

        def group_mean(sums):  # (B, C) channel sums -> (B, C) means of each channel's group
            means = sums.reshape(-1, self.num_groups, group_size).sum(-1) / count
            return jnp.repeat(means, group_size, axis=1)

        mean = group_mean(jnp.sum(x32, axis=pixel_axes))
        mean_square = group_mean(jnp.sum(x32 * x32, axis=pixel_axes))
        variance = jnp.maximum(mean_square - mean * mean, 0.0)
        gain = scale * lax.rsqrt(variance + self.epsilon)
        broadcast = (x.shape[0],) + (1,) * len(pixel_axes) + (channels,)
        y = (x32 - mean.reshape(broadcast)) * gain.reshape(broadcast) + bias
        return y.astype(self.dtype)


def group_norm(x: jax.Array, num_groups: int | None = None, dtype: Dtype = jnp.float32):
    """:class:`GroupNorm` with the reference's ``epsilon = 1e-6``; ``num_groups=None`` means
    the reference's ``min(C // 4, 32)``. Call inside a compact method (it creates a
    ``GroupNorm`` submodule, named ``GroupNorm_<n>`` as ``flax.linen.GroupNorm`` would be)."""
    groups = num_groups if num_groups is not None else min(x.shape[-1] // 4, 32)
    return GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)(x)


class AttnBlock(nn.Module):
    r"""Single-head self-attention over the pixels (DDPM; the ``AttnBlockpp`` of NCSN++):

    .. math::  h = \mathrm{GN}(x),\quad q, k, v = W_q h, W_k h, W_v h,\quad
               a = \mathrm{softmax}_{j}\big(q_i^\top k_j / \sqrt C\big),\quad
               o_i = W_o \textstyle\sum_j a_{ij} v_j,

    returning :math:`x + o` (or :math:`(x + o)/\sqrt2` with ``skip_rescale``). The
    projections are 1x1 convolutions (NIN); :math:`W_q, W_k, W_v` are initialised with
    scale ``NIN_INIT_SCALE`` (0.1, the reference's NIN default) and :math:`W_o` with
    ``init_scale``.
    DDPM's block is ``num_groups=32, skip_rescale=False, init_scale=0``. The softmax is
    taken in float32.
    """

    num_groups: int | None = None
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        nin = functools.partial(Conv, C, kernel_size=1, dtype=self.dtype, conv_impl=self.conv_impl)
        h = group_norm(x, self.num_groups, self.dtype)
        q, k, v = (nin(init_scale=NIN_INIT_SCALE)(h) for _ in range(3))
        logits = jnp.einsum("bhwc,bHWc->bhwHW", q, k).astype(jnp.float32) * C**-0.5
        weights = jax.nn.softmax(logits.reshape(B, H, W, H * W), axis=-1)
        weights = weights.reshape(B, H, W, H, W).astype(self.dtype)
        h = jnp.einsum("bhwHW,bHWc->bhwc", weights, v)
        h = nin(init_scale=self.init_scale)(h)
        return (x + h) * SKIP_SCALE if self.skip_rescale else x + h


class Combine(nn.Module):
    """Combine a skip input ``x`` with ``y`` (NCSN++'s input-skip pyramid): ``x`` is mapped
    by a 1x1 convolution to ``y``'s channels, then summed with or concatenated to ``y``."""

    method: str = "cat"
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        check_option("progressive_combine", self.method, ("sum", "cat"))
        h = Conv(y.shape[-1], kernel_size=1, dtype=self.dtype, conv_impl=self.conv_impl)(x)
        return h + y if self.method == "sum" else jnp.concatenate([h, y], axis=-1)


# -------------------------------------------------------------------------- residual blocks


def _add_time_embedding(h, temb, act, dtype):
    # The time (and label) embedding, projected to the block's channels, added per channel.
    if temb is None:
        return h
    projection = nn.Dense(h.shape[-1], kernel_init=default_init(), dtype=dtype)(act(temb))
    return h + projection[:, None, None, :]


class Dropout(nn.Module):
    """Flax's ``nn.Dropout`` (the same mask from the same ``'dropout'`` key, the same output),
    with the mask kept in one byte per element for the backward pass. XLA fuses the draw's
    last steps into the mask's consumers, so that the backward pass otherwise keeps both of
    the threefry generator's 32-bit outputs alive, 8 bytes per element: at the end of the
    forward pass of EDM's DDPM++ (batch 8) 216 MiB. An integer division by a 1 known only at
    run time, which XLA computes once rather than in each consumer, stores the byte mask."""

    rate: float

    @nn.compact
    def __call__(self, inputs: jax.Array, deterministic: bool) -> jax.Array:
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        key = self.make_rng("dropout")
        mask = jax.random.bernoulli(key, p=keep_prob, shape=inputs.shape)
        # Exactly 1: 0 times a finite float (XLA does not fold it), the key's first word.
        one = (1.0 + 0.0 * jax.random.key_data(key).reshape(-1)[0].astype(jnp.float32)).astype(
            jnp.uint8
        )
        mask = (mask.astype(jnp.uint8) // one).astype(bool)
        return lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))


class _ResidualBlock(nn.Module):
    r"""What the residual blocks share: the residual branch from its first convolution,
    :math:`W_2 * \mathrm{drop}(\mathrm{act}(\mathrm{GN}(W_1 * h + V\,\mathrm{act}(e))))`, and
    the sum with the shortcut."""

    act: Callable[[jax.Array], jax.Array] = nn.swish
    out_ch: int | None = None
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    def conv(self, out_ch: int, **options) -> Conv:
        """A new convolution to ``out_ch`` channels in the block's dtype and implementation."""
        return Conv(out_ch, dtype=self.dtype, conv_impl=self.conv_impl, **options)

    def branch(
        self,
        h: jax.Array,
        temb: jax.Array | None,
        train: bool,
        out_ch: int,
        num_groups: int | None,
    ) -> jax.Array:
        """The residual branch from its first convolution, :math:`W_1` (init scale 1), to its
        last, :math:`W_2` (``init_scale``)."""
        h = self.conv(out_ch)(h)
        h = _add_time_embedding(h, temb, self.act, self.dtype)
        h = self.act(group_norm(h, num_groups, self.dtype))
        h = Dropout(self.dropout)(h, deterministic=not train)
        return self.conv(out_ch, init_scale=self.init_scale)(h)

    def skip_sum(self, x: jax.Array, h: jax.Array) -> jax.Array:
        r""":math:`x + h`, or :math:`(x + h)/\sqrt 2` with ``skip_rescale``."""
        return (x + h) * SKIP_SCALE if self.skip_rescale else x + h


class ResnetBlockDDPMpp(_ResidualBlock):
    r"""The residual block of DDPM (Ho et al. 2020), as used by DDPM++ (``resblock_type
    'ddpm'``):

    .. math::  h = W_2 * \mathrm{drop}(\mathrm{act}(\mathrm{GN}(W_1 * \mathrm{act}(\mathrm{GN}(x))
               + V\,\mathrm{act}(e)))),\qquad \text{out} = S x + h

    (or :math:`(Sx + h)/\sqrt 2` with ``skip_rescale``), :math:`e` the time embedding,
    :math:`W_2` initialised with ``init_scale`` and :math:`S` the identity, or a 1x1 (a 3x3
    with ``conv_shortcut``) convolution when the channels change; the 1x1 is the reference's
    NIN, initialised with scale ``NIN_INIT_SCALE`` (0.1). Ho et al.'s block is
    ``num_groups=32, skip_rescale=False, init_scale=0``.
    """

    conv_shortcut: bool = False
    num_groups: int | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        h = self.act(group_norm(x, self.num_groups, self.dtype))
        h = self.branch(h, temb, train, out_ch, self.num_groups)
        if x.shape[-1] != out_ch:
            if self.conv_shortcut:
                x = self.conv(out_ch, kernel_size=3)(x)
            else:
                x = self.conv(out_ch, kernel_size=1, init_scale=NIN_INIT_SCALE)(x)
        return self.skip_sum(x, h)


class ResnetBlockBigGANpp(_ResidualBlock):
    r"""The BigGAN-type residual block of NCSN++/DDPM++ (Brock et al. 2019; Song et al.
    2021, app. H), which can also up- or down-sample by 2 (``up``/``down``): the
    resampling (FIR if ``fir``, else nearest/average) is applied to both branches after
    the first normalisation,

    .. math::  h = W_2 * \mathrm{drop}(\mathrm{act}(\mathrm{GN}(W_1 * R(\mathrm{act}(\mathrm{GN}(x)))
               + V\,\mathrm{act}(e)))),\qquad \text{out} = (S R(x) + h) / \sqrt 2

    (without :math:`1/\sqrt 2` unless ``skip_rescale``), :math:`S` a 1x1 convolution when
    the channels change or the block resamples, else the identity.
    """

    skip_rescale: bool = True
    up: bool = False
    down: bool = False
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)

    def resample(self, x: jax.Array) -> jax.Array:
        """:math:`R`: up- (``up``) or down-sampling by 2, FIR if ``fir``."""
        if self.up:
            return upsample_2d(x, self.fir_kernel) if self.fir else naive_upsample_2d(x)
        return downsample_2d(x, self.fir_kernel) if self.fir else naive_downsample_2d(x)

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        out_ch = self.out_ch or x.shape[-1]
        h = self.act(group_norm(x, dtype=self.dtype))
        if self.up or self.down:
            h, x = self.resample(h), self.resample(x)
        h = self.branch(h, temb, train, out_ch, None)
        if x.shape[-1] != out_ch or self.up or self.down:
            x = self.conv(out_ch, kernel_size=1)(x)
        return self.skip_sum(x, h)
