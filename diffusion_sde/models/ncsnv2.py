r"""NCSNv2: the RefineNet score network of Song & Ermon (2020), "Improved techniques for
training score-based generative models".

The network is unconditional in the noise level except for its last step
(technique 3 of that paper): it predicts :math:`\sigma_i\, s_\theta(x, \sigma_i)` and
divides by :math:`\sigma_i`,

.. math::  s_\theta(x, i) = \mathrm{net}(x) / \sigma_i, \qquad
   \sigma_i = \sigma_{max} (\sigma_{min}/\sigma_{max})^{i/(N-1)},

with ``time_cond = i`` the index into the *descending* SMLD noise levels (label 0 is
``sigma_max``), which is what ``get_score_fn`` feeds for a discrete VE SDE.

Architecture (Lin et al. 2017, RefineNet, with the dilated ResNet encoder of NCSN):
a stack of pre-activation residual stages, each two :class:`ResidualBlock` s; the first
block of every stage after the first down-samples, by a mean pool when the stage is
undilated and by nothing (a dilated convolution keeps the size) when it is dilated.
A cascade of :class:`RefineBlock` s then fuses the stages from coarse to fine. The
stage layout follows the image size, as the reference's ``ncsnv2_64`` (under 96 px,
also used for 32 px CIFAR-10), ``ncsnv2_128`` (96--128 px) and ``ncsnv2_256``
(129--256 px) networks do. Normalisation is InstanceNorm++ (Song & Ermon 2019, eq. 8).

Where the 2021 reference's JAX port departs from the authors' PyTorch code
(``ermongroup/ncsnv2``, also the reference's PyTorch port), this follows the authors: the
third RefineBlock of the under-96-px network outputs ``nf`` channels (29,694,083
parameters on CIFAR-10; the JAX port's ``2 nf`` gives 33,970,563), every convolution has
PyTorch's default initialisation, and resizing is bilinear with aligned corners. As the
JAX port, InstanceNorm++ takes the biased variance of the channel means.

Config fields (``model.*``): ``nf``, ``nonlinearity`` (``elu``), ``normalization``
(``InstanceNorm++`` or ``InstanceNorm``), ``interpolation`` (``bilinear`` or
``nearest_neighbor``), ``scale_by_sigma``, ``centered``, ``sigma_min``, ``sigma_max``,
``num_scales``, ``num_classes`` (must be 0: NCSNv2 has no label path) and ``dtype``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde.models import common
from diffusion_sde.models.common import Activation
from diffusion_sde.models.layers import naive_downsample_2d

# (channel multiplier, down-sample?, dilation) of each residual stage, shallow to deep,
# and the output width (in units of nf) of the RefineBlock at each stage, for the
# reference's networks for images under 96 px, up to 128 px and up to 256 px.
_STAGES = {
    64: ((1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4)),
    128: ((1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4)),
    256: ((1, False, 1), (2, True, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4)),
}
_REFINE_FEATURES = {64: (1, 1, 2, 2), 128: (1, 1, 2, 2, 4), 256: (1, 1, 2, 2, 2, 4)}


def _pytorch_uniform(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default ``Conv2d`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), used
    for weights and biases by the original (PyTorch) NCSNv2."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class NCSNConv(nn.Module):
    """A ``kernel_size`` x ``kernel_size`` convolution with PyTorch's initialisation."""

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = _pytorch_uniform(self.kernel_size**2 * x.shape[-1])
        return nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            padding="SAME",
            kernel_dilation=self.dilation,
            use_bias=self.use_bias,
            kernel_init=init,
            bias_init=init,
            dtype=self.dtype,
        )(x)


