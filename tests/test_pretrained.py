"""Published-checkpoint readers: each format's fixture, written by the source project's own
code (experiments/make_checkpoint_fixtures.py), loads into our network and reproduces the
source's outputs; import mode writes a workdir that sample mode uses; bad files and
mismatched configs get clear errors."""

import collections
import gzip
import importlib
import json
import pathlib
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default_cifar10
from diffusion_sde import pretrained
from diffusion_sde.evaluation import evaluate
from diffusion_sde.models import count_parameters, get_model
from diffusion_sde.training import checkpoint

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "checkpoints"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def fixture_config(name: str):
    """Our config for the fixture's network: the cifar10 defaults with the fixture's model
    fields (the 2021 reference's names, which our configs share)."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    config = default_cifar10.get_default_configs()
    config.data.image_size = meta["image_size"]
    fields = dict(meta["model"])
    config.data.centered = fields.pop("centered")
    config.training.continuous = fields.pop("continuous")
    config.training.sde = "vesde" if fields.get("scale_by_sigma") else "vpsde"
    if fields.get("parametrization") == "edm":  # EDMPrecond: EDM's path
        config.training.sde = "edm"
    with config.model.unlocked():
        for key, value in fields.items():
            value = tuple(value) if isinstance(value, list) else value
            if key not in config.model or config.model[key] != value:
                config.model[key] = value
        config.model.fourier_in_params = fields.get("embedding_type") == "fourier"
        config.model.conv_impl = "xla"
    return config, meta


def relative_error(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def test_every_format_has_a_fixture():
    formats = {json.loads((FIXTURES / f"{n}.json").read_text())["format"] for n in NAMES}
    assert formats == {"score_sde", "score_sde_pytorch", "torch_state_dict", "diffusers", "edm"}


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_source_outputs(name):
    config, meta = fixture_config(name)
    reference = np.load(FIXTURES / f"{name}.npz")
    model = get_model(config.model)
    x, time_cond = jnp.asarray(reference["x"]), jnp.asarray(reference["time_cond"])
    outputs = [("out_raw", False)] + [("out_ema", True)] * ("out_ema" in reference)
    for key, ema in outputs:
        variables = pretrained.load_variables(
            config, FIXTURES / meta["file"], meta["format"], ema=ema
        )
        assert count_parameters(variables) < 400_000
        leaves = [np.asarray(a) for a in jax.tree.leaves(variables)]
        assert all(np.all(a != 0) for a in leaves), "every tensor random, no zero left"
        out = model.apply(variables, x, time_cond)
        assert relative_error(out, reference[key]) < 1e-5, key
    if "out_ema" in reference:  # the two weight sets differ, so the test tells them apart
        assert relative_error(reference["out_raw"], reference["out_ema"]) > 1e-2


def test_name_table_is_explicit():
    config, meta = fixture_config("ncsnpp_ve")
    table = pretrained.name_table(config, FIXTURES / meta["file"], meta["format"])
    rows = {entry.source: entry for entry in table}
    assert rows["all_modules.0.W"].target == ("GaussianFourierProjection_0", "W")
    conv = rows["all_modules.3.weight"]
    assert conv.target == ("Conv_0", "kernel") and conv.transform == "oihw_to_hwio"
    attention = [e for e in table if e.source.endswith("NIN_0.W")]
    assert attention and all(e.transform == "nin_to_1x1" for e in attention)
    assert all(e.target[0].startswith("AttnBlock") for e in attention)


# ----------------------------------------------------------------------------- errors


def test_wrong_format_is_refused():
    config, meta = fixture_config("ddpm")
    with pytest.raises(pretrained.FormatError, match="not a diffusers UNet2DModel|safetensors"):
        pretrained.load_variables(config, FIXTURES / "ddpm.pth", "diffusers")
    with pytest.raises(pretrained.FormatError, match="not a torch.save zip"):
        pretrained.load_variables(config, FIXTURES / "flax_ddpm.msgpack", "score_sde_pytorch")
    with pytest.raises(pretrained.FormatError, match="not a Flax msgpack|not a score_sde"):
        pretrained.load_variables(config, FIXTURES / "ddpm.pth", "score_sde")
    with pytest.raises(pretrained.CheckpointError, match="valid: "):
        pretrained.load_variables(config, FIXTURES / "ddpm.pth", "tensorflow")


@pytest.mark.parametrize(
    ("name", "file", "format"),
    [
        ("ddpm", "ddpm.pth", "score_sde_pytorch"),
        ("flax_ddpm", "flax_ddpm.msgpack", "score_sde"),
        ("diffusers_ddpm", "diffusers_ddpm/diffusion_pytorch_model.safetensors", "diffusers"),
    ],
)
def test_truncated_file_is_refused(tmp_path, name, file, format):
    config, _ = fixture_config(name)
    data = (FIXTURES / file).read_bytes()
    truncated = tmp_path / pathlib.Path(file).name
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(pretrained.FormatError, match="truncated|not a"):
        pretrained.load_variables(config, truncated, format)


def test_mismatched_config_names_parameter_and_shapes():
    config, meta = fixture_config("ddpmpp_vp")
    config.model.nf = 16
    with pytest.raises(pretrained.MismatchError, match=r"all_modules\.\d+\..*\(.*\).*\(.*\)"):
        pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])
    config, meta = fixture_config("ddpmpp_vp")
    config.model.num_res_blocks = 1
    with pytest.raises(pretrained.MismatchError, match="modules with parameters"):
        pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])


def test_fourier_frequencies_need_fourier_in_params():
    for name in ("ncsnpp_ve", "flax_ncsnpp_ve"):
        config, meta = fixture_config(name)
        config.model.fourier_in_params = False
        with pytest.raises(pretrained.MismatchError, match="fourier_in_params=True"):
            pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])


def test_decoder_attention_mismatch_is_refused():
    config, meta = fixture_config("ddpm")
    config.model.decoder_attention = "every_block"
    with pytest.raises(pretrained.MismatchError, match="decoder_attention"):
        pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])


def _torch_zip(path: pathlib.Path, obj) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/byteorder", "little")


def test_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    _torch_zip(path, collections.Counter(a=1))  # any global outside the allow-list
    with pytest.raises(pretrained.FormatError, match="collections.Counter"):
        pretrained.read_torch(path)


def test_edm_and_other_networks_are_refused_saying_what_differs(tmp_path):
    config, _ = fixture_config("ncsnpp_ve")
    pickle_file = tmp_path / "edm-cifar10-32x32-uncond-vp.pkl"
    pickle_file.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(pretrained.FormatError, match="preconditioning"):
        pretrained.load_variables(config, pickle_file, "edm")
    with pytest.raises(pretrained.FormatError, match="not a Flax msgpack"):
        pretrained.load_variables(config, pickle_file, "consistency_models")
    # jcm's State (consistency_models_cifar10), as its flax checkpoints.save_checkpoint writes it
    from flax import serialization

    jcm = tmp_path / "checkpoint_80"
    one = {"Conv_0": {"kernel": np.ones((3, 3, 3, 8), np.float32)}}
    jcm.write_bytes(
        serialization.msgpack_serialize(
            dict(
                step=80,
                lr=4e-4,
                ema_rate=0.9999,
                params=one,
                params_ema=one,
                model_state={},
                opt_state={},
                rng_state=np.zeros(2, np.uint32),
            )
        )
    )
    for format in ("consistency_models", "score_sde"):
        with pytest.raises(pretrained.FormatError, match="EDM's denoiser.*c_skip"):
            pretrained.load_variables(config, jcm, format)
    # a diffusers NCSN++ (Fourier time projection, skip blocks)
    header = json.dumps({"time_proj.W": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    header = header.encode()
    ncsnpp = tmp_path / "diffusion_pytorch_model.safetensors"
    ncsnpp.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(pretrained.FormatError, match="NCSN\\+\\+"):
        pretrained.load_variables(config, ncsnpp, "diffusers")


# ------------------------------------------------------------------------ import mode


def test_import_mode_writes_a_workdir_that_sample_mode_uses(tmp_path):
    from absl import flags

    from diffusion_sde import main

    name = "ddpmpp_vp"
    config, meta = fixture_config(name)
    config.model.num_scales = 8  # a short sampling chain
    config.sampling.predictor = "euler_maruyama"
    config.sampling.corrector = "none"
    config.eval.batch_size = config.eval.num_samples = 2
    workdir = tmp_path / "imported"

    # The command line, with the fixture's small network in place of the config file's.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(
        [
            "main",
            "--config=configs/cifar10_ddpmpp_continuous_vp.py",
            f"--workdir={workdir}",
            "--mode=import",
            f"--checkpoint={FIXTURES / meta['file']}",
            f"--format={meta['format']}",
        ]
    )
    flags.FLAGS["config"].value = config
    main.main([])
    assert (workdir / "config.json").exists() and (workdir / "state_spec.json").exists()

    _, _, state = checkpoint.load_trained(config, workdir)
    assert int(state.step) == 17
    expected = pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])
    for a, b in zip(
        jax.tree.leaves(state.ema_params),
        jax.tree.leaves(expected["params"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    reference = np.load(FIXTURES / f"{name}.npz")
    out = get_model(config.model).apply(
        {"params": state.params}, jnp.asarray(reference["x"]), jnp.asarray(reference["time_cond"])
    )
    assert relative_error(out, reference["out_raw"]) < 1e-5

    samples = evaluate.sample(config, workdir)
    shard = np.load(next(samples.glob("*.npz")))
    images = next(iter(shard.values()))
    assert images.shape[0] == 2 and np.all(np.isfinite(images))

    with pytest.raises(pretrained.CheckpointError, match="new --workdir"):
        checkpoint.import_published(config, workdir, FIXTURES / meta["file"], meta["format"])
    shutil.rmtree(workdir)
    flags.FLAGS.unparse_flags()


@pytest.mark.slow  # 35 s on one core: import, restore, 5 NFE of sampling
def test_edm_precond_import_samples_with_edm_sampler(tmp_path):
    """An imported EDMPrecond workdir: its EMA params give EDM's denoiser, and sample mode
    runs EDM's Heun sampler on it."""
    from configs import default_digits
    from diffusion_sde.models import get_score_fn
    from diffusion_sde.sde import EDMSDE

    config, meta = fixture_config("edm_ddpmpp_edm")
    default_digits.edm_sampler(config, num_steps=3)
    config.sampling.eps = 0.002
    config.eval.batch_size = config.eval.num_samples = 2
    workdir = tmp_path / "imported"
    checkpoint.import_published(config, workdir, FIXTURES / meta["file"], meta["format"])
    _, _, state = checkpoint.load_trained(config, workdir)
    reference = np.load(FIXTURES / "edm_ddpmpp_edm.npz")
    score_fn = get_score_fn(EDMSDE(), get_model(config.model), {"params": state.ema_params})
    x, sigma = reference["noisy"], reference["sigma"]
    score = np.asarray(score_fn(jnp.asarray(x), jnp.asarray(sigma)), np.float64)
    denoised = x + (sigma.astype(np.float64) ** 2)[:, None, None, None] * score
    assert relative_error(denoised, reference["denoised"]) < 1e-5
    samples = evaluate.sample(config, workdir)
    images = next(iter(np.load(next(samples.glob("*.npz"))).values()))
    assert images.shape[0] == 2 and np.all(np.isfinite(images))


