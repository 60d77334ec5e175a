"""Score networks (DDPM, NCSNv2, MLP) and the CIFAR-10 configs.

Compared against: hand counts of parameters summed from layer shapes, the paper's
parameter counts, the noise levels sigma_i written out by hand, the input scaling
2x - 1, and float32 for bfloat16 runs.
"""

import functools
import importlib
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffusion_sde import models
from diffusion_sde.models import layers, ncsnv2

ROOT = pathlib.Path(__file__).parents[1]
if str(ROOT) not in sys.path:  # config files import `configs.default_cifar10`
    sys.path.insert(0, str(ROOT))

SIGMA_MIN, SIGMA_MAX, NUM_SCALES = 0.01, 50.0, 10
BATCH = 2


def tiny_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """A model config small enough to compile and run in seconds on a CPU."""
    common = dict(
        name=name,
        centered=False,
        sigma_min=SIGMA_MIN,
        sigma_max=SIGMA_MAX,
        num_scales=NUM_SCALES,
        num_classes=0,
        dtype="float32",
    )
    specific = {
        "ddpm": dict(
            nf=32,
            ch_mult=(1, 2),
            num_res_blocks=1,
            attn_resolutions=(4,),
            dropout=0.1,
            resamp_with_conv=True,
            conditional=True,
            scale_by_sigma=False,
            nonlinearity="swish",
            conv_impl="xla",  # compiles 3x faster than "patches" on CPU
        ),
        "ncsnv2": dict(
            nf=8,
            nonlinearity="elu",
            normalization="InstanceNorm++",
            interpolation="bilinear",
            scale_by_sigma=True,
        ),
        "mlp": dict(
            nf=16,
            num_layers=2,
            nonlinearity="swish",
            embedding_type="positional",
            fourier_scale=16.0,
            scale_by_sigma=False,
        ),
    }[name]
    return ml_collections.ConfigDict({**common, **specific, **overrides})


INPUT_SHAPES = {"ddpm": (BATCH, 8, 8, 3), "ncsnv2": (BATCH, 16, 16, 3), "mlp": (BATCH, 2)}


def inputs(name, seed=0):
    x = jax.random.uniform(jax.random.PRNGKey(seed), INPUT_SHAPES[name])
    time_cond = jnp.array([3.0, 7.0])  # valid as time labels and as sigma indices
    return x, time_cond


def init(config, seed=0):
    """Random parameters of the network's shapes (from ``jax.eval_shape(model.init)``, so
    ``init`` is traced but not compiled): kernels ~ N(0, 1/fan_in), norm scales ~ 1 + noise,
    biases ~ small noise. No layer starts at zero, so none hides the others."""
    x, time_cond = inputs(config.name)
    model = models.get_model(config)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), x, time_cond)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = jax.tree_util.keystr(path[-1:])
        if len(leaf.shape) >= 2:
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        if any(s in name for s in ("scale", "gamma", "alpha")):
            return 1.0 + 0.05 * noise
        return 0.05 * noise

    return {"params": jax.tree_util.tree_map_with_path(draw, shapes)}


@functools.cache
def jitted(config_json: str, method: str):
    """``model.apply`` (or another method), compiled once per config (keyed by its JSON)."""
    model = models.get_model(ml_collections.ConfigDict(json.loads(config_json)))
    return jax.jit(getattr(model, method), static_argnames="train")


def apply(config, variables, x, time_cond, y=None, train=False, key=None):
    rngs = {} if key is None else {"dropout": key}
    return jitted(config.to_json(), "apply")(variables, x, time_cond, y=y, train=train, rngs=rngs)


# ----------------------------------------------------------------------------- get_model


def test_get_model_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"'unet'.*\['ddpm', 'mlp', 'ncsnpp', 'ncsnv2'\]"):
        models.get_model(ml_collections.ConfigDict({"name": "unet"}))


def test_get_model_picks_the_named_class():
    for name, cls in [("ddpm", models.DDPM), ("ncsnv2", models.NCSNv2), ("mlp", models.MLP)]:
        assert type(models.get_model(tiny_config(name))) is cls
    assert models.MODELS["ncsnpp"] is models.NCSNpp


