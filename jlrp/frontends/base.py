"""What the linen and NNX front ends share: the per-call handler and the canonizer stage.

Each front end is only its interception mechanism (``flax.linen.intercept_methods``, or NNX
rule-carrying subclasses). For every intercepted module call it hands :func:`handle_call` the
module, its path, the call's arguments, a way to call the original and a way to get the pure apply
``(params, other_state, layer_fn)``; everything else happens here, once:

- canonizer rewrites (:class:`~jlrp.canonizers.Identity`: the call returns its input;
  :class:`~jlrp.canonizers.ParamRewrite`: the layer is evaluated with rewritten parameters),
- the composite's rule (asked from the resolver in execution order), the :class:`LayerRecord`,
  the :class:`jlrp.ops.ModuleScopes` scope, and :func:`jlrp.core.apply_rule`.

Canonizers plan their rewrites on a :class:`ModelView`: an abstract view of one model call that runs
the model under ``jax.make_jaxpr`` (no computation) with a hook on every module call. Its
:attr:`ModelView.calls` list every module call with the identities of its input and output, and
:meth:`ModelView.exclusive` answers "does anything but ``consumer`` use this output?" exactly, by
perturbing that output for everyone but ``consumer`` and following the perturbation through the
traced program (nested ``jit``/``remat``/``custom_jvp`` bodies included; other higher-order
primitives count as using every input).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from .. import types as _types
from ..canonizers import Identity, Note, ParamRewrite
from ..core import apply_rule
from ..errors import ModeError, RuleError
from ..ops import ACTIVE_TAPS, ModuleScopes
from .calls import Tap, inference_mode, with_bias
from .explained import LayerRecord, display_path
from .linear import LinearCall, analyse, analysing, is_plain_flax_linear

__all__ = [
    "ModuleCall",
    "Tap",
    "ModelView",
    "CallContext",
    "handle_call",
    "first_argument",
    "with_bias",
    "container_error",
    "plan_canonizers",
    "check_mode",
    "recognise",
]

#: ``hook(path, module, call_fn, args, kwargs, proceed, pure=None) -> output``; ``proceed(*args, **kwargs)``
#: runs the module's original call (sub-module calls inside it reach the hook again); ``pure()``, when
#: the front end passes it, returns the module's pure apply ``(params, other_state, layer_fn)``.
Hook = Callable[[str, Any, Callable[..., Any], tuple, dict, Callable[..., Any]], Any]


# --------------------------------------------------------------------------------------------
# small shared helpers


def first_argument(
    call_fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple, dict]:
    """Split a module call into its input ``x`` (the first argument after ``self``) and the rest.

    Raises:
        RuleError: if the input is neither the first positional argument nor passed by name.
    """
    if args:
        return args[0], args[1:], kwargs
    names = list(inspect.signature(call_fn).parameters)[1:]
    if names and names[0] in kwargs:
        rest = dict(kwargs)
        return rest.pop(names[0]), (), rest
    raise RuleError(f"cannot find the input of {call_fn.__qualname__} among its arguments")


def _replace_first(call_fn: Callable[..., Any], args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    names = list(inspect.signature(call_fn).parameters)[1:]
    return args, {**kwargs, names[0]: value}


def container_error(rule: Any, owner: str, sub_path: str, sub_kind: str) -> RuleError:
    """The error for a rule on a module that calls sub-modules (rules act on single layers)."""
    return RuleError(
        f"{rule!r} is on '{display_path(owner)}', a container: it calls the sub-module "
        f"'{sub_path}' ({sub_kind}). Rules act on single layers; attach the rule to the layers inside "
        f"(by type, or a path glob like '{owner + '/' if owner else ''}*')."
    )


def check_mode(path: str, module: Any, call_fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Refuse a Dropout or BatchNorm that runs in training mode (explanations must be deterministic).

    Raises:
        ModeError: naming the module and saying how to switch to inference mode.
    """
    dropout = isinstance(module, (nn.Dropout, nnx.Dropout)) and getattr(module, "rate", 0.0) > 0.0
    if not (dropout or isinstance(module, _types.BatchNorm)):
        return
    if inference_mode(module, call_fn, args, kwargs) is False:
        what = "Dropout" if dropout else "BatchNorm"
        raise ModeError(
            f"the {what} '{display_path(path)}' runs in training mode ({type(module).__name__}), so the "
            "explanation would depend on the batch or on random numbers. Explain the model in inference "
            "mode: call model.eval() on an NNX model (or pass deterministic=True / "
            "use_running_average=True), train=False to a linen model."
        )


def _has_kernel(module: Any) -> bool:
    """A cheap test: does the module own a ``kernel`` parameter (before any tracing)?"""
    if isinstance(module, nnx.Module):
        return isinstance(vars(module).get("kernel"), nnx.Variable)
    try:
        return bool(module.has_variable("params", "kernel"))
    except Exception:  # noqa: BLE001 -- an unbound or unusual module: not a candidate
        return False