def test_import_mode_without_checkpoint_flag_says_what_to_pass(tmp_path, capsys):
    from absl import flags

    from diffusion_sde import main

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", "--config=configs/cifar10_ddpmpp_continuous_vp.py", "--workdir=x"])
    flags.FLAGS.mode = "import"
    flags.FLAGS.workdir = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main.main([])
    assert exit_info.value.code == 2
    assert "--checkpoint=PATH and --format=NAME" in capsys.readouterr().err
    flags.FLAGS.unparse_flags()


# ------------------------------------------------- the published networks' full layouts


def _published():
    with gzip.open(FIXTURES / "published_shapes.json.gz", "rt") as file:
        return json.load(file)


@pytest.mark.parametrize("source", sorted(_published()))
def test_name_table_fits_the_published_full_size_layout(source):
    """The name table maps every array of the full-size published network (names and
    shapes recorded from the source's own code) onto our config's network, shape for
    shape, and the parameter counts agree."""
    published = _published()[source]
    config = importlib.import_module(f"configs.{published['config']}").get_config()
    diffusers = source.startswith("google/")
    edm = source.startswith("edm/")
    ncsnpp_fourier = config.model.name == "ncsnpp" and config.model.embedding_type == "fourier"
    config.model.fourier_in_params = ncsnpp_fourier
    if config.model.name == "ddpm" and not diffusers:
        config.model.decoder_attention = "once_per_level"
    arrays = {
        name: np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, [0] * len(shape))
        for name, shape in published["state_dict"].items()
    }
    if edm:  # as the reader: EDMPrecond's bias-free map_augment (augment_dim 9) is dropped
        precond = "EDMPrecond" if source.startswith("edm/edm-") else "VPPrecond"
        arrays = pretrained.edm_network_state(arrays, source, precond)
    elif not diffusers:
        arrays = {k.removeprefix("module.").removeprefix("model."): v for k, v in arrays.items()}
    dialect = "diffusers" if diffusers else "edm" if edm else "torch"
    weights = pretrained.SourceWeights(arrays, None, 0, dialect)
    table = pretrained.name_table(config, weights)
    for entry in table:
        converted = pretrained.TRANSFORMS[entry.transform](arrays[entry.source])
        assert converted.shape == entry.shape, entry
    ours = sum(int(np.prod(entry.shape)) for entry in table)
    # Ours counts NCSN++'s Fourier frequencies W (nf of them), a buffer-like parameter
    # without gradient there.
    fourier = config.model.nf if config.model.fourier_in_params else 0
    # The table has one row per parameter array of our network (it raises on any our
    # network has and the source lacks), so this is our count too.
    assert ours == published["trainable"] + fourier - published.get("dropped", 0)
    if source == "edm/edm-cifar10-32x32-uncond-vp":  # EDM's paper: 55.73M; map_augment 9 x 128
        assert (published["trainable"], published["dropped"]) == (55_733_891, 9 * 128)


