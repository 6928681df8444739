"""``jlrp.models.read_pth``: PyTorch state dicts read without torch and without running code.

Malicious pickles (``os.system``, ``builtins.eval``, ``subprocess``) are refused before anything
runs, in both of torch's formats; truncated and corrupt files give one line naming the file; the
arrays equal ``torch.load``'s (crosscheck), including non-contiguous storage layouts.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from jlrp.errors import StateDictError
from jlrp.models import efficientnet_lite0_weights, read_pth

MAGIC = 0x1950A86A20F9469CFC6C


class _Global:
    """Pickles as a bare reference to ``module.name`` (what a malicious pickle contains)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # the pickler wants REDUCE targets to look callable
        raise AssertionError("never called")


class _Call:
    """Pickles as ``module.name(*args)`` through REDUCE."""

    def __init__(self, module: str, name: str, *args) -> None:
        self.target, self.args = _Global(module, name), args

    def __reduce__(self):
        return self.target, self.args


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _reduce_pickle(module: str, name: str, arg: str) -> bytes:
    """``module.name(arg)`` as a protocol-2 pickle: PROTO 2, GLOBAL, string, TUPLE1, REDUCE, STOP."""
    encoded = arg.encode()
    return b"\x80\x02" + _global(module, name) + b"X" + struct.pack("<I", len(encoded)) + encoded + b"\x85R."


def _tensor_pickle(storage_type: str = "FloatStorage", numel: int = 6, size=(2, 3), stride=(3, 1)) -> bytes:
    """A one-entry state dict ``{'w': tensor}`` as torch pickles it (zip-format persistent id)."""

    class Rebuild:
        def __reduce__(self):
            hooks = _Call("collections", "OrderedDict")
            return _Global("torch._utils", "_rebuild_tensor_v2"), (
                ("storage", _Global("torch", storage_type), "0", "cpu", numel),
                0,
                size,
                stride,
                False,
                hooks,
            )

    return _handwritten({"w": Rebuild()})


