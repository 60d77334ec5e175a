"""NCSN++/DDPM++ (models/ncsnpp.py), its building blocks (models/layers.py), the
convolutions (models/convolution.py) and the time embeddings (models/common.py).

Faithfulness: the parameter counts of the paper's CIFAR-10 architectures, counted by an
independent reimplementation, are reproduced exactly; the Fourier frequencies
are a fixed buffer and not counted. Shapes of every option combination are checked by
tracing only (``jax.eval_shape``); a few small real forward passes check behaviour.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde.models import common, convolution, layers
from diffusion_sde.models.ncsnpp import NCSNpp
from diffusion_sde.sde import VESDE

DDPMPP = dict(
    nf=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=4,
    attn_resolutions=(16,),
    dropout=0.1,
    resamp_with_conv=True,
    conditional=True,
    fir=False,
    fir_kernel=(1, 3, 3, 1),
    skip_rescale=True,
    resblock_type="biggan",
    progressive="none",
    progressive_input="none",
    progressive_combine="sum",
    embedding_type="positional",
    fourier_scale=16.0,
    init_scale=0.0,
    scale_by_sigma=False,
    nonlinearity="swish",
    centered=False,
    num_classes=0,
    dtype="float32",
    conv_impl="xla",  # parameters are the same for every implementation; XLA traces fastest
    sigma_min=0.01,
    sigma_max=50.0,
    num_scales=1000,
    image_size=32,
)
NCSNPP = dict(
    DDPMPP,
    embedding_type="fourier",
    fir=True,
    progressive_input="residual",
    scale_by_sigma=True,
)
# Small networks: levels at 8x8 and 4x4, attention at 4x4.
SMALL = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), image_size=8)


def model_config(base=DDPMPP, **overrides) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(base, name="ncsnpp", **overrides))


def small_config(**overrides) -> ml_collections.ConfigDict:
    # init_scale=1 so that the output is not ~1e-10 and differences are visible.
    return model_config(**dict(SMALL, init_scale=1.0, **overrides))


def count_params(variables) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def time_labels(config, batch):
    # A sigma for Fourier features (it takes the log), an integer noise index otherwise.
    if config.embedding_type == "fourier":
        return jnp.linspace(0.1, 10.0, batch)
    return jnp.linspace(0.0, 999.0, batch).round()


def small_inputs(config, batch=2, channels=3):
    x = jax.random.uniform(jax.random.key(1), (batch, 8, 8, channels))
    return x, time_labels(config, batch)


# ------------------------------------------------------------------------- faithfulness


@pytest.mark.parametrize(
    "name, config, expected",
    [
        ("DDPM++", model_config(), 61_804_419),
        ("DDPM++ deep", model_config(num_res_blocks=8), 106_632_579),
        ("NCSN++", model_config(NCSNPP), 62_758_787),
        ("NCSN++ deep", model_config(NCSNPP, num_res_blocks=8), 107_586_947),
        ("DDPM++ (EDM)", model_config(ch_mult=(2, 2, 2)), 55_732_739),
    ],
)
def test_parameter_counts_match_reference(name, config, expected):
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    variables = jax.eval_shape(NCSNpp(config=config).init, jax.random.key(0), x, t)
    assert list(variables) == ["params"], "only trainable parameters, no buffers or stats"
    assert count_params(variables) == expected, name


def test_parameters_are_float32_and_output_float32_in_bfloat16():
    config = small_config(dtype="bfloat16")
    x, t = small_inputs(config)
    out, variables = jax.eval_shape(NCSNpp(config=config).init_with_output, jax.random.key(0), x, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    assert out.dtype == jnp.float32


# ------------------------------------------------------------------ shapes of all options

# Combine is used by the input_skip pyramid only, so it varies with it.
_INPUT_PYRAMIDS = [
    ("none", "sum"),
    ("input_skip", "sum"),
    ("input_skip", "cat"),
    ("residual", "sum"),
]
_SHAPE_CASES = list(
    itertools.product(
        ("ddpm", "biggan"), ("none", "output_skip", "residual"), _INPUT_PYRAMIDS, (False, True)
    )
)


def test_output_shapes_of_every_option_combination():
    # Options orthogonal to the architecture's wiring vary along the cases (each value of
    # each is covered many times) rather than multiplying them.
    for i, (resblock_type, progressive, (progressive_input, combine), fir) in enumerate(
        _SHAPE_CASES
    ):
        config = small_config(
            resblock_type=resblock_type,
            progressive=progressive,
            progressive_input=progressive_input,
            progressive_combine=combine,
            fir=fir,
            embedding_type=("positional", "fourier")[i % 2],
            conditional=i % 3 != 2,
            resamp_with_conv=i % 4 != 3,
            scale_by_sigma=i % 5 < 2,
            skip_rescale=i % 6 != 5,
            centered=i % 2 == 0,
            num_classes=(0, 10)[(i // 2) % 2],
            dtype=("float32", "bfloat16")[(i // 3) % 2],
        )
        channels = (3, 1)[(i // 4) % 2]
        x, t = small_inputs(config, batch=2, channels=channels)
        y = jnp.array([0, 10]) if config.num_classes and i % 3 == 0 else None
        out, variables = jax.eval_shape(
            NCSNpp(config=config).init_with_output, jax.random.key(0), x, t, y
        )
        assert out.shape == x.shape and out.dtype == jnp.float32, config
        assert count_params(variables) > 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("resblock_type", "resnet"),
        ("progressive", "input_skip"),
        ("progressive_input", "output_skip"),
        ("progressive_combine", "mean"),
        ("embedding_type", "learned"),
        ("nonlinearity", "gelu"),
        ("dtype", "float16"),
        ("conv_impl", "cudnn"),
    ],
)
def test_unknown_option_values_raise_listing_valid_ones(field, value):
    config = small_config(**{field: value})
    x, t = small_inputs(config)
    with pytest.raises(ValueError, match=rf"unknown {field} '{value}'; valid: '"):
        jax.eval_shape(NCSNpp(config=config).init, jax.random.key(0), x, t)


def test_labels_need_num_classes():
    config = small_config()
    x, t = small_inputs(config)
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(NCSNpp(config=config).init, jax.random.key(0), x, t, jnp.array([0, 1]))


# ------------------------------------------------------------------- real forward passes
# Each compilation of even a small network costs seconds on CPU, so the tests share a few
# networks and reuse their parameters for variants with the same parameter structure.

# One network that uses every kind of layer: FIR convolutions, both pyramids, Fourier
# features, class labels (3 classes and the null label 3) and dropout.
FULL = dict(
    fir=True,
    progressive="residual",
    progressive_input="residual",
    embedding_type="fourier",
    num_classes=3,
    dropout=0.5,
)


@functools.cache
def jitted_apply(**overrides):
    return jax.jit(NCSNpp(config=small_config(**overrides)).apply, static_argnames="train")


def random_variables(model, x, t, seed=0):
    """Parameters of the structure ``model.init`` gives, drawn with numpy: compiling
    ``model.init`` (one threefry per parameter) takes far longer than the network itself.
    Kernels have unit fan-in variance and norms are perturbed, so that every path matters."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if leaf.ndim >= 2:
            return rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        offset = 1.0 if path[-1].key == "scale" else 0.0
        return offset + 0.1 * rng.normal(size=leaf.shape)

    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.asarray(draw(path, leaf), leaf.dtype), shapes
    )


