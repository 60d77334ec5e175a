r"""2-D convolutions of NHWC images with HWIO kernels, in several interchangeable
implementations.

:func:`conv2d` computes the cross-correlation

.. math::  y_{b,i,j,o} = \sum_{u,v,c} \tilde x_{b,\,s i + u,\,s j + v,\,c}\; w_{u,v,c,o},

:math:`\tilde x` the zero-padded input and :math:`s` the stride. Every implementation
(``conv_impl``, one of :data:`CONV_IMPLS`) computes this sum, its reverse-mode gradients
and its forward-mode derivatives:

- ``"xla"``: ``lax.conv_general_dilated`` and XLA's own derivatives;
- ``"patches"``: im2col, the :math:`k_h k_w` shifted strided views of :math:`\tilde x` side
  by side in a ``(B, H', W', k_h k_w C)`` array times the kernel reshaped to
  ``(k_h k_w C, O)``: one matrix product, differentiated as such;
- ``"hybrid"``: XLA's convolution forward and for :math:`\partial L/\partial x` (its
  transposed convolution), and :math:`\partial L/\partial w_{u,v} = \sum_{b,i,j} \tilde
  x_{b,si+u,sj+v}^\top \partial L/\partial y_{b,i,j}`, one matrix product per kernel tap
  (a custom JVP);
- ``"winograd"``: 3x3, stride-1, SAME convolutions by Winograd's minimal filtering
  F(2x2, 3x3) (Lavin & Gray 2016): per overlapping 4x4 input tile :math:`d`,
  :math:`Y = A^\top [(G w G^\top) \odot (B^\top d B)] A`, the elementwise product being,
  over channels, 16 matrix products (2.25x fewer multiplications than direct summation);
  its derivatives by the same algorithm (a custom JVP); other convolutions as ``"hybrid"``;
- ``"winograd4"``: the same with F(4x4, 3x3): 6x6 tiles, 36 matrix products (4x fewer
  multiplications);
- ``"auto"``: on CPU, per convolution, the implementation chosen by the thresholds
  ``AUTO_WINOGRAD_*`` below (Winograd for wide 3x3 convolutions, ``"hybrid"`` for 1x1 ones,
  ``"xla"`` for the others); on GPU and TPU ``"xla"`` (cuDNN, the TPU convolution units).

Contract: every implementation equals ``lax.conv_general_dilated`` in values, gradients
and JVPs up to float32 round-off of differently ordered sums (about 1e-6 relative;
F(4x4, 3x3), whose transforms have larger coefficients, about 1e-5), for any input size,
stride and padding; the implementations take the same kernel, so a network's parameters
do not depend on ``conv_impl``. Forward mode stays available everywhere (custom JVPs, not
VJPs), as ``jax.linearize`` in likelihoods needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_sde.models.common import check_option

CONV_IMPLS = ("auto", "xla", "patches", "hybrid", "winograd", "winograd4")
# Image, kernel and output layouts of every convolution here.
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# Thresholds of "auto" on CPU. A 3x3 SAME convolution with at least
# AUTO_WINOGRAD_MIN_CHANNELS channels in and out, on images of at least
# AUTO_WINOGRAD_MIN_SIZE pixels a side, is computed by Winograd's algorithm: F(4x4, 3x3) from
# AUTO_WINOGRAD4_MIN_SIZE pixels a side in batches of at least AUTO_WINOGRAD4_MIN_PIXELS
# pixels, else F(2x2, 3x3) (on few pixels F(4x4)'s matrix products have too few rows). 1x1
# convolutions are "hybrid" (XLA's kernel gradient of a 1x1 convolution is slower than the
# one matrix product); all others "xla". Below the thresholds the matrix products of the
# tiled algorithms are too small to beat XLA's convolution. The values are where the
# implementations cross over in experiments/benchmarks/conv_layers.py (BigGAN residual
# blocks of 256 channels, forward and forward + backward) on a 2-core CPU, at the image
# sizes the networks use (32, 16 and 8 px); README.md lists the measured times.
AUTO_WINOGRAD_MIN_CHANNELS = 64
AUTO_WINOGRAD_MIN_SIZE = 16
AUTO_WINOGRAD4_MIN_SIZE = 32
AUTO_WINOGRAD4_MIN_PIXELS = 8192


def resolve_conv_impl(conv_impl: str) -> str:
    """Check a ``conv_impl`` name (one of :data:`CONV_IMPLS`; ``'auto'`` chooses per
    convolution and backend) and return it; a ``ValueError`` lists the valid names."""
    return check_option("conv_impl", conv_impl, CONV_IMPLS)


def _explicit_padding(x_shape, kernel_shape, stride, padding) -> tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], (stride, stride), padding)
    return tuple((int(low), int(high)) for low, high in padding)


def _conv_xla(x, kernel, stride, padding):
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=DIMENSION_NUMBERS
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


@dataclasses.dataclass(frozen=True)
class WinogradTransforms:
    r"""The matrices of Winograd's minimal filtering F(m x m, 3 x 3) (Lavin & Gray 2016).

    Per overlapping :math:`(m + 2) \times (m + 2)` input tile :math:`d` (stride :math:`m`)
    and 3x3 filter :math:`w`, the :math:`m \times m` output tile of the correlation is

    .. math::  Y = A^\top [(G w G^\top) \odot (B^\top d B)] A,

    :math:`(m + 2)^2` multiplications instead of :math:`9 m^2`; over channels, :math:`(m +
    2)^2` matrix products (a tile element of the input times one of the filter). F(2x2, 3x3)
    (points 0, 1, -1, inf) rounds like direct summation (1e-6 relative in float32); F(4x4,
    3x3) (points 0, 1, -1, 2, -2, inf) rounds at about 1e-5 relative.
    """

    m: int  # output tile size
    BT: np.ndarray  # (m + 2, m + 2) input transform
    G: np.ndarray  # (m + 2, 3) filter transform
    AT: np.ndarray  # (m, m + 2) output transform


# WINOGRAD[m]: the transforms of F(m x m, 3 x 3), m = 2 or 4.
WINOGRAD = {
    2: WinogradTransforms(
        2,
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], float),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], float),
    ),
    4: WinogradTransforms(
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
# slices and sums rather than sums of many padded copies, which XLA:CPU runs far slower.


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


def _winograd_tiles(x: jax.Array, F: WinogradTransforms, one) -> list[list[jax.Array]]:
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


def _winograd_filter(kernel: jax.Array, F: WinogradTransforms, one=None) -> list[list[jax.Array]]:
    """``U_rs = (G w G^T)_rs`` for a 3x3 HWIO kernel: ``(m+2)^2`` arrays ``(C, O)``, as one
    matrix product with ``G (x) G`` split into pieces. Its transpose concatenates the
    pieces' cotangents and multiplies by ``(G (x) G)^T``. For a kernel tangent, which
    reverse mode transposes, pass ``one``: the concatenation is then materialised, else XLA
    rewrites that product as a sum of ``(m+2)^2`` outer products fused elementwise, far
    slower."""
    n = F.G.shape[0]
    channels, features = kernel.shape[2:]
    G2 = jnp.asarray(np.kron(F.G, F.G), kernel.dtype)  # (n^2, 9): [r n + s, a 3 + b]
    U = G2 @ kernel.reshape(9, -1)
    U = lax.split(U if one is None else _materialise(U, one), [1] * n * n, axis=0)
    return [[U[r * n + s].reshape(channels, features) for s in range(n)] for r in range(n)]


def _winograd_output(M, F: WinogradTransforms, shape, one) -> jax.Array:
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


def _winograd_from_tiles(V, U, F: WinogradTransforms, shape, one) -> jax.Array:
    """The convolution, of output ``shape``, from the input tiles ``V`` of
    :func:`_winograd_tiles` and the filter's ``U`` of :func:`_winograd_filter`."""
    return _winograd_output(_winograd_products(V, U), F, shape, one)


def _winograd_conv_transpose(
    g: jax.Array, kernel: jax.Array, F: WinogradTransforms, one
) -> jax.Array:
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
    F, one = WINOGRAD[m], _runtime_one(kernel)
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
    F = WINOGRAD[m]
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

    :math:`\tilde x` the zero-padded input, :math:`s` = ``stride``. ``padding`` is
    ``"SAME"``, ``"VALID"`` or explicit ``((top, bottom), (left, right))``. ``conv_impl``
    names the implementation (see the module docstring); all compute the same sum and
    derivatives up to float32 round-off.
    """
    impl = _CONV_FUNCTIONS[resolve_conv_impl(conv_impl)]
    return impl(x, kernel, stride, _explicit_padding(x.shape, kernel.shape, stride, padding))