# ------------------------------------------------------------------- shapes, jit, dropout

SHAPE_CASES = [
    ("ddpm", {}),
    ("ddpm", {"num_classes": 3}),
    ("ncsnv2", {}),
    ("mlp", {}),
    ("mlp", {"num_classes": 3, "embedding_type": "fourier", "scale_by_sigma": True}),
]


@pytest.mark.parametrize("name,overrides", SHAPE_CASES, ids=str)
def test_jitted_forward_has_the_shape_of_x(name, overrides):
    config = tiny_config(name, **overrides)
    variables = init(config)
    x, time_cond = inputs(name)
    y = jnp.array([0, 2]) if config.num_classes else None
    out = apply(config, variables, x, time_cond, y=y)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert np.all(np.isfinite(out))
    if name == "ddpm":  # train=True: dropout 0.1, reproducible for one key
        key = jax.random.PRNGKey(5)
        train_out = apply(config, variables, x, time_cond, y=y, train=True, key=key)
        again = apply(config, variables, x, time_cond, y=y, train=True, key=key)
        other = apply(config, variables, x, time_cond, y=y, train=True, key=jax.random.PRNGKey(6))
        np.testing.assert_array_equal(train_out, again)
        assert not np.allclose(train_out, other)
        assert not np.allclose(train_out, out)


@pytest.mark.parametrize("image_size,num_refine_blocks", [(32, 4), (96, 5), (160, 6)])
def test_ncsnv2_picks_the_reference_network_for_the_image_size(image_size, num_refine_blocks):
    # ncsnv2_64 under 96 px, ncsnv2_128 up to 128 px, ncsnv2_256 up to 256 px.
    config = tiny_config("ncsnv2", nf=4)
    model = models.get_model(config)
    x = jnp.zeros((1, image_size, image_size, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.zeros((1,)))
    assert jax.eval_shape(model.apply, shapes, x, jnp.zeros((1,))).shape == x.shape
    refine_blocks = [k for k in shapes["params"] if k.startswith("RefineBlock")]
    assert len(refine_blocks) == num_refine_blocks


def test_ncsnv2_bilinear_resize_aligns_corners():
    # PyTorch interpolate(..., align_corners=True), as the original NCSNv2: corners kept,
    # samples at i (n_in - 1) / (n_out - 1).
    x = jnp.asarray([0.0, 3.0, 6.0]).reshape(1, 1, 3, 1) * jnp.ones((1, 2, 1, 1))
    out = ncsnv2.resize(x, (3, 5), "bilinear")
    np.testing.assert_allclose(out[0, :, :, 0], [[0.0, 1.5, 3.0, 4.5, 6.0]] * 3, atol=1e-6)


def test_instance_norm_plus_matches_its_formula():
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 3)).astype(np.float32) * 3 + 1
    alpha, gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([1.0, 0.5, 3.0]), np.ones(3)
    params = {"alpha": alpha, "gamma": gamma, "beta": beta}
    out = ncsnv2.InstanceNormPlus().apply({"params": params}, jnp.asarray(x))
    mu = x.mean(axis=(1, 2), keepdims=True)
    s = np.sqrt(x.var(axis=(1, 2), keepdims=True) + 1e-5)
    m, v = mu.mean(-1, keepdims=True), np.sqrt(mu.var(-1, keepdims=True) + 1e-5)
    expected = gamma * (x - mu) / s + beta + gamma * alpha * (mu - m) / v
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_group_norm_matches_its_formula_in_float64():
    # Per example and group of C / G consecutive channels: (x - mean) / sqrt(var + eps). A
    # variance of about 1e-5 makes eps = 1e-6 (the reference's) visible.
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 4, 5, 12)) * 3e-3).astype(np.float32)
    scale, bias = rng.normal(size=12), rng.normal(size=12)
    params = {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    out = layers.GroupNorm(num_groups=3).apply({"params": params}, jnp.asarray(x))
    groups = x.astype(np.float64).reshape(2, 4, 5, 3, 4)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = groups.var(axis=(1, 2, 4), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


class _Dropped(nn.Module):
    """``dropout(tanh(x @ w))`` a few times over, as a residual branch's end does."""

    dropout: type
    rate: float = 0.3
    layers: int = 1

    @nn.compact
    def __call__(self, x, w, train=True):
        for _ in range(self.layers):
            x = self.dropout(self.rate)(jnp.tanh(x @ w), deterministic=not train)
        return x


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_dropout_equals_flax_dropout_in_values_and_gradients(rate):
    rng = np.random.default_rng(4)
    x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 8, 8, 16), (16, 16)))
    rngs = {"dropout": jax.random.key(3)}

    def loss(dropout):
        return lambda x, w: jnp.sum(_Dropped(dropout, rate).apply({}, x, w, rngs=rngs) ** 3)

    ours, theirs = (
        jax.value_and_grad(loss(d), argnums=(0, 1)) for d in (layers.Dropout, nn.Dropout)
    )
    (value, grads), (value_flax, grads_flax) = ours(x, w), theirs(x, w)
    assert value == value_flax  # the same mask from the same key: the same sums
    for ours_leaf, flax_leaf in zip(grads, grads_flax, strict=True):
        np.testing.assert_array_equal(ours_leaf, flax_leaf)
    dropped = _Dropped(layers.Dropout, rate).apply({}, x, w, rngs=rngs)
    assert abs(float(jnp.mean(dropped == 0)) - rate) < 0.05
    kept = _Dropped(layers.Dropout, rate).apply({}, x, w, train=False)
    np.testing.assert_array_equal(kept, jnp.tanh(x @ w))