class InstanceNormPlus(nn.Module):
    r"""InstanceNorm++ (Song & Ermon 2019, eq. 8): instance normalisation that keeps the
    relative means of the channels,

    .. math::  z_k = \gamma_k \frac{x_k - \mu_k}{s_k}
       + \beta_k + \gamma_k\alpha_k \frac{\mu_k - m}{v},

    with :math:`\mu_k, s_k` the spatial mean and std of channel ``k`` and :math:`m, v^2`
    the mean and (biased) variance of the :math:`\mu_k` over channels.
    """

    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale_init = lambda key, shape: 1.0 + 0.02 * jax.random.normal(key, shape)
        alpha = self.param("alpha", scale_init, (channels,))
        gamma = self.param("gamma", scale_init, (channels,))
        x32 = x.astype(jnp.float32)
        means = jnp.mean(x32, axis=(1, 2), keepdims=True)
        variances = jnp.var(x32, axis=(1, 2), keepdims=True)
        means_plus = (means - jnp.mean(means, axis=-1, keepdims=True)) / jnp.sqrt(
            jnp.var(means, axis=-1, keepdims=True) + 1e-5
        )
        h = (x32 - means) / jnp.sqrt(variances + 1e-5) + means_plus * alpha
        h = h * gamma
        if self.use_bias:
            h = h + self.param("beta", nn.initializers.zeros, (channels,))
        return h.astype(self.dtype)


class InstanceNorm(nn.Module):
    """Plain instance normalisation with a per-channel scale and bias."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
        h = (x32 - mean) / jnp.sqrt(jnp.var(x32, axis=(1, 2), keepdims=True) + 1e-5)
        h = h * self.param("scale", nn.initializers.ones, (channels,))
        h = h + self.param("bias", nn.initializers.zeros, (channels,))
        return h.astype(self.dtype)


NORMALIZATIONS: dict[str, type[nn.Module]] = {
    "InstanceNorm++": InstanceNormPlus,
    "InstanceNorm": InstanceNorm,
}


def _interpolation_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Linear interpolation weights (size_out, size_in) with aligned corners."""
    if size_in == 1 or size_out == 1:
        return np.full((size_out, size_in), 1.0 / size_in)
    position = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.minimum(np.floor(position).astype(int), size_in - 2)
    frac = position - low
    weights = np.zeros((size_out, size_in))
    weights[np.arange(size_out), low] = 1.0 - frac
    weights[np.arange(size_out), low + 1] = frac
    return weights


def resize(x: jax.Array, shape: Sequence[int], interpolation: str) -> jax.Array:
    """Resize NHWC ``x`` to spatial ``shape``: ``bilinear`` with aligned corners (as
    PyTorch's ``interpolate(..., align_corners=True)`` in the original NCSNv2), or
    ``nearest_neighbor``."""
    if tuple(x.shape[1:3]) == tuple(shape):
        return x
    if interpolation == "bilinear":
        rows = jnp.asarray(_interpolation_matrix(x.shape[1], shape[0]), x.dtype)
        cols = jnp.asarray(_interpolation_matrix(x.shape[2], shape[1]), x.dtype)
        return jnp.einsum("ih,jw,bhwc->bijc", rows, cols, x)
    if interpolation == "nearest_neighbor":
        return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), "nearest")
    raise ValueError(
        f"Unknown model.interpolation {interpolation!r}; valid: ['bilinear', 'nearest_neighbor']"
    )


class ResidualBlock(nn.Module):
    """Pre-activation residual block of the NCSNv2 encoder.

    ``norm -> act -> conv -> norm -> act -> conv`` plus a shortcut. With ``downsample``,
    an undilated block ends in a mean pool (``ConvMeanPool``) and a dilated one keeps the
    spatial size; the shortcut is a convolution whenever the shape changes.
    """

    features: int
    normalization: Callable[..., nn.Module]
    activation: Activation
    downsample: bool = False
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda features, **kw: NCSNConv(features, dtype=self.dtype, **kw)
        in_features = x.shape[-1]
        h = self.activation(self.normalization()(x))
        h = conv(in_features if self.downsample else self.features, dilation=self.dilation)(h)
        h = self.activation(self.normalization()(h))
        if self.downsample and self.dilation == 1:
            h = naive_downsample_2d(conv(self.features)(h))
            shortcut = naive_downsample_2d(conv(self.features, kernel_size=1)(x))
        else:
            h = conv(self.features, dilation=self.dilation)(h)
            if self.downsample or in_features != self.features:
                # A dilated block's shortcut is a dilated 3x3 convolution, else a 1x1.
                kernel_size = 3 if self.dilation > 1 else 1
                shortcut = conv(self.features, kernel_size=kernel_size, dilation=self.dilation)(x)
            else:
                shortcut = x
        return h + shortcut


class _RefineUnit(nn.Module):
    """The width and activation of the RefineNet units :class:`RCUBlock` and
    :class:`CRPBlock`, whose convolutions have no bias."""

    features: int
    activation: Activation


