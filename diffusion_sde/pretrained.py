r"""Published checkpoints, read into this codebase's networks.

(``training.checkpoint.import_published`` writes one as the checkpoint of a workdir.)

The field evaluates fast samplers on the pretrained models of score_sde (Song et al. 2021)
and of DDPM (Ho et al. 2020, as ported by diffusers). Our networks compute what the 2021
reference networks compute, so each of those checkpoints becomes Flax variables of the
network that ``config.model`` builds, parameter for parameter:

===================== =============================================== ======================
``format``            what the file is                                read with
===================== =============================================== ======================
``score_sde``         score_sde's Flax ``checkpoints.save_checkpoint`` msgpack
                      msgpack (``optimizer.target``, ``params_ema``,
                      ``model_state``, ``step``)
``score_sde_pytorch`` score_sde_pytorch's ``torch.save`` of             a restricted
                      ``{model, ema, optimizer, step}``               unpickler (no torch)
``torch_state_dict``  a plain ``state_dict()`` of a score_sde_pytorch    the same
                      network (``all_modules.*`` names)
``diffusers``         diffusers' ``UNet2DModel`` safetensors           a safetensors parser
                      (``google/ddpm-cifar10-32``)                     (no torch)
``edm``               EDM's ``VPPrecond`` or ``EDMPrecond`` around a   the restricted
                      DDPM++ ``SongUNet`` (``baseline-cifar10-32x32-   unpickler
                      uncond-vp``, ``edm-cifar10-32x32-uncond-vp``)
                      exported as ``{precond, sigma_data,
                      state_dict}``
===================== =============================================== ======================

EDM's pickles themselves (unpickling runs EDM's code), EDM's other preconditioners
(the VE baseline, iDDPM), class-conditional SongUNets, NCSNv2, openai's consistency models and
diffusers' NCSN++ port are recognised and refused with an error that says what differs
(see :data:`REFUSED` and :data:`EDM_EXPORT_COMMAND`). Torch is never imported:
``torch.save`` files are zip archives of a pickle and raw storages, read here with an
unpickler that only builds tensors and ordered dicts (anything else in the pickle is an
error, so a file cannot run code).

The map from the source's parameter names to ours is explicit and printable
(:func:`name_table`): our network's top-level modules in the order it calls them are paired
with the source's, in the source's own order (``all_modules.<k>`` of score_sde_pytorch,
Flax auto-names ``<Class>_<k>`` of score_sde, diffusers' and EDM's block names, written
out by :func:`_diffusers_prefixes` and :func:`_edm_prefixes`); inside a module the names
follow :data:`INNER_NAMES`, and arrays are converted by :data:`TRANSFORMS` (PyTorch's
``OIHW`` convolutions to ``HWIO``, ``(out, in)`` linears to ``(in, out)``, score_sde's
``NIN`` matrices to 1x1 convolutions, EDM's fused ``qkv`` split into q, k and v).

Two model options exist only to load checkpoints exactly (both in the cifar10 configs):
``model.fourier_in_params=True`` keeps NCSN++'s Fourier frequencies as the parameter
``W`` the checkpoint stores, and ``model.decoder_attention='once_per_level'`` is the DDPM
decoder of score_sde (``'every_block'``, the default, is Ho et al.'s and diffusers').

Errors are :class:`CheckpointError` (a ``ValueError``): :class:`FormatError` for a file
that is not of the format named, or is truncated; :class:`MismatchError` for a config
that does not build the checkpoint's network (it names the parameter and both shapes).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pathlib
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_sde import errors

__all__ = [
    "FORMATS",
    "INNER_NAMES",
    "REFUSED",
    "TRANSFORMS",
    "CheckpointError",
    "Entry",
    "FormatError",
    "MismatchError",
    "SourceWeights",
    "convert_checkpoint",
    "load_variables",
    "name_table",
    "read_checkpoint",
    "read_safetensors",
    "read_torch",
]


class CheckpointError(errors.UserError, ValueError):
    """A checkpoint that cannot be loaded into the configured network."""


class FormatError(CheckpointError):
    """The file is not of the format named (or not of any format known), or is truncated."""


class MismatchError(CheckpointError):
    """The checkpoint's network is not the one ``config.model`` builds."""


# ----------------------------------------------------------------------------- torch files

# torch's storage classes, by the name the pickle gives them, and their numpy dtypes.
_TORCH_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
    dtype: Any


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, ...)
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[storage_offset])
    if any(n == 0 for n in size):
        return np.zeros(tuple(size), storage.dtype)
    # as_strided does not check bounds: a tensor must lie inside its storage.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if storage_offset < 0 or min(stride) < 0 or last >= storage.size:
        raise FormatError(
            f"a tensor of shape {tuple(size)} reaches past its storage of {storage.size} "
            "elements (a truncated or corrupt torch file)"
        )
    return np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=[s * itemsize for s in stride]
    ).copy()


