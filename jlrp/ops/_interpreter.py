"""Re-evaluation of the explained forward's jaxpr with every equation on the relevance path classified.

Two sweeps per jaxpr (and per nested body): :func:`jlrp.ops._analysis.analyse` classifies
equations symbolically (which values are activations, element-wise regions and their roots,
statistics, which values relevance can still reach), then :class:`_Interpreter` evaluates them, applying the composite's
rules to ops and region exits and rebuilding ``scan``/``cond``/``checkpoint`` around interpreted
bodies.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Literal

from ..core import BasicRule, Rule, RuleCall, apply_rule, recording_rule_calls, rule_dataclass
from ..errors import RuleError, UsageError, integer_input_error
from ..rules import Epsilon
from ._analysis import Analysis, analyse, aval_shape, call_body, clear_caches, scan_acts
from ._kinds import (
    Activation,
    Add,
    Affine,
    Contraction,
    MatMul,
    ModuleScopes,
    Multiply,
    ReLU,
    Scale,
    Softmax,
)
from ._prims import STRUCTURAL
from ._probes import ACTIVE_PROBES, ACTIVE_TAPS
from ._signs import literal_non_negative, non_negative_result

_RULE_SCOPE = re.compile(r"jlrp_r(\d+)")
_TAP_SCOPE = re.compile(r"jlrp_r_tap(\d+)")

#: structural primitives that can merge activations with constants (a class token, a stored cache)
_MERGES = frozenset({"concatenate", "dynamic_update_slice"})


@rule_dataclass
class _Route(Rule):
    """The gradient of a structural op (it routes relevance exactly), recorded for the conservation
    audit: the share that reaches the op's constant operands (a class token) stays there."""

    multi_input = True

    def backward(self, layer_fn, params, x, output, relevance):
        _, pullback = jax.vjp(lambda a: layer_fn(params, a), x)
        return pullback(relevance)[0]


def _plain_ratio(rule: Rule) -> bool:
    """Whether ``rule`` computes ``x * J^T c`` with ``c = gradient_mapper(R, [layer(x)], output)``: a
    :class:`BasicRule` with zennit's default modifiers and reducer whose maths is the base
    :meth:`~BasicRule.propagate` (or Epsilon's, which reads ``z`` from the saved output and uses its own
    mapper), with no :meth:`~Rule.backward` of its own."""
    cls = type(rule)
    if not isinstance(rule, BasicRule) or cls.backward is not BasicRule.backward:
        return False
    maths = cls.propagate is BasicRule.propagate or (
        cls.propagate is Epsilon.propagate and cls.gradient_mapper is Epsilon.gradient_mapper
    )
    return (
        maths
        and cls.input_modifiers is BasicRule.input_modifiers
        and cls.output_modifiers is BasicRule.output_modifiers
        and cls.reducer is BasicRule.reducer
    )


@jax.tree_util.register_pytree_node_class
class _StackedOperands(Rule):
    """A one-input rule on an op whose input is a tuple of same-shaped operands (an :class:`Add`).

    The rule sees the operands stacked on a new axis 0 and the layer ``s -> s[0] + s[1]``, as if the
    op had one input. The stack is built only inside the backward, so the forward saves the operands
    themselves (arrays that other layers keep anyway), not a stacked copy, for the backward; and a rule
    of the form ``x * J^T c`` (Norm, Epsilon) runs on each operand without stacking at all.
    """

    multi_input = True

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def tree_flatten(self) -> tuple[tuple[Rule], None]:
        return (self.rule,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Sequence[Rule]) -> _StackedOperands:
        return cls(children[0])

    def __repr__(self) -> str:
        return repr(self.rule)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.rule == other.rule  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.rule))

    def check(self, params, x, output, where):
        stacked = jax.ShapeDtypeStruct((len(x), *jnp.shape(output)), jnp.result_type(output))
        self.rule.check(params, stacked, output, where)

    def backward(self, layer_fn, params, x, output, relevance):
        rule = self.rule
        if _plain_ratio(rule):
            (modified,) = rule.param_modifiers(params)
            z, pullback = jax.vjp(lambda *ops: layer_fn(modified, ops), *x)
            (c,) = rule.gradient_mapper(relevance, [z], output)
            return tuple(a * g for a, g in zip(x, pullback(c.astype(z.dtype))))
        stacked = jnp.stack(x)
        result = rule.backward(lambda p, s: layer_fn(p, tuple(s)), params, stacked, output, relevance)
        return tuple(result)


