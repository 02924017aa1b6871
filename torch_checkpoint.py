"""Read a legacy (pre-1.6, non-zip) PyTorch checkpoint into numpy arrays, without torch.

The legacy format is five pickles in a row (magic number, protocol version, system info, the object
itself, the sorted storage keys) followed by the raw bytes of each storage. Tensors inside the object are
references to those storages, so we unpickle with stand-ins for torch's classes and fill them in after.
"""

import collections
import pickle
import struct

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

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


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype
        self.array = None


class _TensorRef:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self):
        flat = self.storage.array
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.array(view)  # a copy: the checkpoint's buffer can then be freed


def _rebuild_tensor(storage, offset, size, stride, *_ignored):
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, pid):
        kind, dtype, key = pid[0], pid[1], pid[2]
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        return self._storages.setdefault(key, _Storage(dtype))


def load_state_dict(path):
    """Return {name: numpy array} for a legacy PyTorch state-dict file."""
    with open(path, "rb") as f:
        if pickle.load(f) != LEGACY_MAGIC:
            raise ValueError(f"{path} is not a legacy PyTorch checkpoint")
        pickle.load(f)  # protocol version
        sys_info = pickle.load(f)
        if not sys_info.get("little_endian", True):
            raise ValueError(f"{path} was written on a big-endian machine")
        storages = {}
        state = _Unpickler(f, storages).load()
        for key in pickle.load(f):
            storage = storages[key]
            (count,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(storage.dtype)
            storage.array = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype)
    return {name: ref.to_numpy() for name, ref in state.items() if isinstance(ref, _TensorRef)}