def _rebuild_parameter(data, *_unused):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a ``torch.save`` zip, building tensors as numpy arrays.

    Only the globals a state dict or a score_sde_pytorch checkpoint needs are allowed;
    any other global (which a pickle would call) is a :class:`FormatError`.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(file)
        self._archive, self._prefix, self._source = archive, prefix, source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _StorageType(_TORCH_STORAGE_DTYPES[name])
        if module == "torch" and name == "device":
            return str
        raise FormatError(
            f"{self._source}: the pickle asks for {module}.{name}, which a checkpoint of "
            "tensors does not need, so it is not unpickled (it could run code). Export the "
            "network's state_dict() with torch.save and load that (format "
            "'torch_state_dict')."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"{self._source}: unknown persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise FormatError(f"{self._source}: a storage of unknown type {storage_type!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError as error:
                raise FormatError(
                    f"{self._source}: storage {key} is missing from the archive (truncated?)"
                ) from error
            dtype = storage_type.dtype
            if dtype == "bfloat16":
                array = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
                array = array.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype)
            if array.size < numel:
                raise FormatError(f"{self._source}: storage {key} is short (truncated file?)")
            self._storages[key] = array
        return self._storages[key]


def read_torch(path: str | pathlib.Path) -> Any:
    """The object a ``torch.save`` zip file holds, with tensors as numpy arrays (no torch).

    Raises :class:`FormatError` for a file that is not a torch zip archive (including
    torch's pre-1.6 format), a truncated one, or one whose pickle needs other globals.
    """
    path = pathlib.Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise FormatError(
            f"{path} is not a torch.save zip archive ({error}); a file of torch < 1.6 must "
            "be re-saved with a current torch.save first."
        ) from error
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
        if not pickles:
            raise FormatError(f"{path} is a zip file without data.pkl: not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = f"{prefix}byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise FormatError(f"{path}: big-endian torch files are not supported")
        try:
            return _TorchUnpickler(
                io.BytesIO(archive.read(pickles[0])), archive, prefix, str(path)
            ).load()
        except (
            pickle.UnpicklingError,
            EOFError,
            zipfile.BadZipFile,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
        ) as error:
            if isinstance(error, CheckpointError):
                raise
            raise FormatError(f"{path}: unreadable torch pickle ({error}); truncated?") from error


# ------------------------------------------------------------------------------ safetensors

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a
    JSON header ``{name: {dtype, shape, data_offsets}}``, then the raw buffer."""
    path = pathlib.Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise FormatError(f"{path} is too short to be a safetensors file")
    header_size = int.from_bytes(data[:8], "little")
    if header_size > len(data) - 8:
        raise FormatError(f"{path} is not a safetensors file, or is truncated (header length)")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FormatError(f"{path} is not a safetensors file (its header is not JSON)") from error
    buffer = memoryview(data)[8 + header_size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end > len(buffer):
            raise FormatError(f"{path} is truncated: tensor {name!r} ends past the file")
        if info["dtype"] == "BF16":
            raw = np.frombuffer(buffer[start:end], np.uint16).astype(np.uint32) << 16
            array = raw.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            array = np.frombuffer(buffer[start:end], _SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise FormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        tensors[name] = array.reshape(info["shape"]).copy()
    return tensors


# ------------------------------------------------------------------------------- msgpack


def _read_msgpack(path: pathlib.Path) -> Any:
    from flax import serialization

    try:
        return serialization.msgpack_restore(path.read_bytes())
    except Exception as error:  # noqa: BLE001 -- msgpack raises many kinds for bad bytes
        raise FormatError(
            f"{path} is not a Flax msgpack checkpoint, or is truncated ({type(error).__name__}: "
            f"{error})"
        ) from error


def _flatten(tree: Mapping, separator: str, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, separator, name))
        else:
            flat[name] = np.asarray(value)
    return flat


# ------------------------------------------------------------------------- source weights


@dataclasses.dataclass
class SourceWeights:
    """A checkpoint's arrays by their source names: ``raw`` (the trained weights), ``ema``
    (their exponential moving average, or None), ``step`` and ``dialect`` (which naming:
    ``'torch'``, ``'flax'``, ``'diffusers'`` or ``'edm'``); for ``edm`` also its
    preconditioner's class name ``precond`` and ``sigma_data`` (``None`` where the export
    does not say: EDMPrecond's default 0.5)."""

    raw: dict[str, np.ndarray]
    ema: dict[str, np.ndarray] | None
    step: int
    dialect: str
    precond: str | None = None
    sigma_data: float | None = None


# Recognised and refused: what differs from the networks here.
REFUSED = {
    "edm_pickle": (
        "an EDM network pickle: unpickling it runs EDM's code, so it is not read here. EDM's "
        "baseline-cifar10-32x32-uncond-vp is score_sde's DDPM++ cont. in EDM's SongUNet under "
        "VPPrecond, whose preconditioning is this codebase's VP adapter, and "
        "edm-cifar10-32x32-uncond-vp is a DDPM++ SongUNet under EDMPrecond, this codebase's "
        "model.parametrization='edm' on training.sde='edm': export either (command below) and "
        "load it with format 'edm'. The VE baseline feeds c_noise = log(sigma/2), which no "
        "score function here applies, so it is refused."
    ),
    "edm_state_dict": (
        "a state dict of EDM's SongUNet (names map_noise/enc/dec): load it with format 'edm', "
        "exported with its preconditioner's name"
    ),
    "ncsnv2": (
        "an NCSNv2 (RefineNet) checkpoint: score_sde's JAX port, whose checkpoints these are, "
        "gives its third RefineBlock 2 nf channels (33,970,563 parameters on CIFAR-10), while "
        "this codebase's NCSNv2 follows the authors' PyTorch code (ermongroup/ncsnv2: nf "
        "channels, 29,694,083 parameters), so the weights do not fit; NCSNv2 checkpoints are "
        "not mapped"
    ),
    "diffusers_ncsnpp": (
        "diffusers' port of NCSN++ (UNet2DModel with skip blocks and Fourier time embedding, "
        "e.g. google/ncsnpp-*): its progressive skip blocks are laid out differently from "
        "score_sde's NCSN++ and are not mapped. Load the original score_sde checkpoint "
        "(format 'score_sde' or 'score_sde_pytorch') instead."
    ),
    "consistency_models": (
        "an openai consistency_models_cifar10 checkpoint (jcm): its NCSN++ is score_sde's "
        "except that the Fourier features embed c_noise = log(sigma)/4 itself (score_sde "
        "embeds log sigma), and its output is EDM's denoiser D = c_skip x + c_out "
        "F(c_in x, c_noise), c_in = 1/sqrt(sigma^2 + 0.25), c_skip = 0.25/(sigma^2 + 0.25), "
        "c_out = 0.5 sigma/sqrt(sigma^2 + 0.25) (sigma_data = 0.5; consistency models shift "
        "c_skip and c_out by sigma_min). This codebase has no EDM preconditioning around its "
        "networks, so the checkpoint is refused rather than loaded into a network that "
        "would compute something else."
    ),
}


def _is_edm_state_dict(names) -> bool:
    return any(n.startswith(("map_noise.", "enc.", "model.map_noise", "model.enc.")) for n in names)


def _torch_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise FormatError(f"{source} does not hold a state dict of tensors")
    state = {re.sub(r"^module\.", "", k): v for k, v in obj.items()}
    if _is_edm_state_dict(state):
        raise FormatError(f"{source} is {REFUSED['edm_state_dict']}")
    return state


def _score_sde_pytorch(path: pathlib.Path) -> SourceWeights:
    obj = read_torch(path)
    if not isinstance(obj, Mapping) or "model" not in obj:
        raise FormatError(
            f"{path} is not a score_sde_pytorch checkpoint (a dict with 'model', 'ema', "
            f"'optimizer', 'step'); its keys: {list(obj) if isinstance(obj, Mapping) else type(obj)}. "
            "For a bare state_dict use format 'torch_state_dict'."
        )
    raw = _torch_state_dict(obj["model"], str(path))
    ema = None
    if obj.get("ema") is not None:
        shadow = obj["ema"]["shadow_params"]
        # ExponentialMovingAverage keeps the parameters with requires_grad, in
        # parameters() order: the state dict less the buffer `sigmas` and the Fourier
        # frequencies W (a parameter without gradient).
        trained = [k for k in raw if k != "sigmas" and not (k.endswith(".W") and raw[k].ndim == 1)]
        if len(trained) != len(shadow):
            raise FormatError(
                f"{path}: the EMA holds {len(shadow)} arrays for {len(trained)} trained "
                "parameters of the model"
            )
        ema = dict(raw)
        for name, value in zip(trained, shadow, strict=True):
            if value.shape != raw[name].shape:
                raise FormatError(f"{path}: EMA array for {name} has shape {value.shape}")
            ema[name] = value
    return SourceWeights(raw, ema, int(obj.get("step", 0)), "torch")


def _plain_torch_state_dict(path: pathlib.Path) -> SourceWeights:
    obj = read_torch(path)
    if isinstance(obj, Mapping) and "model" in obj and "ema" in obj:
        return _score_sde_pytorch(path)
    return SourceWeights(_torch_state_dict(obj, str(path)), None, 0, "torch")


def _score_sde_flax(path: pathlib.Path) -> SourceWeights:
    state = _read_msgpack(path)
    if _is_consistency_models_state(state):
        raise FormatError(f"{path} is {REFUSED['consistency_models']}")
    if not isinstance(state, Mapping) or "optimizer" not in state:
        keys = list(state) if isinstance(state, Mapping) else type(state).__name__
        raise FormatError(
            f"{path} is not a score_sde checkpoint (a state with optimizer.target, "
            f"params_ema, model_state, step); it holds {keys}"
        )
    optimizer = state["optimizer"]
    if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("target"), Mapping):
        raise FormatError(f"{path}: its optimizer holds no target parameters")
    raw = _flatten(optimizer["target"], "/")
    if any(name.startswith("RefineBlock_") for name in raw):
        raise FormatError(f"{path} is {REFUSED['ncsnv2']}")
    ema = _flatten(state["params_ema"], "/") if state.get("params_ema") else None
    if _flatten(state.get("model_state") or {}, "/"):
        raise FormatError(f"{path}: the model has batch statistics, which no network here has")
    return SourceWeights(raw, ema, int(np.asarray(state.get("step", 0))), "flax")


# diffusers UNet2DModel settings that our DDPM computes, checked when config.json is there.
_DIFFUSERS_DDPM_SETTINGS = {
    "_class_name": "UNet2DModel",
    "attention_head_dim": None,  # one head over all channels, as Ho et al.
    "time_embedding_type": "positional",
    "flip_sin_to_cos": False,  # [sin, cos]
    "freq_shift": 1,  # frequencies 10000^(-i/(d/2 - 1))
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "center_input_sample": False,
    "resnet_time_scale_shift": "default",
    "downsample_padding": 0,
    "class_embed_type": None,
}


def _check_diffusers_config(path: pathlib.Path) -> None:
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return
    unet = json.loads(config_file.read_text())
    for key, value in _DIFFUSERS_DDPM_SETTINGS.items():
        if key in unet and unet[key] != value:
            raise MismatchError(
                f"{config_file}: {key} = {unet[key]!r}, but this codebase's DDPM computes "
                f"{key} = {value!r}; the network is not mapped"
            )


def _diffusers(path: pathlib.Path) -> SourceWeights:
    _check_diffusers_config(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors")) or sorted(path.glob("*/*.safetensors"))
        if not candidates:
            raise FormatError(f"{path} holds no .safetensors file")
        path = candidates[0]
    tensors = read_safetensors(path)
    if any(n.startswith("time_proj.W") or ".skip_conv." in n for n in tensors):
        raise FormatError(f"{path} is {REFUSED['diffusers_ncsnpp']}")
    if "conv_in.weight" not in tensors:
        raise FormatError(f"{path} is not a diffusers UNet2DModel (it has no conv_in.weight)")
    return SourceWeights(tensors, None, 0, "diffusers")


# What EDM's preconditioners wrap their network in: VPPrecond is score_sde's VP model and
# EDMPrecond our 'edm' parametrisation on EDMSDE (None: mapped); the others are refused.
_EDM_PRECONDITIONING = {
    "VPPrecond": None,
    "EDMPrecond": None,
    "VEPrecond": (
        "VEPrecond feeds its NCSN++ c_noise = log(sigma / 2) (score_sde's embeds log sigma) "
        "and its residual encoder resamples with a fused convolution-then-filter"
    ),
    "iDDPMPrecond": "iDDPMPrecond (ADM network and its discrete noise levels)",
}
EDM_EXPORT_COMMAND = (
    "python -c \"import pickle, torch; net = pickle.load(open('NETWORK.pkl', 'rb'))['ema']; "
    "torch.save({'precond': type(net).__name__, 'sigma_data': getattr(net, 'sigma_data', None), "
    "'state_dict': net.state_dict()}, 'NETWORK.pt')\" "
    "(in EDM's repository, whose code the pickle needs)"
)


def _edm(path: pathlib.Path) -> SourceWeights:
    """An EDM network exported as ``{'precond': class name, 'sigma_data': ..., 'state_dict':
    ...}`` (see :data:`EDM_EXPORT_COMMAND`; ``sigma_data`` may be absent). Read: an
    unconditional DDPM++ ``SongUNet`` (positional embedding, standard encoder and decoder,
    resampling filter [1, 1]) under

    - ``VPPrecond`` (``baseline-cifar10-32x32-uncond-vp``, score_sde's DDPM++ cont.
      re-packaged): its preconditioning is exactly the VP adapter here (c_in x is x_t,
      c_noise = 999 t, the network predicts the noise);
    - ``EDMPrecond`` (``edm-cifar10-32x32-uncond-vp``): D = c_skip x + c_out F(c_in x,
      c_noise) with c_noise = ln(sigma)/4 fed to the same positional embedding, which is
      ``model.parametrization='edm'`` on ``EDMSDE`` (alpha = 1, sigma = t) with
      ``model.sigma_data`` the export's (EDM's default 0.5 when it does not say). Its
      ``sigma_min``/``sigma_max`` only clip EDM's sampler, and ``use_fp16`` only lowers the
      arithmetic's precision on CUDA; neither is in the state dict.

    The SongUNet's ``map_augment`` (``augment_dim=9`` in EDM's CIFAR-10 training, the
    augmentation pipeline's labels) is a Linear without bias whose output is added to the
    noise embedding only when augment labels are passed; EDM's sampler passes none, and
    zero labels would add exactly zero, so the weight is dropped (a ``map_augment.bias``,
    which would add a constant, is refused). ``map_label`` (``label_dim > 0``, the
    class-conditional networks) is refused."""
    if not zipfile.is_zipfile(path):
        raise FormatError(
            f"{path} is {REFUSED['edm_pickle']} To load an EDM VP baseline, export it first: "
            f"{EDM_EXPORT_COMMAND}"
        )
    obj = read_torch(path)
    if not (isinstance(obj, Mapping) and "precond" in obj and "state_dict" in obj):
        raise FormatError(
            f"{path}: an EDM export must say its preconditioner, which a bare state dict does "
            f"not (edm-* and baseline-* networks have the same names); export with "
            f"{EDM_EXPORT_COMMAND}"
        )
    precond = obj["precond"]
    if precond not in _EDM_PRECONDITIONING:
        raise FormatError(f"{path}: unknown EDM preconditioner {precond!r}")
    if _EDM_PRECONDITIONING[precond] is not None:
        raise FormatError(f"{path} is refused: {_EDM_PRECONDITIONING[precond]}.")
    sigma_data = obj.get("sigma_data")
    if sigma_data is not None:
        sigma_data = float(sigma_data)
    state = edm_network_state(obj["state_dict"], str(path), precond)
    return SourceWeights(state, None, 0, "edm", precond=precond, sigma_data=sigma_data)


def edm_network_state(state: Mapping, source: str, precond: str) -> dict:
    """The arrays of an EDM preconditioner's state dict that our DDPM++ holds, by SongUNet
    names (``model.`` removed); a bias-free ``map_augment`` is dropped (see :func:`_edm`)
    and networks that are not mapped are refused. ``source`` names the file in errors."""
    path = source
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if "map_noise.freqs" in state:
        raise FormatError(
            f"{path}: a {precond} around an NCSN++ SongUNet (Fourier embedding of c_noise, "
            "residual encoder with the [1, 3, 3, 1] filter) is not mapped; only DDPM++ is"
        )
    if "map_label.weight" in state:
        raise FormatError(
            f"{path}: a class-conditional SongUNet (map_label, label_dim > 0) is not mapped; "
            "only unconditional networks are"
        )
    if "map_augment.bias" in state:
        raise FormatError(
            f"{path}: this SongUNet's map_augment has a bias, which adds a constant to the "
            "noise embedding even without augmentation; EDM's is bias-free and only that is "
            "dropped"
        )
    state.pop("map_augment.weight", None)  # bias-free: zero without augment labels
    return state


def _check_preconditioning(config: ml_collections.ConfigDict, weights: SourceWeights) -> None:
    """The config must apply the export's preconditioner: EDMPrecond is
    ``model.parametrization='edm'`` on ``training.sde='edm'`` with its ``sigma_data``;
    VPPrecond the noise prediction on ``vpsde``."""
    if weights.dialect != "edm" or weights.precond is None:
        return
    sde = config.training.get("sde")
    parametrization = config.model.get("parametrization")
    if weights.precond == "EDMPrecond":
        sigma_data = 0.5 if weights.sigma_data is None else weights.sigma_data
        ours = config.model.get("sigma_data") or 0.5
        if sde != "edm" or parametrization != "edm" or abs(ours - sigma_data) > 1e-12:
            raise MismatchError(
                f"an EDMPrecond network computes D = c_skip x + c_out F(c_in x, ln(sigma)/4) "
                f"with sigma_data = {sigma_data}: load it with training.sde='edm', "
                f"model.parametrization='edm', model.sigma_data={sigma_data} (e.g. "
                f"configs/cifar10_edm_ddpmpp.py); the config has training.sde={sde!r}, "
                f"model.parametrization={parametrization!r}, model.sigma_data={ours}"
            )
    elif weights.precond == "VPPrecond" and (
        sde != "vpsde" or parametrization not in (None, "eps")
    ):
        raise MismatchError(
            f"a VPPrecond network predicts the noise on the VP SDE: load it with "
            f"training.sde='vpsde' and the 'eps' parametrisation (e.g. "
            f"configs/cifar10_ddpmpp_continuous_vp.py); the config has training.sde={sde!r}, "
            f"model.parametrization={parametrization!r}"
        )


def _is_consistency_models_state(state) -> bool:
    # jcm's State: step, lr, ema_rate, params, params_ema, model_state, opt_state, rng_state.
    return (
        isinstance(state, Mapping)
        and {"params", "params_ema", "opt_state"} <= set(state)
        and "optimizer" not in state
    )


def _consistency_models(path: pathlib.Path) -> SourceWeights:
    state = _read_msgpack(path)
    if not _is_consistency_models_state(state):
        raise FormatError(
            f"{path} is not a consistency_models_cifar10 checkpoint (a state with params, "
            "params_ema, opt_state)"
        )
    raise FormatError(f"{path} is {REFUSED['consistency_models']}")


FORMATS: dict[str, Callable[[pathlib.Path], SourceWeights]] = {
    "score_sde": _score_sde_flax,
    "score_sde_pytorch": _score_sde_pytorch,
    "torch_state_dict": _plain_torch_state_dict,
    "diffusers": _diffusers,
    "edm": _edm,
    "consistency_models": _consistency_models,
}


def read_checkpoint(path: str | pathlib.Path, format: str) -> SourceWeights:
    """The arrays of the checkpoint at ``path`` in ``format`` (one of :data:`FORMATS`)."""
    if format not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; valid: {sorted(FORMATS)}")
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return FORMATS[format](path)


# ---------------------------------------------------------------------- the name table

# Names inside our modules -> names inside the source's, where they differ. score_sde names
# its 1x1 projections NIN_<k> (a matrix W and a bias b) and its FIR convolutions Conv2d_0.
_SCORE_SDE_INNER = {
    "AttnBlock": {"Conv_0": "NIN_0", "Conv_1": "NIN_1", "Conv_2": "NIN_2", "Conv_3": "NIN_3"},
    "ResnetBlockDDPMpp": {"Conv_2": "NIN_0"},
    "Upsample": {"FIRConv_0": "Conv2d_0"},
    "Downsample": {"FIRConv_0": "Conv2d_0"},
}
INNER_NAMES: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {
    "torch": {k: {a: (b,) for a, b in v.items()} for k, v in _SCORE_SDE_INNER.items()},
    "flax": {k: {a: (b,) for a, b in v.items()} for k, v in _SCORE_SDE_INNER.items()},
    # diffusers' ResnetBlock2D and Attention (to_q... in current diffusers, query... in the
    # files of 2022); the first name present is used.
    "diffusers": {
        "ResnetBlockDDPMpp": {
            "GroupNorm_0": ("norm1",),
            "Conv_0": ("conv1",),
            "Dense_0": ("time_emb_proj",),
            "GroupNorm_1": ("norm2",),
            "Conv_1": ("conv2",),
            "Conv_2": ("conv_shortcut",),
        },
        "AttnBlock": {
            "GroupNorm_0": ("group_norm",),
            "Conv_0": ("to_q", "query"),
            "Conv_1": ("to_k", "key"),
            "Conv_2": ("to_v", "value"),
            "Conv_3": ("to_out.0", "proj_attn"),
        },
        "Upsample": {"Conv_0": ("conv",)},
        "Downsample": {"Conv_0": ("conv",)},
    },
}
# EDM's SongUNet UNetBlock: a residual block and, in the same module, its attention (one
# fused qkv 1x1 convolution whose output channels interleave q, k, v: channel 3c + j).
INNER_NAMES["edm"] = {
    "ResnetBlockBigGANpp": {
        "GroupNorm_0": ("norm0",),
        "Conv_0": ("conv0",),
        "Dense_0": ("affine",),
        "GroupNorm_1": ("norm1",),
        "Conv_1": ("conv1",),
        "Conv_2": ("skip",),
    },
    "AttnBlock": {
        "GroupNorm_0": ("norm2",),
        "Conv_0": ("qkv",),
        "Conv_1": ("qkv",),
        "Conv_2": ("qkv",),
        "Conv_3": ("proj",),
    },
}
_EDM_QKV = {"Conv_0": 0, "Conv_1": 1, "Conv_2": 2}  # q, k, v
# score_sde's Flax class names of our modules (auto-names <Class>_<k> count per class).
_FLAX_CLASS_NAMES = {
    "ncsnpp": {"AttnBlock": "AttnBlockpp"},
    "ddpm": {"ResnetBlockDDPMpp": "ResnetBlockDDPM"},
}

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda a: a,
    "oihw_to_hwio": lambda a: a.transpose(2, 3, 1, 0),  # PyTorch convolution
    "transpose": lambda a: a.T,  # PyTorch linear (out, in) -> (in, out)
    "nin_to_1x1": lambda a: a[None, None],  # score_sde NIN (in, out) -> 1x1 convolution
    "linear_to_1x1": lambda a: a.T[None, None],  # PyTorch linear -> 1x1 convolution
}
for _j, _part in enumerate("qkv"):  # EDM's fused qkv: output channels 3c + j
    TRANSFORMS[f"{_part}_of_qkv"] = lambda a, j=_j: a[j::3]
    TRANSFORMS[f"{_part}_of_qkv_oihw_to_hwio"] = lambda a, j=_j: a[j::3].transpose(2, 3, 1, 0)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the name table: the source's array ``source`` is ours at ``target``
    after ``TRANSFORMS[transform]``."""

    source: str
    target: tuple[str, ...]
    transform: str
    shape: tuple[int, ...]


def _children_in_call_order(model: nn.Module, data_shape, conditional: bool):
    """Our network's abstract params and its top-level modules ``(name, class)`` in the
    order it calls them (every call, with parameters or not)."""
    calls: list[tuple[str, str]] = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        path = module.scope.path if module.scope is not None else ()
        if context.method_name == "__call__" and len(path) == 1:
            entry = (path[0], type(module).__name__)
            if entry not in calls:
                calls.append(entry)
        return next_fun(*args, **kwargs)

    x = jnp.zeros((1, *data_shape), jnp.float32)
    y = jnp.zeros((1,), jnp.int32) if conditional else None
    with nn.intercept_methods(interceptor):
        variables = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), x, jnp.ones((1,)), y=y, train=False)
        )
    return variables["params"], calls


def _leaves(tree: Mapping, prefix=()) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    out = []
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.extend(_leaves(value, (*prefix, key)))
        else:
            out.append(((*prefix, key), tuple(value.shape)))
    return out


def _diffusers_prefixes(config: ml_collections.ConfigDict) -> list[str]:
    """diffusers' ``UNet2DModel`` module names, in our DDPM's call order."""
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    attn = tuple(config.attn_resolutions)
    size = config.get("image_size")
    if config.get("decoder_attention", "every_block") != "every_block":
        raise MismatchError(
            "diffusers' UNet2DModel attends after every decoder block: set "
            "model.decoder_attention='every_block'"
        )
    names = ["time_embedding.linear_1", "time_embedding.linear_2", "conv_in"]
    for level in range(levels):
        resolution = size // 2**level
        for j in range(blocks):
            names.append(f"down_blocks.{level}.resnets.{j}")
            if resolution in attn:
                names.append(f"down_blocks.{level}.attentions.{j}")
        if level != levels - 1:
            names.append(f"down_blocks.{level}.downsamplers.0")
    names += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    for level in reversed(range(levels)):
        resolution = size // 2**level
        up = levels - 1 - level
        for j in range(blocks + 1):
            names.append(f"up_blocks.{up}.resnets.{j}")
            if resolution in attn:
                names.append(f"up_blocks.{up}.attentions.{j}")
        if level != 0:
            names.append(f"up_blocks.{up}.upsamplers.0")
    return [*names, "conv_norm_out", "conv_out"]


_EDM_DDPMPP = {
    "name": "ncsnpp",
    "resblock_type": "biggan",
    "progressive": "none",
    "progressive_input": "none",
    "embedding_type": "positional",
    "fir": False,
    "skip_rescale": True,
    "conditional": True,
    "scale_by_sigma": False,
}


def _edm_prefixes(config: ml_collections.ConfigDict) -> list[str]:
    """EDM's SongUNet (DDPM++) module names, in our NCSN++ call order."""
    for key, value in _EDM_DDPMPP.items():
        if config.get(key) != value:
            raise MismatchError(
                f"EDM's DDPM++ SongUNet is our NCSN++ with model.{key}={value!r} (the config "
                f"has {config.get(key)!r}); use configs/cifar10_ddpmpp_continuous_vp.py"
            )
    levels, blocks = len(config.ch_mult), config.num_res_blocks
    attn = tuple(config.attn_resolutions)
    res = [config.image_size >> level for level in range(levels)]
    names = ["map_layer0", "map_layer1", f"enc.{res[0]}x{res[0]}_conv"]
    for level in range(levels):
        r = res[level]
        for i in range(blocks):
            names.append(f"enc.{r}x{r}_block{i}")
            if r in attn:
                names.append(f"enc.{r}x{r}_block{i}")  # its attention
        if level != levels - 1:
            names.append(f"enc.{res[level + 1]}x{res[level + 1]}_down")
    r = res[-1]
    names += [f"dec.{r}x{r}_in0", f"dec.{r}x{r}_in0", f"dec.{r}x{r}_in1"]
    for level in reversed(range(levels)):
        r = res[level]
        names += [f"dec.{r}x{r}_block{i}" for i in range(blocks + 1)]
        if r in attn:
            names.append(f"dec.{r}x{r}_block{blocks}")  # attention in the last block only
        if level != 0:
            names.append(f"dec.{res[level - 1]}x{res[level - 1]}_up")
    return [*names, f"dec.{res[0]}x{res[0]}_aux_norm", f"dec.{res[0]}x{res[0]}_aux_conv"]


def _source_leaf(dialect: str, our_leaf: str, inner_source: str, ndim: int, our_ndim: int):
    """The source's array name inside a module, and the transform to ours."""
    nin = inner_source.split(".")[-1].startswith("NIN")
    if dialect == "flax":
        name = {"kernel": "W" if nin else "kernel", "bias": "b" if nin else "bias"}.get(
            our_leaf, our_leaf
        )
        if inner_source.startswith("Conv2d") and our_leaf == "kernel":
            name = "weight"  # score_sde's FIR Conv2d
        return name, "nin_to_1x1" if nin and our_leaf == "kernel" else "copy"
    name = {"kernel": "W" if nin else "weight", "bias": "b" if nin else "bias", "scale": "weight"}
    name = name.get(our_leaf, our_leaf)
    if our_leaf != "kernel":
        return name, "copy"
    if nin:
        return name, "nin_to_1x1"
    if ndim == 2 and our_ndim == 4:
        return name, "linear_to_1x1"
    return name, "oihw_to_hwio" if our_ndim == 4 else "transpose"


def _pair_modules(config, dialect: str, source_names, calls, params) -> list[tuple[str, str, str]]:
    """``(our module, its class, the source's module prefix)`` for our modules with params."""
    with_params = [(name, cls) for name, cls in calls if name in params]
    layouts = {"edm": ("network", "EDM's SongUNet"), "diffusers": ("DDPM", "diffusers'")}
    if dialect in layouts:
        if dialect == "diffusers" and config.name != "ddpm":
            raise MismatchError(
                f"diffusers checkpoints load into model.name='ddpm' (got {config.name!r})"
            )
        prefixes = _edm_prefixes(config) if dialect == "edm" else _diffusers_prefixes(config)
        if len(prefixes) != len(with_params):
            ours, theirs = layouts[dialect]
            raise MismatchError(
                f"the config's {ours} has {len(with_params)} modules with parameters, "
                f"{theirs} layout for it {len(prefixes)}"
            )
        return [(n, c, p) for (n, c), p in zip(with_params, prefixes, strict=True)]
    if dialect == "torch":
        indices = sorted(
            {int(m.group(1)) for n in source_names if (m := re.match(r"all_modules\.(\d+)\.", n))}
        )
        if not indices:
            raise MismatchError(
                "the state dict has no all_modules.<k> names: not a score_sde_pytorch network"
            )
        if len(indices) != len(with_params):
            hint = ""
            if any(re.fullmatch(r"all_modules\.0\.W", n) for n in source_names) and not (
                config.get("fourier_in_params", False)
            ):
                hint = (
                    " The checkpoint stores NCSN++'s Fourier frequencies (all_modules.0.W): "
                    "set model.fourier_in_params=True (e.g. --config.model."
                    "fourier_in_params=True) for import, sample and eval."
                )
            raise MismatchError(
                f"the checkpoint's network has {len(indices)} modules with parameters, the "
                f"config's {config.name!r} network {len(with_params)}: compare model.nf, "
                "ch_mult, num_res_blocks, attn_resolutions, resblock_type, progressive*, "
                f"conditional and decoder_attention with the checkpoint's config.{hint}"
            )
        return [(n, c, f"all_modules.{k}") for (n, c), k in zip(with_params, indices, strict=True)]
    # flax: score_sde's auto-names, counted per class in call order.
    renames = _FLAX_CLASS_NAMES.get(config.name, {})
    counters: collections.Counter = collections.Counter()
    pairs = []
    for name, cls in calls:
        source_cls = renames.get(cls, cls)
        prefix = f"{source_cls}_{counters[source_cls]}"
        counters[source_cls] += 1
        if name in params:
            pairs.append((name, cls, prefix))
    if (
        any(n.startswith("GaussianFourierProjection_0/W") for n in source_names)
        and "GaussianFourierProjection_0" not in params
    ):
        raise MismatchError(
            "the checkpoint stores NCSN++'s Fourier frequencies (GaussianFourierProjection_0/W):"
            " set model.fourier_in_params=True (e.g. --config.model.fourier_in_params=True) "
            "for import, sample and eval."
        )
    return pairs


def _table(config, weights: SourceWeights, data_shape) -> list[Entry]:
    from diffusion_sde.models import get_model

    if config.name not in ("ncsnpp", "ddpm"):
        reason = REFUSED["ncsnv2"] if config.name == "ncsnv2" else "not a published network"
        raise MismatchError(
            f"checkpoints load into model.name 'ncsnpp' (NCSN++, DDPM++) or 'ddpm'; "
            f"{config.name!r} is {reason}"
        )
    model = get_model(config)
    params, calls = _children_in_call_order(model, data_shape, config.get("num_classes", 0) > 0)
    dialect = weights.dialect
    separator = "/" if dialect == "flax" else "."  # torch, diffusers, edm: PyTorch names
    source_names = set(weights.raw)
    entries = []
    for name, cls, prefix in _pair_modules(config, dialect, source_names, calls, params):
        inner_names = INNER_NAMES[dialect].get(cls, {})
        for path, shape in _leaves(params[name]):
            *inner, leaf = path
            inner_options = inner_names.get(inner[0], (inner[0],)) if inner else ("",)
            source = candidate = None
            for inner_source in inner_options:
                inner_path = separator.join([inner_source, *inner[1:]]) if inner else ""
                source_leaf, _ = _source_leaf(dialect, leaf, inner_source, 0, len(shape))
                candidate = separator.join(p for p in (prefix, inner_path, source_leaf) if p)
                if candidate in source_names:
                    source = candidate
                    _, transform = _source_leaf(
                        dialect, leaf, inner_source, weights.raw[candidate].ndim, len(shape)
                    )
                    if dialect == "edm" and cls == "AttnBlock" and inner[0] in _EDM_QKV:
                        part = "qkv"[_EDM_QKV[inner[0]]]
                        transform = f"{part}_of_qkv" + (
                            "" if transform == "copy" else "_oihw_to_hwio"
                        )
                    break
            if source is None:
                raise MismatchError(
                    f"the checkpoint has no {candidate!r} (for our "
                    f"{'/'.join((name, *path))}, shape {shape}): it holds another network "
                    f"than the config's {config.name!r} (compare the model config)"
                )
            entries.append(Entry(source, (name, *path), transform, shape))
    used = {e.source for e in entries}
    ignored = {"sigmas", "resample_filter"}  # buffers: score_sde's sigmas, EDM's FIR taps
    unused = sorted(n for n in source_names - used if n.split(separator)[-1] not in ignored)
    if unused:
        raise MismatchError(
            f"the checkpoint has {len(unused)} arrays the config's {config.name!r} network does "
            f"not have, e.g. {unused[:4]}: compare the model config with the checkpoint's"
        )
    return entries


def name_table(
    config: ml_collections.ConfigDict,
    checkpoint: str | pathlib.Path | SourceWeights,
    format: str | None = None,
) -> list[Entry]:
    """The table from the checkpoint's array names to our parameter paths, for the network
    ``config.model`` builds (``config`` is the full config: ``config.data`` gives the
    image shape). ``checkpoint`` is a path (with its ``format``) or the
    :class:`SourceWeights` of :func:`read_checkpoint` (only names and shapes are read)."""
    from diffusion_sde import data as data_lib

    weights = checkpoint
    if not isinstance(weights, SourceWeights):
        if format is None:
            raise CheckpointError(f"name the format of {checkpoint}: one of {sorted(FORMATS)}")
        weights = read_checkpoint(checkpoint, format)
    return _table(_model_config(config), weights, data_lib.data_shape(config.data))


def _model_config(config):
    model = ml_collections.ConfigDict(config.model.to_dict())
    with model.unlocked():
        model.image_size = config.data.image_size
    return model


def _convert(entries: list[Entry], arrays: dict[str, np.ndarray]) -> dict:
    params: dict = {}
    for entry in entries:
        value = TRANSFORMS[entry.transform](np.asarray(arrays[entry.source], np.float32))
        if value.shape != entry.shape:
            raise MismatchError(
                f"{entry.source}: the checkpoint's shape {arrays[entry.source].shape} "
                f"({value.shape} as ours) but the config's network has {entry.shape} at "
                f"{'/'.join(entry.target)}: compare model.nf, ch_mult and the image size"
            )
        node = params
        for key in entry.target[:-1]:
            node = node.setdefault(key, {})
        node[entry.target[-1]] = jnp.asarray(value)
    return params


def convert_checkpoint(
    config: ml_collections.ConfigDict, path: str | pathlib.Path, format: str
) -> tuple[dict, dict | None, int]:
    """``(params, ema_params, step)`` of the checkpoint at ``path`` (``format`` one of
    :data:`FORMATS`) as parameters of the network ``config.model`` builds: its raw weights,
    its EMA weights (None when the file has none) and its training step."""
    from diffusion_sde import data as data_lib

    weights = read_checkpoint(path, format)
    _check_preconditioning(config, weights)
    entries = _table(_model_config(config), weights, data_lib.data_shape(config.data))
    ema_params = _convert(entries, weights.ema) if weights.ema is not None else None
    return _convert(entries, weights.raw), ema_params, weights.step


def load_variables(
    config: ml_collections.ConfigDict,
    path: str | pathlib.Path,
    format: str,
    *,
    ema: bool = True,
) -> dict:
    """``{"params": ...}`` of the network ``config.model`` builds, from the checkpoint at
    ``path`` (``format`` one of :data:`FORMATS`): its EMA weights when ``ema`` and the file
    has them (what the papers sample and evaluate), else its raw weights.

    >>> variables = load_variables(config, "checkpoint_8.pth", "score_sde_pytorch")
    >>> score_fn = get_score_fn(sde, get_model(config.model), variables)
    """
    params, ema_params, _ = convert_checkpoint(config, path, format)
    return {"params": ema_params if ema and ema_params is not None else params}