def test_diffusers_settings_we_do_not_compute_are_refused(tmp_path):
    config, meta = fixture_config("diffusers_ddpm")
    directory = tmp_path / "unet"
    shutil.copytree(FIXTURES / meta["file"], directory)
    unet = json.loads((directory / "config.json").read_text())
    unet["attention_head_dim"] = 8
    (directory / "config.json").write_text(json.dumps(unet))
    with pytest.raises(pretrained.MismatchError, match="attention_head_dim = 8"):
        pretrained.load_variables(config, directory, "diffusers")


def test_edm_vp_baseline_is_score_sde_vp_adapter():
    """EDM's VPPrecond denoiser D(x, sigma) = x - sigma F(x / sqrt(sigma^2 + 1), 999 t(sigma))
    is x + sigma sigma_t s(x_t, t) with our VP score s, x_t = x / sqrt(1 + sigma^2),
    sigma_t = sigma / sqrt(1 + sigma^2) and t = sigma^{-1}(sigma) of the same beta(t)."""
    from diffusion_sde.models import get_score_fn
    from diffusion_sde.sde import VPSDE

    config, meta = fixture_config("edm_ddpmpp_vp")
    reference = np.load(FIXTURES / "edm_ddpmpp_vp.npz")
    variables = pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    sigma = reference["sigma"].astype(np.float64)
    beta_min, beta_d = 0.1, 19.9
    t = (np.sqrt(beta_min**2 + 2 * beta_d * np.log1p(sigma**2)) - beta_min) / beta_d
    scale = (1 / np.sqrt(1 + sigma**2))[:, None, None, None]
    score_fn = get_score_fn(sde, get_model(config.model), variables, continuous=True)
    x = reference["x"]
    score = score_fn(jnp.asarray(x * scale, jnp.float32), jnp.asarray(t, jnp.float32))
    denoised = x + (sigma**2)[:, None, None, None] * scale * np.asarray(score)
    errors = [relative_error(denoised[i], reference["denoised"][i]) for i in range(len(sigma))]
    # At sigma = 20 the label 999 t is 930, whose float32 spacing (6e-5) the sinusoid of
    # frequency 1 sees in both codes' own rounding: 3e-5 there, below 1e-5 elsewhere. A wrong
    # beta (20 for 19.9) moves the label by 5.
    assert errors[0] < 1e-5 and errors[1] < 1e-5 and errors[2] < 1e-4, errors