@functools.cache
def small_network(**overrides):
    """A small network's config, jitted ``apply``, parameters and inputs (cached)."""
    config = small_config(**overrides)
    x, t = small_inputs(config, batch=3)
    variables = random_variables(NCSNpp(config=config), x, t)
    return config, jitted_apply(**overrides), variables, x, t


def relative_difference(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize(
    "options", [FULL, dict(embedding_type="positional")], ids=["full", "positional"]
)
def test_time_and_label_conditioning_change_the_output(options):
    config, apply, variables, x, t = small_network(**options)
    # The same image at (t0, y0), (t1, y0), (t0, y1).
    x = jnp.broadcast_to(x[:1], x.shape)
    t = t.at[2].set(t[0])
    y = jnp.array([0, 0, 1]) if config.num_classes else None
    out = apply(variables, x, t, y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    assert relative_difference(out[1], out[0]) > 1e-3
    if config.num_classes:
        assert relative_difference(out[2], out[0]) > 1e-3
        # y=None is the null label; evaluation is deterministic.
        null = jnp.full((3,), config.num_classes)
        np.testing.assert_allclose(apply(variables, x, t, None), apply(variables, x, t, null))
        np.testing.assert_array_equal(apply(variables, x, t, y), out)


def test_unconditional_model_ignores_time():
    _, apply, variables, x, t = small_network(conditional=False)
    x = jnp.broadcast_to(x[:1], x.shape)
    out = apply(variables, x, t)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training():
    _, apply, variables, x, t = small_network(**FULL)
    train_out = [
        apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(i)}) for i in (0, 1)
    ]
    assert relative_difference(train_out[0], train_out[1]) > 1e-3
    assert relative_difference(train_out[0], apply(variables, x, t)) > 1e-3


