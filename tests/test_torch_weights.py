"""The PyTorch state-dict reader: both file layouts, built here the way torch writes them, and refused globals."""
import collections
import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from pipeline.backbones.torch_weights import LEGACY_MAGIC, read_state_dict
from pipeline.errors import WeightsError

TENSORS = collections.OrderedDict([
    ("conv.weight", np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3) / 7),
    ("bn.running_var", np.array([0.5, 2.0], np.float32)),
    ("bn.num_batches_tracked", np.array(12, np.int64)),
    ("half", np.array([[1.5, -2.0]], np.float16)),
])


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named like torch's, so that pickle writes the same globals torch's own files hold."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class _Storage:
    def __init__(self, key, array, storage_type):
        self.key, self.array, self.storage_type = key, array, storage_type


class _Tensor:
    """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)."""

    def __init__(self, storage, array, offset=0):
        self.storage, self.array, self.offset = storage, array, offset

    def __reduce__(self):
        strides = tuple(s // self.array.itemsize for s in self.array.strides)
        return (sys.modules["torch._utils"]._rebuild_tensor_v2,
                (self.storage, self.offset, self.array.shape, strides, False, collections.OrderedDict()))


def _storage_type(torch, array):
    return {np.float32: torch.FloatStorage, np.int64: torch.LongStorage, np.float16: torch.HalfStorage}[
        array.dtype.type]


def _state(torch, tensors):
    storages, state = [], collections.OrderedDict()
    for k, (name, array) in enumerate(tensors.items()):
        storage = _Storage(str(1000 + k), np.require(array, requirements="C"), _storage_type(torch, array))
        storages.append(storage)
        state[name] = _Tensor(storage, storage.array)
    return state, storages


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.storage_type, obj.key, "cpu", obj.array.size)
        return None


def _dumps(obj):
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def write_legacy(path, torch, tensors):
    """torch < 1.6's format: magic, protocol, sys info, the state dict, the storage keys, then each storage."""
    state, storages = _state(torch, tensors)
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(_dumps(state))
        f.write(pickle.dumps([s.key for s in storages], protocol=2))
        for s in storages:
            f.write(struct.pack("<q", s.array.size))
            f.write(s.array.tobytes())


def write_zip(path, torch, tensors):
    """torch >= 1.6's format: archive/data.pkl and archive/data/<key> per storage."""
    state, storages = _state(torch, tensors)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", _dumps(state))
        for s in storages:
            z.writestr(f"archive/data/{s.key}", s.array.tobytes())


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_reads_every_tensor_with_its_shape_dtype_and_values(tmp_path, fake_torch, writer):
    path = tmp_path / "tiny.pth"
    writer(path, fake_torch, TENSORS)
    state = read_state_dict(path)
    assert list(state) == list(TENSORS)
    for name, want in TENSORS.items():
        assert state[name].dtype == want.dtype and state[name].shape == want.shape
        np.testing.assert_array_equal(state[name], want)


def test_a_view_into_a_shared_storage_keeps_its_offset_and_strides(tmp_path, fake_torch):
    whole = np.arange(12, dtype=np.float32)
    storage = _Storage("7", whole, fake_torch.FloatStorage)
    transposed = whole[2:8].reshape(2, 3).T  # offset 2, strides (1, 3) elements
    state = collections.OrderedDict(t=_Tensor(storage, transposed, offset=2), all=_Tensor(storage, whole))
    path = tmp_path / "views.pth"
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(_dumps(state))
        f.write(pickle.dumps(["7"], protocol=2))
        f.write(struct.pack("<q", whole.size) + whole.tobytes())
    got = read_state_dict(path)
    np.testing.assert_array_equal(got["t"], np.array([[2, 5], [3, 6], [4, 7]], np.float32))
    np.testing.assert_array_equal(got["all"], whole)


def test_a_forbidden_global_is_refused_and_never_called(tmp_path, fake_torch):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, {}):
            f.write(pickle.dumps(header, protocol=2))
        f.write(pickle.dumps({"weight": Payload()}, protocol=2))
    with pytest.raises(WeightsError, match=r"evil\.pth.*'posix\.mkdir'.*refused"):
        read_state_dict(path)
    assert not marker.exists()


def test_a_forbidden_global_in_a_zip_file_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": print}, protocol=2))
    with pytest.raises(WeightsError, match="print.*refused"):
        read_state_dict(path)


def test_truncated_and_foreign_files_are_errors_naming_the_file(tmp_path, fake_torch):
    path = tmp_path / "cut.pth"
    write_legacy(path, fake_torch, TENSORS)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="cut.pth.*truncated"):
        read_state_dict(path)
    other = tmp_path / "notes.pth"
    other.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pth"):
        read_state_dict(other)
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "missing.pth")