def test_dropout_keeps_one_byte_per_element_for_the_backward_pass():
    # Six layers of 2**21 elements. Flax's dropout keeps the generator's 32-bit words for the
    # backward pass, ours a one-byte mask (2 MiB a layer): 64 MiB less in all (jax 0.10.2).
    x, w = jnp.ones((4096, 512)), jnp.full((512, 512), 0.01)
    rngs = {"dropout": jax.random.key(0)}

    def temp_bytes(dropout):
        def loss(x, w):
            return jnp.sum(_Dropped(dropout, 0.1, layers=6).apply({}, x, w, rngs=rngs) ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    saved = temp_bytes(nn.Dropout) - temp_bytes(layers.Dropout)
    assert saved >= 6 * 8 * 2**20


@pytest.mark.parametrize("shape, groups", [((2, 8, 8, 32), 8), ((3, 4, 4, 64), 32), ((2, 16), 4)])
def test_group_norm_equals_flax_group_norm_in_values_and_gradients(shape, groups):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=shape) * 2 + 0.5, jnp.float32)
    ours, flax_norm = (
        layers.GroupNorm(num_groups=groups),
        nn.GroupNorm(num_groups=groups, epsilon=1e-6),
    )
    variables = flax_norm.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, variables
    )
    variables = jax.tree.map(
        lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), variables
    )
    weights = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(module):
        return lambda v, x: jnp.sum(weights * jnp.tanh(module.apply(v, x)))

    value, grads = jax.value_and_grad(loss(ours), argnums=(0, 1))(variables, x)
    value_flax, grads_flax = jax.value_and_grad(loss(flax_norm), argnums=(0, 1))(variables, x)
    np.testing.assert_allclose(value, value_flax, rtol=1e-5)
    for ours_leaf, flax_leaf in zip(
        jax.tree.leaves(grads), jax.tree.leaves(grads_flax), strict=True
    ):
        np.testing.assert_allclose(ours_leaf, flax_leaf, rtol=1e-4, atol=1e-5)


def test_group_norm_refuses_channels_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="multiple of the group count"):
        layers.GroupNorm(num_groups=4).init(jax.random.key(0), jnp.ones((1, 2, 2, 6)))


# ------------------------------------------------------------------------ conditioning


