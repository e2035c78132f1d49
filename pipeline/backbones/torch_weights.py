"""Read a PyTorch `state_dict` file (`.pth`) into NumPy arrays, without torch and without running its pickle.

Two layouts exist. The legacy one (torch < 1.6, and the EfficientNet-Lite0 checkpoint) is a run of pickles:
a magic number, a protocol version, system info, the state dict whose tensors name their storages by
persistent id, the list of storage keys, then each storage as an 8-byte element count and its raw bytes.
The zip layout (torch >= 1.6) holds `<name>/data.pkl` and one raw file per storage in `<name>/data/`.

The unpickler resolves only the globals a state dict needs (an OrderedDict, tensor rebuilders and storage
types); any other global, which is how a malicious pickle runs code, is refused with WeightsError.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class _StorageType:
    """Stands in for `torch.FloatStorage` and its kin: only the element type is kept."""

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(STORAGE_DTYPES[name])


class _TensorRef:
    """A tensor as the pickle describes it: a storage key, an offset, a shape and strides (in elements)."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = storage, offset, tuple(shape), tuple(stride)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_ignored):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise WeightsError(f"'{self.path}' is not a plain PyTorch state dict: its pickle refers to "
                               f"'{module}.{name}', which is refused (only tensors and their storages "
                               "are read, so that loading a file never runs its code)") from None

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, element count[, view metadata])
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"'{self.path}': unexpected persistent id {pid!r} in its pickle")
        return pid[1], str(pid[2]), int(pid[4])


def _tensor_array(ref, storages, path, name):
    (storage_type, key, _count) = ref.storage
    if key not in storages:
        raise WeightsError(f"'{path}': tensor '{name}' refers to storage '{key}', which the file does not hold")
    flat = storages[key]
    if flat.dtype != storage_type.dtype:
        flat = flat.view(storage_type.dtype)
    if not ref.shape:
        if ref.offset >= flat.size:
            raise WeightsError(f"'{path}': tensor '{name}' reaches past the end of its storage '{key}'")
        return np.array(flat[ref.offset])
    if any(n == 0 for n in ref.shape):
        return np.zeros(ref.shape, storage_type.dtype)
    needed = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride)) + 1
    if needed > flat.size:
        raise WeightsError(f"'{path}': tensor '{name}' reaches past the end of its storage '{key}'")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape,
                                           strides=[s * item for s in ref.stride], writeable=False)
    return np.array(view)


def _read_legacy(f, path):
    magic = _Unpickler(f, path).load()
    if magic != LEGACY_MAGIC:
        raise WeightsError(f"'{path}' is not a PyTorch file (neither a zip archive nor the legacy format)")
    _Unpickler(f, path).load()  # protocol version
    _Unpickler(f, path).load()  # system info (endianness, type sizes)
    state = _Unpickler(f, path).load()
    keys = _Unpickler(f, path).load()
    types = {}
    for value in _tensors(state, path):
        storage_type, key, count = value.storage
        types[key] = (storage_type.dtype, count)
    storages = {}
    for key in keys:
        if key not in types:
            raise WeightsError(f"'{path}': storage '{key}' is listed but no tensor uses it")
        dtype, _ = types[key]
        header = f.read(8)
        if len(header) != 8:
            raise WeightsError(f"'{path}' ends inside its storages (storage '{key}'); the file is truncated")
        (count,) = struct.unpack("<q", header)
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise WeightsError(f"'{path}' ends inside storage '{key}'; the file is truncated")
        storages[key] = np.frombuffer(raw, dtype=dtype)
    return state, storages


def _read_zip(archive, path):
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise WeightsError(f"'{path}' is a zip archive but not a PyTorch file (no single data.pkl inside)")
    prefix = pickles[0][: -len("data.pkl")]
    state = _Unpickler(io.BytesIO(archive.read(pickles[0])), path).load()
    storages = {}
    for value in _tensors(state, path):
        storage_type, key, _ = value.storage
        if key not in storages:
            try:
                raw = archive.read(f"{prefix}data/{key}")
            except KeyError:
                raise WeightsError(f"'{path}': storage '{key}' is missing from the archive") from None
            storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
    return state, storages


def _tensors(state, path):
    if not isinstance(state, dict):
        raise WeightsError(f"'{path}': its pickle holds a {type(state).__name__}, not a state dict of tensors")
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise WeightsError(f"'{path}': entry '{name}' of its state dict is a {type(value).__name__}, not a tensor")
        yield value


def read_state_dict(path):
    """The tensors of a PyTorch state-dict file as {name: NumPy array}, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"PyTorch weight file '{path}' does not exist")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                state, storages = _read_zip(archive, path)
        else:
            with open(path, "rb") as f:
                state, storages = _read_legacy(f, path)
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, struct.error) as exc:
        raise WeightsError(f"'{path}' is not a readable PyTorch state dict: {exc}") from exc
    return collections.OrderedDict(
        (name, _tensor_array(ref, storages, path, name)) for name, ref in state.items())
