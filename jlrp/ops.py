"""Function-level ops: residual adds, means, average pools and ReLUs that Flax code calls as functions.

Flax models write residual connections as ``x + h``, global average pooling as ``jnp.mean`` and
activations as ``nn.relu(x)``. With plain gradients a residual add doubles the relevance and a mean
divides it. jlrp finds these ops on the relevance path of the traced model and matches them against
composites exactly like modules: by type (the :class:`Op` classes below, grouped in
:mod:`jlrp.types`: ``Sum``, ``AvgPool``, ``ReLU``) and by path (``'<module path>/@<kind>_<n>'``, e.g.
``'layer1_0/@add_0'``).

How: the explained forward (with module rules already in place) is traced to a jaxpr; every module
call sits in a named scope that tells which module an equation belongs to. The jaxpr is then
evaluated again by :func:`run_with_op_rules`; an equation that (a) depends on the model input,
(b) is not internal to a layer that owns parameters (a BatchNorm's own arithmetic is not a
"function-level" op) and (c) is one of the ops below, gets the composite's rule through
:func:`jlrp.core.apply_rule`. The op recognised:

- :class:`Add`: ``add`` of two input-dependent arrays (a residual connection);
- :class:`Mean` / :class:`ReduceSum`: ``reduce_sum`` over axes, fused with a following division or
  multiplication by a constant (``jnp.mean``);
- :class:`AvgPool`: ``reduce_window_sum`` fused with its division (``nn.avg_pool``);
- :class:`Scale`: an input-dependent array multiplied or divided by a constant;
- :class:`ReLU`: ``jax.nn.relu`` / ``nn.relu`` and ``jnp.maximum(x, 0)``.

Other linear ops on the relevance path (a ``dot_general`` or convolution outside any module, the
difference of two activations) are recorded as *uncovered* for :func:`jlrp.audit` and
``explain(..., strict=True)``. Ops inside ``jax.lax.scan``/``cond``/``while`` or checkpointed
sub-computations are evaluated as they are (no op rules inside them).

Signs: the same pass tracks which values are provably ``>= 0`` (results of ReLUs, max pools and
shape changes of such values, sums and products of them, ...; see :func:`_non_negative_result`).
A layer whose input is one of them gets its rule call traced again by
:func:`jlrp.core.apply_rule` with ``non_negative=True``, so ZPlus, AlphaBeta and Gamma drop their
negative-input terms at trace time (:func:`jlrp.core.input_known_non_negative`): after a ReLU that
halves ZPlus's convolutions. Anything not proven keeps the general formula, which is exact for any
sign.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import Literal

from .core import RuleCall, apply_rule, recording_rule_calls

__all__ = ["Op", "ReLU", "Add", "ReduceSum", "Mean", "AvgPool", "Scale", "ModuleScopes", "run_with_op_rules"]


@dataclasses.dataclass(frozen=True)
class Op:
    """A function-level op found in the model's trace.

    Attributes:
        primitive: the JAX primitive behind it, e.g. ``'add'``.
        path: where it sits: the enclosing module's path plus the op's kind and index.
    """

    primitive: str
    path: str


class ReLU(Op):
    """``nn.relu`` / ``jax.nn.relu`` / ``jnp.maximum(x, 0)`` called as a function."""


class Add(Op):
    """The sum of two activations (a residual connection ``x + h``)."""


class ReduceSum(Op):
    """A sum over axes of an activation (``jnp.sum``)."""


class Mean(Op):
    """A mean over axes of an activation (``jnp.mean``, global average pooling)."""


class AvgPool(Op):
    """Average pooling called as a function (``nn.avg_pool``)."""


class Scale(Op):
    """An activation multiplied or divided by a constant."""


_KIND = {ReLU: "relu", Add: "add", ReduceSum: "sum", Mean: "mean", AvgPool: "avg_pool", Scale: "scale"}

# linear primitives that mix activations; on the relevance path outside any rule they are "uncovered"
_LINEAR_MIXING = {"dot_general", "conv_general_dilated", "cumsum"}
_SCALES = {"mul", "div"}
_SCOPE = re.compile(r"jlrp_m(\d+)")


class ModuleScopes:
    """Per-trace registry of module calls; front ends wrap each call in :meth:`scope`.

    The named scope ``jlrp_m<index>`` ends up in the name stack of every equation the call traces,
    which is how :func:`run_with_op_rules` tells which module an op belongs to.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def scope(self, path: str, owns_variables: bool) -> Any:
        """A context manager for the call of the module at ``path``.

        Args:
            path: the module path.
            owns_variables: whether the module holds parameters/state of its own and no sub-modules
                (its internal arithmetic is then part of the layer, never a function-level op).
        """
        self.calls.append((path, owns_variables))
        return jax.named_scope(f"jlrp_m{len(self.calls) - 1}")

    def owner(self, name_stack: str) -> tuple[str, bool] | None:
        found = _SCOPE.findall(name_stack)
        return self.calls[int(found[-1])] if found else None


