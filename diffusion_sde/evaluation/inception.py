r"""The Inception-v3 of FID (TTUR / pytorch-fid) in Flax, with its weights read without torch.

FID (Heusel et al. 2017) compares the 2048-d ``pool3`` features of the Inception-v3 graph
``inception-2015-12-05`` released with TensorFlow. pytorch-fid ported those weights as

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(:data:`FID_WEIGHTS_URL`; about 91 MB). This module never downloads it: fetch it once, e.g.
``wget <URL> -P ~/.cache/diffusion_sde/`` (the default place, see :func:`default_weights_path`),
or pass its path. A ``.npz`` holding the same state-dict names works as well.

:class:`FIDInceptionV3` is torchvision's ``Inception3`` (no auxiliary classifier, the
``fc`` 2048 -> 1008 layer left out: it is not needed for ``pool3``) with pytorch-fid's
patches of the blocks that differ from torchvision's:

- ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1): the 3x3 average pool of
  the pooling branch does not count the zero padding (TensorFlow's ``SAME`` average pool,
  ``count_include_pad=False``);
- ``Mixed_7c`` (E_2): the pooling branch takes a 3x3 *max* pool.

Every convolution is ``conv (no bias) -> batch norm (eps 1e-3, inference mode) -> relu``.
Submodules carry the state-dict names (``Mixed_6b.branch7x7_2.conv``), so a state-dict
entry ``<module>.conv.weight`` (OIHW) is the kernel ``<module>/conv/kernel`` (HWIO), and
``<module>.bn.{weight,bias,running_mean,running_var}`` are ``<module>/bn/{scale,bias}``
(params) and ``<module>/bn/{mean,var}`` (batch_stats).

Inputs are preprocessed as pytorch-fid does: images in [0, 1] are resized to 299x299
bilinearly (half-pixel centres, no antialiasing: ``F.interpolate(..., mode="bilinear",
align_corners=False)``) and mapped to [-1, 1] by ``2 x - 1``; grey images are repeated to
three channels. (TTUR's TensorFlow resize differs slightly, so FIDs agree with pytorch-fid
rather than with TTUR to the last digit.)

A ``.pth`` file is read by :func:`read_state_dict` with a restricted unpickler that knows
only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` (and
``_rebuild_parameter``) and the ``torch.<Type>Storage`` classes, and refuses every other
global. Both layouts of ``torch.save`` are read:

- zip (torch >= 1.6): ``<archive>/data.pkl`` whose persistent ids are
  ``("storage", storage_type, key, location, numel)``, and the raw storages
  ``<archive>/data/<key>`` (little-endian unless ``<archive>/byteorder`` says ``big``);
- legacy (older torch): three small pickles (magic number, protocol 1001, system info),
  the pickled object with persistent ids ``("storage", storage_type, key, location, numel,
  view_metadata)``, the pickled list of storage keys, then for each key an 8-byte element
  count followed by the storage's raw little-endian bytes.

A tensor is ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``: the strided view
of the storage's elements from ``offset``.
"""

from __future__ import annotations

import functools
import os
import pathlib
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, BinaryIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_sde.evaluation.feature_nets import CACHE_ENV, cache_dir

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
BATCH_NORM_EPSILON = 1e-3
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008  # the 2015-12-05 graph's classes: ImageNet's 1000 and 8 unused

# ----------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------