@pytest.mark.parametrize("name", ["ddpm", "mlp"])
def test_time_conditioning_changes_the_output(name):
    config = tiny_config(name)
    variables = init(config)
    x, _ = inputs(name)
    first = apply(config, variables, x, jnp.array([3.0, 3.0]))
    second = apply(config, variables, x, jnp.array([7.0, 7.0]))
    assert np.abs(first - second).max() > 1e-2 * np.abs(first).max()


@pytest.mark.parametrize("name", ["ddpm", "ncsnv2", "mlp"])
def test_scale_by_sigma_divides_by_the_descending_sigma_of_the_label(name):
    # sigma_i = sigma_max (sigma_min / sigma_max)^(i / (N - 1)): label 0 is sigma_max.
    scaled = tiny_config(name, scale_by_sigma=True)
    unscaled = tiny_config(name, scale_by_sigma=False)
    variables = init(scaled)
    x, _ = inputs(name)
    labels = np.array([0.0, NUM_SCALES - 1.0])
    sigmas = SIGMA_MAX * (SIGMA_MIN / SIGMA_MAX) ** (labels / (NUM_SCALES - 1))
    sigmas = sigmas.reshape((-1,) + (1,) * (x.ndim - 1))
    np.testing.assert_allclose(
        apply(scaled, variables, x, jnp.asarray(labels, jnp.float32)),
        apply(unscaled, variables, x, jnp.asarray(labels, jnp.float32)) / sigmas,
        rtol=1e-5,
    )


def test_mlp_fourier_scale_by_sigma_divides_by_time_cond():
    config = tiny_config("mlp", embedding_type="fourier", scale_by_sigma=True)
    unscaled = tiny_config("mlp", embedding_type="fourier", scale_by_sigma=False)
    variables = init(config)
    x, _ = inputs("mlp")
    sigma = jnp.array([0.3, 20.0])
    np.testing.assert_allclose(
        apply(config, variables, x, sigma),
        apply(unscaled, variables, x, sigma) / sigma[:, None],
        rtol=1e-5,
    )


@pytest.mark.parametrize("name", ["ddpm", "ncsnv2", "mlp"])
def test_uncentered_networks_map_data_from_unit_interval(name):
    # centered=False feeds 2x - 1 to the same network that centered=True feeds x.
    config = tiny_config(name)
    variables = init(config)
    x, time_cond = inputs(name)
    np.testing.assert_allclose(
        apply(config, variables, x, time_cond),
        apply(tiny_config(name, centered=True), variables, 2 * x - 1, time_cond),
        rtol=1e-4,
        atol=1e-5,
    )


def test_class_labels_with_a_null_label():
    config = tiny_config("mlp", num_classes=3)
    variables = init(config)
    x, time_cond = inputs("mlp")
    x, time_cond = jnp.broadcast_to(x[:1], x.shape), jnp.full_like(time_cond, 3.0)
    labelled = apply(config, variables, x, time_cond, y=jnp.array([0, 2]))
    assert not np.allclose(labelled[0], labelled[1])  # the label changes the output
    null = apply(config, variables, x, time_cond)  # y=None is label num_classes
    np.testing.assert_allclose(null, apply(config, variables, x, time_cond, y=jnp.array([3, 3])))


@pytest.mark.parametrize("name", ["ddpm", "ncsnv2", "mlp"])
def test_labels_for_an_unconditional_network_are_an_error(name):
    model = models.get_model(tiny_config(name))
    x, time_cond = inputs(name)
    with pytest.raises(ValueError, match="num_classes = 0|no class-label path"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, time_cond, y=jnp.array([0, 1]))


def test_ncsnv2_refuses_num_classes():
    model = models.get_model(tiny_config("ncsnv2", num_classes=3))
    with pytest.raises(ValueError, match="no class-label path"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs("ncsnv2"))