def recognise(
    module: Any, call_fn: Callable[..., Any], args: tuple, kwargs: dict, pure: Callable[[], Any]
) -> LinearCall | None:
    """What a module call computes, if it is one contraction of its input with its kernel.

    Plain Flax linear classes and modules without a ``kernel`` parameter are not analysed (``None``);
    for the others see :func:`jlrp.frontends.linear.analyse`.
    """
    if is_plain_flax_linear(module) or not (args or kwargs) or not _has_kernel(module):
        return None
    try:
        params, other_state, layer_fn = pure()
        x, rest, rest_kwargs = first_argument(call_fn, args, kwargs)
    except Exception:  # noqa: BLE001 -- not analysable: the module keeps the behaviour of its class
        return None
    return analyse(params, x, (other_state, rest, rest_kwargs), layer_fn)


def linear_note(info: LinearCall | None, typed: bool) -> str:
    """The record note for a recognised call (``typed``: the module is already a Flax linear subclass)."""
    if info is None:
        return ""
    notes = []
    if not typed:
        what = "a convolution" if info.kind == "conv" else "a dense layer"
        notes.append(f"recognised by its computation as {what}")
    if info.effective:
        notes.append("rules act on the kernel its call computes (effective kernel), not the stored one")
    return "; ".join(notes)


# --------------------------------------------------------------------------------------------
# the abstract model view canonizers plan on


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleCall:
    """One module call seen during an abstract pass over the model.

    Attributes:
        path: the module path (``''``: the root).
        index: how many calls of the same path came before this one.
        module: the module (bound, for linen; a copy of the clone's module, for NNX).
        call_fn: the function whose signature names the call's arguments (the class's ``__call__``).
        args: positional arguments (abstract values).
        kwargs: keyword arguments.
        input_id: ``id`` of the first argument (the module input).
        output_id: ``id`` of the output object.
        output: the output (abstract value; shape and dtype only).
        linear: what :func:`jlrp.frontends.linear.analyse` found the call computes, for a module that
            is not a plain Flax linear class but owns a ``kernel`` (``None`` otherwise).
    """

    path: str
    index: int
    module: Any
    call_fn: Callable[..., Any]
    args: tuple
    kwargs: Mapping[str, Any]
    input_id: int
    output_id: int
    output: Any
    linear: LinearCall | None = None

    @property
    def input(self) -> Any:
        """The module input (first argument)."""
        return first_argument(self.call_fn, self.args, dict(self.kwargs))[0]


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, jax.core.Tracer))


def _sub_jaxpr(eqn: Any) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        sub = getattr(sub, "jaxpr", sub)
        if sub is not None and hasattr(sub, "eqns"):
            if len(sub.invars) == len(eqn.invars) and len(sub.outvars) == len(eqn.outvars):
                return sub
    return None


def _taint(jaxpr: Any, in_masks: Sequence[int]) -> list[int]:
    """Follow bit masks from a jaxpr's inputs to its outputs (which inputs each value depends on)."""
    env: dict[Any, int] = dict(zip(jaxpr.invars, in_masks))

    def get(atom: Any) -> int:
        return env.get(atom, 0) if not hasattr(atom, "val") else 0

    for eqn in jaxpr.eqns:
        masks = [get(a) for a in eqn.invars]
        union = functools.reduce(lambda a, b: a | b, masks, 0)
        if not union:
            continue
        sub = _sub_jaxpr(eqn)
        outs = _taint(sub, masks) if sub is not None else [union] * len(eqn.outvars)
        for var, mask in zip(eqn.outvars, outs):
            env[var] = mask
    return [get(v) for v in jaxpr.outvars]


