"""Targets: which part of the model output is explained, as a pytree that ``jax.jit`` takes directly.

An attribution starts from a *starting relevance* (the VJP's cotangent) built from the model output.
:func:`as_target` turns what a user passes as ``target=`` into a :class:`Target`:

- ``None``: the predicted class (``argmax`` of the output's last axis), ``output * one_hot(argmax)``;
- an int, or an integer array with one class per sample: ``output * one_hot(target)``;
- a mask (float or bool array) shaped like the output or broadcastable to it: ``output * mask``;
- a callable ``output -> starting relevance`` (same shape as the output);
- :func:`one_hot` ``(classes)``: ``one_hot(classes)`` itself, not multiplied with the output, so a
  plain model's VJP is the textbook gradient :math:`\\partial f_c / \\partial x`.

A :class:`Target` is a frozen ``flax.struct.dataclass``: its ``kind`` and callable ``fn`` are static
(part of the compiled program; a callable is hashed by identity, so reuse one function object), its
``value`` is an array (traced: new classes do not recompile).

Models that return more than one array (``(logits, aux)``, ``{'logits': ..., 'aux': ...}``) need an
output selector, ``output=``: an int (index into a tuple/list), a str (dict key), a tuple of them (a
path, e.g. ``('heads', 0)``) or a callable ``output -> array``. :func:`select_output` applies it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .errors import TargetError, UsageTypeError

__all__ = [
    "Target",
    "TargetLike",
    "OutputSelector",
    "KINDS",
    "as_target",
    "one_hot",
    "output_cotangent",
    "select_output",
    "output_struct",
]

#: the kinds of :class:`Target`
KINDS = ("argmax", "index", "mask", "one_hot", "callable")


@struct.dataclass
class Target:
    """A normalised target: ``kind`` and ``fn`` static, ``value`` an array (or ``None``).

    Kinds: ``'argmax'`` (value ``None``), ``'index'`` (integer classes, shape ``()`` or the output's
    leading shape), ``'mask'`` (broadcastable to the output), ``'one_hot'`` (integer classes, like
    ``'index'``, cotangent not multiplied with the output), ``'callable'`` (``fn``, value ``None``).
    Build one with :func:`as_target` or :func:`one_hot`.
    """

    kind: str = struct.field(pytree_node=False)
    value: Any = None
    fn: Callable[[jax.Array], jax.Array] | None = struct.field(pytree_node=False, default=None)

    def per_sample(self, output_shape: tuple[int, ...], n: int) -> bool:
        """Whether ``value`` has one entry per sample (its axis 0 is the batch axis of ``n`` samples).

        Per-sample: integer classes with ``ndim >= 1``, or a mask with as many axes as the output whose
        first axis is the batch (``n > 1``). Everything else is the same for every sample.
        """
        if self.kind in ("index", "one_hot"):
            return jnp.ndim(self.value) >= 1
        if self.kind == "mask":
            return n > 1 and jnp.ndim(self.value) == len(output_shape) and jnp.shape(self.value)[0] == n
        return False

    def fixed(self, output: jax.Array) -> Target:
        """``'argmax'`` resolved to the classes predicted in ``output`` (an ``'index'`` target); others as is."""
        if self.kind == "argmax":
            return Target("index", jnp.argmax(output, axis=-1))
        return self


TargetLike = Target | int | np.ndarray | jax.Array | Callable[[jax.Array], jax.Array] | None
OutputSelector = int | str | tuple[int | str, ...] | Callable[[Any], jax.Array] | None


def one_hot(classes: Any) -> Target:
    """A target whose starting relevance is ``one_hot(classes)`` itself (not times the output).

    With a plain model the VJP is then the gradient of the class score, :math:`\\partial f_c/\\partial x`.

    Args:
        classes: an int, or an integer array with one class per sample (shape: the output's leading axes).
    """
    arr = np.asarray(classes) if not isinstance(classes, jax.Array) else classes
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise TargetError(f"one_hot needs integer classes, got dtype {arr.dtype}")
    return Target("one_hot", jnp.asarray(arr))


def _check_classes(arr: Any, output_shape: tuple[int, ...]) -> None:
    n_classes = output_shape[-1]
    if isinstance(arr, np.ndarray) or (isinstance(arr, jax.Array) and not isinstance(arr, jax.core.Tracer)):
        if isinstance(arr, jax.Array) and not arr.is_fully_addressable:
            # a global array across processes (jax.distributed): each process checks its own part
            arr_np = np.concatenate([np.asarray(s.data).reshape(-1) for s in arr.addressable_shards] + [[0]])
        else:
            arr_np = np.asarray(arr)
        bad = (arr_np < 0) | (arr_np >= n_classes)
        if bad.any():
            raise TargetError(
                f"target class {arr_np[bad].ravel()[0]} is outside the output's range 0..{n_classes - 1}"
            )
    if jnp.ndim(arr) and tuple(jnp.shape(arr)) != tuple(output_shape[: jnp.ndim(arr)]):
        raise TargetError(
            f"one target per sample needs shape {tuple(output_shape[:-1])}, got {tuple(jnp.shape(arr))}"
        )


def _check_mask(arr: Any, output_shape: tuple[int, ...]) -> None:
    try:
        np.broadcast_shapes(tuple(jnp.shape(arr)), output_shape)
    except ValueError:
        raise TargetError(
            f"a target mask must broadcast to the output shape {output_shape}, got {tuple(jnp.shape(arr))}"
        ) from None


def as_target(target: TargetLike, output_shape: tuple[int, ...], batch: int | None = None) -> Target:
    """Check ``target`` against the (selected) output shape and normalise it to a :class:`Target`.

    Args:
        target: ``None``, an int, an integer array (one class per sample), a mask broadcastable to the
            output, a callable ``output -> starting relevance``, or a :class:`Target`.
        output_shape: the shape of the explained output, e.g. ``(N, n_classes)``.
        batch: the input's batch length, if known. A 1-D output of that length (one score per sample,
            e.g. a sentence similarity) makes ``target=None`` ambiguous: its "predicted class" would be
            the argmax over the *samples*, so it raises (pass ``target=1.0`` for every sample's score).

    Raises:
        TargetError: a class index out of range, a per-sample array of the wrong shape, a mask that does
            not broadcast to the output, a class target for a scalar output, an unsupported type, or
            ``target=None`` for one score per sample.
    """
    output_shape = tuple(output_shape)
    if target is None and batch is not None and batch > 1 and output_shape == (batch,):
        raise TargetError(
            f"the model returns one value per sample (output shape {output_shape}), so target=None (the "
            "argmax over the last axis) would explain only the sample with the largest output; pass "
            "target=1.0 to explain every sample's own output"
        )
    if isinstance(target, Target):
        if target.kind not in KINDS:
            raise TargetError(f"unknown target kind {target.kind!r}; one of {KINDS}")
        if target.kind in ("index", "one_hot"):
            if not output_shape:
                raise TargetError("the model output is a scalar; pass target=None or a callable")
            _check_classes(target.value, output_shape)
        if target.kind == "mask":
            _check_mask(target.value, output_shape)
        return target
    if target is None:
        return Target("argmax")
    if callable(target) and not isinstance(target, (np.ndarray, jax.Array)):
        return Target("callable", fn=target)
    arr = target if isinstance(target, jax.Array) else np.asarray(target)
    if len(output_shape) == 0:
        raise TargetError("the model output is a scalar; pass target=None or a callable")
    if jnp.issubdtype(arr.dtype, jnp.integer) and arr.ndim <= len(output_shape) - 1:
        _check_classes(arr, output_shape)
        return Target("index", jnp.asarray(arr))
    if jnp.issubdtype(arr.dtype, jnp.bool_) or jnp.issubdtype(arr.dtype, jnp.number):
        _check_mask(arr, output_shape)
        return Target("mask", jnp.asarray(arr))
    raise TargetError(f"unsupported target {target!r}: use an int, an int array, a mask or a callable")


def output_cotangent(output: jax.Array, target: TargetLike) -> jax.Array:
    """The starting relevance for ``output`` (an array, the selected model output).

    ``'argmax'``/``'index'``: ``output * one_hot(classes)``; ``'mask'``: ``output * mask``; ``'one_hot'``:
    ``one_hot(classes)``; ``'callable'``: ``fn(output)``. A target that is not a :class:`Target` goes
    through :func:`as_target` first.

    Returns:
        An array shaped like ``output``, in its dtype.

    Raises:
        TargetError: a callable that returns another shape than the output's.
    """
    if not isinstance(target, Target):
        target = as_target(target, tuple(output.shape))
    if target.kind == "callable":
        start = jnp.asarray(target.fn(output))
        if start.shape != output.shape:
            raise TargetError(
                f"the target callable returned shape {start.shape}, the output is {output.shape}"
            )
        return start.astype(output.dtype)
    target = target.fixed(output)
    if target.kind in ("index", "one_hot"):
        mask = jax.nn.one_hot(target.value, output.shape[-1], dtype=output.dtype)
        if target.kind == "one_hot":
            return jnp.broadcast_to(mask, output.shape)
    else:
        mask = jnp.asarray(target.value).astype(output.dtype)
    return output * mask


# --------------------------------------------------------------------------------------------------
# output selection


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (tuple, list, dict))
    )


def describe(tree: Any, depth: int = 2) -> str:
    """A short one-line picture of a pytree: ``tuple(f32[8,10], dict(aux=f32[8]))``."""
    if _is_array(tree):
        dtype = np.dtype(tree.dtype)
        return f"{dtype.kind}{dtype.itemsize * 8}[{','.join(str(int(d)) for d in tree.shape)}]"
    if depth <= 0:
        return type(tree).__name__
    if isinstance(tree, dict):
        items = [f"{k}={describe(v, depth - 1)}" for k, v in list(tree.items())[:6]]
        more = ", ..." if len(tree) > 6 else ""
        return f"{type(tree).__name__}({', '.join(items)}{more})"
    if isinstance(tree, (tuple, list)):
        items = [describe(v, depth - 1) for v in tree[:6]]
        more = ", ..." if len(tree) > 6 else ""
        return f"{type(tree).__name__}({', '.join(items)}{more})"
    return type(tree).__name__


def select_output(output: Any, selector: OutputSelector) -> jax.Array:
    """The array to explain: ``output`` itself (``selector=None``), ``output[i]``, ``output[key]``, a path
    of them (a tuple of ints/strs), or ``selector(output)``.

    Raises:
        TargetError: the selector does not fit the output, or what it selects is not an array (the
            message shows the output's structure and says how to pass ``output=``).
    """
    selected = output
    if callable(selector):
        selected = selector(output)
    elif selector is not None:
        path = selector if isinstance(selector, tuple) else (selector,)
        for i, key in enumerate(path):
            if isinstance(key, bool) or not isinstance(key, (int, np.integer, str)):
                raise TargetError(
                    f"output={selector!r}: use an int (tuple/list index), a str (dict key), a tuple of "
                    f"them, or a callable output -> array"
                )
            try:
                selected = selected[key]
            except (IndexError, KeyError, TypeError):
                raise TargetError(
                    f"output={selector!r} does not fit the model output {describe(output)} "
                    f"(at {path[: i + 1]!r})"
                ) from None
    if not _is_array(selected):
        what = "the model output" if selector is None else f"output={selector!r} selects"
        raise TargetError(
            f"{what} {describe(selected)}, not an array: pass output= to select the array to explain, "
            f"e.g. output=0 (tuple index), output='logits' (dict key) or output=lambda out: out[0]"
        )
    return selected


# --------------------------------------------------------------------------------------------------
# cached output shapes


def _abstract_leaf(leaf: Any) -> Any:
    try:
        return jax.typeof(leaf)
    except TypeError:
        return jax.typeof(np.asarray(leaf))


@functools.lru_cache(maxsize=256)
def _cached_output_struct(
    fn: Callable[..., Any], treedef: Any, leaves: tuple[Any, ...], kwargs: tuple, selector: OutputSelector
) -> jax.ShapeDtypeStruct:
    args = jax.tree_util.tree_unflatten(treedef, leaves)
    return jax.eval_shape(lambda a: select_output(fn(*a, **dict(kwargs)), selector), args)


def output_struct(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], selector: OutputSelector = None
) -> jax.ShapeDtypeStruct:
    """Shape and dtype of ``select_output(fn(*args, **kwargs), selector)``, without running ``fn``.

    Cached on ``(fn, tree structure of args, every leaf's shape and dtype, kwargs, selector)``.

    Raises:
        TargetError: the (selected) output is not an array.
        UsageTypeError: a keyword argument that is not hashable (they are static in the compiled call).
    """
    flat, treedef = jax.tree_util.tree_flatten(args)
    key_kwargs = tuple(sorted(kwargs.items()))
    try:
        hash(key_kwargs)
        hash(selector)
    except TypeError:
        raise UsageTypeError(
            "model keyword arguments (and output=) are static in the compiled call, so they must be "
            f"hashable; got {sorted(kwargs)}: pass arrays positionally instead"
        ) from None
    leaves = tuple(_abstract_leaf(leaf) for leaf in flat)
    return _cached_output_struct(fn, treedef, leaves, key_kwargs, selector)