# ---------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", ["ddpm", "ncsnv2", "mlp"])
def test_bfloat16_is_close_to_float32(name):
    config = tiny_config(name)
    config_bf16 = tiny_config(name, dtype="bfloat16")
    x, time_cond = inputs(name)
    bf16_model = models.get_model(config_bf16)
    bf16_params = jax.eval_shape(bf16_model.init, jax.random.PRNGKey(0), x, time_cond)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(bf16_params))
    variables = init(config)
    reference = apply(config, variables, x, time_cond)
    out = apply(config_bf16, variables, x, time_cond)
    assert out.dtype == jnp.float32
    error = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert error < 3e-2, error


# -------------------------------------------------------------- parameter counts by hand


def conv(k, c_in, c_out, bias=True):
    return k * k * c_in * c_out + (c_out if bias else 0)


def dense(n_in, n_out):
    return n_in * n_out + n_out


def ddpm_hand_count(
    nf,
    ch_mult,
    num_res_blocks,
    attn_resolutions,
    image_size,
    channels=3,
    attention_every_decoder_block=True,
):
    """Parameters of Ho et al.'s U-Net summed from layer shapes (GroupNorm: 2C)."""
    temb = 4 * nf

    def resblock(c_in, c_out):
        shortcut = conv(1, c_in, c_out) if c_in != c_out else 0
        return (
            2 * c_in
            + conv(3, c_in, c_out)
            + dense(temb, c_out)
            + 2 * c_out
            + conv(3, c_out, c_out)
            + shortcut
        )

    def attention(c):
        return 2 * c + 4 * conv(1, c, c)

    total = dense(nf, temb) + dense(temb, temb) + conv(3, channels, nf)
    skips, c, size = [nf], nf, image_size
    for level, mult in enumerate(ch_mult):
        for _ in range(num_res_blocks):
            total += resblock(c, nf * mult)
            c = nf * mult
            total += attention(c) if size in attn_resolutions else 0
            skips.append(c)
        if level != len(ch_mult) - 1:
            total += conv(3, c, c)  # stride-2 convolution
            skips.append(c)
            size //= 2
    total += 2 * resblock(c, c) + attention(c)
    for level, mult in reversed(list(enumerate(ch_mult))):
        for _ in range(num_res_blocks + 1):
            total += resblock(c + skips.pop(), nf * mult)
            c = nf * mult
            if size in attn_resolutions and attention_every_decoder_block:
                total += attention(c)
        if size in attn_resolutions and not attention_every_decoder_block:
            total += attention(c)
        if level != 0:
            total += conv(3, c, c)  # after nearest-neighbour upsampling
            size *= 2
    return total + 2 * c + conv(3, c, channels)


def ncsnv2_hand_count(nf, channels=3):
    """Parameters of the NCSNv2 for images under 96 px (InstanceNorm++: 3C)."""

    def residual(c_in, c_out, downsample, dilation):
        mid = c_in if downsample else c_out
        if downsample:
            shortcut = conv(3 if dilation > 1 else 1, c_in, c_out)
        else:
            shortcut = conv(1, c_in, c_out) if c_in != c_out else 0
        return 3 * c_in + conv(3, c_in, mid) + 3 * mid + conv(3, mid, c_out) + shortcut

    def rcu(c, blocks):
        return blocks * 2 * conv(3, c, c, bias=False)

    def refine(c_inputs, features, start=False, end=False):
        fusion = 0 if start else sum(conv(3, c, features) for c in c_inputs)
        crp = 2 * conv(3, features, features, bias=False)
        return sum(rcu(c, 2) for c in c_inputs) + fusion + crp + rcu(features, 3 if end else 1)

    encoder = (
        2 * residual(nf, nf, False, 1)
        + residual(nf, 2 * nf, True, 1)
        + residual(2 * nf, 2 * nf, False, 1)
        + residual(2 * nf, 2 * nf, True, 2)
        + residual(2 * nf, 2 * nf, False, 2)
        + residual(2 * nf, 2 * nf, True, 4)
        + residual(2 * nf, 2 * nf, False, 4)
    )
    decoder = (
        refine([2 * nf], 2 * nf, start=True)
        + refine([2 * nf, 2 * nf], 2 * nf)
        + refine([2 * nf, 2 * nf], nf)
        + refine([nf, nf], nf, end=True)
    )
    return conv(3, channels, nf) + encoder + decoder + 3 * nf + conv(3, nf, channels)