def _is_zero_literal(atom: Any) -> bool:
    return isinstance(atom, Literal) and getattr(atom.val, "shape", ()) == () and float(atom.val) == 0.0


def _is_relu_jaxpr(jaxpr: Any) -> bool:
    eqns = jaxpr.eqns
    if len(eqns) != 1:
        return False
    eqn = eqns[0]
    if eqn.primitive.name in ("pjit", "jit"):
        return _is_relu_jaxpr(eqn.params["jaxpr"].jaxpr)
    return eqn.primitive.name == "max" and any(_is_zero_literal(a) for a in eqn.invars)


_RULE_SCOPE = re.compile(r"jlrp_r(\d+)")
# Ops whose result is >= 0 where their first operand is (shape changes, reductions of such values).
_KEEPS_SIGN = frozenset(
    {
        "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
        "rev", "copy", "copy_p", "convert_element_type", "reduce_max", "reduce_min", "reduce_sum",
        "reduce_window_sum", "reduce_precision", "sqrt", "stop_gradient", "cumsum", "cummax",
    }
)  # fmt: skip
# Ops whose result is >= 0 where all their (array) operands are.
_ALL_NON_NEGATIVE = frozenset({"add", "add_any", "mul", "div", "min", "concatenate"})


def _literal_non_negative(atom: Any) -> bool:
    try:
        return bool(np.all(np.asarray(atom.val) >= 0))
    except (TypeError, ValueError):
        return False


def _window_never_all_padding(params: Mapping[str, Any]) -> bool:
    windows = params["window_dimensions"]
    dilated = any(d != 1 for d in (*params.get("base_dilation", ()), *params.get("window_dilation", ())))
    return not dilated and all(lo < w and hi < w for (lo, hi), w in zip(params["padding"], windows))


def _non_negative_result(eqn: Any, flags: Sequence[bool]) -> bool:
    """Whether ``eqn``'s result is provably ``>= 0`` given which operands are (a sound, partial test).

    NaN inputs are rejected by :func:`jlrp.explain.check_input` before any trace."""
    name = eqn.primitive.name
    if name == "max":
        return any(flags)
    if name == "custom_jvp_call":
        return _is_relu_jaxpr(eqn.params["call_jaxpr"].jaxpr)
    if name in ("abs", "exp", "square", "logistic"):
        return True
    if name == "integer_pow":
        return eqn.params["y"] % 2 == 0 or flags[0]
    if name in _KEEPS_SIGN:
        return flags[0]
    if name == "reduce_window_max":
        return flags[0] and _window_never_all_padding(eqn.params)
    if name == "pad":
        return flags[0] and flags[1]
    if name == "select_n":
        return all(flags[1:])
    if name in _ALL_NON_NEGATIVE:
        return all(flags)
    return False


def _bind(eqn: Any, invals: Sequence[Any]) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # older JAX: (subfuns, params)
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **params)


def _consumers(jaxpr: Any) -> dict[Any, list[int]]:
    uses: dict[Any, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, Literal):
                uses.setdefault(v, []).append(i)
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses.setdefault(v, []).append(-1)
    return uses


