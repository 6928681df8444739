"""Attribution: from an explained model and a target to relevance.

:func:`attribute` is the one-call convenience: it runs the explained model, builds the starting
relevance from ``target`` (:func:`output_cotangent`) and pulls it back to the input, jit-compiled.

The attributors :class:`Gradient`, :class:`SmoothGrad`, :class:`IntegratedGradients` and
:class:`Occlusion` mirror zennit's (same hyper-parameters, defaults and formulas). Each is a frozen
dataclass of its hyper-parameters plus the model, called like the model with a ``target``::

    attr = SmoothGrad(jlrp.explain(model, composites.EpsilonPlus()), noise_level=0.1, n_iter=20)
    output, relevance = attr(variables, x, target=3)        # linen; NNX: attr(x, target=3)

Large batches and several devices go through :func:`attribute` too: ``batch_size=k`` propagates at most
``k`` samples at a time (``lax.map`` over chunks, memory bounded by ``k``), ``devices=...`` shards the
batch over a 1-D device mesh (``jax.shard_map``, parameters replicated); the two combine.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .errors import TargetError
from .explain import Explained, check_input

__all__ = [
    "attribute",
    "BATCH_AXIS",
    "output_cotangent",
    "normalize_target",
    "pure_function",
    "Attributor",
    "Gradient",
    "SmoothGrad",
    "IntegratedGradients",
    "Occlusion",
    "occlude_independent",
]

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


def _static_target(kind: str, value: Any) -> tuple[Any, Any]:
    """Make a normalised target jit-friendly: a callable travels in the (static) kind, arrays stay dynamic.

    A callable target is hashed by identity, so pass the same function object to reuse the compilation.
    """
    if kind == "callable":
        return ("callable", value), None
    return kind, value


def _dynamic_target(kind: Any, value: Any) -> tuple[str, Any]:
    """Undo :func:`_static_target` inside the jit-compiled function."""
    if isinstance(kind, tuple):
        return kind
    return kind, value


#: name of the mesh axis that :func:`attribute` shards the batch over (``devices=...``)
BATCH_AXIS = "batch"


def _per_sample(kind: str, value: Any, output_shape: tuple[int, ...], n: int) -> bool:
    """Whether a normalised target value has one entry per sample (leading axis = the batch axis).

    Per-sample: an integer array of classes (``ndim >= 1``), or a mask with as many axes as the output
    whose first axis is the batch (``n > 1``). Everything else (``None``, a scalar class, a mask that
    broadcasts over the batch, a callable) is the same for every sample.
    """
    if kind == "index":
        return jnp.ndim(value) >= 1
    if kind == "mask":
        return n > 1 and jnp.ndim(value) == len(output_shape) and jnp.shape(value)[0] == n
    return False


def _pad_batch(a: Any, n: int) -> Any:
    """``a`` with its leading axis padded to ``n`` by repeating the last entry (valid, finite inputs)."""
    missing = n - a.shape[0]
    if missing <= 0:
        return a
    xp = np if isinstance(a, np.ndarray) else jnp
    return xp.concatenate([a, xp.repeat(a[-1:], missing, axis=0)], axis=0)


def _in_chunks(
    compute: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]],
    x: jax.Array,
    batched: Any,
    batch_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    """``compute(x, batched)`` evaluated on chunks of at most ``batch_size`` samples under ``lax.map``.

    The ``n`` samples are split into ``ceil(n / batch_size)`` equal chunks (so one compiled body serves
    them all); fewer than one sample per chunk is padding (a copy of the last sample), stripped from the
    results. Memory holds one chunk's activations and residuals at a time.
    """
    n = x.shape[0]
    if batch_size is None or batch_size >= n:
        return compute(x, batched)
    n_chunks = -(-n // batch_size)
    size = -(-n // n_chunks)

    def split(a: jax.Array) -> jax.Array:
        return _pad_batch(a, n_chunks * size).reshape((n_chunks, size) + a.shape[1:])

    def merge(a: jax.Array) -> jax.Array:
        return a.reshape((n_chunks * size,) + a.shape[2:])[:n]

    chunks = lax.map(lambda args: compute(*args), (split(x), jax.tree_util.tree_map(split, batched)))
    return jax.tree_util.tree_map(merge, chunks)


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _attribute(fn, params, x, rest, value, kind, kwargs, batch_size, mesh, batched):
    """The jit-compiled body of :func:`attribute`.

    ``batched``: whether ``value`` (the dynamic target) has a leading batch axis. With a ``mesh`` the
    (padded, batch-sharded) ``x`` and a batched ``value`` are split over the mesh's devices by
    ``shard_map``, everything else is replicated; each device then chunks its own part.
    """

    def local(params, x, rest, value):
        def compute(x_chunk, batched_value):
            target = batched_value if batched else value
            return _vjp_at(fn, params, x_chunk, rest, kwargs, *_dynamic_target(kind, target))

        return _in_chunks(compute, x, value if batched else None, batch_size)

    if mesh is None:
        return local(params, x, rest, value)
    shard, replicate = PartitionSpec(BATCH_AXIS), PartitionSpec()
    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(replicate, shard, replicate, shard if batched else replicate),
        out_specs=(shard, shard),
        # every device explains its own shard without collectives, so there is nothing to check; and
        # rules build device-invariant inputs (ZBox's bounds) whose pullbacks then receive per-device
        # relevance, which the varying-manual-axes check would reject
        check_vma=False,
    )
    return sharded(params, x, rest, value)


def _resolve_devices(devices: Sequence[jax.Device] | int | None) -> tuple[jax.Device, ...] | None:
    """``None`` -> no sharding; an int ``k`` -> the first ``k`` local devices; a sequence -> those devices."""
    if devices is None:
        return None
    local = jax.local_devices()
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(local):
            raise ValueError(
                f"devices={devices}: there are {len(local)} local device(s) ({local[0].platform}); "
                f"pass a number from 1 to {len(local)} or a list of jax.Device objects"
            )
        return tuple(local[: int(devices)])
    if isinstance(devices, jax.Device):
        devices = (devices,)
    try:
        resolved = tuple(devices)
    except TypeError:
        raise TypeError(
            f"devices must be None, an int or a sequence of jax.Device, got {type(devices).__name__}"
        ) from None
    if not resolved or not all(isinstance(d, jax.Device) for d in resolved):
        raise TypeError(f"devices must be a non-empty sequence of jax.Device objects, got {devices!r}")
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"devices lists a device twice: {resolved}")
    return resolved


def attribute(
    explained: Explained,
    *args: Any,
    target: Target = None,
    batch_size: int | None = None,
    devices: Sequence[jax.Device] | int | None = None,
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """Explain a batch in one call, jit-compiled: ``(output, relevance)``.

    This is jlrp's one entry point for batch attribution, also for large batches and several devices:
    ``batch_size`` bounds the memory, ``devices`` spreads the batch over accelerators (or both: each
    device then works through its part in chunks). Either way every sample is explained on its own, so
    the relevance is that of the plain call up to floating-point rounding: kernels for another batch
    size may round differently (about 1e-7 relative in float32, 1e-15 in float64, as a plain call on a
    sub-batch would; on CPU each device's shard is bit-for-bit a plain call on that shard)::

        out, rel = jlrp.attribute(explained, variables, x, target=labels)                  # one device
        out, rel = jlrp.attribute(explained, variables, x, target=labels, batch_size=16)   # bounded memory
        out, rel = jlrp.attribute(explained, variables, x, target=labels,
                                  devices=jax.local_device_count())                        # all devices

    Both options need a model whose output has the batch axis first and treats the samples
    independently (inference mode, e.g. ``train=False`` for BatchNorm), and a ``target`` callable that
    works per sample: it is called on the output of each chunk / device shard.

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: what the explained model takes: ``(variables, x, ...)`` for linen, ``(x, ...)`` for NNX.
            The batch is axis 0 of ``x``; further positional arguments are passed whole to every chunk
            and device (they must not have the batch axis).
        target: ``None`` for the predicted class, an int class, an integer array with one class per
            sample, a mask shaped like (or broadcastable to) the output, or a callable
            ``output -> starting relevance``. Ints and masks are multiplied with the output (the
            starting relevance is the explained score itself).
        batch_size: at most this many samples (per device, with ``devices``) are propagated at once:
            the batch is split into ``ceil(n / batch_size)`` equal chunks, processed one after the
            other under ``lax.map`` inside the compiled function, so peak memory follows
            ``batch_size``, not the batch. ``None`` (default): the whole batch at once.
        devices: shard the batch over these devices: ``None`` (default) runs on the inputs' device
            without sharding; an int ``k`` takes the first ``k`` of ``jax.local_devices()``; or a
            sequence of ``jax.Device``. The batch (and a per-sample target) is padded to a multiple of
            the device count by repeating its last sample and placed with a ``NamedSharding`` over a
            1-D mesh with axis :data:`BATCH_AXIS`; the parameters and other arguments are replicated.
            Arrays that already have exactly that placement are not copied again, so when calling
            repeatedly, place the variables once with ``jax.device_put(variables,
            NamedSharding(Mesh(np.array(devices), (BATCH_AXIS,)), PartitionSpec()))``. Each device
            runs the attribution of its shard (``jax.shard_map``, no communication); the padding is
            stripped from the results. When the batch is a multiple of the device count, ``output``
            and ``relevance`` stay sharded over the devices (axis 0); otherwise they are the sliced
            arrays, placed wherever JAX puts the slice.
        **kwargs: keyword arguments of the model call (static, e.g. ``train=False``). The names
            ``target``, ``batch_size`` and ``devices`` are taken by this function.

    Returns:
        The model output and the relevance of the input (same shape and dtype as ``x``).

    Raises:
        TargetError: a target that does not fit the output (see :func:`normalize_target`).
        ValueError: a non-positive ``batch_size``, a device count out of range, or ``batch_size`` /
            ``devices`` with a model whose output does not have the batch axis first.
    """
    fn, params, x, rest = pure_function(explained, args)
    check_input(x)
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)
    resolved = _resolve_devices(devices)
    cache = explained.__dict__.setdefault("_output_shapes", {})
    key = (jax.tree_util.tree_structure((params, x, rest)), tuple(jnp.shape(x)), str(jnp.result_type(x)))
    if key not in cache:
        cache[key] = jax.eval_shape(lambda p, i, r: fn(p, i, *r, **kwargs), params, x, rest).shape
    output_shape = cache[key]
    kind, value = normalize_target(target, output_shape)
    static_kwargs = tuple(sorted(kwargs.items()))
    if batch_size is None and resolved is None:
        kind, value = _static_target(kind, value)
        return _attribute(fn, params, x, rest, value, kind, static_kwargs, None, None, False)
    n = jnp.shape(x)[0] if jnp.ndim(x) else None
    if n is None or len(output_shape) == 0 or output_shape[0] != n:
        raise ValueError(
            f"batch_size/devices split the batch (axis 0 of the input, shape {tuple(jnp.shape(x))}), "
            f"so the model output must have the batch axis first, but it has shape {tuple(output_shape)}"
        )
    batched = _per_sample(kind, value, output_shape, n)
    kind, value = _static_target(kind, value)
    mesh = None
    if resolved is not None:
        mesh = Mesh(np.asarray(resolved, dtype=object), (BATCH_AXIS,))
        padded = -(-n // len(resolved)) * len(resolved)
        shard, replicate = (
            NamedSharding(mesh, PartitionSpec(BATCH_AXIS)),
            NamedSharding(mesh, PartitionSpec()),
        )
        x = jax.device_put(_pad_batch(x, padded), shard)
        if batched:
            value = jax.device_put(_pad_batch(value, padded), shard)
        elif value is not None:
            value = jax.device_put(value, replicate)
        params, rest = jax.device_put((params, rest), replicate)
    output, relevance = _attribute(fn, params, x, rest, value, kind, static_kwargs, batch_size, mesh, batched)
    if output.shape[0] != n:
        output, relevance = output[:n], relevance[:n]
    return output, relevance


# --------------------------------------------------------------------------------------------------
# Attributors
# --------------------------------------------------------------------------------------------------

WindowSpec = int | tuple[int, ...]


def occlude_independent(
    x: jax.Array,
    mask: jax.Array,
    fill_fn: Callable[[jax.Array], jax.Array] = jnp.zeros_like,
    invert: bool = False,
) -> jax.Array:
    """Occlude every element of ``x`` outside the window ``mask`` (inside it with ``invert=True``).

    :math:`\\tilde x = m \\odot x + (1 - m) \\odot \\mathrm{fill}(x)` with :math:`m` the boolean mask (or
    :math:`\\neg m` when inverted). The default (zeros, no inversion) keeps the window and fills the rest
    with zeros, as zennit's default occlusion does; ``invert=True`` blanks the window instead. Wrap it in
    :func:`functools.partial` to pass other settings to :class:`Occlusion`.

    Args:
        x: the input batch.
        mask: a boolean array shaped like ``x``, ``True`` inside the sliding window.
        fill_fn: the replacement values, a function of ``x`` that keeps its shape.
        invert: occlude inside the window instead of outside.

    Returns:
        The occluded input, same shape and dtype as ``x``.
    """
    if invert:
        mask = jnp.logical_not(mask)
    return jnp.where(mask, x, fill_fn(x)).astype(x.dtype)


def _vjp_at(
    fn: Callable[..., Any], params: Any, point: jax.Array, rest: tuple, kwargs: tuple, kind: str, value: Any
):
    """``(output, relevance)`` at ``point``, the starting relevance built from the output at ``point``."""
    output, pullback = jax.vjp(lambda inp: fn(params, inp, *rest, **dict(kwargs)), point)
    (relevance,) = pullback(output_cotangent(output, kind, value))
    return output, relevance


def _fix_predicted_class(output: jax.Array, kind: str, value: Any) -> tuple[str, Any]:
    """``target=None`` means the class predicted for the clean input, kept fixed over every evaluation."""
    if kind == "argmax":
        return "index", jnp.argmax(output, axis=-1)
    return kind, value


def _chunked_sum(f: Callable[[jax.Array], Any], n: int, chunk_size: int) -> Any:
    """:math:`\\sum_{i<n} f(i)`, with ``f`` vmapped over chunks of at most ``chunk_size`` indices under ``lax.scan``.

    Memory holds one chunk of evaluations (plus the running sum), whatever ``n`` is. The ``n`` indices are
    split into ``ceil(n / chunk_size)`` equal chunks, so one compiled body serves all of them and fewer
    than one evaluation per chunk is padding (evaluated at a valid index, masked out of the sum).
    """
    n_chunks = -(-n // chunk_size)
    size = -(-n // n_chunks)
    batched = jax.vmap(f)

    def chunk_sum(start: jax.Array) -> Any:
        indices = start + jnp.arange(size)
        valid = indices < n
        values = batched(jnp.minimum(indices, n - 1))

        def masked_sum(v: jax.Array) -> jax.Array:
            keep = valid.reshape((size,) + (1,) * (v.ndim - 1))
            return jnp.where(keep, v, jnp.zeros_like(v)).sum(0)

        return jax.tree_util.tree_map(masked_sum, values)

    if n_chunks == 1:
        return chunk_sum(jnp.asarray(0))
    init = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sum, jnp.asarray(0))
    )

    def body(carry: Any, start: jax.Array) -> tuple[Any, None]:
        return jax.tree_util.tree_map(jnp.add, carry, chunk_sum(start)), None

    total, _ = lax.scan(body, init, jnp.arange(n_chunks) * size)
    return total


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class Attributor:
    """Base class: a model (explained or not) plus hyper-parameters, called like the model.

    Calls: ``attr(variables, x, *args, target=None, **kwargs)`` for a linen model (explained or plain),
    ``attr(x, *args, target=None, **kwargs)`` for an NNX model (explained or plain). ``kwargs`` go to the
    model call and are static (e.g. ``train=False``). The result is ``(output, relevance)``: the model
    output for ``x`` and an attribution shaped like ``x``.

    Models:
        - an explained model from :func:`jlrp.explain`: the gradients are the LRP-modified ones, so
          ``Gradient`` is LRP and ``SmoothGrad``/``IntegratedGradients`` average modified gradients;
        - a plain ``flax.linen.Module`` (evaluated as ``model.apply``) or ``flax.nnx.Module`` (evaluated
          through ``nnx.split``/``nnx.merge``; state updates made by the call, such as batch statistics,
          are discarded): ordinary gradients;
        - a plain model with ``composite=...``: explained with :func:`jlrp.explain` once, at construction
          (zennit's ``Attributor(model, composite)``).

    Targets: as :func:`attribute`: ``None`` (the predicted class), an int, an integer array with one
    class per sample, a mask broadcastable to the output, or a callable ``output -> starting relevance``.
    The starting relevance (the VJP's cotangent) is recomputed from the output at every evaluated point
    (zennit's ``attr_output`` function of the output), e.g. :math:`f(\\tilde x) \\odot e_c` at a noisy
    or path point :math:`\\tilde x`; ``None`` is resolved once to the class predicted for the clean ``x``.
    A callable target is a static argument hashed by identity: reuse the same function object to avoid
    recompiling.

    Compilation: every attributor jit-compiles its computation once per instance and argument shapes
    (a second call with the same shapes reuses it). Batches are axis 0 of ``x``.

    Attributes:
        model: the model, explained or plain.
        composite: optional; when given, ``model`` must be plain and is explained with it.
    """

    model: Any
    composite: Any = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        target = self.model
        if self.composite is not None:
            from .explain import explain

            target = explain(self.model, self.composite)
        object.__setattr__(self, "_explained", target)
        self._check_model(target)

    @staticmethod
    def _check_model(model: Any) -> None:
        if getattr(model, "pure", None) is not None or isinstance(model, Explained):
            return
        from flax import linen as nn
        from flax import nnx

        if isinstance(model, (nn.Module, nnx.Module)):
            return
        raise TypeError(
            f"an attributor needs a model made by jlrp.explain or a flax.linen/flax.nnx Module, "
            f"got {type(model).__name__}"
        )

    # -- splitting a call into a pure function -------------------------------------------------------

    def _split(self, args: tuple[Any, ...]) -> tuple[Callable[..., Any], Any, Any, tuple[Any, ...]]:
        """``(fn, params, x, rest)`` with ``fn(params, x, *rest, **kwargs)`` the (explained) model."""
        model = self._explained
        if getattr(model, "pure", None) is not None or isinstance(model, Explained):
            return pure_function(model, args)
        from flax import linen as nn

        if isinstance(model, nn.Module):
            if len(args) < 2:
                raise TypeError("a linen model needs (variables, x, ...) arguments")
            fns = self.__dict__.setdefault("_fns", {})
            fn = fns.setdefault("linen", model.apply)
            return fn, args[0], args[1], tuple(args[2:])
        from flax import nnx

        if len(args) < 1:
            raise TypeError("an NNX model needs (x, ...) arguments")
        graphdef, state = nnx.split(model)
        fns = self.__dict__.setdefault("_fns", {})
        if graphdef not in fns:

            def nnx_fn(state, x, *rest, **kwargs):
                return nnx.merge(graphdef, state)(x, *rest, **kwargs)

            fns[graphdef] = nnx_fn
        return fns[graphdef], state, args[0], tuple(args[1:])

    def _output_shape(self, fn: Callable[..., Any], params: Any, x: Any, rest: tuple, kwargs: dict) -> tuple:
        cache = self.__dict__.setdefault("_output_shapes", {})
        key = (
            fn,
            jax.tree_util.tree_structure((params, x, rest)),
            tuple(jnp.shape(x)),
            str(jnp.result_type(x)),
            tuple(sorted(kwargs.items())),
        )
        if key not in cache:
            cache[key] = jax.eval_shape(lambda p, i, r: fn(p, i, *r, **kwargs), params, x, rest).shape
        return cache[key]

    @functools.cached_property
    def _jitted(self) -> Callable[..., Any]:
        return jax.jit(self._compute, static_argnums=(0, 1, 2))

    def _run(self, args: tuple[Any, ...], target: Target, kwargs: dict[str, Any], extra: Any = None):
        fn, params, x, rest = self._split(args)
        check_input(x)
        kind, value = normalize_target(target, self._output_shape(fn, params, x, rest, kwargs))
        kind, value = _static_target(kind, value)
        return self._jitted(fn, kind, tuple(sorted(kwargs.items())), params, x, rest, value, extra)

    def __call__(self, *args: Any, target: Target = None, **kwargs: Any) -> tuple[jax.Array, jax.Array]:
        """``(output, attribution)`` for the batch ``x``; see the class docstring for the arguments."""
        return self._run(args, target, kwargs)

    def _compute(self, fn, kind, kwargs, params, x, rest, value, extra):  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, eq=False)
class Gradient(Attributor):
    """The (modified) gradient: :math:`R = J_f(x)^\\top\\, r(f(x))`, the VJP of the model at ``x``.

    :math:`r` is the starting relevance from ``target`` (e.g. :math:`f(x) \\odot e_c`). With an
    explained model this is LRP, the same as :func:`attribute`; with a plain model, the gradient
    times the starting relevance.

    Attributes:
        model: an explained model, or a plain linen/NNX model (see :class:`Attributor`).
    """

    def _compute(self, fn, kind, kwargs, params, x, rest, value, extra):
        return _vjp_at(fn, params, x, rest, kwargs, *_dynamic_target(kind, value))


@dataclasses.dataclass(frozen=True, eq=False)
class SmoothGrad(Attributor):
    """SmoothGrad (Smilkov et al., 2017): the mean (modified) gradient over noisy copies of the input.

    .. math::

        R = \\frac{1}{n} \\sum_{i=0}^{n-1} J_f(x + \\varepsilon_i)^\\top\\, r(f(x + \\varepsilon_i)),
        \\qquad \\varepsilon_i \\sim \\mathcal N(0, \\sigma^2),\\quad
        \\sigma = \\text{noise\\_level} \\cdot (\\max_j x_j - \\min_j x_j),

    with :math:`\\sigma` per sample (max and min over all non-batch axes). As in zennit the last
    iteration is noise-free, :math:`\\varepsilon_{n-1} = 0`, so ``n_iter=1`` gives :class:`Gradient`.
    Noise of iteration ``i`` is ``jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype) * sigma``,
    so results depend on ``rng`` only (not on ``chunk_size``).

    Call: ``attr(variables, x, target=..., rng=key)`` (linen) / ``attr(x, target=..., rng=key)`` (NNX);
    ``rng`` is a ``jax.random.PRNGKey`` or an int seed (default ``PRNGKey(0)``, reproducible). The model
    therefore cannot take a keyword argument called ``rng`` through this call.

    Attributes:
        model: an explained model, or a plain linen/NNX model (see :class:`Attributor`).
        noise_level: :math:`\\sigma / (x_{max} - x_{min})`, default 0.1.
        n_iter: number of gradients averaged, default 20.
        chunk_size: iterations evaluated at once (vmapped); memory grows with it, not with ``n_iter``.
    """

    noise_level: float = 0.1
    n_iter: int = 20
    chunk_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("n_iter", self.n_iter)
        _positive_int("chunk_size", self.chunk_size)
        if not float(self.noise_level) >= 0.0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level!r}")

    def __call__(
        self, *args: Any, target: Target = None, rng: Any = None, **kwargs: Any
    ) -> tuple[jax.Array, jax.Array]:
        """``(output, relevance)``; ``rng`` seeds the noise (see the class docstring)."""
        if rng is None:
            rng = jax.random.PRNGKey(0)
        elif isinstance(rng, (int, np.integer)):
            rng = jax.random.PRNGKey(int(rng))
        return self._run(args, target, kwargs, rng)

    def _compute(self, fn, kind, kwargs, params, x, rest, value, rng):
        kind, value = _dynamic_target(kind, value)
        output = fn(params, x, *rest, **dict(kwargs))
        kind, value = _fix_predicted_class(output, kind, value)
        axes = tuple(range(1, x.ndim))
        sigma = self.noise_level * (
            jnp.max(x, axis=axes, keepdims=True) - jnp.min(x, axis=axes, keepdims=True)
        )
        last = self.n_iter - 1

        def gradient(i):
            # flat, then reshaped: the same numbers as normal(key, x.shape), compiled faster on CPU
            noise = jax.random.normal(jax.random.fold_in(rng, i), (x.size,), x.dtype).reshape(x.shape) * sigma
            noise = jnp.where(i == last, jnp.zeros_like(noise), noise)
            return _vjp_at(fn, params, x + noise, rest, kwargs, kind, value)[1]

        total = _chunked_sum(gradient, self.n_iter, self.chunk_size)
        return output, (total / self.n_iter).astype(x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class IntegratedGradients(Attributor):
    """Integrated Gradients (Sundararajan et al., 2017), a right Riemann sum of the (modified) gradient.

    .. math::

        R = (x - b) \\odot \\frac{1}{n} \\sum_{k=1}^{n} J_f(\\tilde x_k)^\\top\\, r(f(\\tilde x_k)),
        \\qquad \\tilde x_k = b + \\tfrac{k}{n}(x - b),

    with baseline :math:`b` = ``baseline_fn(x)`` (zeros by default) and the starting relevance
    :math:`r` recomputed from the output at each path point, as in zennit (so with an int target the
    cotangent at :math:`\\tilde x_k` is :math:`f(\\tilde x_k) \\odot e_c`; pass a callable returning a
    one-hot for the textbook :math:`\\partial f_c / \\partial x`). ``alphas = linspace(1/n, 1, n)``.

    Attributes:
        model: an explained model, or a plain linen/NNX model (see :class:`Attributor`).
        baseline_fn: the baseline as a function of the input batch, default ``jnp.zeros_like``; it is
            traced under ``jax.jit`` (write it with ``jnp``), e.g. ``lambda x: jnp.full_like(x, -1.)``.
        n_iter: number of path points, default 20.
        chunk_size: path points evaluated at once (vmapped); memory grows with it, not with ``n_iter``.
    """

    baseline_fn: Callable[[jax.Array], jax.Array] = jnp.zeros_like
    n_iter: int = 20
    chunk_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("n_iter", self.n_iter)
        _positive_int("chunk_size", self.chunk_size)
        if not callable(self.baseline_fn):
            raise TypeError(f"baseline_fn must be a function of the input, got {self.baseline_fn!r}")

    def _compute(self, fn, kind, kwargs, params, x, rest, value, extra):
        kind, value = _dynamic_target(kind, value)
        output = fn(params, x, *rest, **dict(kwargs))
        kind, value = _fix_predicted_class(output, kind, value)
        baseline = jnp.asarray(self.baseline_fn(x), dtype=x.dtype)
        delta = x - baseline

        def gradient(k):
            alpha = (k + 1).astype(x.dtype) / self.n_iter
            return _vjp_at(fn, params, baseline + alpha * delta, rest, kwargs, kind, value)[1]

        total = _chunked_sum(gradient, self.n_iter, self.chunk_size)
        return output, (total / self.n_iter * delta).astype(x.dtype)


def _check_window(name: str, value: Any) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1
    ok = ok or (
        isinstance(value, tuple)
        and len(value) > 0
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in value)
    )
    if not ok:
        raise TypeError(
            f"Occlusion {name} must be a positive int or a non-empty tuple of positive ints, got {value!r}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Occlusion(Attributor):
    """Occlusion: the target score of the model on occluded copies of the input, summed per window.

    For every window position :math:`p` with boolean mask :math:`m_p`,

    .. math::

        s_p = \\sum_j r\\big(f(\\mathrm{occ}(x, m_p))\\big)_j, \\qquad R = \\sum_p m_p\\, s_p,

    where :math:`r` is the starting relevance from ``target`` (so with an int :math:`c`,
    :math:`s_p = f_c(\\mathrm{occ}(x, m_p))`) and the sum over :math:`j` runs over the non-batch output
    axes. Every element gets the sum of the scores of the windows covering it, not normalised by their
    number (as zennit). Gradients are not used, so a composite has no effect.

    Windows (channels-last, batch axis 0): an int ``window`` is the window size along every spatial
    axis (axes ``1 .. ndim-2``; for a 2-D input ``(N, F)``, axis 1), the channel axis is taken whole;
    a tuple gives the sizes along the leading non-batch axes (``(8, 8)`` on NHWC: H and W, channels
    whole; ``(8, 8, 1)``: each channel apart), the axes after it whole. ``stride`` is an int for every
    windowed axis or a tuple for the leading ones (default for unlisted windowed axes: the window).
    Sizes larger than an axis are clipped to it. Window positions start at ``0, stride, 2*stride, ...``
    below the axis length; a window that runs over the end wraps around to the start (zennit rolls its
    mask the same way), so with ``window == stride`` dividing the axis the windows tile it exactly.

    Attributes:
        model: an explained model, or a plain linen/NNX model (see :class:`Attributor`).
        window: window size, int or tuple (see above), default 8.
        stride: window stride, int or tuple, default 8.
        occlusion_fn: ``occlusion_fn(x, mask) -> occluded x`` with ``mask`` a boolean array shaped like
            ``x``, ``True`` inside the window, traced under ``jax.jit`` and ``jax.vmap``. Default
            :func:`occlude_independent`: keep the window, zeros elsewhere.
        chunk_size: window positions evaluated at once (vmapped).
    """

    window: WindowSpec = 8
    stride: WindowSpec = 8
    occlusion_fn: Callable[[jax.Array, jax.Array], jax.Array] = occlude_independent
    chunk_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window", self.window)
        _check_window("stride", self.stride)
        _positive_int("chunk_size", self.chunk_size)
        if not callable(self.occlusion_fn):
            raise TypeError(f"occlusion_fn must be a function (x, mask) -> x, got {self.occlusion_fn!r}")

    def resolve(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The window and stride per axis of an input of ``shape`` (the batch axis: whole, one position).

        Raises:
            ValueError: a tuple longer than the number of non-batch axes, or a stride tuple longer than
                the windowed axes.
        """
        shape = tuple(int(s) for s in shape)
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(
                f"Occlusion needs a batch axis and at least one more, got an input of shape {shape}"
            )
        if isinstance(self.window, tuple):
            if len(self.window) > ndim - 1:
                raise ValueError(
                    f"window {self.window} has more entries than the {ndim - 1} non-batch axes of shape {shape}"
                )
            windowed = len(self.window)
            sizes = tuple(int(w) for w in self.window)
        else:
            windowed = max(ndim - 2, 1)
            sizes = (int(self.window),) * windowed
        if isinstance(self.stride, tuple):
            if len(self.stride) > windowed:
                raise ValueError(f"stride {self.stride} has more entries than the {windowed} windowed axes")
            strides = tuple(int(s) for s in self.stride) + sizes[len(self.stride) :]
        else:
            strides = (int(self.stride),) * windowed
        window = [shape[0]] + [min(w, n) for w, n in zip(sizes, shape[1:])] + list(shape[1 + windowed :])
        stride = [shape[0]] + [min(s, n) for s, n in zip(strides, shape[1:])] + list(shape[1 + windowed :])
        return tuple(window), tuple(stride)

    def _compute(self, fn, kind, kwargs, params, x, rest, value, extra):
        kind, value = _dynamic_target(kind, value)
        output = fn(params, x, *rest, **dict(kwargs))
        kind, value = _fix_predicted_class(output, kind, value)
        window, stride = self.resolve(x.shape)
        counts = tuple(math.ceil(n / s) for n, s in zip(x.shape, stride))
        n_positions = math.prod(counts)

        def window_mask(p):
            position = jnp.unravel_index(p, counts)
            mask = jnp.ones(x.shape, dtype=bool)
            for axis, (n, w, s) in enumerate(zip(x.shape, window, stride)):
                if w == n:
                    continue
                along = (jnp.arange(n) - position[axis] * s) % n < w
                mask = mask & along.reshape((n,) + (1,) * (x.ndim - axis - 1))
            return mask

        def contribution(p):
            mask = window_mask(p)
            occluded = self.occlusion_fn(x, mask)
            out = fn(params, occluded, *rest, **dict(kwargs))
            start = output_cotangent(out, kind, value)
            score = start.reshape(start.shape[0], -1).sum(1) if start.ndim > 1 else start
            return jnp.where(mask, score.reshape((-1,) + (1,) * (x.ndim - 1)), 0).astype(x.dtype)

        total = _chunked_sum(contribution, n_positions, self.chunk_size)
        return output, total.astype(x.dtype)
