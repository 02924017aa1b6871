"""Read a legacy (pre-1.6, non-zip) PyTorch checkpoint into numpy arrays, without torch.

The legacy format is five pickles in a row (magic number, protocol version, system info, the object
itself, the sorted storage keys) followed by the raw bytes of each storage. Tensors inside the object are
references to those storages, so we unpickle with stand-ins for torch's classes and fill them in after.

A checkpoint may come from anyone (MODEL_WEIGHTS), so nothing in it is trusted: every pickle goes through an
unpickler that can build only what that pickle legitimately holds, and every count, offset, size and stride is
checked against the bytes actually present before numpy is allowed to look at memory through it.
"""

import collections
import math
import os
import pickle
import struct

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _Frozen:
    # The BUILD opcode would otherwise let a pickle rewrite our objects' attributes, even the shared ones below.
    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"refusing to set state on a {type(self).__name__.lstrip('_')}")


class _StorageType(_Frozen):
    """What `torch.FloatStorage` and friends unpickle to: a dtype, and deliberately not callable."""

    def __init__(self, name):
        self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


_STORAGE_TYPES = {name: _StorageType(name) for name in _STORAGE_DTYPES}


class _Storage(_Frozen):
    def __init__(self, key, storage_type, numel):
        self.key, self.type, self.numel = key, storage_type, numel
        self.array = None


class _TensorRef(_Frozen):
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def to_numpy(self):
        """The tensor's elements, once _check_tensors has found them inside its storage."""
        flat = self.storage.array
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.array(view)  # a copy: the checkpoint's buffer can then be freed


def _shown(value):
    """An untrusted value as an error message names it: the repr of a number or of a string's start, else its type.
    A list nested N deep whose levels are one shared object is a few bytes of pickle and 2**N characters of repr:
    a 245-byte file kept the reader building one message for good."""
    if isinstance(value, (bool, float)) or (isinstance(value, int) and -(2**63) <= value < 2**64):
        return repr(value)
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    return f"a {type(value).__name__}"


def _is_count(value):
    return type(value) is int and value >= 0  # not bool, not float: torch writes plain ints