@pytest.mark.parametrize(
    "options", [FULL, dict(embedding_type="positional")], ids=["full", "positional"]
)
def test_scale_by_sigma_divides_by_the_noise_level(options):
    config, apply, variables, x, t = small_network(**options)
    scaled = jitted_apply(**options, scale_by_sigma=True)(variables, x, t)
    if config.embedding_type == "fourier":
        sigma = t  # the label is sigma itself
    else:  # the label indexes the descending SMLD noise levels
        vesde = VESDE(sigma_min=config.sigma_min, sigma_max=config.sigma_max, N=config.num_scales)
        sigma = vesde.discrete_sigmas[::-1][t.astype(int)]
    np.testing.assert_allclose(
        scaled * np.asarray(sigma)[:, None, None, None],
        apply(variables, x, t),
        rtol=1e-4,
        atol=1e-5,
    )


def test_uncentered_model_maps_data_to_minus_one_one():
    _, apply, variables, x, t = small_network(**FULL)
    centered = jitted_apply(**FULL, centered=True)(variables, 2 * x - 1, t)
    np.testing.assert_allclose(apply(variables, x, t), centered, rtol=1e-4, atol=1e-5)


def test_bfloat16_runs_and_stays_close_to_float32():
    _, apply, variables, x, t = small_network(**FULL)
    out = jitted_apply(**FULL, dtype="bfloat16")(variables, x, t)
    assert out.dtype == jnp.float32
    assert relative_difference(out, apply(variables, x, t)) < 0.05


def test_conv_implementations_give_the_same_network():
    _, apply, variables, x, t = small_network(**FULL)
    reference = apply(variables, x, t)
    for impl in ("auto", "patches", "hybrid", "winograd"):
        out = jitted_apply(**dict(FULL, conv_impl=impl))(variables, x, t)
        np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-5, err_msg=impl)


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("conv_impl", ["auto", "patches", "hybrid", "winograd"])
@pytest.mark.parametrize(
    "kernel_size, stride, padding",
    [(3, 1, "SAME"), (1, 1, "SAME"), (3, 2, "SAME"), (3, 2, "VALID"), (3, 1, ((2, 0), (1, 2)))],
)
def test_conv_implementations_agree_with_gradients(conv_impl, kernel_size, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 5))
    kernel = jax.random.normal(jax.random.key(1), (kernel_size, kernel_size, 5, 4))

    def loss(impl, x, kernel):
        y = convolution.conv2d(x, kernel, stride=stride, padding=padding, conv_impl=impl)
        return jnp.sum(jnp.sin(y)), y

    def value_and_grads(impl):
        return jax.value_and_grad(functools.partial(loss, impl), argnums=(0, 1), has_aux=True)(
            x, kernel
        )

    (_, y), grads = value_and_grads(conv_impl)
    (_, y_xla), grads_xla = value_and_grads("xla")
    # Forward mode too (likelihoods use jax.linearize): "hybrid" has a custom JVP.
    tangents = (jnp.cos(x), jnp.sin(kernel))
    _, jvp, _ = jax.jvp(functools.partial(loss, conv_impl), (x, kernel), tangents, has_aux=True)
    _, jvp_xla, _ = jax.jvp(functools.partial(loss, "xla"), (x, kernel), tangents, has_aux=True)
    np.testing.assert_allclose(jvp, jvp_xla, rtol=1e-4, atol=1e-3)
    # Outputs are O(5); float32 rounding of differently ordered sums.
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=5e-5)
    for g, g_xla in zip(grads, grads_xla, strict=True):
        np.testing.assert_allclose(g, g_xla, rtol=1e-4, atol=1e-4)