class ModelView:
    """An abstract view of one model call, for canonizers (see the module docstring).

    Args:
        run: ``run(inputs, hook)`` calls the model on ``inputs`` with ``hook`` on every module call.
        inputs: the call's inputs as one pytree (array leaves become abstract; others stay as they are).
        collections: the variable collections the model has (``'params'``, ``'batch_stats'``...).
        variables: ``variables(path) -> {collection: {name: value}}`` of the module at ``path``, with
            the values of the current trace (for :class:`~jlrp.canonizers.ParamRewrite`).
    """

    def __init__(
        self,
        run: Callable[[Any, Hook], Any],
        inputs: Any,
        collections: frozenset[str],
        variables: Callable[[str], Mapping[str, Mapping[str, Any]]],
    ):
        self._run = run
        self._inputs = inputs
        self.collections = collections
        self.variables = variables
        self._calls: tuple[ModuleCall, ...] | None = None

    def _trace(self, hook: Hook, extra: Sequence[jax.ShapeDtypeStruct] = ()) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(self._inputs)
        arrays = [_is_array(leaf) for leaf in leaves]
        avals = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x, a in zip(leaves, arrays) if a]

        def model(abstract: list[Any], extras: list[Any]) -> Any:
            it = iter(abstract)
            full = [next(it) if a else leaf for leaf, a in zip(leaves, arrays)]
            return self._run(
                jax.tree_util.tree_unflatten(treedef, full),
                lambda path, module, call_fn, args, kwargs, proceed, pure=None: (
                    proceed(*args, **kwargs)
                    if analysing()  # a module's own apply, traced by the analysis: not a model call
                    else hook(path, module, call_fn, args, kwargs, proceed, extras, pure)
                ),
            )

        return jax.make_jaxpr(model)(avals, list(extra))

    @property
    def calls(self) -> tuple[ModuleCall, ...]:
        """Every module call in execution order (one abstract pass, made on first use)."""
        if self._calls is None:
            calls: list[ModuleCall] = []
            keep: list[Any] = []  # keeps inputs and outputs alive, so that their ids stay unique
            counts: dict[str, int] = {}

            active: list[str] = []

            def hook(path, module, call_fn, args, kwargs, proceed, extras, pure):
                if active and active[-1] == path:  # super().__call__ inside the module's own call
                    return proceed(*args, **kwargs)
                check_mode(path, module, call_fn, args, kwargs)
                linear = recognise(module, call_fn, args, kwargs, pure) if pure is not None else None
                index = counts.get(path, 0)
                counts[path] = index + 1
                x = first_argument(call_fn, args, kwargs)[0] if (args or kwargs) else None
                active.append(path)
                try:
                    output = proceed(*args, **kwargs)
                finally:
                    active.pop()
                keep.append((x, output))
                abstract = jax.tree_util.tree_map(
                    lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype) if _is_array(v) else v, output
                )
                calls.append(
                    ModuleCall(
                        path, index, module, call_fn, args, kwargs, id(x), id(output), abstract, linear
                    )
                )
                return output

            self._trace(hook)
            self._calls = tuple(calls)
        return self._calls

    def exclusive(self, taps: Sequence[Tap]) -> list[bool]:
        """For each tap: whether nothing but ``tap.consumer`` uses the output of call ``(tap.path, tap.index)``.

        Exact: the output is perturbed by an extra input for every consumer except ``tap.consumer``'s
        calls that take it as input, and the model output is checked for dependence on that extra input.
        An output that is not a single array counts as not exclusive.
        """
        if not taps:
            return []
        shapes = {(c.path, c.index): c.output for c in self.calls}
        index = {(t.path, t.index): k for k, t in enumerate(taps)}
        ok = [isinstance(shapes.get((t.path, t.index)), jax.ShapeDtypeStruct) for t in taps]
        extra = [
            shapes[(t.path, t.index)] if good else jax.ShapeDtypeStruct((), np.float32)
            for t, good in zip(taps, ok)
        ]
        counts: dict[str, int] = {}
        perturbed: dict[int, tuple[int, Any, Any]] = {}

        active: list[str] = []

        def hook(path, module, call_fn, args, kwargs, proceed, extras, pure):
            if active and active[-1] == path:  # super().__call__ inside the module's own call
                return proceed(*args, **kwargs)
            n = counts.get(path, 0)
            counts[path] = n + 1
            if args or kwargs:
                x = first_argument(call_fn, args, kwargs)[0]
                found = perturbed.get(id(x))
                if found is not None and taps[found[0]].consumer == path:
                    args, kwargs = _replace_first(call_fn, args, kwargs, found[2])
            active.append(path)
            try:
                output = proceed(*args, **kwargs)
            finally:
                active.pop()
            k = index.get((path, n))
            if k is not None and ok[k]:
                shifted = output + extras[k].astype(output.dtype)
                perturbed[id(shifted)] = (k, shifted, output)
                return shifted
            return output

        jaxpr = self._trace(hook, extra).jaxpr
        n_extra = len(taps)
        n_in = len(jaxpr.invars) - n_extra
        masks = [0] * n_in + [1 << k for k in range(n_extra)]
        used = functools.reduce(lambda a, b: a | b, _taint(jaxpr, masks), 0)
        return [good and not used & (1 << k) for k, good in enumerate(ok)]


def plan_canonizers(canonizers: Sequence[Any], view: ModelView) -> dict[str, tuple[Any, ...]]:
    """Ask every canonizer for its rewrites; ``{path: (Identity | ParamRewrite, ...)}`` in canonizer order.

    Refusals (a :class:`~jlrp.canonizers.Note`) are kept as well, so that the records carry them.
    """
    plan: dict[str, list[Any]] = {}
    for canonizer in canonizers:
        for path, rewrite in canonizer.rewrites(view).items():
            plan.setdefault(path, []).append(rewrite)
    return {path: tuple(rewrites) for path, rewrites in plan.items()}