class BasicConv(nn.Module):
    """``relu(batch_norm(conv(x)))``, the conv without bias (torchvision's ``BasicConv2d``)."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features,
            self.kernel_size,
            self.strides,
            padding=[(p, p) for p in self.padding],
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average over the unpadded neighbours (TensorFlow's ``SAME`` average pool)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int = 2, padding: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), padding=((padding, padding),) * 2)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg pool-1x1 (FIDInceptionA)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        branch5x5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        branch5x5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
        branch3x3dbl = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (FIDInceptionC)."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        branch7x7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        branch7x7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        dbl = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        dbl = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        branch3x3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 branches; ``pool`` is ``"avg"`` (E_1) or ``"max"`` (E_2)."""

    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        branch3x3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3),
            ],
            axis=-1,
        )
        dbl = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        dbl = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate(
            [
                BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl),
            ],
            axis=-1,
        )
        # pytorch-fid: the FID graph max-pools in its last block (likely a bug of that
        # graph, kept so that features match).
        pooled = _avg_pool_3x3(x) if self.pool == "avg" else _max_pool_3x3(x, 1, 1)
        branch_pool = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """``(B, H, W, 3)`` in [-1, 1] (H, W >= 75; 299 for FID) -> ``pool3`` features ``(B, 2048)``."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def preprocess(images: jax.Array) -> jax.Array:
    """Images in [0, 1], ``(B, H, W, 1 or 3)`` -> ``(B, 299, 299, 3)`` in [-1, 1] (pytorch-fid's)."""
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    if images.shape[-1] != 3:
        raise ValueError(f"Inception features need 1 or 3 channels, got shape {images.shape}.")
    shape = (images.shape[0], INPUT_SIZE, INPUT_SIZE, 3)
    images = jax.image.resize(images, shape, method="bilinear", antialias=False)
    return 2.0 * images - 1.0


@functools.cache
def abstract_variables() -> Any:
    """Shapes and dtypes of :class:`FIDInceptionV3`'s ``{"params", "batch_stats"}``."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)


# ----------------------------------------------------------------------------------------
# State-dict names <-> Flax variables
# ----------------------------------------------------------------------------------------

# (collection, Flax leaf name) -> state-dict suffix, for each leaf under ".../<conv|bn>/".
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# State-dict entries that the pool3 network does not use.
_UNUSED_SUFFIXES = (".num_batches_tracked",)
_UNUSED_PREFIXES = ("fc.", "AuxLogits.")


def _state_dict_name(path: tuple[Any, ...]) -> str:
    """A Flax variable path, e.g. ``("params", "Mixed_5b", "branch1x1", "conv", "kernel")`` ->
    its state-dict name ``"Mixed_5b.branch1x1.conv.weight"``."""
    names = [getattr(entry, "key", entry) for entry in path]
    collection, modules, leaf = names[0], names[1:-1], names[-1]
    return ".".join([*modules, _LEAF_NAMES[(collection, leaf)]])


# Axis permutations between Flax's HWIO conv kernels and torch's OIHW weights.
_OIHW_FROM_HWIO = (3, 2, 0, 1)
_HWIO_FROM_OIHW = (2, 3, 1, 0)


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The state-dict names and (torch-layout) shapes that :class:`FIDInceptionV3` reads."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_variables()):
        shape = leaf.shape
        shapes[_state_dict_name(path)] = (
            tuple(shape[axis] for axis in _OIHW_FROM_HWIO) if len(shape) == 4 else shape
        )
    return shapes


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> Any:
    """Flax ``{"params", "batch_stats"}`` of :class:`FIDInceptionV3` from a pytorch-fid state dict.

    Raises:
      ValueError: missing or unexpected entries (other than ``fc.*``, ``AuxLogits.*`` and
        ``*.num_batches_tracked``), or a shape that does not match.
    """
    abstract = abstract_variables()
    paths = jax.tree_util.tree_leaves_with_path(abstract)
    names = {_state_dict_name(path) for path, _ in paths}
    missing = sorted(names - set(state_dict))
    unexpected = sorted(
        name
        for name in set(state_dict) - names
        if not (name.endswith(_UNUSED_SUFFIXES) or name.startswith(_UNUSED_PREFIXES))
    )
    if missing or unexpected:
        raise ValueError(
            "Not a pytorch-fid FID Inception state dict: "
            f"{len(missing)} missing entries {missing[:5]}, "
            f"{len(unexpected)} unexpected entries {unexpected[:5]}."
        )

    def convert(path, leaf):
        name = _state_dict_name(path)
        array = np.asarray(state_dict[name])
        if array.ndim == 4:
            array = np.transpose(array, _HWIO_FROM_OIHW)
        if array.shape != leaf.shape:
            raise ValueError(f"{name}: expected shape {leaf.shape} (HWIO), got {array.shape}.")
        return jnp.asarray(array, leaf.dtype)

    return jax.tree_util.tree_map_with_path(convert, abstract)


# ----------------------------------------------------------------------------------------
# Reading torch.save files without torch
# ----------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001


class _StorageType:
    """Stands for ``torch.<name>Storage`` inside a pickle."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: the strided view of ``storage`` from ``offset``."""
    size, stride = tuple(size), tuple(stride)
    if any(n == 0 for n in size):
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
        raise pickle.UnpicklingError(
            f"Tensor of size {size}, stride {stride}, offset {offset} overflows its storage "
            f"of {storage.size} elements."
        )
    strides = [s * storage.itemsize for s in stride]
    # A view: the legacy format reads the storage's bytes only after the pickle.
    return np.lib.stride_tricks.as_strided(storage[offset:], size, strides, writeable=False)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays; refuses every other global.

    ``load_storage(storage_type, key, numel) -> np.ndarray`` supplies the raw storages.
    """

    _GLOBALS = {
        ("collections", "OrderedDict"): OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file: BinaryIO, load_storage):
        super().__init__(file)
        self._load_storage = load_storage
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"Refusing to unpickle {module}.{name}: only torch tensors in (Ordered)dicts are read."
        )

    def persistent_load(self, saved_id: Any) -> np.ndarray:
        if not (isinstance(saved_id, tuple) and saved_id[0] == "storage"):
            raise pickle.UnpicklingError(f"Unknown persistent id {saved_id!r}.")
        storage_type, key, _, numel = saved_id[1:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"Unknown storage type {storage_type!r}.")
        if len(saved_id) > 5 and saved_id[5] is not None:
            raise pickle.UnpicklingError("Storage views (legacy view_metadata) are not supported.")
        if key not in self._storages:
            self._storages[key] = self._load_storage(storage_type.dtype, str(key), int(numel))
        return self._storages[key]


def _read_torch_zip(path: pathlib.Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one <archive>/data.pkl, found {pickles}.")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()

        def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
            dtype = dtype.newbyteorder("<" if byteorder == "little" else ">")
            array = np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype)
            if array.size < numel:
                raise ValueError(f"{path}: storage {key} has {array.size} < {numel} elements.")
            return array[:numel].astype(dtype.newbyteorder("="))

        with archive.open(pickles[0]) as file:
            return _TorchUnpickler(file, load_storage).load()


def _read_torch_legacy(path: pathlib.Path) -> Any:
    with open(path, "rb") as file:
        try:
            magic_number, protocol = (_TorchUnpickler(file, None).load() for _ in range(2))
            _TorchUnpickler(file, None).load()  # system information
        except Exception:  # garbage bytes raise anything from EOFError to UnpicklingError
            magic_number = protocol = None
        if magic_number != _LEGACY_MAGIC_NUMBER or protocol != _LEGACY_PROTOCOL_VERSION:
            raise ValueError(
                f"{path} is not a torch.save file (neither zip nor legacy layout); is it a "
                f"complete download of {FID_WEIGHTS_URL}?"
            )
        storages: dict[str, tuple[np.dtype, int, np.ndarray]] = {}

        def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
            # The bytes follow the pickles: fill the array in once the keys are known.
            storages[key] = (dtype, numel, np.empty(numel, dtype))
            return storages[key][2]

        result = _TorchUnpickler(file, load_storage).load()
        keys = _TorchUnpickler(file, None).load()
        for key in keys:
            dtype, numel, array = storages[str(key)]
            (count,) = np.frombuffer(file.read(8), "<i8")
            if count != numel:
                raise ValueError(f"{path}: storage {key} has {count} elements, expected {numel}.")
            array[:] = np.frombuffer(file.read(numel * dtype.itemsize), dtype)
    return result


def _materialise(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Copy the tensors (views of their storages) into their own C-ordered arrays."""
    return {name: np.array(value) for name, value in state_dict.items()}


def default_weights_path() -> pathlib.Path:
    """Where the FID weights are looked for by default: ``<cache_dir>/<FID_WEIGHTS_FILENAME>``."""
    return cache_dir() / FID_WEIGHTS_FILENAME


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a ``torch.save`` file (zip or legacy) or a ``.npz``, as numpy arrays.

    Raises:
      FileNotFoundError: no such file; the message gives :data:`FID_WEIGHTS_URL`.
      pickle.UnpicklingError: the pickle holds anything but tensors in (ordered) dicts.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download pytorch-fid's weights once "
            f"(this code never downloads them):\n    wget {FID_WEIGHTS_URL} -P "
            f"{default_weights_path().parent}\nand pass the file's path, or leave it at the "
            f"default {default_weights_path()} (the directory is ${CACHE_ENV} when set)."
        )
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    state_dict = _read_torch_zip(path) if zipfile.is_zipfile(path) else _read_torch_legacy(path)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
    return _materialise(state_dict)