def test_edm_precond_is_our_edm_parametrisation_on_edm_sde():
    """EDM's EDMPrecond denoiser D(x; sigma) = c_skip x + c_out F(c_in x, ln(sigma)/4) is
    x + sigma^2 s(x, sigma) with our score s of get_score_fn(EDMSDE, ..., 'edm') (alpha = 1,
    sigma_t = t), on noisy inputs x = y + sigma n at sigma = 0.05, 1 and 20; the fixture's
    random map_augment is dropped (EDM's sampler passes no augment labels, and the fixture
    maker checks that zero labels give the same D bit for bit)."""
    from diffusion_sde.models import get_score_fn
    from diffusion_sde.sde import EDMSDE

    config, meta = fixture_config("edm_ddpmpp_edm")
    reference = np.load(FIXTURES / "edm_ddpmpp_edm.npz")
    weights = pretrained.read_checkpoint(FIXTURES / meta["file"], "edm")
    assert (weights.precond, weights.sigma_data) == ("EDMPrecond", 0.5)
    assert "map_augment.weight" not in weights.raw  # dropped, bias-free
    variables = pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])
    sde = EDMSDE(sigma_min=0.002, sigma_max=80.0)
    score_fn = get_score_fn(sde, get_model(config.model), variables, parametrization="edm")
    x, sigma = reference["noisy"], reference["sigma"]
    score = np.asarray(score_fn(jnp.asarray(x), jnp.asarray(sigma)), np.float64)
    denoised = x + (sigma.astype(np.float64) ** 2)[:, None, None, None] * score
    errors = [relative_error(denoised[i], reference["denoised"][i]) for i in range(len(sigma))]
    # Measured: 1e-7, 7e-7, 1.5e-6. A wrong sigma_data (1 for 0.5) moves D by 5e-2 to 1.
    assert max(errors) < 1e-5, errors
    wrong = get_score_fn(sde, get_model(config.model), variables, sigma_data=1.0)
    wrong_d = x + sigma[:, None, None, None] ** 2 * np.asarray(wrong(jnp.asarray(x), sigma))
    assert relative_error(wrong_d, reference["denoised"]) > 1e-2