# --------------------------------------------------------------------------------------------
# the per-call handler


@dataclasses.dataclass
class CallContext:
    """One explained forward: the resolver, the records, the op scopes and the canonizer plan."""

    resolver: Any
    records: list[LayerRecord]
    scopes: ModuleScopes
    plan: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    variables: Callable[[str], Mapping[str, Mapping[str, Any]]] | None = None
    #: paths of the module calls in progress (a module's ``super().__call__`` is not a new call)
    active: list[str] = dataclasses.field(default_factory=list)


def handle_call(
    ctx: CallContext,
    path: str,
    module: Any,
    call_fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    call_original: Callable[[], Any],
    pure_layer: Callable[[Any], tuple[dict[str, Any], Any, Callable[[Any, Any, Any], Any]]],
    owns_variables: bool,
) -> Any:
    """Evaluate one intercepted module call of an explained forward.

    Args:
        ctx: the forward's context.
        path: the module path.
        module: the module.
        call_fn: the class's original ``__call__`` (its signature names the arguments).
        args, kwargs: the call's arguments.
        call_original: runs the original call.
        pure_layer: ``pure_layer(rule)`` returns ``(params, other_state, layer_fn)``, the pure apply
            ``layer_fn(params, x, (other_state, rest_args, rest_kwargs))`` (``rule`` names the owner in
            the container error a sub-module call inside it raises).
        owns_variables: whether the module is a single layer (see :meth:`ModuleScopes.scope`).
    """
    if ctx.active and ctx.active[-1] == path:  # super().__call__ inside the module's own call
        return call_original()
    ctx.active.append(path)
    try:
        output = _evaluate_call(
            ctx, path, module, call_fn, args, kwargs, call_original, pure_layer, owns_variables
        )
    finally:
        ctx.active.pop()
    taps = ACTIVE_TAPS.get()
    return output if taps is None else taps.module_output(path, output)


def _evaluate_call(
    ctx, path, module, call_fn, args, kwargs, call_original, pure_layer, owns_variables
) -> Any:
    """:func:`handle_call` without the re-entry guard (same arguments)."""
    kind = type(module).__name__
    check_mode(path, module, call_fn, args, kwargs)
    planned = ctx.plan.get(path, ())
    notes = "; ".join(r.note for r in planned if r.note)
    identity = next((r for r in planned if isinstance(r, Identity)), None)
    if identity is not None:  # folded into a neighbouring layer
        ctx.records.append(LayerRecord(path, kind, None, False, notes))
        return first_argument(call_fn, args, kwargs)[0]
    rewrites = [r for r in planned if isinstance(r, ParamRewrite)]
    assert all(isinstance(r, (ParamRewrite, Note)) for r in planned)
    typed = isinstance(module, _types.Linear)
    info = recognise(module, call_fn, args, kwargs, lambda: pure_layer(None))
    if info is not None and not typed:  # match Convolution / Dense keys like a Flax Conv / Dense
        rule = ctx.resolver.rule_for(path, module, like=info.like(module))
    else:
        rule = ctx.resolver.rule_for(path, module)
    if rule is not None and isinstance(module, _types.Normalization):
        raise RuleError(
            f"{rule!r} is on '{display_path(path)}' ({kind}), a normalisation layer: it is not linear, and "
            "jlrp explains it without a module rule (its statistic held constant, its centring and affine "
            "parts as linear ops, see jlrp.audit). Remove the entry, or narrow the glob to the layers you mean."
        )
    notes = "; ".join(n for n in (linear_note(info, typed), notes) if n)
    ctx.records.append(LayerRecord(path, kind, rule, typed or info is not None, notes))
    with ctx.scopes.scope(path, owns_variables):
        if rule is None and not rewrites:
            taps = ACTIVE_TAPS.get()
            if taps is not None:
                taps.module_params(path, None, {})  # noted as skipped where wanted: no rule, no R_w
            return call_original()
        x, rest, rest_kwargs = first_argument(call_fn, args, kwargs)
        params, other_state, layer_fn = pure_layer(rule)
        state = (other_state, rest, rest_kwargs)
        if info is not None and info.effective:  # rules (and merges) act on the kernel the layer applies
            params = info.effective_params(params, state)
            layer_fn = info.layer_fn
        for rewrite in rewrites:
            params, layer_fn = rewrite.apply(params, layer_fn, ctx.variables)
        taps = ACTIVE_TAPS.get()
        tapped = False
        if taps is not None:
            params, tapped = taps.module_params(path, rule, params)
        if rule is None:
            return layer_fn(params, x, state)
        where = f"'{display_path(path)}' ({kind})"
        return apply_rule(rule, layer_fn, params, x, where, state=state, param_relevance=tapped)