def count(config, image_size, channels=3):
    model = models.get_model(config.model)
    x = jnp.zeros((1, image_size, image_size, channels))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jnp.ones((1,)))
    return models.count_parameters(shapes["params"])


def load_config(file_name, variant=None):
    module = importlib.import_module(f"configs.{file_name}")
    return module.get_config() if variant is None else module.get_config(variant)


def test_ddpm_cifar10_parameter_count():
    # Ho et al. (2020) report 35.7M parameters for their CIFAR-10 model.
    config = load_config("cifar10_ddpm_vp")
    model = config.model
    hand = ddpm_hand_count(
        model.nf, model.ch_mult, model.num_res_blocks, model.attn_resolutions, 32
    )
    assert count(config, 32) == hand == 35_746_307
    assert abs(hand - 35.7e6) < 0.05e6
    # The 2021 reference's port, attending once per decoder level, is 0.5M smaller.
    reference_port = ddpm_hand_count(
        model.nf,
        model.ch_mult,
        model.num_res_blocks,
        model.attn_resolutions,
        32,
        attention_every_decoder_block=False,
    )
    assert reference_port == 35_218_947


@pytest.mark.parametrize(
    "overrides",
    [{}, {"nf": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (8, 16)}],
    ids=["cifar10", "other"],
)
def test_ddpm_count_matches_hand_count(overrides):
    config = load_config("cifar10_ddpm_vp")
    config.model.update(overrides)
    m = config.model
    assert count(config, 32) == ddpm_hand_count(
        m.nf, m.ch_mult, m.num_res_blocks, m.attn_resolutions, 32
    )


def test_ncsnv2_cifar10_parameter_count():
    config = load_config("cifar10_ncsnv2_ve")
    assert count(config, 32) == ncsnv2_hand_count(128) == 29_694_083


# ------------------------------------------------------------------------------- configs

CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("cifar10_*.py"))
# Parameter counts of the full-size networks: the README's table (NCSN++/DDPM++, from an
# independent reimplementation), the hand counts above (DDPM, NCSNv2).
PARAMETERS = {
    "cifar10_ddpmpp_continuous_vp": 61_804_419,
    "cifar10_ddpmpp_continuous_subvp": 61_804_419,
    "cifar10_ddpmpp_deep_continuous_vp": 106_632_579,
    "cifar10_ncsnpp_continuous_ve": 62_758_787,
    "cifar10_ncsnpp_deep_continuous_ve": 107_586_947,
    "cifar10_ddpm_vp": 35_746_307,
    "cifar10_ncsnv2_ve": 29_694_083,
    # DDPM++ with EDM's ch_mult (2, 2, 2): the EDM-style network of the networks benchmark.
    "cifar10_edm_ddpmpp": 55_732_739,
    "cifar10_rectified_flow": 61_804_419,
}
DDPMPP = {
    "model.name": "ncsnpp",
    "model.nf": 128,
    "model.ch_mult": (1, 2, 2, 2),
    "model.num_res_blocks": 4,
    "model.attn_resolutions": (16,),
    "model.resblock_type": "biggan",
    "model.skip_rescale": True,
    "model.init_scale": 0.0,
    "model.fir": False,
    "model.progressive": "none",
    "model.progressive_input": "none",
    "model.embedding_type": "positional",
    "model.scale_by_sigma": False,
    "model.ema_rate": 0.9999,
    "data.centered": True,
    "training.continuous": True,
    "training.reduce_mean": True,
    "sampling.predictor": "euler_maruyama",
    "sampling.corrector": "none",
}
NCSNPP = {
    **DDPMPP,
    "model.fir": True,
    "model.fir_kernel": [1, 3, 3, 1],
    "model.progressive_input": "residual",
    "model.progressive_combine": "sum",
    "model.embedding_type": "fourier",
    "model.fourier_scale": 16,
    "model.scale_by_sigma": True,
    "model.ema_rate": 0.999,
    "data.centered": False,
    "training.sde": "vesde",
    "training.reduce_mean": False,
    "sampling.predictor": "reverse_diffusion",
    "sampling.corrector": "langevin",
}
# The 2021 reference's hyperparameters (its configs/{vp,subvp,ve}/...).
HYPERPARAMETERS = {
    "cifar10_ddpmpp_continuous_vp": {**DDPMPP, "training.sde": "vpsde"},
    "cifar10_ddpmpp_continuous_subvp": {**DDPMPP, "training.sde": "subvpsde"},
    "cifar10_ddpmpp_deep_continuous_vp": {
        **DDPMPP,
        "training.sde": "vpsde",
        "model.num_res_blocks": 8,
        "training.n_iters": 950001,
    },
    "cifar10_ncsnpp_continuous_ve": NCSNPP,
    "cifar10_ncsnpp_deep_continuous_ve": {
        **NCSNPP,
        "model.num_res_blocks": 8,
        "training.n_iters": 950001,
    },
    "cifar10_ddpm_vp": {
        "model.name": "ddpm",
        "model.nf": 128,
        "model.ch_mult": (1, 2, 2, 2),
        "model.num_res_blocks": 2,
        "model.attn_resolutions": (16,),
        "model.dropout": 0.1,
        "model.resamp_with_conv": True,
        "model.conditional": True,
        "model.scale_by_sigma": False,
        "model.ema_rate": 0.9999,
        "data.centered": True,
        "training.sde": "vpsde",
        "training.continuous": False,
        "training.reduce_mean": True,
        "sampling.predictor": "ancestral_sampling",
        "sampling.corrector": "none",
    },
    "cifar10_ncsnv2_ve": {
        "model.name": "ncsnv2",
        "model.nf": 128,
        "model.num_scales": 232,
        "model.sigma_max": 50,
        "model.sigma_min": 0.01,
        "model.scale_by_sigma": True,
        "model.normalization": "InstanceNorm++",
        "model.nonlinearity": "elu",
        "model.ema_rate": 0.999,
        "training.sde": "vesde",
        "training.continuous": False,
        "sampling.predictor": "none",
        "sampling.corrector": "ald",
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.176,
        "optim.lr": 1e-4,
        "optim.warmup": 0,
        "optim.grad_clip": -1.0,
        "data.centered": False,
    },
    # EDM's CIFAR-10 recipe (Karras et al. 2022, Table 7 and their train.py for
    # --arch=ddpmpp --precond=edm): 200 Mimg at batch 512, lr 1e-3 ramped over 10 Mimg, EMA
    # half-life 0.5 Mimg, dropout 0.13, P_mean -1.2, P_std 1.2, sigma_data 0.5, 18 Heun steps.
    "cifar10_edm_ddpmpp": {
        **DDPMPP,
        "model.ch_mult": (2, 2, 2),
        "model.dropout": 0.13,
        "model.ema_rate": 0.5 ** (1.0 / (0.5e6 / 512)),  # half-life 0.5 Mimg
        "model.parametrization": "edm",
        "model.sigma_data": 0.5,
        "model.sigma_min": 0.002,
        "model.sigma_max": 80,
        "training.sde": "edm",
        "training.weighting": "edm",
        "training.time_distribution": "log_normal",
        "training.log_normal_mean": -1.2,
        "training.log_normal_std": 1.2,
        "training.batch_size": 512,
        "training.n_iters": 390_625,
        "training.reduce_mean": False,
        "optim.lr": 1e-3,
        "optim.warmup": 19_531,
        "optim.grad_clip": -1.0,
        "sampling.method": "edm",
        "sampling.num_steps": 18,
        "sampling.rho": 7.0,
        "sampling.s_churn": 0.0,
        "sampling.eps": 0.002,
        "sampling.predictor": "euler_maruyama",
    },
    # Rectified flow (Liu et al. 2023) with the DDPM++ of cifar10_ddpmpp_continuous_vp and
    # RK45 sampling.
    "cifar10_rectified_flow": {
        **DDPMPP,
        "training.sde": "rectified_flow",
        "training.weighting": "velocity",
        "training.time_distribution": "uniform",
        "model.parametrization": "velocity",
        "sampling.method": "ode",
        "sampling.ode_method": "adaptive",
        "sampling.noise_removal": False,
    },
}
DEFAULTS = {
    "training.batch_size": 128,
    "training.snapshot_freq": 50000,
    "training.log_freq": 50,
    "training.eval_freq": 100,
    "training.snapshot_freq_for_preemption": 10000,
    "training.snapshot_sampling": True,
    "training.likelihood_weighting": False,
    "training.n_jitted_steps": 5,
    "sampling.n_steps_each": 1,
    "sampling.noise_removal": True,
    "sampling.probability_flow": False,
    "sampling.snr": 0.16,
    "sampling.method": "pc",
    "eval.batch_size": 1024,
    "eval.num_samples": 50000,
    "data.dataset": "cifar10",
    "data.image_size": 32,
    "data.random_flip": True,
    "data.uniform_dequantization": False,
    "data.num_channels": 3,
    "model.sigma_min": 0.01,
    "model.sigma_max": 50,
    "model.num_scales": 1000,
    "model.beta_min": 0.1,
    "model.beta_max": 20.0,
    "model.dropout": 0.1,
    "model.dtype": "float32",
    "model.num_classes": 0,
    "optim.optimizer": "Adam",
    "optim.lr": 2e-4,
    "optim.beta1": 0.9,
    "optim.eps": 1e-8,
    "optim.weight_decay": 0,
    "optim.warmup": 5000,
    "optim.grad_clip": 1.0,
    "seed": 42,
    "training.n_iters": 1300001,
}