def test_edm_precond_needs_the_edm_config(monkeypatch):
    config, meta = fixture_config("edm_ddpmpp_edm")
    path = FIXTURES / meta["file"]
    for field, value in [("training.sde", "vpsde"), ("model.parametrization", "eps")]:
        wrong = config.copy_and_resolve_references()
        section, key = field.split(".")
        wrong[section][key] = value
        with pytest.raises(pretrained.MismatchError, match="model.parametrization='edm'"):
            pretrained.load_variables(wrong, path, "edm")
    # The VP baseline is not loaded under the EDM config either.
    with pytest.raises(pretrained.MismatchError, match="VPPrecond network predicts the noise"):
        pretrained.load_variables(config, FIXTURES / "edm_ddpmpp_vp.pt", "edm")
    export = pretrained.read_torch(path)
    state = collections.OrderedDict(export["state_dict"])
    # An export with another sigma_data needs that model.sigma_data.
    monkeypatch.setattr(pretrained, "read_torch", lambda _: {**export, "sigma_data": 1.0})
    with pytest.raises(pretrained.MismatchError, match="model.sigma_data=1.0"):
        pretrained.load_variables(config, path, "edm")
    config.model.sigma_data = 1.0
    assert pretrained.load_variables(config, path, "edm")["params"]
    # A map_augment with a bias would add a constant to the embedding: refused.
    state["model.map_augment.bias"] = np.ones(8, np.float32)
    monkeypatch.setattr(pretrained, "read_torch", lambda _: {**export, "state_dict": state})
    with pytest.raises(pretrained.FormatError, match="map_augment has a bias"):
        pretrained.load_variables(config, path, "edm")
    # A class-conditional SongUNet (map_label) is refused.
    del state["model.map_augment.bias"]
    state["model.map_label.weight"] = np.ones((8, 10), np.float32)
    with pytest.raises(pretrained.FormatError, match="class-conditional"):
        pretrained.load_variables(config, path, "edm")


