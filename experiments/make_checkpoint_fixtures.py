"""Make the checkpoint fixtures of tests/test_checkpoints.py with the source projects' own code.

Each fixture is a small network (under 400k parameters, 16x16 images) of a source project,
every tensor random (no zero left by zero-initialisation; the EMA weights differ from the
raw ones), written in that project's checkpoint format by its own code, with that code's
outputs on fixed inputs (``<name>.npz``: ``x``, ``time_cond``, ``out_raw`` and, where the
format has EMA weights, ``out_ema``) and the model config (``<name>.json``, the 2021
reference's field names, which our configs share).

Sources, at the commits the fixtures were made from (clone them outside this repository;
their code is not part of it):

- score_sde_pytorch, github.com/yang-song/score_sde_pytorch at cb1f359f (CPU torch; its
  ``op`` package's CUDA kernels are not compiled: the CPU path is its upfirdn2d_native);
- score_sde, github.com/yang-song/score_sde at 0acb9e0e (models/ only, run with current
  jax/flax; its ``models/utils.py`` imports TensorFlow and the removed ``flax.optim``, so a
  stand-in module gives ncsnpp.py/ddpm.py the two functions they use, ``register_model``
  and ``get_sigmas``; the checkpoint is the msgpack that ``checkpoints.save_checkpoint``
  wrote, ``serialization.to_bytes`` of the State dataclass, rebuilt here with the same
  fields since ``flax.optim.Optimizer`` no longer exists);
- diffusers 0.42.1 from the package registry (``UNet2DModel.save_pretrained``);
- EDM, github.com/NVlabs/edm at 008a4e53 (``training/networks.py``: a ``VPPrecond`` around
  a DDPM++ ``SongUNet``, exported as ``{'precond': 'VPPrecond', 'state_dict': ...}``, and an
  ``EDMPrecond`` around a DDPM++ ``SongUNet`` with ``augment_dim=9``, the layout of
  edm-cifar10-32x32-uncond-vp).

Run, from the repository root (torch 2.13 CPU, diffusers 0.42.1, ml_collections in the
first environment; this project's .venv for the second):

    python experiments/make_checkpoint_fixtures.py torch --score_sde_pytorch=PATH
    python experiments/make_checkpoint_fixtures.py edm --edm=PATH  # after torch
    python experiments/make_checkpoint_fixtures.py edm_precond --edm=PATH  # after edm
    .venv/bin/python experiments/make_checkpoint_fixtures.py flax --score_sde=PATH
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import math
import pathlib
import sys
import types

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "checkpoints"
IMAGE_SIZE, CHANNELS, BATCH = 16, 3, 3
_COMMON = dict(
    sigma_min=0.01,
    sigma_max=50.0,
    num_scales=1000,
    beta_min=0.1,
    beta_max=20.0,
    dropout=0.0,
    ema_rate=0.999,
    normalization="GroupNorm",
    nonlinearity="swish",
    conditional=True,
    init_scale=0.0,
    fourier_scale=16,
    conv_size=3,
    resamp_with_conv=True,
    fir_kernel=[1, 3, 3, 1],
)
# The networks: NCSN++ (VE, as cifar10_ncsnpp_continuous, and with the other pyramids),
# DDPM++ (VP, as cifar10_ddpmpp_continuous), DDPM++ with DDPM blocks, and DDPM.
NETWORKS = {
    "ncsnpp_ve": dict(
        name="ncsnpp",
        scale_by_sigma=True,
        nf=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        fir=True,
        skip_rescale=True,
        resblock_type="biggan",
        progressive="output_skip",
        progressive_input="residual",
        progressive_combine="sum",
        embedding_type="fourier",
        centered=False,
        continuous=True,
    ),
    "ncsnpp_pyramids": dict(
        name="ncsnpp",
        scale_by_sigma=True,
        nf=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        fir=True,
        skip_rescale=True,
        resblock_type="biggan",
        progressive="residual",
        progressive_input="input_skip",
        progressive_combine="cat",
        embedding_type="fourier",
        centered=False,
        continuous=True,
    ),
    "ddpmpp_vp": dict(
        name="ncsnpp",
        scale_by_sigma=False,
        nf=8,
        ch_mult=[1, 2],
        num_res_blocks=2,
        attn_resolutions=[8],
        fir=False,
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="none",
        progressive_combine="sum",
        embedding_type="positional",
        centered=True,
        continuous=True,
    ),
    "ddpmpp_ddpm_blocks": dict(
        name="ncsnpp",
        scale_by_sigma=False,
        nf=8,
        ch_mult=[1, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        fir=False,
        skip_rescale=True,
        resblock_type="ddpm",
        progressive="none",
        progressive_input="none",
        progressive_combine="sum",
        embedding_type="positional",
        centered=True,
        continuous=True,
    ),
    "ddpm": dict(
        name="ddpm",
        scale_by_sigma=False,
        nf=32,
        ch_mult=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[8],
        centered=True,
        continuous=False,
        decoder_attention="once_per_level",
    ),
}


def model_fields(name: str) -> dict:
    return {**_COMMON, **NETWORKS[name]}


def inputs(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    fields = model_fields(name)
    x = rng.uniform(0, 1, (BATCH, IMAGE_SIZE, IMAGE_SIZE, CHANNELS)).astype(np.float32)
    if fields["centered"]:
        x = 2 * x - 1
    if fields.get("embedding_type") == "fourier":
        time_cond = np.array([0.02, 1.3, 37.0], np.float32)  # sigma
    elif fields["continuous"]:
        time_cond = np.array([3.5, 420.25, 990.0], np.float32)  # 999 t
    else:
        time_cond = np.array([0, 417, 999], np.float32)  # DDPM step
    return x, time_cond


def random_value(rng, name: str, shape, fourier_scale: float) -> np.ndarray:
    """A random tensor of ``shape``: ~N(0, 1/fan) matrices, norm scales 1 + N(0, 0.1^2),
    biases N(0, 0.1^2), Fourier frequencies N(0, scale^2)."""
    if len(shape) >= 2:
        fan = math.prod(shape) / max(shape)
        return rng.standard_normal(shape) / math.sqrt(fan)
    leaf = name.split(".")[-1].split("/")[-1]
    if leaf == "W":
        return rng.standard_normal(shape) * fourier_scale
    if leaf in ("scale",) or ("norm" in name.lower() and leaf == "weight"):
        return 1 + 0.1 * rng.standard_normal(shape)
    return 0.1 * rng.standard_normal(shape)


def write(name: str, fmt: str, file: str, x, time_cond, outputs: dict, source: str) -> None:
    np.savez(OUT / f"{name}.npz", x=x, time_cond=time_cond, **outputs)
    meta = {
        "format": fmt,
        "file": file,
        "source": source,
        "image_size": IMAGE_SIZE,
        "model": model_fields(name.removeprefix("flax_").removesuffix("_state_dict")),
    }
    (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(name, {k: v.shape for k, v in outputs.items()})


# ------------------------------------------------------------------------- PyTorch sources


def source_config(name: str):
    import ml_collections

    fields = model_fields(name)
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(
        {k: v for k, v in fields.items() if k not in ("centered", "continuous")}
    )
    config.data = ml_collections.ConfigDict(
        dict(image_size=IMAGE_SIZE, num_channels=CHANNELS, centered=fields["centered"])
    )
    config.training = ml_collections.ConfigDict(dict(continuous=fields["continuous"]))
    return config


def make_torch(score_sde_pytorch: pathlib.Path) -> None:
    import torch
    import torch.utils.cpp_extension

    torch.utils.cpp_extension.load = lambda *args, **kwargs: None  # CUDA ops unused on CPU
    sys.path.insert(0, str(score_sde_pytorch))
    from models import ddpm, ncsnpp  # noqa: F401 -- registers the models
    from models import utils as mutils
    from models.ema import ExponentialMovingAverage

    # score_sde_pytorch's utils.py imports TensorFlow for restore_checkpoint only.
    tensorflow = types.ModuleType("tensorflow")
    tensorflow.__spec__ = importlib.machinery.ModuleSpec("tensorflow", None)
    sys.modules.setdefault("tensorflow", tensorflow)
    from utils import save_checkpoint

    torch.set_default_dtype(torch.float32)
    # Not ncsnpp_pyramids nor ddpmpp_ddpm_blocks: score_sde_pytorch's FIR upsample_conv_2d
    # (progressive='residual') fails in PyTorch (w[..., ::-1, ::-1], a negative step), and
    # so does its layerspp.Upsample with a convolution (F.interpolate given 'nearest' as
    # scale_factor); no published model uses either. The Flax fixtures cover both.
    torch_networks = [n for n in NETWORKS if n not in ("ncsnpp_pyramids", "ddpmpp_ddpm_blocks")]
    for seed, name in enumerate(torch_networks):
        config = source_config(name)
        network = mutils.get_model(config.model.name)(config)
        model = torch.nn.DataParallel(network)  # as mutils.create_model, so names are module.*
        rng = np.random.default_rng(100 + seed)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                value = random_value(rng, pname, tuple(p.shape), config.model.fourier_scale)
                p.copy_(torch.from_numpy(value.astype(np.float32)))
        ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
        for shadow in ema.shadow_params:
            shadow.add_(torch.from_numpy(0.05 * rng.standard_normal(tuple(shadow.shape))).float())
        x, time_cond = inputs(name, seed)
        x_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
        labels = torch.from_numpy(time_cond)
        if not config.training.continuous:
            labels = labels.long()
        # One Adam step, so that the file holds an optimizer state as a trained one does
        # (not for the DDPM, whose moments would double the largest fixture).
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)
        if name != "ddpm":
            model(x_torch, labels).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        state = dict(optimizer=optimizer, model=model, ema=ema, step=17)
        save_checkpoint(str(OUT / f"{name}.pth"), state)
        model.eval()
        with torch.no_grad():
            out_raw = model(x_torch, labels).permute(0, 2, 3, 1).numpy()
            ema.copy_to(model.parameters())
            out_ema = model(x_torch, labels).permute(0, 2, 3, 1).numpy()
        write(
            name,
            "score_sde_pytorch",
            f"{name}.pth",
            x,
            time_cond,
            dict(out_raw=out_raw, out_ema=out_ema),
            "score_sde_pytorch cb1f359f",
        )
        if name == "ddpmpp_vp":
            # A plain state dict, as exported from such a checkpoint (here the EMA weights).
            torch.save(network.state_dict(), OUT / f"{name}_state_dict.pt")
            write(
                f"{name}_state_dict",
                "torch_state_dict",
                f"{name}_state_dict.pt",
                x,
                time_cond,
                dict(out_raw=out_ema),
                "score_sde_pytorch cb1f359f",
            )
    make_diffusers()
    make_shapes()


def make_diffusers() -> None:
    import diffusers
    import torch

    fields = model_fields("ddpm")
    unet = diffusers.UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_eps=1e-6,
        norm_num_groups=32,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        time_embedding_type="positional",
        act_fn="silu",
        center_input_sample=False,
    )
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            value = random_value(rng, pname, tuple(p.shape), 1.0)
            p.copy_(torch.from_numpy(value.astype(np.float32)))
    directory = OUT / "diffusers_ddpm"
    unet.save_pretrained(directory, safe_serialization=True)
    x, time_cond = inputs("ddpm", 7)
    unet.eval()
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(time_cond).long())
    out = out.sample.permute(0, 2, 3, 1).numpy()
    np.savez(OUT / "diffusers_ddpm.npz", x=x, time_cond=time_cond, out_raw=out)
    meta = {
        "format": "diffusers",
        "file": "diffusers_ddpm",
        "source": f"diffusers {diffusers.__version__}",
        "image_size": IMAGE_SIZE,
        "model": {**fields, "decoder_attention": "every_block"},
    }
    (OUT / "diffusers_ddpm.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("diffusers_ddpm", out.shape)


def make_edm(edm: pathlib.Path) -> None:
    """EDM's VPPrecond around a DDPM++ SongUNet (the layout of baseline-cifar10-32x32-uncond-vp),
    exported as the error message of diffusion_sde.pretrained tells (preconditioner class
    name and state dict; the sigma_data it now also writes is None there), with the network's outputs F(x_in, c_noise) and the preconditioned
    denoiser's D(x, sigma)."""
    import torch

    sys.path.insert(0, str(edm))
    from training import networks

    fields = model_fields("ddpmpp_vp")
    net = networks.VPPrecond(
        img_resolution=IMAGE_SIZE,
        img_channels=CHANNELS,
        label_dim=0,
        model_type="SongUNet",
        model_channels=fields["nf"],
        channel_mult=fields["ch_mult"],
        num_blocks=fields["num_res_blocks"],
        attn_resolutions=fields["attn_resolutions"],
        dropout=0.0,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    )
    rng = np.random.default_rng(11)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            p.copy_(
                torch.from_numpy(random_value(rng, pname, tuple(p.shape), 1.0).astype(np.float32))
            )
    torch.save(
        {"precond": type(net).__name__, "state_dict": net.state_dict()}, OUT / "edm_ddpmpp_vp.pt"
    )
    x, time_cond = inputs("ddpmpp_vp", 11)  # x in [-1, 1], time_cond = c_noise = 999 t
    sigma = np.array([0.05, 1.0, 20.0], np.float32)
    net.eval()
    with torch.no_grad():
        x_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
        out = net.model(x_torch, torch.from_numpy(time_cond), class_labels=None)
        denoised = net(x_torch, torch.from_numpy(sigma))
    np.savez(
        OUT / "edm_ddpmpp_vp.npz",
        x=x,
        time_cond=time_cond,
        out_raw=out.permute(0, 2, 3, 1).numpy(),
        sigma=sigma,
        denoised=denoised.permute(0, 2, 3, 1).numpy(),
    )
    meta = {
        "format": "edm",
        "file": "edm_ddpmpp_vp.pt",
        "source": "EDM 008a4e53",
        "image_size": IMAGE_SIZE,
        "model": fields,
    }
    (OUT / "edm_ddpmpp_vp.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("edm_ddpmpp_vp", out.shape)

    # The full-size layout of baseline-cifar10-32x32-uncond-vp: score_sde's DDPM++ cont.
    # (nf 128, ch_mult 1,2,2,2, 4 blocks, attention at 16) as a SongUNet under VPPrecond.
    import gzip

    full = networks.VPPrecond(
        img_resolution=32,
        img_channels=3,
        label_dim=0,
        model_type="SongUNet",
        model_channels=128,
        channel_mult=[1, 2, 2, 2],
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.1,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    )
    with gzip.open(OUT / "published_shapes.json.gz", "rt") as file:
        shapes = json.load(file)
    shapes["edm/baseline-cifar10-32x32-uncond-vp"] = dict(
        config="cifar10_ddpmpp_continuous_vp",
        state_dict={k: list(v.shape) for k, v in full.state_dict().items()},
        trainable=sum(p.numel() for p in full.parameters()),
    )
    with gzip.open(OUT / "published_shapes.json.gz", "wt") as file:
        json.dump(shapes, file)
    print("baseline-vp", shapes["edm/baseline-cifar10-32x32-uncond-vp"]["trainable"])


def make_edm_precond(edm: pathlib.Path) -> None:
    """EDM's EDMPrecond around a DDPM++ SongUNet with augment_dim=9 (the layout of
    edm-cifar10-32x32-uncond-vp: channel_mult 2 at every level, map_augment a bias-free
    Linear), every tensor random, exported as for VPPrecond, with the network's outputs
    F(c_in x, c_noise) and the preconditioned denoiser's D(x; sigma) on noisy x = y + sigma n,
    without augment labels (as EDM's sampler calls it) and with zero ones."""
    import torch

    sys.path.insert(0, str(edm))
    from training import networks

    fields = {
        **model_fields("ddpmpp_vp"),
        "ch_mult": [2, 2],
        "parametrization": "edm",
        "sigma_data": 0.5,
    }
    net = networks.EDMPrecond(
        img_resolution=IMAGE_SIZE,
        img_channels=CHANNELS,
        label_dim=0,
        sigma_data=0.5,
        model_type="SongUNet",
        augment_dim=9,
        model_channels=fields["nf"],
        channel_mult=fields["ch_mult"],
        num_blocks=fields["num_res_blocks"],
        attn_resolutions=fields["attn_resolutions"],
        dropout=0.13,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    )
    rng = np.random.default_rng(14)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            p.copy_(
                torch.from_numpy(random_value(rng, pname, tuple(p.shape), 1.0).astype(np.float32))
            )
    assert net.model.map_augment.bias is None
    torch.save(
        {
            "precond": type(net).__name__,
            "sigma_data": net.sigma_data,
            "state_dict": net.state_dict(),
        },
        OUT / "edm_ddpmpp_edm.pt",
    )
    sigma = np.array([0.05, 1.0, 20.0], np.float32)
    clean, _ = inputs("ddpmpp_vp", 14)  # in [-1, 1]
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    x = (clean + sigma[:, None, None, None] * noise).astype(np.float32)
    net.eval()
    with torch.no_grad():
        x_torch = torch.from_numpy(x).permute(0, 3, 1, 2)
        sigma_torch = torch.from_numpy(sigma)
        c_in = (1 / (0.5**2 + sigma_torch.reshape(-1, 1, 1, 1) ** 2).sqrt()).to(torch.float32)
        c_noise = (sigma_torch.log() / 4).to(torch.float32)
        out = net.model(c_in * x_torch, c_noise, class_labels=None)
        denoised = net(x_torch, sigma_torch)
        zeros = torch.zeros([BATCH, 9])
        denoised_zero_augment = net(x_torch, sigma_torch, augment_labels=zeros)
    assert torch.equal(denoised, denoised_zero_augment)
    np.savez(
        OUT / "edm_ddpmpp_edm.npz",
        x=(c_in * x_torch).permute(0, 2, 3, 1).numpy(),  # the network's input c_in x
        time_cond=c_noise.numpy(),  # c_noise = ln(sigma) / 4
        out_raw=out.permute(0, 2, 3, 1).numpy(),
        sigma=sigma,
        noisy=x,
        denoised=denoised.permute(0, 2, 3, 1).numpy(),
    )
    meta = {
        "format": "edm",
        "file": "edm_ddpmpp_edm.pt",
        "source": "EDM 008a4e53",
        "image_size": IMAGE_SIZE,
        "model": fields,
    }
    (OUT / "edm_ddpmpp_edm.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("edm_ddpmpp_edm", out.shape)

    # The full-size layout of edm-cifar10-32x32-uncond-vp (EDM's train.py --arch=ddpmpp
    # --precond=edm --augment=0.12: channel_mult 2,2,2, augment_dim 9, dropout 0.13).
    import gzip

    full = networks.EDMPrecond(
        img_resolution=32,
        img_channels=3,
        label_dim=0,
        model_type="SongUNet",
        augment_dim=9,
        model_channels=128,
        channel_mult=[2, 2, 2],
        dropout=0.13,
        embedding_type="positional",
        encoder_type="standard",
        decoder_type="standard",
        channel_mult_noise=1,
        resample_filter=[1, 1],
    )
    with gzip.open(OUT / "published_shapes.json.gz", "rt") as file:
        shapes = json.load(file)
    state = {k: list(v.shape) for k, v in full.state_dict().items()}
    shapes["edm/edm-cifar10-32x32-uncond-vp"] = dict(
        config="cifar10_edm_ddpmpp",
        state_dict=state,
        trainable=sum(p.numel() for p in full.parameters()),
        # map_augment (9 x 128, no bias) is not loaded: zero augment labels at sampling.
        dropped=sum(p.numel() for p in full.model.map_augment.parameters()),
    )
    with gzip.open(OUT / "published_shapes.json.gz", "wt") as file:
        json.dump(shapes, file)
    print("edm-vp", shapes["edm/edm-cifar10-32x32-uncond-vp"]["trainable"])


# Published score_sde_pytorch checkpoints: their source config and our config that loads each.
PUBLISHED = {
    "vp/cifar10_ddpmpp_continuous": "cifar10_ddpmpp_continuous_vp",
    "vp/cifar10_ddpmpp_deep_continuous": "cifar10_ddpmpp_deep_continuous_vp",
    "subvp/cifar10_ddpmpp_continuous": "cifar10_ddpmpp_continuous_subvp",
    "ve/cifar10_ncsnpp_continuous": "cifar10_ncsnpp_continuous_ve",
    "ve/cifar10_ncsnpp_deep_continuous": "cifar10_ncsnpp_deep_continuous_ve",
    "vp/ddpm/cifar10": "cifar10_ddpm_vp",
}


def make_shapes() -> None:
    """``published_shapes.json.gz``: the array names and shapes of the full-size published
    networks (score_sde_pytorch's, and diffusers' google/ddpm-cifar10-32 with the config of
    its model card), built by their own code, so the name table is tested on the real
    layouts without the weights."""
    import gzip
    import importlib

    import diffusers
    import torch
    from models import utils as mutils

    shapes = {}
    for source, ours in PUBLISHED.items():
        config = importlib.import_module("configs." + source.replace("/", ".")).get_config()
        model = torch.nn.DataParallel(mutils.get_model(config.model.name)(config))
        state = {k: list(v.shape) for k, v in model.state_dict().items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shapes[source] = dict(config=ours, state_dict=state, trainable=trainable)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        norm_eps=1e-6,
        norm_num_groups=32,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        time_embedding_type="positional",
        act_fn="silu",
        center_input_sample=False,
    )
    shapes["google/ddpm-cifar10-32"] = dict(
        config="cifar10_ddpm_vp",
        state_dict={k: list(v.shape) for k, v in unet.state_dict().items()},
        trainable=sum(p.numel() for p in unet.parameters()),
    )
    with gzip.open(OUT / "published_shapes.json.gz", "wt") as file:
        json.dump(shapes, file)
    print({k: v["trainable"] for k, v in shapes.items()})


# ---------------------------------------------------------------------------- Flax source


def make_flax(score_sde: pathlib.Path) -> None:
    import flax
    import jax
    import jax.numpy as jnp
    from flax import serialization

    # Stand-in for score_sde's models/utils.py (TensorFlow, flax.optim): the two functions
    # the networks use.
    models_utils = types.ModuleType("models.utils")
    registry = {}

    def register_model(cls=None, *, name=None):
        def register(cls):
            registry[name or cls.__name__] = cls
            return cls

        return register if cls is None else register(cls)

    def get_sigmas(config):
        return np.exp(
            np.linspace(
                np.log(config.model.sigma_max),
                np.log(config.model.sigma_min),
                config.model.num_scales,
            )
        )

    models_utils.register_model, models_utils.get_sigmas = register_model, get_sigmas
    sys.path.insert(0, str(score_sde))
    import models

    sys.modules["models.utils"] = models_utils
    models.utils = models_utils
    from models import ddpm, ncsnpp  # noqa: F401 -- registers the models

    @flax.struct.dataclass
    class Optimizer:  # what flax.optim.Optimizer serialised: its target and state
        target: dict
        state: dict

    @flax.struct.dataclass
    class State:  # score_sde's models/utils.State
        step: int
        optimizer: Optimizer
        lr: float
        model_state: dict
        ema_rate: float
        params_ema: dict
        rng: jax.Array

    for seed, name in enumerate(NETWORKS):
        config = source_config(name)
        network = registry[config.model.name](config=config)
        x, time_cond = inputs(name, 50 + seed)
        labels = jnp.asarray(time_cond)
        if not config.training.continuous:
            labels = labels.astype(jnp.int32)
        variables = network.init(
            {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
            jnp.asarray(x),
            labels,
            train=False,
        )
        rng = np.random.default_rng(200 + seed)
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]), sep="/")
        params = {
            k: jnp.asarray(random_value(rng, k, v.shape, config.model.fourier_scale), jnp.float32)
            for k, v in flat.items()
        }
        params_ema = {
            k: v + jnp.asarray(0.05 * rng.standard_normal(v.shape), jnp.float32)
            for k, v in params.items()
        }
        params = flax.traverse_util.unflatten_dict(params, sep="/")
        params_ema = flax.traverse_util.unflatten_dict(params_ema, sep="/")
        state = State(
            step=23,
            optimizer=Optimizer(target=params, state={"step": 23, "param_states": {}}),
            lr=2e-4,
            model_state={},
            ema_rate=config.model.ema_rate,
            params_ema=params_ema,
            rng=jax.random.PRNGKey(3),
        )
        (OUT / f"flax_{name}.msgpack").write_bytes(serialization.to_bytes(state))

        def apply(p, network=network, x=x, labels=labels):
            return np.asarray(network.apply({"params": p}, jnp.asarray(x), labels, train=False))

        write(
            f"flax_{name}",
            "score_sde",
            f"flax_{name}.msgpack",
            x,
            time_cond,
            dict(out_raw=apply(params), out_ema=apply(params_ema)),
            "score_sde 0acb9e0e",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=["torch", "flax", "edm", "edm_precond"])
    parser.add_argument("--score_sde_pytorch", type=pathlib.Path)
    parser.add_argument("--edm", type=pathlib.Path)
    parser.add_argument("--score_sde", type=pathlib.Path)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.which == "torch":
        make_torch(args.score_sde_pytorch.resolve())
    elif args.which == "edm":
        make_edm(args.edm.resolve())
    elif args.which == "edm_precond":
        make_edm_precond(args.edm.resolve())
    else:
        make_flax(args.score_sde.resolve())