def _check_extent(name, offset, size, stride, storage_numel):
    """Refuse a tensor that would make as_strided read outside its storage, or blow a few bytes up into many."""
    if not (
        _is_count(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(map(_is_count, size))
        and all(map(_is_count, stride))
    ):
        raise ValueError(
            f"tensor {_shown(name)} has an invalid offset, size or stride: "
            f"{_shown(offset)}, {_shown(size)}, {_shown(stride)}"
        )
    numel = math.prod(size)
    # The highest element as_strided will touch; an empty tensor touches none but must still start in range.
    end = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 if numel else offset
    if end > storage_numel:
        raise ValueError(
            f"tensor {_shown(name)} (offset {offset}, size {size}, stride {stride}) reaches element {end - 1} "
            f"of a storage of {storage_numel}"
        )
    # A state dict holds weights, never broadcast views; one would copy out more elements than the file has.
    if numel > storage_numel:
        raise ValueError(f"tensor {_shown(name)} has {numel} elements, more than its storage's {storage_numel}")


class _RebuildTensor(_Frozen):
    """What `torch._utils._rebuild_tensor_v2` unpickles to; an object rather than a function so BUILD can't touch it."""

    def __call__(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"a tensor must be built on a storage, not on {type(storage).__name__}")
        return _TensorRef(storage, offset, size, stride)


_REBUILD_TENSOR = _RebuildTensor()


# The pure-Python unpickler: the C one grows its memo to the largest index a PUT names, so a 20-byte file asked for
# 2 GB with one LONG_BINPUT of 2**27 before anything could be checked. Only the small state pickle goes through it.
class _NoClasses(pickle._Unpickler):
    """For the header pickles and the key list: plain ints, strings, lists and dicts, nothing that can run."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"refusing persistent id {_shown(pid)} outside the state dict")


class _StateDict(_NoClasses):
    """For the object pickle: an OrderedDict of tensors that point into storages listed after it."""

    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _REBUILD_TENSOR
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {_shown(pid)}")
        _, storage_type, key, location, numel, view = pid
        if not (
            isinstance(storage_type, _StorageType)
            and isinstance(key, str)
            and isinstance(location, str)
            and _is_count(numel)
        ):
            raise pickle.UnpicklingError(f"malformed storage reference {_shown(pid)}")
        if view is not None:
            raise pickle.UnpicklingError(
                f"storage {_shown(key)} is a view into another storage, which is not supported"
            )
        storage = self._storages.setdefault(key, _Storage(key, storage_type, numel))
        if (storage.type, storage.numel) != (storage_type, numel):
            raise pickle.UnpicklingError(f"storage {_shown(key)} is referenced with two different types or sizes")
        return storage


def _unpickle(unpickler, what):
    try:
        return unpickler.load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{what}: {exc}") from exc
    except Exception as exc:
        raise pickle.UnpicklingError(f"{what} is not a valid pickle: {exc!r}") from exc


def _read_header(f, path):
    magic = _unpickle(_NoClasses(f), "magic number")
    if type(magic) is not int or magic != LEGACY_MAGIC:
        raise ValueError(f"{path} is not a legacy PyTorch checkpoint")
    version = _unpickle(_NoClasses(f), "protocol version")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ValueError(f"{path} has protocol version {_shown(version)}, not {PROTOCOL_VERSION}")
    sys_info = _unpickle(_NoClasses(f), "system info")
    if not isinstance(sys_info, dict):
        raise ValueError(f"{path}: the system info is a {type(sys_info).__name__}, not a dict")
    if not sys_info.get("little_endian", True):
        raise ValueError(f"{path} was written on a big-endian machine")


def _read_keys(f):
    keys = _unpickle(_NoClasses(f), "storage keys")
    if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)):
        raise ValueError(f"the storage keys are not a list of strings: {_shown(keys)}")
    if len(set(keys)) != len(keys):
        raise ValueError("a storage key is listed more than once")
    return keys


def _read_storage(f, storage, file_size):
    """One storage's bytes: an 8-byte element count, then the elements; the count is checked before reading."""
    header = f.read(8)
    if len(header) != 8:
        raise ValueError(f"the file ends before storage {_shown(storage.key)}")
    (count,) = struct.unpack("<q", header)
    if count < 0:
        raise ValueError(f"storage {_shown(storage.key)} has a negative element count {count}")
    nbytes = count * storage.type.dtype.itemsize
    if nbytes > file_size - f.tell():
        raise ValueError(
            f"storage {_shown(storage.key)} claims {nbytes} bytes, more than the {file_size - f.tell()} "
            "bytes left in the file"
        )
    if count != storage.numel:
        raise ValueError(
            f"storage {_shown(storage.key)} has {count} elements but its reference declares {storage.numel}"
        )
    storage.array = np.frombuffer(f.read(nbytes), dtype=storage.type.dtype)


def _read_storages(f, storages, file_size):
    keys = _read_keys(f)
    for key in keys:
        if key not in storages:
            raise ValueError(f"storage {_shown(key)} is in the file but no tensor uses it")
        _read_storage(f, storages[key], file_size)
    missing = sorted(set(storages) - set(keys))
    if missing:
        raise ValueError(f"storage {_shown(missing[0])} is used by a tensor but not in the file")


def _check_state(state, path):
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    for name, ref in state.items():
        if not isinstance(name, str):
            raise ValueError(f"the state dict has a {type(name).__name__} key, not a string")
        if not isinstance(ref, _TensorRef):
            raise ValueError(f"the value of {_shown(name)} is not a tensor but a {type(ref).__name__}")


def load_state_dict(path):
    """Return {name: numpy array} for a legacy PyTorch state-dict file."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        _read_header(f, path)
        storages = {}
        state = _unpickle(_StateDict(f, storages), "state dict")
        _check_state(state, path)
        _read_storages(f, storages, file_size)
    _check_tensors(state, storages)
    return {name: ref.to_numpy() for name, ref in state.items()}


# Elements all tensors may hold, as a multiple of the storages' own: views may overlap (a weight and a slice of it),
# but 20000 names for one tensor took a 1.3 MiB file to 20 GB.
_VIEWS_PER_ELEMENT = 4


def _check_tensors(state, storages):
    """Every tensor inside its storage, and all of them together not many times the storages' elements."""
    for name, ref in state.items():  # before any size is multiplied out: each must be a tuple of counts
        _check_extent(name, ref.offset, ref.size, ref.stride, len(ref.storage.array))
    total = sum(math.prod(ref.size) for ref in state.values())
    stored = sum(storage.numel for storage in storages.values())
    if total > _VIEWS_PER_ELEMENT * stored:
        raise ValueError(f"the tensors hold {total} elements, more than {_VIEWS_PER_ELEMENT}x their storages' {stored}")