class _Interpreter:
    def __init__(
        self,
        resolver: Any,
        records: list[Any],
        scopes: ModuleScopes,
        record_cls: type,
        rule_calls: Sequence[RuleCall] = (),
    ):
        self.resolver = resolver
        self.records = records
        self.scopes = scopes
        self.record_cls = record_cls
        self.rule_calls = rule_calls
        self.counts: Counter[tuple[str, str]] = Counter()

    def _rule_call(self, eqn: Any, stack: str, flags: Sequence[bool]) -> RuleCall | None:
        """The :class:`~jlrp.core.RuleCall` of a rule's ``custom_vjp_call`` whose layer input is ``>= 0``."""
        if eqn.primitive.name != "custom_vjp_call":
            return None
        found = _RULE_SCOPE.findall(stack)
        if not found or int(found[-1]) >= len(self.rule_calls):
            return None
        call = self.rule_calls[int(found[-1])]
        if call.num_operands != len(eqn.invars) or not flags[call.input_index]:
            return None
        return call

    def _path(self, owner_path: str, kind: str) -> str:
        n = self.counts[(owner_path, kind)]
        self.counts[(owner_path, kind)] += 1
        return f"{owner_path}/@{kind}_{n}" if owner_path else f"@{kind}_{n}"

    def _classify(self, jaxpr, eqn, acts, defined_before, uses, act):
        """The op class of an equation on the relevance path, and the fused follow-up equation index."""
        name = eqn.primitive.name
        if name in ("add", "add_any") and len(acts) == 2 and all(acts):
            return Add, None
        if name == "max" and acts[0] != acts[1] and any(_is_zero_literal(a) for a in eqn.invars):
            return ReLU, None
        if name == "custom_jvp_call" and _is_relu_jaxpr(eqn.params["call_jaxpr"].jaxpr):
            return ReLU, None
        if name in ("reduce_sum", "reduce_window_sum") and acts[0]:
            fused = self._fusable_scale(jaxpr, eqn.outvars[0], defined_before, uses, act)
            if name == "reduce_window_sum":
                return AvgPool, fused
            return (Mean if fused is not None else ReduceSum), fused
        if name in _SCALES and len(acts) == 2 and acts[0] != acts[1] and (name == "mul" or acts[0]):
            act = eqn.invars[0] if acts[0] else eqn.invars[1]
            if tuple(act.aval.shape) == tuple(eqn.outvars[0].aval.shape):
                return Scale, None
        return None, None

    def _fusable_scale(self, jaxpr, var, defined_before, uses, act):
        """The index of the equation scaling ``var`` by a constant, if that is its only use."""
        users = uses.get(var, [])
        if len(users) != 1 or users[0] < 0:
            return None
        j = users[0]
        follow = jaxpr.eqns[j]
        if follow.primitive.name not in _SCALES:
            return None
        others = [a for a in follow.invars if a is not var]
        if len(others) != 1 or (follow.primitive.name == "div" and follow.invars[0] is not var):
            return None
        other = others[0]
        if isinstance(other, Literal) or (other in defined_before and other not in act):
            return j
        return None

    def run(
        self,
        jaxpr: Any,
        consts: Sequence[Any],
        args: Sequence[Any],
        arg_acts: Sequence[bool],
        prefix: str,
        arg_non_negative: Sequence[bool] | None = None,
    ) -> tuple[list[Any], list[bool]]:
        """Evaluate ``jaxpr``; return its outputs and which of them are provably ``>= 0``."""
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        act = {v for v, a in zip(jaxpr.invars, arg_acts) if a}
        non_negative = {v for v, n in zip(jaxpr.invars, arg_non_negative or ()) if n}

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        def known_non_negative(v):
            return _literal_non_negative(v) if isinstance(v, Literal) else v in non_negative

        uses = _consumers(jaxpr)
        skip: set[int] = set()
        defined: set[Any] = set(jaxpr.constvars) | set(jaxpr.invars)
        for i, eqn in enumerate(jaxpr.eqns):
            if i in skip:  # fused into an earlier op
                continue
            acts = [not isinstance(v, Literal) and v in act for v in eqn.invars]
            invals = [read(v) for v in eqn.invars]
            stack = prefix + "/" + str(eqn.source_info.name_stack)
            result = None
            if any(acts):
                result = self._maybe_op(jaxpr, eqn, acts, invals, stack, defined, uses, env, skip, act)
            flags = [known_non_negative(v) for v in eqn.invars]
            if result is None:
                rule_call = self._rule_call(eqn, stack, flags)
                if eqn.primitive.name in ("pjit", "jit"):
                    inner = eqn.params["jaxpr"]
                    outs, inner_flags = self.run(inner.jaxpr, inner.consts, invals, acts, stack, flags)
                    non_negative.update(v for v, n in zip(eqn.outvars, inner_flags) if n)
                elif rule_call is not None:  # the layer input is >= 0: its rule may drop negative terms
                    outs = [rule_call.call_non_negative(invals)]
                else:
                    outs = _bind(eqn, invals)
                    outs = outs if eqn.primitive.multiple_results else [outs]
                result = dict(zip(eqn.outvars, outs))
            # an op rule keeps the op's forward value; a fused op's result (its follow-up's) is not tested
            if len(eqn.outvars) == 1 and eqn.outvars[0] in result and _non_negative_result(eqn, flags):
                non_negative.add(eqn.outvars[0])
            env.update(result)
            if any(acts):
                act.update(result)
            defined.update(eqn.outvars)
        return [read(v) for v in jaxpr.outvars], [known_non_negative(v) for v in jaxpr.outvars]

    def _maybe_op(self, jaxpr, eqn, acts, invals, stack, defined, uses, env, skip, act):
        """Apply the composite's rule if ``eqn`` is a function-level op; ``None`` leaves it as it is."""
        owner = self.scopes.owner(stack)
        if owner is not None and owner[1]:
            return None  # arithmetic inside a layer that owns parameters
        owner_path = owner[0] if owner is not None else ""
        op_cls, fused = self._classify(jaxpr, eqn, acts, defined, uses, act)
        if op_cls is None:
            name = eqn.primitive.name
            if name in _LINEAR_MIXING or (name == "sub" and all(acts)):
                self.records.append(self.record_cls(self._path(owner_path, name), name, None, True))
            return None
        path = self._path(owner_path, _KIND[op_cls])
        rule = self.resolver.rule_for(path, op_cls(eqn.primitive.name, path))
        self.records.append(self.record_cls(path, op_cls.__name__, rule, op_cls is not ReLU))
        if rule is None:
            return None
        follow = jaxpr.eqns[fused] if fused is not None else None
        layer_fn, params, x = self._layer(eqn, acts, invals, follow, env)
        output = apply_rule(rule, layer_fn, params, x, f"'{path}' ({op_cls.__name__})")
        if follow is not None:
            skip.add(fused)
            return {follow.outvars[0]: output}
        return {eqn.outvars[0]: output}

    @staticmethod
    def _layer(eqn, acts, invals, follow, env) -> tuple[Callable[[Any, Any], Any], Any, Any]:
        """``(layer_fn, params, x)`` of an op: the input-dependent operand is ``x``, the others are
        ``params`` (so they get no cotangent and may be traced values)."""
        if eqn.primitive.name in ("add", "add_any"):
            return (lambda p, s: s[0] + s[1]), (), jax.numpy.stack(invals)
        position = acts.index(True)
        others = tuple(v for k, v in enumerate(invals) if k != position)

        def first(p, a):
            vals = list(p[0])
            vals.insert(position, a)
            out = _bind(eqn, vals)
            return out[0] if eqn.primitive.multiple_results else out

        if follow is None:
            return first, (others,), invals[position]
        intermediate = eqn.outvars[0]
        follow_position = next(k for k, v in enumerate(follow.invars) if v is intermediate)
        other = next(v for v in follow.invars if v is not intermediate)
        other_val = other.val if isinstance(other, Literal) else env[other]

        def fused(p, a):
            vals = [p[1]]
            vals.insert(follow_position, first(p, a))
            return _bind(follow, vals)

        return fused, (others, other_val), invals[position]