def _handwritten(obj) -> bytes:
    """Pickle with ``_Global`` emitted as GLOBAL opcodes (the pickler never imports the target)."""
    buffer = io.BytesIO()

    class P(pickle._Pickler):  # the pure-Python pickler lets us write opcodes for _Global
        def persistent_id(self, o):
            if isinstance(o, tuple) and o and o[0] == "storage":
                return o
            return None

        def save(self, o, save_persistent_id=True):
            if isinstance(o, _Global):
                self.write(_global(o.module, o.name))
                return
            return super().save(o, save_persistent_id)

    P(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def _zip_pth(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"archive/data/{key}", raw)
    return path


def _legacy_pth(
    path: Path, main_pickle: bytes, keys: list[str], storages: list[bytes], itemsize: int = 4
) -> Path:
    with open(path, "wb") as f:
        for header in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(main_pickle)
        pickle.dump(keys, f, protocol=2)
        for raw in storages:
            f.write(struct.pack("<q", len(raw) // itemsize) + raw)
    return path


# ------------------------------------------------------------------------------------ safety


MALICIOUS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("subprocess", "call"),
    ("torch", "load"),
    ("numpy", "frombuffer"),
]


@pytest.mark.parametrize("module, name", MALICIOUS)
def test_malicious_zip_pickle_is_refused_and_not_run(tmp_path, module, name):
    marker = tmp_path / "pwned"
    payload = _reduce_pickle(
        module, name, f"touch {marker}" if name != "eval" else f"open({str(marker)!r}, 'w')"
    )
    path = _zip_pth(tmp_path / "evil.pth", payload, {})
    with pytest.raises(StateDictError) as info:
        read_pth(path)
    message = str(info.value)
    assert f"{module}.{name}" in message and str(path) in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval")])
def test_malicious_legacy_pickle_is_refused_and_not_run(tmp_path, module, name):
    marker = tmp_path / "pwned"
    command = f"touch {marker}" if name == "system" else f"open({str(marker)!r}, 'w')"
    path = _legacy_pth(tmp_path / "evil.pth", _reduce_pickle(module, name, command), [], [])
    with pytest.raises(StateDictError, match=rf"refused to unpickle {module}\.{name}") as info:
        read_pth(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_malicious_object_hidden_inside_a_state_dict_is_refused(tmp_path):
    """The evil call sits in the tensor's backward hooks, after valid entries."""
    marker = tmp_path / "pwned"

    class Rebuild:
        def __reduce__(self):
            return _Global("torch._utils", "_rebuild_tensor_v2"), (
                ("storage", _Global("torch", "FloatStorage"), "0", "cpu", 2),
                0,
                (2,),
                (1,),
                False,
                _Call("os", "system", f"touch {marker}"),
            )

    path = _zip_pth(tmp_path / "evil.pth", _handwritten(OrderedDict(ok=Rebuild())), {"0": b"\0" * 8})
    with pytest.raises(StateDictError, match=r"os\.system"):
        read_pth(path)
    assert not marker.exists()


def test_header_pickles_of_legacy_files_allow_no_globals(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        f.write(_reduce_pickle("os", "system", "true"))
    with pytest.raises(StateDictError, match=r"refused to unpickle os\.system"):
        read_pth(path)


def test_non_tensor_content_is_refused(tmp_path):
    path = _zip_pth(tmp_path / "ckpt.pth", pickle.dumps({"epoch": 3}, protocol=2), {})
    with pytest.raises(StateDictError, match=r"not a flat tensor state dict.*'epoch' \(int\)"):
        read_pth(path)


# ------------------------------------------------------------------------------------ reading


def test_hand_built_zip_file_with_strides(tmp_path):
    """A transposed (2, 3) view of a 6-element storage: strides (1, 2) -> columns of the storage."""
    raw = np.arange(6, dtype="<f4").tobytes()
    path = _zip_pth(tmp_path / "w.pth", _tensor_pickle(size=(2, 3), stride=(1, 2)), {"0": raw})
    out = read_pth(path)
    np.testing.assert_array_equal(out["w"], np.arange(6, dtype=np.float32).reshape(3, 2).T)
    assert out["w"].flags.c_contiguous and out["w"].flags.writeable


def test_hand_built_legacy_file(tmp_path):
    raw = np.arange(6, dtype="<f8").tobytes()
    main = _tensor_pickle("DoubleStorage", size=(3, 2), stride=(2, 1))
    out = read_pth(_legacy_pth(tmp_path / "w.pth", main, ["0"], [raw], itemsize=8))
    np.testing.assert_array_equal(out["w"], np.arange(6.0).reshape(3, 2))
    assert out["w"].dtype == np.float64


def test_tensor_beyond_its_storage_is_an_error(tmp_path):
    path = _zip_pth(
        tmp_path / "w.pth", _tensor_pickle(numel=6, size=(4, 3), stride=(3, 1)), {"0": b"\0" * 24}
    )
    with pytest.raises(StateDictError, match=r"w\.pth.*reaches element 11 of a storage with 6"):
        read_pth(path)


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    real = efficientnet_lite0_weights().read_bytes()
    cases = {
        "truncated_legacy.pth": real[: len(real) // 2],
        "truncated_header.pth": real[:40],
        "garbage.pth": b"hello, not a model",
        "empty.pth": b"",
        "truncated_zip.pth": b"PK\x03\x04" + b"\0" * 100,
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(StateDictError) as info:
            read_pth(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, message
    with pytest.raises(StateDictError, match="no such file"):
        read_pth(tmp_path / "missing.pth")


def test_truncated_zip_storage(tmp_path):
    path = _zip_pth(tmp_path / "w.pth", _tensor_pickle(), {"0": b"\0" * 10})
    with pytest.raises(StateDictError, match=r"storage '0' of tensor 'w' is truncated"):
        read_pth(path)


def test_real_file_is_the_efficientnet_state_dict():
    weights = read_pth(efficientnet_lite0_weights())
    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert weights["_fc.weight"].shape == (1000, 1280) and weights["_fc.weight"].dtype == np.float32
    assert weights["_bn0.num_batches_tracked"].dtype == np.int64


@pytest.mark.crosscheck
def test_arrays_equal_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    path = efficientnet_lite0_weights()
    reference = torch.load(path, map_location="cpu", weights_only=True)
    ours = read_pth(path)
    assert list(ours) == list(reference)
    for key, tensor in reference.items():
        assert ours[key].dtype == tensor.numpy().dtype and ours[key].shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(ours[key], tensor.numpy(), err_msg=key)
    # the zip format, with every dtype torch's typed storages cover, shared storages and views
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = OrderedDict(
        t=base.t(),
        view=base[1:3, 2:5],
        f16=torch.linspace(-2, 2, 7, dtype=torch.float16),
        bf16=torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
        i8=torch.tensor([-3, 4], dtype=torch.int8),
        u8=torch.tensor([3, 250], dtype=torch.uint8),
        b=torch.tensor([True, False]),
        i64=torch.tensor(7),
        empty=torch.zeros(0, 3),
        param=torch.nn.Parameter(torch.ones(2)),
    )
    torch.save(state, tmp_path / "many.pth")
    ours = read_pth(tmp_path / "many.pth")
    for key, tensor in state.items():
        expected = (
            tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        )
        assert ours[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = read_pth(tmp_path / "legacy.pth")
    for key in state:
        np.testing.assert_array_equal(legacy[key], ours[key], err_msg=key)


def test_no_torch_import():
    """read_pth must work where torch is absent: it never imports it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import jlrp.models as jm\n"
        "w = jm.read_pth(jm.efficientnet_lite0_weights())\n"
        "assert len(w) == 296\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