class RCUBlock(_RefineUnit):
    """Residual conv unit: ``n_blocks`` times ``x + (act -> conv)^n_stages (x)``."""

    n_blocks: int
    n_stages: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(self.n_blocks):
            residual = x
            for _ in range(self.n_stages):
                x = NCSNConv(self.features, use_bias=False, dtype=self.dtype)(self.activation(x))
            x = x + residual
        return x


class CRPBlock(_RefineUnit):
    """Chained residual pooling: ``x += conv(maxpool_5x5(path))``, ``n_stages`` times."""

    n_stages: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.activation(x)
        path = x
        for _ in range(self.n_stages):
            path = nn.max_pool(path, (5, 5), strides=(1, 1), padding="SAME")
            path = NCSNConv(self.features, use_bias=False, dtype=self.dtype)(path)
            x = path + x
        return x


class RefineBlock(nn.Module):
    """RefineNet block: an RCU per input, multi-resolution fusion (conv each input to
    ``features``, resize to ``output_shape``, sum), chained residual pooling, and an
    output RCU (three units in the last block)."""

    output_shape: Sequence[int]
    features: int
    activation: Activation
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, xs: Sequence[jax.Array]) -> jax.Array:
        hs = [RCUBlock(x.shape[-1], self.activation, n_blocks=2, dtype=self.dtype)(x) for x in xs]
        if self.start:
            h = hs[0]
        else:
            h = sum(
                resize(
                    NCSNConv(self.features, dtype=self.dtype)(h),
                    self.output_shape,
                    self.interpolation,
                )
                for h in hs
            )
        h = CRPBlock(self.features, self.activation, dtype=self.dtype)(h)
        n_blocks = 3 if self.end else 1
        return RCUBlock(self.features, self.activation, n_blocks=n_blocks, dtype=self.dtype)(h)


def _variant(image_size: int) -> int:
    """Which of the reference's NCSNv2 networks serves ``image_size``."""
    if image_size < 96:
        return 64
    if image_size <= 128:
        return 128
    if image_size <= 256:
        return 256
    raise ValueError(f"NCSNv2 is defined for images up to 256 px, got {image_size} px")


class NCSNv2(common.ScoreNetwork):
    """NCSNv2 score network; see the module docstring.

    ``__call__(x, time_cond, y=None, train=False)``: ``x`` (B, H, W, C), ``time_cond``
    (B,) discrete noise-level labels (index into the descending sigmas). ``y`` must be
    ``None`` and ``train`` has no effect (the network has no dropout).
    """

    def forward(
        self, x: jax.Array, time_cond: jax.Array, y: jax.Array | None, train: bool
    ) -> jax.Array:
        config = self.config
        if config.get("num_classes", 0) or y is not None:
            raise ValueError("NCSNv2 has no class-label path: num_classes must be 0, y None")
        nf = config.nf
        act, dtype = common.activation(config), common.compute_dtype(config)
        normalization = common.choose("normalization", config.normalization, NORMALIZATIONS)
        norm = functools.partial(normalization, dtype=dtype)
        variant = _variant(x.shape[1])

        h = NCSNConv(nf, dtype=dtype)(common.scale_input(config, x).astype(dtype))
        # ResNet encoder: two residual blocks per stage.
        layers = []
        for multiplier, downsample, dilation in _STAGES[variant]:
            for first in (True, False):
                h = ResidualBlock(
                    multiplier * nf,
                    norm,
                    act,
                    downsample=downsample and first,
                    dilation=dilation,
                    dtype=dtype,
                )(h)
            layers.append(h)
        # RefineNet decoder, deepest stage first.
        refined = None
        features = _REFINE_FEATURES[variant]
        for level in reversed(range(len(layers))):
            inputs = [layers[level]] if refined is None else [layers[level], refined]
            refined = RefineBlock(
                layers[level].shape[1:3],
                features[level] * nf,
                act,
                interpolation=config.interpolation,
                start=refined is None,
                end=level == 0,
                dtype=dtype,
            )(inputs)

        h = act(norm()(refined))
        h = NCSNConv(x.shape[-1], dtype=dtype)(h).astype(jnp.float32)
        if config.scale_by_sigma:
            h = common.divide_by_discrete_sigma(h, time_cond, config)
        return h