def run_with_op_rules(
    fn: Callable[..., Any],
    args: Sequence[Any],
    input_argnum: int,
    resolver: Any,
    records: list[Any],
    scopes: ModuleScopes,
    record_cls: type,
) -> Any:
    """Evaluate ``fn(*args)`` with the composite's rules on function-level ops.

    Args:
        fn: the explained forward (module rules in place, module calls in :class:`ModuleScopes` scopes).
        args: its positional arguments (pytrees).
        input_argnum: which argument is the model input (the start of the relevance path).
        resolver: the composite's per-trace resolver.
        records: the list the trace's layer records are appended to.
        scopes: the module scopes the front end filled while ``fn`` was traced.
        record_cls: the record class (:class:`jlrp.explain.LayerRecord`).

    Returns:
        ``fn(*args)``, whose VJP applies the op rules.
    """
    rule_calls: list[RuleCall] = []
    with recording_rule_calls(rule_calls):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat_args, _ = jax.tree_util.tree_flatten(list(args))
    arg_acts = []
    for k, arg in enumerate(args):
        arg_acts += [k == input_argnum] * len(jax.tree_util.tree_leaves(arg))
    interpreter = _Interpreter(resolver, records, scopes, record_cls, rule_calls)
    flat_out, _ = interpreter.run(closed.jaxpr, closed.consts, flat_args, arg_acts, "")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat_out)
