"""Relevance anywhere and conditional relevance (CRP): :func:`attribute`.

One forward pass of the explained model with *taps* (:class:`jlrp.ops.Taps`) at the chosen module and
op outputs and parameters; its VJP returns, besides the input relevance, the relevance arriving at every
tapped output and the parameter relevance of the tapped modules. Condition masks are cotangents of
extra zero outputs (the taps' carriers), so ``vmap`` over a stack of masks reuses the one forward pass
and runs only the backward pass once per mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from ..attribution import _lookup_shapes, embedding_relevance, leading_length, pure_function
from ..composites import glob_to_regex
from ..errors import UsageError, UsageTypeError
from ..frontends.explained import check_input
from ..ops import EmbeddingProbes, TapPoint, Taps, probing_embeddings, tapping
from ..targets import (
    OutputSelector,
    Target,
    TargetLike,
    _abstract_leaf,
    as_target,
    output_cotangent,
    output_struct,
    select_output,
)

__all__ = ["ConceptAttribution", "attribute", "tap_points"]


@struct.dataclass
class ConceptAttribution:
    """What :func:`jlrp.concepts.attribute` returns (a pytree: it can leave ``jax.jit``).

    With ``conditions``, every relevance below has a leading axis of length ``K``, one entry per
    condition set (mask); without, it has none.

    Attributes:
        output: the explained (selected) model output, e.g. ``(N, n_classes)``.
        heatmap: the relevance of the input, shaped like it (``(K, *x.shape)`` with conditions): the
            conditional heatmaps of CRP.
        relevances: ``{key: R}`` at every captured output, ``R`` shaped like that output. It is the
            relevance arriving at the output, before the output's own condition mask is applied.
            Keys are paths; a path called several times has keys ``path``, ``path#1``, ...
        activations: ``{key: a}``, the captured outputs themselves (no ``K`` axis).
        params: ``{key: {name: R_p}}`` for every module whose parameter relevance was asked for:
            each parameter leaf of the rule's (effective) parameters times the rule's modified cotangent,
            summed over the batch (:meth:`jlrp.core.Rule.relevance_with_params`).
    """

    output: jax.Array
    heatmap: Any
    relevances: dict[str, jax.Array]
    activations: dict[str, jax.Array]
    params: dict[str, Any]


def _predicate(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    regexes = [glob_to_regex(p) for p in patterns]
    return lambda path: any(r.match(path) and (path or not p) for r, p in zip(regexes, patterns))


def _patterns(name: str, value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise UsageTypeError(
            f"{name} must be a path glob or a list of them, got {type(value).__name__}"
        ) from None
    for p in patterns:
        if not isinstance(p, str):
            raise UsageTypeError(f"{name} must hold path globs (str), got {p!r}")
    return patterns


@dataclasses.dataclass(frozen=True)
class _Spec:
    """The static part of a call: which paths are tapped, and how."""

    capture: tuple[str, ...]
    conditions: tuple[str, ...]
    params: tuple[str, ...]

    def taps(self, values: Any = None) -> Taps:
        conditioned = frozenset(self.conditions)
        return Taps(
            _predicate(self.capture), conditioned.__contains__, _predicate(self.params), values=values
        )


def _run_forward(fn, params, x, rest, kwargs, output, spec, values, probes):
    """The explained (selected) output with taps (``values``) and embedding probes (``probes``)."""
    taps = spec.taps(values)
    with contextlib.ExitStack() as stack:
        stack.enter_context(tapping(taps))
        for k, v in probes.items():
            stack.enter_context(probing_embeddings(EmbeddingProbes(k, v)))
        y = select_output(fn(params, x, *rest, **dict(kwargs)), output)
    return y, taps


def _discover(fn, params, x, rest, kwargs, output, spec) -> Taps:
    """The tap points of one call (an abstract pass: nothing is computed)."""
    box: list[Taps] = []

    def run(p, inp):
        y, taps = _run_forward(fn, p, inp, rest, kwargs, output, spec, None, {})
        box.append(taps)
        return y

    jax.eval_shape(run, params, x)
    return box[-1]


def tap_points(
    explained: Any, *args: Any, capture: Any = None, output: OutputSelector = None, **kwargs: Any
) -> dict[str, TapPoint]:
    """The outputs that ``capture`` selects, in execution order, without computing anything.

    Useful to list the layer and op paths of a model (``capture='**'`` for every module,
    ``capture=['**', '**/@*']`` also for every op) and the shapes of their outputs.

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: the explained model's arguments (``(variables, x, ...)`` linen, ``(x, ...)`` NNX).
        capture: path globs (``*`` within a segment, ``**`` across; ops only where the pattern spells
            ``@``).
        output: which output to explain when the model returns several (see :func:`jlrp.attribute`).

    Returns:
        ``{key: TapPoint}`` with each output's path, shape and dtype.
    """
    fn, params, x, rest = pure_function(explained, args)
    spec = _Spec(_patterns("capture", capture), (), ())
    return _discover(fn, params, x, rest, tuple(sorted(kwargs.items())), output, spec).ordered_points()


def _broadcast_masks(masks: Mapping[str, Any], points: Mapping[str, TapPoint]) -> dict[str, jax.Array]:
    """``{key: (K, *shape)}`` carrier cotangents for every conditioned tap point."""
    out = {}
    for key, point in points.items():
        if not point.conditioned:
            continue
        mask = masks[point.path]
        error = UsageError(
            f"the masks for '{point.path}' have shape {mask.shape}, which (after the leading axis of "
            f"condition sets) does not broadcast to its output {point.shape}; for channels of an NHWC "
            "output pass (K, C), e.g. jlrp.concepts.ChannelConcept().masks(channels, shape)"
        )
        if mask.ndim - 1 > len(point.shape):
            raise error
        aligned = mask.reshape((mask.shape[0],) + (1,) * (len(point.shape) + 1 - mask.ndim) + mask.shape[1:])
        try:
            out[key] = jnp.broadcast_to(aligned, (mask.shape[0], *point.shape)).astype(point.dtype)
        except ValueError:
            raise error from None
    return out


def _stage_of(points: Mapping[str, TapPoint], exclusive: Sequence[str]) -> Callable[[str, bool], int]:
    """Which backward stage of ``exclude_parallel`` reports the relevance at a key: the one that starts
    at the lowest conditioned output above it (0: the unconditioned pass). A module's parameters lie
    below its own output."""
    order = {key: n for n, key in enumerate(points)}
    positions = [order[k] for k in exclusive]  # descending execution order

    def stage(key: str, params: bool = False) -> int:
        p = order[key]
        above = [j for j, q in enumerate(positions) if q > p or (params and q == p)]
        return above[-1] + 1 if above else 0

    return stage


@functools.partial(
    jax.jit,
    static_argnames=("fn", "kwargs", "output", "spec", "exclude_parallel", "batch_size"),
)
def _attribute(
    params: Any,
    x: Any,
    rest: tuple[Any, ...],
    target: Target,
    masks: dict[str, jax.Array],
    *,
    fn: Callable[..., Any],
    kwargs: tuple[tuple[str, Any], ...],
    output: OutputSelector,
    spec: _Spec,
    exclude_parallel: bool,
    batch_size: int | None,
) -> ConceptAttribution:
    found = _discover(fn, params, x, rest, kwargs, output, spec)
    points, param_points = found.ordered_points(), dict(found.param_points)
    leaves, treedef = jax.tree_util.tree_flatten(x)
    integer = [k for k, leaf in enumerate(leaves) if jnp.issubdtype(jnp.result_type(leaf), jnp.integer)]
    shapes = {k: _lookup_shapes(fn, params, x, rest, kwargs, output, k) for k in integer}
    values = {
        "out": {k: jnp.zeros(p.shape, p.dtype) for k, p in points.items()},
        "params": {
            k: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), t)
            for k, t in param_points.items()
        },
    }
    embed = {k: [jnp.zeros(s, d) for s, d in found_k] for k, found_k in shapes.items()}
    floats = [leaf if k not in shapes else None for k, leaf in enumerate(leaves)]

    def forward(float_leaves, values, embed):
        merged = [leaves[k] if k in shapes else float_leaves[k] for k in range(len(leaves))]
        inp = jax.tree_util.tree_unflatten(treedef, merged)
        y, taps = _run_forward(fn, params, inp, rest, kwargs, output, spec, values, embed)
        acts = {k: a for k, (a, _) in taps.outputs.items() if k in points}
        carriers = {k: c for k, (_, c) in taps.outputs.items() if c is not None and k in points}
        return y, acts, carriers

    (y, acts, carriers), pullback = jax.vjp(forward, floats, values, embed)
    start = output_cotangent(y, target)
    ones = {k: jnp.ones_like(c) for k, c in carriers.items()}
    no_injection = {k: jnp.zeros_like(a) for k, a in acts.items()}

    def pull(cot_y, injection, carrier_cot):
        float_bar, values_bar, embed_bar = pullback((cot_y, {**no_injection, **injection}, carrier_cot))
        heat = [
            embedding_relevance(embed_bar[k], jnp.shape(leaves[k])) if k in shapes else float_bar[k]
            for k in range(len(leaves))
        ]
        return jax.tree_util.tree_unflatten(treedef, heat), values_bar["out"], values_bar["params"]

    captured = [k for k, p in points.items() if p.captured]
    result = functools.partial(ConceptAttribution, y, activations={k: acts[k] for k in captured})
    if not masks:
        heat, rel, prel = pull(start, {}, ones)
        return result(heatmap=heat, relevances={k: rel[k] for k in captured}, params=prel)

    carrier_masks = _broadcast_masks(masks, points)
    conditioned = [k for k in reversed(points) if points[k].conditioned]
    if not exclude_parallel:

        def one(m):
            heat, rel, prel = pull(start, {}, {**ones, **m})
            return heat, {k: rel[k] for k in captured}, prel

    else:
        stage = _stage_of(points, conditioned)
        zero_y = jnp.zeros_like(start)
        _, plain_rel, plain_prel = pull(start, {}, ones)  # stage 0 does not depend on the masks

        def one(m):
            rels, prels = [plain_rel], [plain_prel]
            heat = None
            for key in conditioned:  # each stage starts at one conditioned output, from the top down
                heat, rel, prel = pull(zero_y, {key: rels[-1][key]}, {**ones, key: m[key]})
                rels.append(rel)
                prels.append(prel)
            picked = {k: rels[stage(k)][k] for k in captured}
            return heat, picked, {k: prels[stage(k, True)][k] for k in param_points}

    n = next(iter(carrier_masks.values())).shape[0]
    if batch_size is None or batch_size >= n:
        heat, rel, prel = jax.vmap(one)(carrier_masks)
    else:
        heat, rel, prel = lax.map(one, carrier_masks, batch_size=batch_size)
    return result(heatmap=heat, relevances=rel, params=prel)


def attribute(
    explained: Any,
    *args: Any,
    target: TargetLike = None,
    output: OutputSelector = None,
    capture: str | Iterable[str] | None = None,
    conditions: Mapping[str, Any] | None = None,
    params: str | Iterable[str] | None = None,
    exclude_parallel: bool = True,
    batch_size: int | None = None,
    **kwargs: Any,
) -> ConceptAttribution:
    r"""Relevance at the input, at any layer or op, of parameters, and conditioned on concepts (CRP).

    One jit-compiled call: a forward pass of the explained model with taps at the selected outputs, and
    one backward pass per condition set (``vmap``-ed: the forward pass is not repeated)::

        res = concepts.attribute(explained, variables, x, target=3, capture=['features_*'],
                                 conditions={'features_28': concepts.ChannelConcept().masks([7, 42], shape)})
        res.heatmap.shape           # (2, *x.shape): the conditional heatmaps R(x | channel 7), R(x | 42)
        res.relevances['features_10']   # (2, *that output's shape)

    Conditional relevance (Achtibat et al., "From attribution maps to human-understandable explanations
    through Concept Relevance Propagation", Nature Machine Intelligence 2023, Eq. 5): at every
    conditioned output :math:`a` the relevance is multiplied by the condition mask,
    :math:`R_a(x \mid \theta) = R_a \, \delta_\theta`, and propagated on with the composite's rules.
    LRP rules are linear in the relevance, so the conditional heatmaps of a partition of a layer's
    channels sum to the plain heatmap (with ``exclude_parallel``: to the part that passes through that
    layer).

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: the explained model's arguments (``(variables, x, ...)`` linen, ``(x, ...)`` NNX).
        target: what to explain, as for :func:`jlrp.attribute`.
        output: which output to explain when the model returns several, as for :func:`jlrp.attribute`.
        capture: path globs of module and op outputs whose relevance and activation to return (``*``
            within a path segment, ``**`` across; ops such as ``'layer1_0/@add_0'`` only where the
            pattern spells ``@``). :func:`tap_points` lists them.
        conditions: ``{path: masks}``, ``masks`` of shape ``(K, ...)`` broadcastable (after the leading
            axis) to that output, the same ``K`` for every path: condition set ``k`` multiplies the
            relevance at each conditioned output by ``masks[k]``. Module paths or op paths, exact (every
            call of that path is conditioned). ``None``: no conditions (no ``K`` axis).
        params: path globs of modules whose parameter relevance to return (modules with a rule).
        exclude_parallel: zennit-crp's option, default as there: relevance reaches the input only
            *through* the conditioned outputs. Conditioned outputs are visited from the last executed
            down; each backward stage starts at one of them with the relevance that arrived there
            through the one above, masked. Relevance flowing around a conditioned layer (a residual
            skip connection) is excluded. ``False``: the masks act as filters on the one backward pass,
            and relevance that bypasses a conditioned output reaches the input unconditioned.
        batch_size: at most this many condition sets are propagated at once (``lax.map`` over chunks,
            memory bounded by ``batch_size`` backward passes); ``None``: all at once.
        **kwargs: keyword arguments of the model call (static and hashable).

    Returns:
        A :class:`ConceptAttribution`: ``output``, ``heatmap``, ``relevances``, ``activations``,
        ``params``.

    Raises:
        UsageError: a pattern or condition path that matches no output (the message lists the paths),
            masks that do not fit, a module that has no rule for ``params``, a capture inside a
            ``scan``/``cond``/``remat`` body, a non-positive ``batch_size``.
        UsageTypeError: patterns or masks of the wrong type.
        TargetError, InputError: as for :func:`jlrp.attribute`.
    """
    fn, model_params, x, rest = pure_function(explained, args)
    check_input(x)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"batch_size must be a positive int (condition sets at once), got {batch_size!r}")
    masks = {}
    for path, value in (conditions or {}).items():
        if not isinstance(path, str):
            raise UsageTypeError(f"conditions must be {{path: masks}} with str paths, got key {path!r}")
        mask = jnp.asarray(value)
        if mask.ndim < 1:
            raise UsageError(f"the masks for '{path}' need a leading axis of condition sets, shape (K, ...)")
        masks[path] = mask
    if len({m.shape[0] for m in masks.values()}) > 1:
        sizes = {p: m.shape[0] for p, m in masks.items()}
        raise UsageError(f"every condition path needs the same number K of masks, got {sizes}")
    spec = _Spec(_patterns("capture", capture), tuple(masks), _patterns("params", params))
    static_kwargs = tuple(sorted(kwargs.items()))
    _check_spec(fn, model_params, x, rest, static_kwargs, output, spec)
    output_shape = tuple(output_struct(fn, (model_params, x, *rest), kwargs, output).shape)
    target = as_target(target, output_shape, leading_length(x))
    return _attribute(
        model_params,
        x,
        rest,
        target,
        masks,
        fn=fn,
        kwargs=static_kwargs,
        output=output,
        spec=spec,
        exclude_parallel=bool(exclude_parallel),
        batch_size=batch_size,
    )


def _check_spec(fn, params, x, rest, kwargs, output, spec: _Spec) -> None:
    """Every pattern and condition path must select something; say what exists otherwise.

    Cached on the abstract ``params`` and ``x`` (a check traces the whole model: seconds for a real
    network, on every call otherwise) when there are no further model arguments; a failing check raises
    again on every call.
    """
    if not (spec.capture or spec.conditions or spec.params):
        return
    if rest:  # closed over as values by the abstract pass: not cached
        _check_spec_now(fn, params, x, rest, kwargs, output, spec)
        return
    flat, treedef = jax.tree_util.tree_flatten((params, x))
    leaves = tuple(_abstract_leaf(leaf) for leaf in flat)
    try:
        hash((kwargs, output))
    except TypeError:
        _check_spec_now(fn, params, x, rest, kwargs, output, spec)
        return
    _check_spec_cached(fn, treedef, leaves, kwargs, output, spec)


@functools.lru_cache(maxsize=256)
def _check_spec_cached(fn, treedef, leaves, kwargs, output, spec: _Spec) -> None:
    params, x = jax.tree_util.tree_unflatten(treedef, leaves)
    _check_spec_now(fn, params, x, (), kwargs, output, spec)


def _check_spec_now(fn, params, x, rest, kwargs, output, spec: _Spec) -> None:
    found = _discover(fn, params, x, rest, kwargs, output, spec)
    paths = {p.path for p in found.points.values() if p.captured or p.conditioned}
    missing = [p for p in spec.capture if not any(_predicate((p,))(q) for q in paths)]
    missing += [p for p in spec.conditions if p not in paths]
    missing += [
        p for p in spec.params if not any(_predicate((p,))(k.split("#")[0]) for k in found.param_points)
    ]
    if missing:
        listing = _discover(fn, params, x, rest, kwargs, output, _Spec(("**", "**/@*"), (), ()))
        available = ", ".join(dict.fromkeys(p.path or "<root>" for p in listing.points.values()))
        skipped = "; ".join(f"{k}: {why}" for k, why in found.skipped.items())
        raise UsageError(
            f"{missing} select no output (or, for params, no module with a rule)"
            + (f" ({skipped})" if skipped else "")
            + f". The paths are: {available}"
        )