@functools.cache
def _jitted_features():
    model = FIDInceptionV3()

    @jax.jit
    def features(variables: Any, images: jax.Array) -> jax.Array:
        # Full float32 convolutions on GPU/TPU too (no TF32 or bf16 passes), so the features
        # match the float32 reference.
        with jax.default_matmul_precision("highest"):
            return model.apply(variables, preprocess(images))

    return features


def load_inception(weights_path: str | os.PathLike | None = None):
    """``features(images) -> (B, 2048)`` for images in [0, 1], ``(B, H, W, 1 or 3)``.

    ``weights_path`` defaults to :func:`default_weights_path`; see the module docstring.
    """
    return load_inception_classifier(weights_path)[0]


def load_inception_classifier(weights_path: str | os.PathLike | None = None):
    """``(features, logits)``: :func:`load_inception`'s ``features`` and
    ``logits(pool3) -> (B, 1008)``, the graph's final layer ``pool3 @ W^T + b`` applied to
    those features (in numpy), from which the Inception Score is computed; ``logits`` is
    None when the weights file has no ``fc.weight`` / ``fc.bias`` (an ``.npz`` of the pool3
    network only).

    Published Inception Scores differ in this layer's bias: TF-GAN's ``logits`` output
    (the 2021 reference's) includes it; the original improved-GAN code and StyleGAN/EDM's
    metrics multiply by ``W`` alone. Differences are in the second decimal.
    """
    path = default_weights_path() if weights_path is None else weights_path
    state_dict = read_state_dict(path)
    features = functools.partial(_jitted_features(), variables_from_state_dict(state_dict))
    if "fc.weight" not in state_dict or "fc.bias" not in state_dict:
        return features, None
    weight = np.asarray(state_dict["fc.weight"], np.float32)
    bias = np.asarray(state_dict["fc.bias"], np.float32)
    if weight.shape != (NUM_LOGITS, FEATURE_DIM) or bias.shape != (NUM_LOGITS,):
        raise ValueError(
            f"fc.weight / fc.bias of {path} have shapes {weight.shape} / {bias.shape}, not "
            f"({NUM_LOGITS}, {FEATURE_DIM}) / ({NUM_LOGITS},): not the FID Inception weights."
        )

    def logits(pool3: np.ndarray) -> np.ndarray:
        return np.asarray(pool3, np.float32) @ weight.T + bias

    return features, logits


__all__ = [
    "FEATURE_DIM",
    "FIDInceptionV3",
    "FID_WEIGHTS_FILENAME",
    "FID_WEIGHTS_URL",
    "NUM_LOGITS",
    "abstract_variables",
    "default_weights_path",
    "load_inception",
    "load_inception_classifier",
    "preprocess",
    "read_state_dict",
    "state_dict_shapes",
    "variables_from_state_dict",
]