def test_default_init_is_fan_avg_uniform_and_zero_scale_is_tiny():
    kernel = common.default_init(1.0)(jax.random.key(0), (3, 3, 64, 32))
    bound = np.sqrt(3.0 / ((64 * 9 + 32 * 9) / 2))
    assert float(jnp.max(jnp.abs(kernel))) <= bound
    assert float(jnp.max(jnp.abs(kernel))) > 0.95 * bound
    tiny = common.default_init(0.0)(jax.random.key(0), (3, 3, 64, 32))
    assert 0 < float(jnp.max(jnp.abs(tiny))) <= 1e-5 * bound


def test_fir_upsampling_then_downsampling_of_a_constant_is_the_identity():
    x = jnp.full((1, 8, 8, 2), 0.7)
    up = layers.upsample_2d(x, (1, 3, 3, 1))
    assert up.shape == (1, 16, 16, 2)
    # The reference zero-pads, so only the outermost ring feels the border.
    np.testing.assert_allclose(up[:, 1:-1, 1:-1], 0.7, rtol=1e-6)
    down = layers.downsample_2d(up, (1, 3, 3, 1))
    assert down.shape == x.shape
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], x[:, 1:-1, 1:-1], rtol=1e-6)
    np.testing.assert_allclose(layers.downsample_2d(x, (1, 3, 3, 1))[:, 1:-1, 1:-1], 0.7, rtol=1e-6)


def _upfirdn2d_numpy(x, k, up, down, pad):
    # The definition, one sample at a time: zero insertion, padding, 2-D convolution with
    # k k^T, decimation.
    b, h, w, c = x.shape
    u = np.zeros((b, h * up, w * up, c))
    u[:, ::up, ::up] = x
    p0, p1 = pad
    u = np.pad(u, ((0, 0), (p0, p1), (p0, p1), (0, 0)))
    f = np.outer(k, k)[::-1, ::-1]  # convolution = correlation with the flipped filter
    n = len(k)
    out_h, out_w = u.shape[1] - n + 1, u.shape[2] - n + 1
    y = np.zeros((b, out_h, out_w, c))
    for i in range(out_h):
        for j in range(out_w):
            y[:, i, j] = np.einsum("buvc,uv->bc", u[:, i : i + n, j : j + n], f)
    return y[:, ::down, ::down]