#: the op an op becomes when one of its activation operands is held constant (CP-LRP)
_WITH_A_CONSTANT = {MatMul: Contraction, Multiply: Scale, Add: Affine}


def _bind(eqn: Any, invals: Sequence[Any]) -> Any:
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **params)


def _bind_list(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    out = _bind(eqn, invals)
    return list(out) if eqn.primitive.multiple_results else [out]


def _constrained(values: Sequence[Any], shardings: Sequence[Any] | None) -> list[Any]:
    """``values`` under the shardings a ``jit`` equation names for them (its ``in_shardings`` or
    ``out_shardings``; unspecified ones leave the value as it is)."""
    if not shardings:
        return list(values)
    return [
        jax.lax.with_sharding_constraint(v, s) if isinstance(s, jax.sharding.Sharding) else v
        for v, s in zip(values, shardings)
    ]


def _source(eqn: Any) -> str:
    try:
        from jax._src import source_info_util

        frame = source_info_util.user_frame(eqn.source_info.traceback)
        if frame is not None:
            return f"{frame.file_name}:{frame.start_line}"
    except Exception:  # source information is a courtesy; never fail on it
        pass
    return ""


# --------------------------------------------------------------------------------------------
# evaluation


class _Interpreter:
    def __init__(self, resolver, records, scopes: ModuleScopes, record_cls: type, rule_calls=()):
        self.resolver = resolver
        self.records = records
        self.scopes = scopes
        self.record_cls = record_cls
        self.rule_calls = rule_calls
        self.counts: Counter[tuple[str, str]] = Counter()
        self.final_softmax: list[str] = []
        self.embeddings = 0
        self.holding = False  # set by _apply_op when a rule holds an op's output constant (CP-LRP)
        self.inner = 0  # > 0 inside scan, cond and checkpoint bodies (traced apart from the outer pass)

    def _path(self, owner_path: str, kind: str) -> str:
        n = self.counts[(owner_path, kind)]
        self.counts[(owner_path, kind)] += 1
        return f"{owner_path}/@{kind}_{n}" if owner_path else f"@{kind}_{n}"

    def _owner(self, stack: str) -> str:
        owner = self.scopes.owner(stack)
        return owner[0] if owner is not None else ""

    def _record(
        self, path: str, kind: str, rule: Any, needs_rule: bool, note: str = "", source: str = ""
    ) -> None:
        self.records.append(self.record_cls(path, kind, rule, needs_rule, note, source))

    def _rule_call(self, eqn: Any, stack: str, flags: Sequence[bool]) -> RuleCall | None:
        if eqn.primitive.name != "custom_vjp_call":
            return None
        found = _RULE_SCOPE.findall(stack)
        if not found or int(found[-1]) >= len(self.rule_calls):
            return None
        call = self.rule_calls[int(found[-1])]
        if call.num_operands != len(eqn.invars) or not flags[call.input_index]:
            return None
        return call

    def _apply_op(
        self,
        op_cls: type,
        eqn: Any,
        stack: str,
        layer: Callable[[], tuple[Any, Any, Any]],
        primitive: str = "",
    ) -> Any:
        """Ask the composite for the op's rule; apply it (``None``: keep the gradient)."""
        owner_path = self._owner(stack)
        primitive = primitive or eqn.primitive.name
        kind = "sub" if op_cls is Add and primitive == "sub" else op_cls.kind
        path = self._path(owner_path, kind)
        rule = self.resolver.rule_for(path, op_cls(primitive, path))
        holds = bool(getattr(rule, "holds", False))
        note = "held constant: its products are linear in their other operand" if holds else ""
        self._record(path, op_cls.__name__, rule, not op_cls.gradient_is_rule, note, _source(eqn))
        taps = ACTIVE_TAPS.get()
        if taps is not None and taps.wants(path):
            if self.inner:
                raise UsageError(
                    f"'{path}' lies inside a scan, cond or checkpoint (remat) body, where relevance and "
                    "activations cannot be captured per iteration; capture or condition the output of the "
                    "module that contains the loop or checkpoint instead."
                )
            if rule is None:
                layer_fn, params, x = layer()
                return taps.op_output(path, layer_fn(params, x))
            return taps.op_output(path, self._ruled(op_cls, rule, path, layer))
        if rule is None:
            return None
        return self._ruled(op_cls, rule, path, layer)

    def _ruled(self, op_cls: type, rule: Any, path: str, layer: Callable[[], tuple[Any, Any, Any]]) -> Any:
        """The op's output with ``rule`` applied (a held op: its value, constant for the backward)."""
        where = f"'{path}' ({op_cls.__name__})"
        if op_cls.operands > 1 and not rule.multi_input:
            raise RuleError(
                f"{rule!r} on {where}: this op multiplies two activations, so its rule gets both as a tuple; "
                f"{type(rule).__name__} serves layers with one input. Use rules.UniformEpsilon() (products "
                "that sum, e.g. matmuls) or rules.Uniform() (element-wise products)."
            )
        layer_fn, params, x = layer()
        if getattr(rule, "holds", False):
            self.holding = True
            return jax.lax.stop_gradient(layer_fn(params, x))
        if op_cls is Add:
            rule = _StackedOperands(rule)
        return apply_rule(rule, layer_fn, params, x, where, absorbs=op_cls is Affine)

    def run(
        self,
        jaxpr,
        consts,
        args,
        arg_acts,
        prefix,
        arg_non_negative=None,
        arg_taint=None,
        top=False,
        arg_held=None,
    ):
        """Evaluate ``jaxpr``; return its outputs, which of them are provably ``>= 0`` and which are
        held constant (computed only from outputs of ops whose rule holds them, CP-LRP's AH-rule)."""
        analysis = analyse(jaxpr, list(arg_acts), None if arg_taint is None else list(arg_taint))
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        non_negative = {v for v, n in zip(jaxpr.invars, arg_non_negative or ()) if n}
        held_vars = {v for v, h in zip(jaxpr.invars, arg_held or ()) if h}
        region_eqns: dict[int, list[int]] = {}

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        def known_non_negative(v):
            return literal_non_negative(v) if isinstance(v, Literal) else v in non_negative

        skip: set[int] = set()
        for i, eqn in enumerate(jaxpr.eqns):
            if i in skip:
                continue
            cls = analysis.eqns[i]
            invals = [read(v) for v in eqn.invars]
            for k in cls.held:
                invals[k] = jax.lax.stop_gradient(invals[k])
            stack = prefix + "/" + str(eqn.source_info.name_stack)
            flags = [known_non_negative(v) for v in eqn.invars]
            live = any(v in analysis.live for v in eqn.outvars)
            outs = None
            act_in = [
                v
                for k, v in enumerate(eqn.invars)
                if not isinstance(v, Literal) and v in analysis.info and k not in cls.held
            ]
            if held_vars and act_in and cls.kind != "call" and all(v in held_vars for v in act_in):
                # computed from held values only: a constant of the relevance pass
                held_vars.update(eqn.outvars)
                env.update(zip(eqn.outvars, _bind_list(eqn, invals)))
                continue
            if cls.held and live:
                owner_path = self._owner(stack)
                self._record(
                    self._path(owner_path, "normalize"), "Normalize", None, False,
                    "statistic (std/norm) held constant", _source(eqn),
                )  # fmt: skip
            if cls.kind == "region":
                region_eqns.setdefault(id(cls.root), []).append(i)
                outs = _bind_list(eqn, invals)
                v = eqn.outvars[0]
                if v in analysis.exits and v in analysis.live:
                    ruled = self._region_exit(jaxpr, analysis, region_eqns[id(cls.root)], i, env, stack)
                    if ruled is not None:
                        outs = [ruled] + outs[1:]
            elif cls.kind == "structural" and live and eqn.primitive.name in _MERGES:
                outs = self._merge(eqn, invals, analysis, stack)
            elif cls.kind == "op" and live:
                self.holding = False
                outs = self._op(jaxpr, i, cls, invals, stack, env, analysis, skip, held_vars)
                if self.holding:
                    held_vars.update(eqn.outvars)
                final = cls.op is Softmax and top
                if final and self._reaches_output(jaxpr, analysis, eqn.outvars[0]):
                    self.final_softmax.append(_source(eqn) or "the model output")
            elif cls.kind == "embed":
                outs = _bind_list(eqn, invals)
                self.embeddings += 1
                probes = ACTIVE_PROBES.get()
                if probes is not None:
                    k = len(probes.found)
                    probes.found.append((tuple(jnp.shape(outs[0])), jnp.result_type(outs[0])))
                    if probes.values is not None:
                        outs = [outs[0] + probes.values[k]] + outs[1:]
            elif cls.kind == "call":
                outs, out_held = self._call(eqn, invals, stack, flags, analysis, env, held_vars)
                held_vars.update(v for v, h in zip(eqn.outvars, out_held) if h)
            elif cls.kind == "uncovered" and live:
                self._record(
                    self._path(self._owner(stack), cls.name or eqn.primitive.name),
                    cls.name or eqn.primitive.name, None, True, cls.note, _source(eqn),
                )  # fmt: skip
                final = cls.name in ("softmax", "log_softmax") and top
                if final and self._reaches_output(jaxpr, analysis, eqn.outvars[0]):
                    self.final_softmax.append(_source(eqn) or "the model output")
            if cls.kind == "rule" and "jlrp_r_tap" in stack:
                taps = ACTIVE_TAPS.get()
                found = _TAP_SCOPE.findall(stack)
                if taps is not None and found:
                    taps.reached(int(found[-1]), inner=bool(self.inner))
                if flags[0]:  # a tap returns its input unchanged: still provably >= 0
                    non_negative.add(eqn.outvars[0])
            if outs is None:
                rule_call = self._rule_call(eqn, stack, flags)
                if rule_call is not None:
                    outs = [rule_call.call_non_negative(invals)]
                else:
                    outs = _bind_list(eqn, invals)
            if len(eqn.outvars) == 1 and non_negative_result(eqn, flags):
                non_negative.add(eqn.outvars[0])
            env.update(zip(eqn.outvars, outs))
        return (
            [read(v) for v in jaxpr.outvars],
            [known_non_negative(v) for v in jaxpr.outvars],
            [not isinstance(v, Literal) and v in held_vars for v in jaxpr.outvars],
        )

    def _merge(self, eqn, invals, analysis, stack):
        """A concatenation (or update) of activations with constant arrays: the gradient, as one rule
        call that may keep relevance (what reaches the constants), so the conservation audit can
        account for it. ``None`` (plain evaluation) when no other operand is a floating constant array."""
        acts = [not isinstance(v, Literal) and v in analysis.info for v in eqn.invars]
        constants = [
            v
            for v, a in zip(eqn.invars, acts)
            if not a and not isinstance(v, Literal) and jnp.issubdtype(v.aval.dtype, jnp.floating)
        ]
        if not constants or not any(acts):
            return None
        positions = [k for k, a in enumerate(acts) if a]

        def merge(p, operands):
            vals = list(p)
            for k, a in zip(positions, operands):
                vals.insert(k, a)
            return _bind_list(eqn, vals)[0]

        others = tuple(v for k, v in enumerate(invals) if k not in positions)
        where = f"'{self._path(self._owner(stack), eqn.primitive.name)}' (structural, with constants)"
        operands = tuple(invals[k] for k in positions)
        return [apply_rule(_Route(), merge, others, operands, where, absorbs=True)]

    @staticmethod
    def _reaches_output(jaxpr: Any, analysis: Analysis, var: Any) -> bool:
        """Whether ``var`` reaches an output of ``jaxpr`` through structural equations only."""
        frontier = [var]
        seen = set()
        while frontier:
            v = frontier.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            for j in analysis.uses.get(v, []):
                if j < 0:
                    return True
                if jaxpr.eqns[j].primitive.name in STRUCTURAL:
                    frontier.extend(jaxpr.eqns[j].outvars)
        return False

    @staticmethod
    def _replay(jaxpr, analysis, chain, out, root, env):
        """``(fn, consts)``: ``fn(consts, a)`` re-evaluates the equations ``chain`` from ``root = a`` to
        ``out``; every other operand (a literal, a constant, a held statistic) is one of ``consts``."""
        produced = {id(v) for j in chain for v in jaxpr.eqns[j].outvars}
        consts: list[Any] = []
        slots: list[list[tuple[str, Any]]] = []
        for j in chain:
            e = jaxpr.eqns[j]
            held = analysis.eqns[j].held
            row = []
            for k, v in enumerate(e.invars):
                if not isinstance(v, Literal) and k not in held and (v is root or id(v) in produced):
                    row.append(("var", v))
                else:
                    value = v.val if isinstance(v, Literal) else env[v]
                    if k in held:
                        value = jax.lax.stop_gradient(value)
                    row.append(("const", len(consts)))
                    consts.append(value)
            slots.append(row)

        def fn(params, a):
            local = {id(root): a}
            for j, row in zip(chain, slots):
                e = jaxpr.eqns[j]
                vals = [local[id(ref)] if tag == "var" else params[ref] for tag, ref in row]
                for v, value in zip(e.outvars, _bind_list(e, vals)):
                    local[id(v)] = value
            return local[id(out)]

        return fn, tuple(consts)

    def _region_exit(self, jaxpr, analysis, members, index, env, stack):
        """Apply the rule of an element-wise region at one of its exits (``jaxpr.eqns[index]``)."""
        eqn = jaxpr.eqns[index]
        out = eqn.outvars[0]
        var = analysis.info[out]
        root = var.root
        # the equations the exit depends on, in order
        needed = {id(out)}
        chain = []
        for j in reversed(members):
            e = jaxpr.eqns[j]
            if id(e.outvars[0]) in needed:
                chain.append(j)
                for k, v in enumerate(e.invars):
                    if not isinstance(v, Literal) and v in analysis.info and k not in analysis.eqns[j].held:
                        needed.add(id(v))
        chain.reverse()
        if var.relu and len(chain) == 1:
            op_cls: type = ReLU
        elif not var.nonlinear:
            op_cls = Affine if var.shift else Scale
        else:
            op_cls = Activation
        region_fn, consts = self._replay(jaxpr, analysis, chain, out, root, env)

        def layer():
            return region_fn, consts, env[root]

        primitive = eqn.primitive.name if len(chain) == 1 else "elementwise"
        return self._apply_op(op_cls, eqn, stack, layer, primitive)

    def _op(self, jaxpr, index, cls, invals, stack, env, analysis, skip, held_vars):
        eqn = jaxpr.eqns[index]
        acts = [
            not isinstance(v, Literal) and v in analysis.info and k not in cls.held
            for k, v in enumerate(eqn.invars)
        ]
        op = cls.op
        held_positions = [k for k, a in enumerate(acts) if a and eqn.invars[k] in held_vars]
        if held_positions:  # an operand held constant (CP-LRP): the op is linear in the other one
            acts = [a and k not in held_positions for k, a in enumerate(acts)]
            invals = [jax.lax.stop_gradient(v) if k in held_positions else v for k, v in enumerate(invals)]
            op = _WITH_A_CONSTANT.get(op, op)
        follow = jaxpr.eqns[cls.fused] if cls.fused is not None else None
        out_shape = aval_shape(eqn.outvars[0])

        def layer():
            if op is Softmax:
                chain = [*cls.members, index]
                fn, consts = self._replay(jaxpr, analysis, chain, eqn.outvars[0], cls.root, env)
                return fn, consts, env[cls.root]
            if op is Add:  # the rule sees them stacked (_StackedOperands), the forward keeps both as they are
                dtype = eqn.outvars[0].aval.dtype
                operands = tuple(jnp.broadcast_to(jnp.asarray(v, dtype), out_shape) for v in invals)
                sign = -1.0 if eqn.primitive.name == "sub" else 1.0
                return (lambda p, s: s[0] + sign * s[1]), (), operands
            if op.operands > 1:
                positions = [k for k, a in enumerate(acts) if a]

                def several(p, operands):
                    vals = list(p)
                    for k, a in zip(positions, operands):
                        vals.insert(k, a)
                    return _bind_list(eqn, vals)[0]

                others = tuple(v for k, v in enumerate(invals) if k not in positions)
                return several, others, tuple(invals[k] for k in positions)
            position = acts.index(True)
            others = tuple(v for k, v in enumerate(invals) if k != position)

            def first(p, a):
                vals = list(p[0])
                vals.insert(position, a)
                return _bind_list(eqn, vals)[0]

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

        primitive = cls.name or eqn.primitive.name
        if op is not cls.op:
            primitive = eqn.primitive.name
        output = self._apply_op(op, eqn, stack, layer, primitive)
        if output is None:
            return None
        if follow is not None:
            skip.add(cls.fused)
            env[eqn.outvars[0]] = _bind_list(eqn, invals)[0]
            env[follow.outvars[0]] = output
            return [env[eqn.outvars[0]]]
        return [output]

    def _call(self, eqn, invals, stack, flags, analysis, env, held_vars):
        """Evaluate a call-like equation by interpreting its body (rebuilding scan/cond/checkpoint).

        Returns its outputs and which of them are held constant (only for calls entered directly and
        checkpoints; values held constant do not travel through ``scan`` carries or ``cond`` branches)."""
        name = eqn.primitive.name
        acts = [not isinstance(v, Literal) and v in analysis.info for v in eqn.invars]
        no_held = [False] * len(eqn.outvars)
        if name == "scan":
            return self._scan(eqn, invals, acts, stack), no_held
        if name == "cond":
            return self._cond(eqn, invals, acts, stack), no_held
        jaxpr, consts = call_body(eqn)
        arg_held = [not isinstance(v, Literal) and v in held_vars for v in eqn.invars]
        taint = self._taint(eqn, analysis)
        if name in ("remat2", "checkpoint"):
            out_held: list[list[bool]] = []

            def body(*args):
                self.inner += 1
                try:
                    outs, _, held = self.run(
                        jaxpr, consts, args, acts, stack, flags, taint, arg_held=arg_held
                    )
                finally:
                    self.inner -= 1
                out_held.append(held)
                return outs

            outs = jax.checkpoint(
                body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
            )(*invals)
            return list(outs), out_held[-1] if out_held else no_held
        if name in ("pjit", "jit"):  # inlined: its shardings become constraints, as XLA inlines it
            invals = _constrained(invals, eqn.params.get("in_shardings"))
        outs, _, held = self.run(jaxpr, consts, invals, acts, stack, flags, taint, arg_held=arg_held)
        if name in ("pjit", "jit"):
            outs = _constrained(outs, eqn.params.get("out_shardings"))
        return outs, held

    @staticmethod
    def _taint(eqn: Any, analysis: Analysis) -> list[bool]:
        return [not isinstance(v, Literal) and v in analysis.taint for v in eqn.invars]

    def _scan(self, eqn, invals, acts, stack):
        params = eqn.params
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        body = params["jaxpr"]
        body_acts, _ = scan_acts(eqn, acts, acts)
        consts, init, xs = (
            invals[:n_consts],
            invals[n_consts : n_consts + n_carry],
            invals[n_consts + n_carry :],
        )

        def step(carry, x):
            self.inner += 1
            try:
                outs, *_ = self.run(body.jaxpr, body.consts, [*consts, *carry, *x], body_acts, stack)
            finally:
                self.inner -= 1
            return list(outs[:n_carry]), list(outs[n_carry:])

        carry, ys = jax.lax.scan(
            step,
            list(init),
            list(xs),
            length=params["length"],
            reverse=params["reverse"],
            unroll=params["unroll"],
        )
        return [*carry, *ys]

    def _cond(self, eqn, invals, acts, stack):
        index, operands = invals[0], invals[1:]

        def branch_fn(branch):
            def fn(*ops):
                self.inner += 1
                try:
                    outs, *_ = self.run(branch.jaxpr, branch.consts, ops, acts[1:], stack)
                finally:
                    self.inner -= 1
                return outs

            return fn

        return list(jax.lax.switch(index, [branch_fn(b) for b in eqn.params["branches"]], *operands))


def run_with_op_rules(
    fn: Callable[..., Any],
    args: Sequence[Any],
    input_argnum: int,
    resolver: Any,
    records: list[Any],
    scopes: ModuleScopes,
    record_cls: type,
    notes: list[str] | None = None,
) -> Any:
    """Evaluate ``fn(*args)`` with every equation on the relevance path classified and ruled.

    Args:
        fn: the explained forward (module rules in place, module calls in :class:`ModuleScopes` scopes).
        args: its positional arguments (pytrees).
        input_argnum: which argument is the model input (the start of the relevance path); every
            floating leaf of it starts the path, integer leaves mark embedding lookups.
        resolver: the composite's per-trace resolver.
        records: the list the trace's layer records are appended to.
        scopes: the module scopes the front end filled while ``fn`` was traced.
        record_cls: the record class (:class:`jlrp.explain.LayerRecord`).
        notes: if given, receives notes for :func:`jlrp.audit` (e.g. a final softmax).

    Returns:
        ``fn(*args)``, whose VJP applies the rules.
    """
    rule_calls: list[RuleCall] = []
    with recording_rule_calls(rule_calls):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat_args, _ = jax.tree_util.tree_flatten(list(args))
    arg_acts, arg_taint = [], []
    probes = ACTIVE_PROBES.get()
    integer_leaves = []
    for k, arg in enumerate(args):
        for n, leaf in enumerate(jax.tree_util.tree_leaves(arg)):
            is_input = k == input_argnum
            is_float = jnp.issubdtype(jnp.result_type(leaf), jnp.floating)
            if is_input and not is_float:
                integer_leaves.append(n)
            arg_taint.append(is_input and (probes is None or is_float or n == probes.leaf))
            arg_acts.append(is_input and is_float)
    interpreter = _Interpreter(resolver, records, scopes, record_cls, rule_calls)
    clear_caches()
    try:
        flat_out, *_ = interpreter.run(
            closed.jaxpr, closed.consts, flat_args, arg_acts, "", arg_taint=arg_taint, top=True
        )
    finally:
        clear_caches()
    if integer_leaves and not interpreter.embeddings:
        path, leaf = jax.tree_util.tree_leaves_with_path(args[input_argnum])[integer_leaves[0]]
        where = "input" + jax.tree_util.keystr(path)
        raise integer_input_error(where, f"{jnp.result_type(leaf)} (it feeds no embedding lookup)")
    if notes is not None:
        for where in interpreter.final_softmax:
            notes.append(
                f"the model output passes through a softmax ({where}): LRP explains logits, not probabilities. "
                "Explain the model without its final softmax/log-softmax (return the logits)."
            )
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), flat_out)
