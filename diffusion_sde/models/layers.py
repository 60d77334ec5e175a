r"""Building blocks of the score networks (NCSN++, DDPM++, DDPM, NCSNv2).

Every block is a Flax linen module (or a pure function) on NHWC images with float32
parameters and computation in ``dtype`` (float32 or bfloat16). The blocks follow the
architecture descriptions of

- Ho, Jain & Abbeel (2020), *Denoising Diffusion Probabilistic Models*, appendix B
  (residual blocks, self-attention, sinusoidal time embedding),
- Song et al. (2021), *Score-Based Generative Modeling through SDEs*, appendix H
  (NCSN++/DDPM++: BigGAN-type residual blocks, FIR resampling, skip rescaling by
  :math:`1/\sqrt 2`, Gaussian Fourier time features, progressive growing),
- Karras et al. (2020), *StyleGAN2*: FIR up/down-sampling through ``upfirdn2d``.

Initialisation follows the reference implementation: every convolution and dense kernel
is drawn from ``variance_scaling(scale, "fan_avg", "uniform")`` (:func:`default_init`),
biases are zero, and a block's last layer uses ``init_scale`` (0 in NCSN++/DDPM++, which
:func:`default_init` turns into ``1e-10`` so the block starts close to the identity).

Convolutions have several interchangeable implementations (``conv_impl``, see
:func:`conv2d`), equal up to float rounding and with the same parameters: ``"xla"``
(``lax.conv_general_dilated`` and its XLA gradients), ``"patches"`` (im2col and one matrix
product), ``"hybrid"`` (XLA's convolution forward and for the input gradient, the kernel
gradient as matrix products), ``"winograd"`` and ``"winograd4"`` (3x3 convolutions and their
gradients by Winograd's F(2x2, 3x3) and F(4x4, 3x3), 2.25x and 4x fewer multiplications,
as matrix products per tile element). ``"auto"`` (the default) picks what was measured
fastest on CPU (``experiments/benchmarks/networks.py``), and XLA's own convolutions
(cuDNN, the TPU convolution units) on accelerators.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
T = TypeVar("T")

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "elu": nn.elu,
    "relu": nn.relu,
    "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
}
DTYPES: dict[str, Dtype] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONV_IMPLS = ("auto", "xla", "patches", "hybrid", "winograd", "winograd4")
# 1/sqrt(2): the skip rescaling of NCSN++/DDPM++, keeping the variance of x + h at that of x.
SKIP_SCALE = 1.0 / math.sqrt(2.0)
# The reference initialises its 1x1 "NIN" projections (attention q, k, v and the DDPM
# block's channel-changing shortcut) with variance scale 0.1, its other layers with 1.
NIN_INIT_SCALE = 0.1
_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


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


def default_init(scale: float = 1.0) -> jax.nn.initializers.Initializer:
    r"""The reference initialiser: ``variance_scaling(scale, "fan_avg", "uniform")``.

    A kernel of fan-in :math:`n_i` and fan-out :math:`n_o` is drawn from
    :math:`U(-a, a)` with :math:`a^2 = 3\,\mathrm{scale} / ((n_i + n_o)/2)`. ``scale = 0``
    means ``1e-10`` (an almost-zero layer that still has a direction), as in the reference.
    """
    return jax.nn.initializers.variance_scaling(
        1e-10 if scale == 0 else scale, "fan_avg", "uniform"
    )


# ----------------------------------------------------------------------------- convolutions


def _explicit_padding(x_shape, kernel_shape, stride, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], (stride, stride), padding)
    return tuple((int(low), int(high)) for low, high in padding)


def _conv_xla(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSION_NUMBERS
    )


def _shifted_views(x, kernel_shape, stride, padding) -> list[jax.Array]:
    # The kh * kw views x~[:, s i + u, s j + v, :] of the padded input, ordered (u, v).
    kh, kw = kernel_shape[:2]
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    return [
        x[:, u : u + stride * (out_h - 1) + 1 : stride, v : v + stride * (out_w - 1) + 1 : stride]
        for u in range(kh)
        for v in range(kw)
    ]


def _conv_patches(x, kernel, stride, padding):
    features = kernel.shape[-1]
    if kernel.shape[:2] == (1, 1) and stride == 1 and padding == ((0, 0), (0, 0)):
        return x @ kernel.reshape(-1, features)
    # (B, H', W', kh kw C), ordered (u, v, c) as kernel.reshape(kh kw C, O) is.
    patches = jnp.concatenate(_shifted_views(x, kernel.shape, stride, padding), axis=-1)
    return patches @ kernel.reshape(-1, features)


def _conv_per_tap(x, kernel, stride, padding):
    # sum_{u,v} x~[:, s i + u, s j + v, :] w_{u,v}: one (pixels, C) x (C, O) matrix product
    # per kernel tap; transposed, x~_{u,v}^T dL/dy for the kernel gradient.
    channels, features = kernel.shape[2:]
    views = _shifted_views(x, kernel.shape, stride, padding)
    taps = kernel.reshape(-1, channels, features)
    y = functools.reduce(
        jnp.add, [view.reshape(-1, channels) @ tap for view, tap in zip(views, taps, strict=True)]
    )
    return y.reshape(*views[0].shape[:3], features)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _conv_hybrid(x, kernel, stride, padding):
    return _conv_xla(x, kernel, stride, padding)


@functools.partial(_conv_hybrid.defjvp, symbolic_zeros=True)
def _conv_hybrid_jvp(stride, padding, primals, tangents):
    # The convolution is bilinear: dy = conv(dx, w) + conv(x, dw). Reverse mode transposes
    # this: dL/dx by XLA's transposed convolution (as fast as its forward one), dL/dw as
    # one matrix product per tap, x~_{u,v}^T dL/dy, where XLA's CPU kernel-gradient
    # convolution is slow. A custom JVP rather than VJP keeps forward mode (jax.linearize,
    # used for likelihoods) available.
    x, kernel = primals
    dx, dkernel = tangents
    y = _conv_xla(x, kernel, stride, padding)
    dy = jnp.zeros_like(y)
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        dy = dy + _conv_xla(dx, kernel, stride, padding)
    if not isinstance(dkernel, jax.custom_derivatives.SymbolicZero):
        dy = dy + _conv_per_tap(x, dkernel, stride, padding)
    return y, dy


# Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016). Per overlapping
# (m + 2) x (m + 2) input tile d (stride m) and 3 x 3 filter w, the m x m output tile is
#     Y = A^T [(G w G^T) * (B^T d B)] A,
# "*" elementwise: (m + 2)^2 multiplications instead of 9 m^2, and over channels
# (m + 2)^2 matrix products (tile element of the input) x (tile element of the filter).
# F(2x2, 3x3) (points 0, 1, -1, inf) saves 2.25x and rounds like direct summation (1e-6
# relative in float32); F(4x4, 3x3) (points 0, 1, -1, 2, -2, inf) saves 4x and its
# transforms round at about 1e-5 relative.
@dataclasses.dataclass(frozen=True)
class _Winograd:
    m: int  # output tile size
    BT: np.ndarray  # (m + 2, m + 2) input transform
    G: np.ndarray  # (m + 2, 3) filter transform
    AT: np.ndarray  # (m, m + 2) output transform


_WINOGRAD = {
    2: _Winograd(
        2,
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float),
    ),
    4: _Winograd(
        4,
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ],
            float,
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ]
        ),
        np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
            float,
        ),
    ),
}


def _linear_combination(arrays, coefficients):
    terms = [
        a if c == 1 else -a if c == -1 else float(c) * a
        for c, a in zip(coefficients, arrays, strict=True)
        if c != 0
    ]
    return functools.reduce(jnp.add, terms)


def _pad_axis(a: jax.Array, axis: int, low: int, high: int) -> jax.Array:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (low, high)
    return jnp.pad(a, widths)


def _materialise(arrays, one: jax.Array):
    """``arrays`` unchanged, but computed once and stored. XLA fuses cheap elementwise
    producers into each of their consumers, so a first-stage array read by several second-
    stage ones would be recomputed by each (and ``lax.optimization_barrier`` does not stop
    fusion on CPU); a division is "expensive", and XLA does not duplicate it. Dividing by a
    1 known only at run time (:func:`_runtime_one`) is exact, and JAX transposes it to a
    division of the cotangent, so the reverse pass is materialised at the same places."""
    return jax.tree.map(lambda a: a / one, arrays)


def _runtime_one(kernel: jax.Array) -> jax.Array:
    # Exactly 1 for a finite kernel (XLA does not fold 0 * x for floats: x may be NaN).
    return 1 + 0 * lax.stop_gradient(kernel[0, 0, 0, 0])


# The transforms are separable: along rows, then along columns. Each 1-D stage is written
# out as unit-stride slices and sums of a few arrays (XLA fuses and vectorises them over
# channels); its transpose is written out too, so that JAX's transposes of both are again
# slices and sums rather than sums of many padded copies, which XLA:CPU runs 10-30x slower.


def _tiles_1d(x: jax.Array, BT: np.ndarray, m: int, axis: int) -> list[jax.Array]:
    """``z_r[i] = sum_a BT[r, a] x[m i + a]`` (tile ``i``'s element ``r``) along ``axis``,
    of length ``m (T + 1)``: ``m + 2`` arrays with ``T`` there."""
    tiles = x.shape[axis] // m - 1
    blocks = x.reshape(*x.shape[:axis], tiles + 1, m, *x.shape[axis + 1 :])
    # Element a of tile i is element a % m of block i + a // m.
    pieces = [
        lax.index_in_dim(
            lax.slice_in_dim(blocks, a // m, a // m + tiles, axis=axis), a % m, axis + 1, False
        )
        for a in range(BT.shape[0])
    ]
    return [_linear_combination(pieces, row) for row in BT]


def _tiles_1d_transpose(z: Sequence[jax.Array], BT: np.ndarray, m: int, axis: int) -> jax.Array:
    """The transpose of :func:`_tiles_1d`: overlapping tiles summed back into place."""
    pieces = [_linear_combination(z, column) for column in BT.T]
    # Block j's element p is element p of tile j and, for p < 2, element m + p of tile j - 1.
    columns = [_pad_axis(pieces[p], axis, 0, 1) for p in range(m)]
    for p in range(len(pieces) - m):
        columns[p] = columns[p] + _pad_axis(pieces[m + p], axis, 1, 0)
    blocks = jnp.stack(columns, axis=axis + 1)
    return blocks.reshape(*blocks.shape[:axis], -1, *blocks.shape[axis + 2 :])


def _untile_1d(z: Sequence[jax.Array], AT: np.ndarray, axis: int) -> jax.Array:
    """``y[m i + j] = sum_r AT[j, r] z_r[i]``: output tiles side by side along ``axis``."""
    y = jnp.stack([_linear_combination(z, row) for row in AT], axis=axis + 1)
    return y.reshape(*y.shape[:axis], -1, *y.shape[axis + 2 :])


def _untile_1d_transpose(y: jax.Array, AT: np.ndarray, axis: int) -> list[jax.Array]:
    """The transpose of :func:`_untile_1d`."""
    m = AT.shape[0]
    y = y.reshape(*y.shape[:axis], -1, m, *y.shape[axis + 1 :])
    # lax.split, not slices: JAX transposes it to a concatenation, slices to padded sums.
    pieces = [p.squeeze(axis + 1) for p in lax.split(y, [1] * m, axis=axis + 1)]
    return [_linear_combination(pieces, column) for column in AT.T]


def _winograd_tiles(x: jax.Array, F: _Winograd, one) -> list[list[jax.Array]]:
    """``V_rs = (B^T d B)_rs`` for every tile ``d`` of the SAME-padded input: ``(m+2)^2``
    arrays ``(B * tiles_h * tiles_w, C)``."""
    batch, height, width, channels = x.shape
    tiles_h, tiles_w = -(-height // F.m), -(-width // F.m)
    padding = ((0, 0), (1, F.m * (tiles_h + 1) - height - 1), (1, F.m * (tiles_w + 1) - width - 1))
    x = jnp.pad(x, (*padding, (0, 0)))
    return [
        [v.reshape(-1, channels) for v in _tiles_1d(rows, F.BT, F.m, 2)]
        for rows in _materialise(_tiles_1d(x, F.BT, F.m, 1), one)
    ]


def _winograd_filter(kernel: jax.Array, F: _Winograd, one=None) -> list[list[jax.Array]]:
    """``U_rs = (G w G^T)_rs`` for a 3x3 HWIO kernel: ``(m+2)^2`` arrays ``(C, O)``, as one
    matrix product with ``G (x) G`` split into pieces. Its transpose concatenates the
    pieces' cotangents and multiplies by ``(G (x) G)^T``. For a kernel tangent, which
    reverse mode transposes, pass ``one``: the concatenation is then materialised, else XLA
    rewrites that product as a sum of ``(m+2)^2`` outer products fused elementwise (3-8x
    slower)."""
    n = F.G.shape[0]
    channels, features = kernel.shape[2:]
    G2 = jnp.asarray(np.kron(F.G, F.G), kernel.dtype)  # (n^2, 9): [r n + s, a 3 + b]
    U = G2 @ kernel.reshape(9, -1)
    U = lax.split(U if one is None else _materialise(U, one), [1] * n * n, axis=0)
    return [[U[r * n + s].reshape(channels, features) for s in range(n)] for r in range(n)]


def _winograd_output(M, F: _Winograd, shape, one) -> jax.Array:
    """``Y = A^T M A`` per tile, the tiles side by side, cropped to ``shape`` (B, H, W, O)."""
    batch, height, width, features = shape
    tiles = (batch, -(-height // F.m), -(-width // F.m), features)
    rows = _materialise([_untile_1d([v.reshape(tiles) for v in row], F.AT, 2) for row in M], one)
    return _untile_1d(rows, F.AT, 1)[:, :height, :width]


def _winograd_products(V, U):
    return [
        [v @ u for v, u in zip(v_row, u_row, strict=True)]
        for v_row, u_row in zip(V, U, strict=True)
    ]


def _winograd_from_tiles(V, U, F: _Winograd, shape, one) -> jax.Array:
    """The convolution, of output ``shape``, from the input tiles ``V`` of
    :func:`_winograd_tiles` and the filter's ``U`` of :func:`_winograd_filter`."""
    return _winograd_output(_winograd_products(V, U), F, shape, one)


def _winograd_conv_transpose(g: jax.Array, kernel: jax.Array, F: _Winograd, one) -> jax.Array:
    """The transpose in ``x`` of ``x -> conv(x, kernel)`` applied to ``g`` (the input
    gradient), each Winograd step transposed: output transform, products, input transform."""
    batch, height, width, features = g.shape
    channels = kernel.shape[2]
    tiles_h, tiles_w = -(-height // F.m), -(-width // F.m)
    g = _materialise(g, one)  # in reverse mode: dL/dx, computed once
    g = jnp.pad(g, ((0, 0), (0, F.m * tiles_h - height), (0, F.m * tiles_w - width), (0, 0)))
    dP = _materialise(_untile_1d_transpose(g, F.AT, 1), one)
    dM = [_untile_1d_transpose(rows, F.AT, 2) for rows in dP]
    U = _winograd_filter(kernel, F)
    dV = [
        [
            (dm.reshape(-1, features) @ u.T).reshape(batch, tiles_h, tiles_w, channels)
            for dm, u in zip(dm_row, u_row, strict=True)
        ]
        for dm_row, u_row in zip(dM, U, strict=True)
    ]
    dR = _materialise([_tiles_1d_transpose(row, F.BT, F.m, 2) for row in dV], one)
    dx = _tiles_1d_transpose(dR, F.BT, F.m, 1)
    return dx[:, 1 : 1 + height, 1 : 1 + width]


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv3x3_winograd(x: jax.Array, kernel: jax.Array, m: int) -> jax.Array:
    F, one = _WINOGRAD[m], _runtime_one(kernel)
    shape = (*x.shape[:3], kernel.shape[-1])
    V, U = _winograd_tiles(x, F, one), _winograd_filter(kernel, F)
    return _materialise(_winograd_from_tiles(V, U, F, shape, one), one)


@functools.partial(_conv3x3_winograd.defjvp, symbolic_zeros=True)
def _conv3x3_winograd_jvp(m, primals, tangents):
    # dy = conv(dx, w) + conv(x, dw), both by Winograd. conv(dx, w) is written as the
    # transposed algorithm applied to the flipped kernel (a 3x3 SAME convolution's transpose
    # is the convolution with w[2 - u, 2 - v] and channels swapped), so that reverse mode,
    # transposing it, computes dL/dx by the forward algorithm. conv(x, dw) reuses the input
    # tiles V: its transpose, dL/dU_rs = V_rs^T dL/dM_rs, is a matrix product per tile element.
    # A custom JVP (not VJP) keeps forward mode, jax.linearize in likelihoods, available.
    # y, dy and dx are materialised: in reverse mode the cotangents of y (read by both
    # branches) and of x (the last stage of the input gradient) are then computed once,
    # where XLA would otherwise fuse the whole chain of downstream cotangents (the residual
    # stream's, through every later block) into each first-stage array, and recompute it.
    F = _WINOGRAD[m]
    x, kernel = primals
    dx, dkernel = tangents
    shape = (*x.shape[:3], kernel.shape[-1])
    one = _runtime_one(kernel)
    V = _winograd_tiles(x, F, one)
    y = _materialise(_winograd_from_tiles(V, _winograd_filter(kernel, F), F, shape, one), one)
    dy = jnp.zeros_like(y)
    if not isinstance(dx, jax.custom_derivatives.SymbolicZero):
        flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
        dy = dy + _winograd_conv_transpose(dx, flipped, F, one)
    if not isinstance(dkernel, jax.custom_derivatives.SymbolicZero):
        dy = dy + _winograd_from_tiles(V, _winograd_filter(dkernel, F, one), F, shape, one)
    return y, _materialise(dy, one)


def _is_3x3_same(kernel, stride, padding) -> bool:
    return kernel.shape[:2] == (3, 3) and stride == 1 and padding == ((1, 1), (1, 1))


def _conv_winograd(x, kernel, stride, padding, m=2):
    if _is_3x3_same(kernel, stride, padding):
        return _conv3x3_winograd(x, kernel, m)
    return _conv_hybrid(x, kernel, stride, padding)


# "auto" on CPU: 3x3 SAME convolutions with at least AUTO_WINOGRAD_MIN_CHANNELS channels in
# and out by Winograd, F(4x4, 3x3) on images of at least AUTO_WINOGRAD4_MIN_SIZE pixels a
# side in batches of at least AUTO_WINOGRAD4_MIN_PIXELS pixels (at 32x32x256, batch 1 and 2,
# F(2x2) is faster: its matrix products have 4x more rows), F(2x2, 3x3) from
# AUTO_WINOGRAD_MIN_SIZE; 1x1 convolutions as "hybrid" (XLA's kernel gradient of a 1x1
# convolution is 2x slower than the one matrix product); the others as "xla". Measured on
# a 2-core CPU with experiments/benchmarks/conv_layers.py (four BigGAN residual blocks, 256
# channels, batch 8; milliseconds forward / forward + backward with dropout): at 32x32 xla
# 595 / 2000, F(4x4) 223 / 776-1019; at 16x16 xla 121 / 470, F(2x2) 86 / 311, F(4x4)
# 95 / 280 (a tie within this machine's noise); at 8x8 xla 30 / 107, F(2x2) 41 / 116,
# hybrid 35 / 131 (the matrix products have too few rows there).
AUTO_WINOGRAD_MIN_CHANNELS = 64
AUTO_WINOGRAD_MIN_SIZE = 16
AUTO_WINOGRAD4_MIN_SIZE = 32
AUTO_WINOGRAD4_MIN_PIXELS = 8192


def _conv_auto(x, kernel, stride, padding):
    if jax.default_backend() != "cpu":
        return _conv_xla(x, kernel, stride, padding)
    size = min(x.shape[1:3])
    if (
        _is_3x3_same(kernel, stride, padding)
        and min(kernel.shape[2:]) >= AUTO_WINOGRAD_MIN_CHANNELS
        and size >= AUTO_WINOGRAD_MIN_SIZE
    ):
        pixels = x.shape[0] * x.shape[1] * x.shape[2]
        large = size >= AUTO_WINOGRAD4_MIN_SIZE and pixels >= AUTO_WINOGRAD4_MIN_PIXELS
        return _conv3x3_winograd(x, kernel, 4 if large else 2)
    if kernel.shape[:2] == (1, 1):
        return _conv_hybrid(x, kernel, stride, padding)
    return _conv_xla(x, kernel, stride, padding)


_CONV_FUNCTIONS = {
    "auto": _conv_auto,
    "xla": _conv_xla,
    "patches": _conv_patches,
    "hybrid": _conv_hybrid,
    "winograd": _conv_winograd,
    "winograd4": functools.partial(_conv_winograd, m=4),
}


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: str | Sequence[tuple[int, int]] = "SAME",
    conv_impl: str = "xla",
) -> jax.Array:
    r"""2-D cross-correlation of NHWC ``x`` with an HWIO ``kernel``:

    .. math::  y_{b,i,j,o} = \sum_{u,v,c} \tilde x_{b,\,s i + u,\,s j + v,\,c}\; w_{u,v,c,o},

    :math:`\tilde x` the zero-padded input, :math:`s` the stride. ``padding`` is
    ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``. The
    implementations (``conv_impl``) compute the same sum and its gradients:

    - ``"xla"``: ``lax.conv_general_dilated`` and XLA's own gradients;
    - ``"patches"``: im2col, the :math:`k_h k_w` shifted strided views of :math:`\tilde x`
      side by side in a ``(B, H', W', k_h k_w C)`` array times the kernel reshaped to
      ``(k_h k_w C, O)``, one matrix product, differentiated as such;
    - ``"hybrid"``: the XLA convolution forward and for :math:`\partial L/\partial x`,
      and :math:`\partial L/\partial w_{u,v} = \sum_{b,i,j} \tilde x_{b,si+u,sj+v}^\top
      \partial L/\partial y_{b,i,j}` as one matrix product per tap (a custom JVP);
    - ``"winograd"``: 3x3, stride 1, SAME convolutions by Winograd's minimal filtering
      F(2x2, 3x3) (Lavin & Gray 2016): per overlapping 4x4 input tile :math:`d`,
      :math:`Y = A^\top [(G w G^\top) \odot (B^\top d B)] A`, the elementwise product
      being, over channels, 16 matrix products (2.25x fewer multiplications); its
      gradients by the same algorithm (a custom JVP); other convolutions as ``"hybrid"``.
      Rounding differs from direct summation by about 1e-6 relative in float32;
    - ``"winograd4"``: the same with F(4x4, 3x3), 6x6 tiles and 36 matrix products (4x
      fewer multiplications), rounding at about 1e-5 relative in float32;
    - ``"auto"``: on CPU ``"winograd4"``/``"winograd"`` for 3x3 convolutions with enough
      channels, ``"hybrid"`` for 1x1 convolutions and ``"xla"`` for the others, the
      fastest measured there; ``"xla"`` on GPU and TPU.
    """
    impl = choose("conv_impl", conv_impl, _CONV_FUNCTIONS)
    return impl(x, kernel, stride, _explicit_padding(x.shape, kernel.shape, stride, padding))


class Conv(nn.Module):
    """A ``kernel_size`` x ``kernel_size`` convolution with SAME padding (``conv3x3``,
    ``conv1x1`` and the NIN layers of the reference; a 1x1 convolution *is* NIN),
    kernel initialised by :func:`default_init` (``init_scale``) and a zero bias."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel", default_init(self.init_scale), (k, k, x.shape[-1], self.features)
        )
        y = conv2d(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            stride=self.stride,
            conv_impl=self.conv_impl,
        )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


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
        dimension_numbers=_DIMENSION_NUMBERS,
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


class FIRConv(nn.Module):
    """A convolution fused with FIR up- (``up``) or down-sampling (``down``) by 2
    (the reference's ``up_or_down_sampling.Conv2d``), same parameters as :class:`Conv`."""

    features: int
    kernel_size: int = 3
    up: bool = False
    down: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    use_bias: bool = True
    init_scale: float = 1.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.up == self.down:
            raise ValueError("FIRConv resamples: set exactly one of up and down")
        k = self.kernel_size
        kernel = self.param(
            "kernel", default_init(self.init_scale), (k, k, x.shape[-1], self.features)
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if self.up:
            y = upsample_conv_2d(x, kernel, self.fir_kernel)
        else:
            y = conv_downsample_2d(x, kernel, self.fir_kernel, conv_impl=self.conv_impl)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


class Upsample(nn.Module):
    """Upsampling by 2: nearest neighbour (then a 3x3 convolution if ``with_conv``), as in
    DDPM; or, with ``fir``, FIR upsampling (fused with the convolution if ``with_conv``)."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

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


class Downsample(nn.Module):
    """Downsampling by 2: a 3x3 convolution of stride 2 if ``with_conv`` else 2x2 average
    pooling, as in DDPM; or, with ``fir``, FIR downsampling (fused with the convolution if
    ``with_conv``)."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

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


# ------------------------------------------------------------------------ time embeddings


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


# ------------------------------------------------------------------ normalisation, attention


def group_norm(x: jax.Array, num_groups: int | None = None, dtype: Dtype = jnp.float32):
    """Group normalisation (Wu & He 2018) with a learnt scale and shift; ``num_groups=None``
    means the reference's ``min(C // 4, 32)``. Statistics are computed in float32. Call
    inside a compact method (it creates an ``nn.GroupNorm`` submodule)."""
    groups = num_groups if num_groups is not None else min(x.shape[-1] // 4, 32)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=dtype)(x)


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


class ResnetBlockDDPMpp(nn.Module):
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

    act: Callable[[jax.Array], jax.Array] = nn.swish
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    num_groups: int | None = None
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        C = x.shape[-1]
        out_ch = self.out_ch or C
        conv = functools.partial(Conv, out_ch, dtype=self.dtype, conv_impl=self.conv_impl)
        h = self.act(group_norm(x, self.num_groups, self.dtype))
        h = conv()(h)
        h = _add_time_embedding(h, temb, self.act, self.dtype)
        h = self.act(group_norm(h, self.num_groups, self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(init_scale=self.init_scale)(h)
        if C != out_ch:
            if self.conv_shortcut:
                x = conv(kernel_size=3)(x)
            else:
                x = conv(kernel_size=1, init_scale=NIN_INIT_SCALE)(x)
        return (x + h) * SKIP_SCALE if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
    r"""The BigGAN-type residual block of NCSN++/DDPM++ (Brock et al. 2019; Song et al.
    2021, app. H), which can also up- or down-sample by 2 (``up``/``down``): the
    resampling (FIR if ``fir``, else nearest/average) is applied to both branches after
    the first normalisation,

    .. math::  h = W_2 * \mathrm{drop}(\mathrm{act}(\mathrm{GN}(W_1 * R(\mathrm{act}(\mathrm{GN}(x)))
               + V\,\mathrm{act}(e)))),\qquad \text{out} = (S R(x) + h) / \sqrt 2

    (without :math:`1/\sqrt 2` unless ``skip_rescale``), :math:`S` a 1x1 convolution when
    the channels change or the block resamples, else the identity.
    """

    act: Callable[[jax.Array], jax.Array] = nn.swish
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: Sequence[float] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        C = x.shape[-1]
        out_ch = self.out_ch or C
        conv = functools.partial(Conv, out_ch, dtype=self.dtype, conv_impl=self.conv_impl)
        h = self.act(group_norm(x, dtype=self.dtype))
        if self.up:
            resample = (
                functools.partial(upsample_2d, fir_kernel=self.fir_kernel)
                if self.fir
                else naive_upsample_2d
            )
            h, x = resample(h), resample(x)
        elif self.down:
            resample = (
                functools.partial(downsample_2d, fir_kernel=self.fir_kernel)
                if self.fir
                else naive_downsample_2d
            )
            h, x = resample(h), resample(x)
        h = conv()(h)
        h = _add_time_embedding(h, temb, self.act, self.dtype)
        h = self.act(group_norm(h, dtype=self.dtype))
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = conv(init_scale=self.init_scale)(h)
        if C != out_ch or self.up or self.down:
            x = conv(kernel_size=1)(x)
        return (x + h) * SKIP_SCALE if self.skip_rescale else x + h