def test_edm_exports_other_than_vp_and_edm_are_refused(tmp_path):
    config, _ = fixture_config("edm_ddpmpp_vp")
    for precond, reason in [
        ("VEPrecond", r"log\(sigma / 2\)"),
        ("iDDPMPrecond", "ADM"),
    ]:
        path = tmp_path / f"{precond}.pt"
        _torch_zip(path, {"precond": precond, "state_dict": collections.OrderedDict()})
        with pytest.raises(pretrained.FormatError, match=reason):
            pretrained.load_variables(config, path, "edm")
    # A bare state dict cannot say its preconditioner (edm-* and baseline-* share names).
    bare = tmp_path / "bare.pt"
    _torch_zip(bare, collections.OrderedDict())
    with pytest.raises(pretrained.FormatError, match="preconditioner.*torch.save"):
        pretrained.load_variables(config, bare, "edm")
    # The network must be the config's DDPM++.
    config.model.resblock_type = "ddpm"
    with pytest.raises(pretrained.MismatchError, match="resblock_type='biggan'"):
        pretrained.load_variables(config, FIXTURES / "edm_ddpmpp_vp.pt", "edm")


def test_ncsnv2_checkpoints_are_refused_saying_what_differs(tmp_path):
    from flax import serialization

    config, meta = fixture_config("ddpm")
    config.model.name = "ncsnv2"
    with pytest.raises(pretrained.MismatchError, match="2 nf channels"):
        pretrained.load_variables(config, FIXTURES / meta["file"], meta["format"])
    # score_sde's Flax NCSNv2 state (its auto-named RefineBlocks)
    one = {"RefineBlock_0": {"Conv_0": {"kernel": np.ones((3, 3, 8, 8), np.float32)}}}
    state = dict(
        step=1,
        optimizer=dict(target=one, state={}),
        lr=2e-4,
        model_state={},
        ema_rate=0.999,
        params_ema=one,
        rng=np.zeros(2, np.uint32),
    )
    path = tmp_path / "checkpoint_1"
    path.write_bytes(serialization.msgpack_serialize(state))
    with pytest.raises(pretrained.FormatError, match="29,694,083"):
        pretrained.load_variables(config, path, "score_sde")


def test_tensor_reaching_past_its_storage_is_refused(tmp_path, monkeypatch):
    """A crafted torch file whose tensor claims more elements than its storage holds
    (as_strided would read past the buffer)."""
    import sys
    import types

    torch_module, utils_module = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("only pickled here, never called")

    FloatStorage.__module__, _rebuild_tensor_v2.__module__ = "torch", "torch._utils"
    FloatStorage.__qualname__ = "FloatStorage"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch_module.FloatStorage, utils_module._rebuild_tensor_v2 = FloatStorage, _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_module)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_module)

    class Storage:
        pass

    class Tensor:
        def __reduce__(self):  # 100 elements claimed, 4 stored
            return _rebuild_tensor_v2, (Storage(), 0, (10, 10), (10, 1), False, {})

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", FloatStorage, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buffer = __import__("io").BytesIO()
    Pickler(buffer, protocol=2).dump({"weight": Tensor()})
    path = tmp_path / "short.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(pretrained.FormatError, match="reaches past its storage"):
        pretrained.read_torch(path)