@pytest.mark.parametrize(
    "up, down, pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (0, 3))]
)
def test_upfirdn2d_matches_its_definition(up, down, pad):
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3))
    k = np.array([1.0, 2.0, 5.0, 1.0])  # asymmetric, so flips matter
    got = layers.upfirdn2d(jnp.asarray(x, jnp.float32), k, up=up, down=down, pad=pad)
    np.testing.assert_allclose(got, _upfirdn2d_numpy(x, k, up, down, pad), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_compute_a_correlation(m):
    # F(m, 3) in one dimension: A^T [(G g) * (B^T d)] is y_i = sum_k d_{i+k} g_k for the
    # m + 2 inputs d; the 2-D algorithm nests it along rows and columns.
    F = convolution.WINOGRAD[m]
    rng = np.random.default_rng(m)
    for _ in range(5):
        d, g = rng.normal(size=m + 2), rng.normal(size=3)
        correlation = np.array([d[i : i + 3] @ g for i in range(m)])
        np.testing.assert_allclose(F.AT @ ((F.G @ g) * (F.BT @ d)), correlation, atol=1e-12)
    d, g = rng.normal(size=(m + 2, m + 2)), rng.normal(size=(3, 3))
    tile = F.AT @ ((F.G @ g @ F.G.T) * (F.BT @ d @ F.BT.T)) @ F.AT.T
    direct = [[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(m)] for i in range(m)]
    np.testing.assert_allclose(tile, direct, atol=1e-12)


@pytest.mark.parametrize("size", [16, 32])
def test_auto_winograd_convolutions_agree_with_xla_in_both_modes(size):
    # 64 channels: "auto" takes F(2x2, 3x3) at 16x16 and F(4x4, 3x3) at 32x32 in a batch of
    # 8 on CPU. Reverse mode, forward mode and a vmap of the linearised function (as
    # likelihoods use) agree.
    x = jax.random.normal(jax.random.key(0), (1 if size == 16 else 8, size, size, 64))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) / 24.0

    def loss(impl, x, kernel):
        return jnp.sum(jnp.sin(convolution.conv2d(x, kernel, conv_impl=impl)))

    probes = jax.random.normal(jax.random.key(2), (3, *x.shape))

    @functools.partial(jax.jit, static_argnums=0)
    def grads_values_and_jvps(impl, x, kernel, probes):
        # One program per implementation: eager, its hundreds of small operations would
        # each be compiled on their own (and too quickly for the persistent cache).
        grads = jax.grad(functools.partial(loss, impl), argnums=(0, 1))(x, kernel)
        conv = functools.partial(convolution.conv2d, kernel=kernel, conv_impl=impl)
        y, jvp = jax.linearize(conv, x)
        return grads, y, jax.vmap(jvp)(probes)

    grads_xla, y_xla, jvps_xla = grads_values_and_jvps("xla", x, kernel, probes)
    for impl in ("auto", "winograd", "winograd4"):
        grads, y, jvps = grads_values_and_jvps(impl, x, kernel, probes)
        for g, g_xla in zip(grads, grads_xla, strict=True):
            assert relative_difference(g, g_xla) < 1e-4, impl
        assert relative_difference(y, y_xla) < 1e-4, impl
        assert relative_difference(jvps, jvps_xla) < 1e-4, impl


def test_fused_fir_convolutions_match_unfused_away_from_the_border():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    fir = (1, 3, 3, 1)
    fused_up = layers.upsample_conv_2d(x, kernel, fir)
    unfused_up = convolution.conv2d(layers.upsample_2d(x, fir), kernel)
    assert fused_up.shape == unfused_up.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(fused_up[:, 2:-2, 2:-2], unfused_up[:, 2:-2, 2:-2], atol=1e-4)
    for impl in convolution.CONV_IMPLS:
        fused_down = layers.conv_downsample_2d(x, kernel, fir, conv_impl=impl)
        unfused_down = layers.downsample_2d(convolution.conv2d(x, kernel), fir)
        assert fused_down.shape == unfused_down.shape == (2, 4, 4, 4)
        np.testing.assert_allclose(
            fused_down[:, 1:-1, 1:-1], unfused_down[:, 1:-1, 1:-1], atol=1e-4
        )


def test_naive_resampling():
    x = jnp.arange(8.0).reshape(1, 2, 2, 2)
    up = layers.naive_upsample_2d(x)
    np.testing.assert_array_equal(up[0, :2, :2, 0], jnp.full((2, 2), x[0, 0, 0, 0]))
    np.testing.assert_array_equal(layers.naive_downsample_2d(up), x)


def test_time_embeddings():
    t = jnp.array([0.0, 1.0, 500.0])
    embedding = common.get_timestep_embedding(t, 16)
    assert embedding.shape == (3, 16)
    np.testing.assert_allclose(embedding[0], np.r_[np.zeros(8), np.ones(8)])
    np.testing.assert_allclose(embedding[1, 0], np.sin(1.0), rtol=1e-6)  # frequency 1
    np.testing.assert_allclose(embedding[1, 7], np.sin(1e-4), rtol=1e-4)  # 1 / max_positions
    assert common.get_timestep_embedding(t, 15).shape == (3, 15)

    projection = common.GaussianFourierProjection(embedding_size=8, scale=16.0)
    features, variables = projection.init_with_output(jax.random.key(0), t)
    assert features.shape == (3, 16) and variables == {}  # W is a constant, not a parameter
    np.testing.assert_allclose(features[0], np.r_[np.zeros(8), np.ones(8)], atol=1e-6)
    again = common.GaussianFourierProjection(embedding_size=8, scale=16.0).apply({}, t)
    np.testing.assert_array_equal(features, again)
