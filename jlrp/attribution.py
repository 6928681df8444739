"""Attribution: from an explained model and a target to relevance.

:func:`attribute` is the one-call convenience: it runs the explained model, builds the starting
relevance from ``target`` (:func:`output_cotangent`) and pulls it back to the input, jit-compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import TargetError
from .explain import Explained, check_input

__all__ = ["attribute", "output_cotangent", "normalize_target", "pure_function"]

Target = int | np.ndarray | jax.Array | Callable[[jax.Array], jax.Array] | None


def normalize_target(target: Target, output_shape: tuple[int, ...]) -> tuple[str, Any]:
    """Check ``target`` against the output shape and split it into a static kind and a dynamic value.

    Kinds: ``'argmax'`` (``None``: the predicted class), ``'index'`` (an int, or an integer array of one
    class per sample), ``'mask'`` (an array shaped like the output or broadcastable to it, multiplied
    with the output), ``'callable'`` (a function of the output that returns the starting relevance).

    Raises:
        TargetError: a class index out of range, a per-sample array of the wrong length, a mask that
            does not broadcast to the output.
    """
    if target is None:
        return "argmax", None
    if callable(target) and not isinstance(target, (np.ndarray, jax.Array)):
        return "callable", target
    arr = np.asarray(target) if not isinstance(target, jax.core.Tracer) else target
    if len(output_shape) == 0:
        raise TargetError("the model output is a scalar; pass target=None or a callable")
    n_classes = output_shape[-1]
    if jnp.issubdtype(arr.dtype, jnp.integer) and arr.ndim <= len(output_shape) - 1:
        if isinstance(arr, np.ndarray):
            bad = (arr < 0) | (arr >= n_classes)
            if bad.any():
                raise TargetError(
                    f"target class {arr[bad].ravel()[0]} is outside the output's range 0..{n_classes - 1}"
                )
        if arr.ndim and tuple(arr.shape) != tuple(output_shape[: arr.ndim]):
            raise TargetError(
                f"one target per sample needs shape {tuple(output_shape[:-1])}, got {tuple(arr.shape)}"
            )
        return "index", jnp.asarray(arr)
    if jnp.issubdtype(arr.dtype, jnp.bool_) or jnp.issubdtype(arr.dtype, jnp.number):
        try:
            np.broadcast_shapes(tuple(arr.shape), tuple(output_shape))
        except ValueError:
            raise TargetError(
                f"a target mask must broadcast to the output shape {tuple(output_shape)}, got {tuple(arr.shape)}"
            ) from None
        return "mask", jnp.asarray(arr)
    raise TargetError(f"unsupported target {target!r}: use an int, an int array, a mask or a callable")


def output_cotangent(output: jax.Array, kind: str, value: Any) -> jax.Array:
    """The starting relevance: the output times a one-hot / mask, or a callable's result."""
    if kind == "callable":
        start = jnp.asarray(value(output))
        if start.shape != output.shape:
            raise TargetError(
                f"the target callable returned shape {start.shape}, the output is {output.shape}"
            )
        return start.astype(output.dtype)
    if kind == "argmax":
        value = jnp.argmax(output, axis=-1)
        kind = "index"
    if kind == "index":
        mask = jax.nn.one_hot(value, output.shape[-1], dtype=output.dtype)
    else:
        mask = jnp.asarray(value).astype(output.dtype)
    return output * mask


def pure_function(
    explained: Any, args: tuple[Any, ...]
) -> tuple[Callable[..., Any], Any, Any, tuple[Any, ...]]:
    """Split a call of an explained model into ``(fn, params, x, rest)`` with ``fn(params, x, *rest)``.

    linen: ``args = (variables, x, *rest)``; NNX: ``args = (x, *rest)`` and ``params`` is the model's
    state (so everything is a pytree that ``jax.jit`` and ``jax.vmap`` can take).
    """
    pure = getattr(explained, "pure", None)
    if pure is not None:  # NNX
        return explained.pure, explained.state, args[0], tuple(args[1:])
    if isinstance(explained, Explained):
        if len(args) < 2:
            raise TypeError("a linen explained model needs (variables, x, ...) arguments")
        return explained, args[0], args[1], tuple(args[2:])
    raise TypeError(f"expected a model made by jlrp.explain, got {type(explained).__name__}")


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _attribute(fn, params, x, rest, value, kind, kwargs):
    output, pullback = jax.vjp(lambda inp: fn(params, inp, *rest, **dict(kwargs)), x)
    (relevance,) = pullback(output_cotangent(output, kind, value))
    return output, relevance


def attribute(
    explained: Explained, *args: Any, target: Target = None, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """Explain a batch in one call, jit-compiled: ``(output, relevance)``.

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: what the explained model takes: ``(variables, x, ...)`` for linen, ``(x, ...)`` for NNX.
        target: ``None`` for the predicted class, an int class, an integer array with one class per
            sample, a mask shaped like (or broadcastable to) the output, or a callable
            ``output -> starting relevance``. Ints and masks are multiplied with the output (the
            starting relevance is the explained score itself).
        **kwargs: keyword arguments of the model call (static, e.g. ``train=False``).

    Returns:
        The model output and the relevance of the input (same shape and dtype as ``x``).
    """
    fn, params, x, rest = pure_function(explained, args)
    check_input(x)
    cache = explained.__dict__.setdefault("_output_shapes", {})
    key = (jax.tree_util.tree_structure((params, x, rest)), tuple(jnp.shape(x)), str(jnp.result_type(x)))
    if key not in cache:
        cache[key] = jax.eval_shape(lambda p, i, r: fn(p, i, *r, **kwargs), params, x, rest).shape
    kind, value = normalize_target(target, cache[key])
    return _attribute(fn, params, x, rest, value, kind, tuple(sorted(kwargs.items())))