def field(config, dotted):
    """``config.a.b`` for ``"a.b"``."""
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def test_every_config_file_is_covered():
    assert CONFIG_FILES == sorted(PARAMETERS) == sorted(HYPERPARAMETERS)


@pytest.mark.parametrize("file_name", CONFIG_FILES)
def test_config_has_the_reference_hyperparameters(file_name):
    config = load_config(file_name)
    expected = {**DEFAULTS, **HYPERPARAMETERS[file_name]}
    for dotted, value in expected.items():
        assert field(config, dotted) == value, dotted
    assert config.model.centered == config.data.centered
    config.data.centered = not config.data.centered  # tied by a FieldReference
    assert config.model.centered == config.data.centered


@pytest.mark.parametrize("file_name", CONFIG_FILES)
def test_config_model_builds_with_the_expected_parameter_count(file_name):
    assert count(load_config(file_name), 32) == PARAMETERS[file_name]


@pytest.mark.parametrize("file_name", CONFIG_FILES)
def test_small_config_builds_a_small_model(file_name):
    config = load_config(file_name, "small")
    size = config.data.image_size
    assert size == 16 and config.training.batch_size == 16
    assert count(config, size, config.data.num_channels) < 1_000_000
    assert config.model.centered == config.data.centered
    with pytest.raises(ValueError, match="'small'"):
        load_config(file_name, "tiny")


@pytest.mark.parametrize(
    "file_name, shape, reference",
    [
        # The reference's configs/ncsnpp/celeba.py: NCSN++ with positional embeddings.
        ("celeba_ncsnpp_ve", (64, 64, 3), {"model.sigma_max": 90.0, "sampling.snr": 0.17}),
        ("mnist_ddpmpp_continuous_vp", (28, 28, 1), {"data.centered": True}),
    ],
)
def test_mnist_and_celeba_configs_build_at_their_data_shape(file_name, shape, reference):
    from diffusion_sde import data as data_lib

    config = load_config(file_name)
    assert data_lib.data_shape(config.data) == shape
    for dotted, value in reference.items():
        assert field(config, dotted) == value, dotted
    assert count(config, shape[0], shape[-1]) > 5_000_000
    small = load_config(file_name, "small")
    assert data_lib.data_shape(small.data) == (16, 16, shape[-1])
    assert count(small, 16, shape[-1]) < 1_000_000
