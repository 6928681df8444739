"""Re-evaluation of the explained forward's jaxpr with every equation on the relevance path classified.

Two sweeps per jaxpr (and per nested body): :func:`_analyse` classifies equations symbolically
(which values are activations, element-wise regions and their roots, statistics, which values
relevance can still reach), then :class:`_Interpreter` evaluates them, applying the composite's
rules to ops and region exits and rebuilding ``scan``/``cond``/``checkpoint`` around interpreted
bodies.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from ..core import RuleCall, apply_rule, context_value, recording_rule_calls
from ..errors import integer_input_error
from ._kinds import (
    Activation,
    Add,
    Affine,
    AvgPool,
    Contraction,
    Mean,
    ModuleScopes,
    ReduceSum,
    ReLU,
    Scale,
)
from ._prims import (
    CALLS,
    EW_ARITH,
    EW_LINEAR,
    EW_NONLINEAR,
    POWERS,
    REDUCTIONS,
    STRUCTURAL,
    WINNER_TAKES_ALL,
)

_KIND = {
    ReLU: "relu",
    Activation: "activation",
    Scale: "scale",
    Affine: "affine",
    Add: "add",
    ReduceSum: "sum",
    Mean: "mean",
    AvgPool: "avg_pool",
    Contraction: "contraction",
}
# ops whose plain gradient already is their LRP treatment: no rule needed
_GRADIENT_OK = (ReLU, Scale)
_RULE_SCOPE = re.compile(r"jlrp_r(\d+)")
_SCALES = {"mul", "div"}
_SOFTMAX_NOTE = (
    "a normalisation by a sum of exponentials; the transformer rules (AttnLRP/CP-LRP) will cover it"
)


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", np.float32), jnp.floating)


def _is_zero_literal(atom: Any) -> bool:
    return isinstance(atom, Literal) and getattr(atom.val, "shape", ()) == () and float(atom.val) == 0.0


def _shape(atom: Any) -> tuple[int, ...]:
    return tuple(getattr(atom.aval, "shape", ()))


# --------------------------------------------------------------------------------------------
# sub-jaxprs of call-like primitives


def _call_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    """``(jaxpr, consts)`` of a call-like equation that is evaluated by entering its body."""
    name = eqn.primitive.name
    if name in ("pjit", "jit", "closed_call", "core_call"):
        closed = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    elif name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        closed = eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr"))
    elif name in ("remat2", "checkpoint"):
        closed = eqn.params["jaxpr"]
    else:
        return None
    if hasattr(closed, "jaxpr"):
        return closed.jaxpr, closed.consts
    return closed, ()


_EW_CACHE: dict[int, tuple[Any, str | None]] = {}


def _elementwise_kind(jaxpr: Any) -> str | None:
    """``'relu'``, ``'linear'``, ``'select'`` or ``'nonlinear'`` if every equation of ``jaxpr`` is
    element-wise (one output of the inputs' shape), else ``None``."""
    key = id(jaxpr)
    if key in _EW_CACHE and _EW_CACHE[key][0] is jaxpr:
        return _EW_CACHE[key][1]
    kind: str | None = "linear"
    outs = [_shape(v) for v in jaxpr.outvars]
    if len(outs) != 1 or any(_shape(v) not in ((), outs[0]) for v in jaxpr.invars):
        kind = None
    else:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            body = _call_body(eqn)
            if body is not None and name not in ("remat2", "checkpoint"):
                inner = _elementwise_kind(body[0])
                if inner is None:
                    kind = None
                    break
                kind = "nonlinear" if "nonlinear" in (kind, inner) or inner == "relu" else kind
                continue
            if name == "select_n":
                kind = kind if kind == "nonlinear" else "select"
            elif name in ("broadcast_in_dim",) and all(_shape(v) == () for v in eqn.invars):
                pass
            elif name in EW_NONLINEAR:
                kind = "nonlinear"
            elif (
                name not in EW_LINEAR
                and name not in EW_ARITH
                and name not in ("gt", "lt", "ge", "le", "eq", "ne")
            ):
                kind = None
                break
        if kind is not None and len(jaxpr.eqns) == 1 and jaxpr.eqns[0].primitive.name == "max":
            if any(_is_zero_literal(a) for a in jaxpr.eqns[0].invars):
                kind = "relu"
        if kind is not None and len(jaxpr.eqns) == 1 and _call_body(jaxpr.eqns[0]) is not None:
            if _elementwise_kind(_call_body(jaxpr.eqns[0])[0]) == "relu":
                kind = "relu"
    _EW_CACHE[key] = (jaxpr, kind)
    return kind


# --------------------------------------------------------------------------------------------
# analysis


@dataclasses.dataclass
class _Stat:
    """A statistic of activations (computed through a reduction)."""

    powered: bool = False  # through sqrt/rsqrt/pow: a std or a norm
    linear: bool = True  # a linear function (a sum/mean) of an activation
    exp: bool = False  # a sum of exponentials (a softmax denominator)


@dataclasses.dataclass
class _Var:
    """What the analysis knows about an activation (a value on the relevance path)."""

    root: Any = None  # the root of the element-wise region that produced it
    nonlinear: bool = False
    shift: bool = False
    bias: bool = False  # shifted by a constant array (not a literal): a bias, absorbing relevance
    cut: bool = False  # the root of a new region for every element-wise use after it
    relu: bool = False
    exp: bool = False
    stat: _Stat | None = None


@dataclasses.dataclass
class _Eqn:
    """The class of one equation."""

    kind: str  # plain, region, op, call, rule, structural, wta, uncovered, embed, stat
    op: type | None = None
    fused: int | None = None
    held: tuple[int, ...] = ()  # operand positions held constant (normalisation)
    root: Any = None
    name: str = ""
    note: str = ""


@dataclasses.dataclass
class _Analysis:
    eqns: list[_Eqn]
    info: dict[Any, _Var]
    live: set[Any]
    exits: set[Any]
    out_acts: list[bool]
    uses: dict[Any, list[int]]
    taint: set[Any]


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


def _scan_acts(eqn: Any, in_acts: Sequence[bool], in_taint: Sequence[bool]) -> tuple[list[bool], list[bool]]:
    """Activation flags of a scan body's inputs, carries iterated to a fixed point."""
    body = eqn.params["jaxpr"].jaxpr
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    acts, taint = list(in_acts), list(in_taint)
    for _ in range(len(acts) + 1):
        out = _analyse(body, acts, taint)
        new = list(acts)
        for k in range(n_carry):
            new[n_consts + k] = acts[n_consts + k] or out.out_acts[k]
        if new == acts:
            break
        acts = new
    return acts, taint


_ANALYSES: dict[tuple[int, tuple[bool, ...], tuple[bool, ...]], tuple[Any, _Analysis]] = {}


def _analyse(jaxpr: Any, in_acts: Sequence[bool], in_taint: Sequence[bool] | None = None) -> _Analysis:
    """Classify the equations of ``jaxpr`` given which inputs are activations (and input-dependent)."""
    in_taint = list(in_acts) if in_taint is None else list(in_taint)
    key = (id(jaxpr), tuple(in_acts), tuple(in_taint))
    if key in _ANALYSES and _ANALYSES[key][0] is jaxpr:
        return _ANALYSES[key][1]
    info: dict[Any, _Var] = {v: _Var() for v, a in zip(jaxpr.invars, in_acts) if a}
    taint = {v for v, t in zip(jaxpr.invars, in_taint) if t} | set(info)
    uses = _consumers(jaxpr)
    eqns: list[_Eqn] = []
    fused_into: dict[int, int] = {}
    held_at: dict[int, tuple[int, ...]] = {}

    def is_act(v: Any) -> bool:
        return not isinstance(v, Literal) and v in info

    def root_of(v: Any) -> Any:
        return info[v].root if info[v].root is not None and not info[v].cut else v

    for i, eqn in enumerate(jaxpr.eqns):
        acts = [is_act(v) for v in eqn.invars]
        tainted = any(not isinstance(v, Literal) and v in taint for v in eqn.invars)
        if tainted:
            taint.update(eqn.outvars)
        if i in fused_into:
            eqns.append(_Eqn("fused"))
            source = next(info[v] for v in eqn.invars if is_act(v))
            info[eqn.outvars[0]] = _Var(stat=source.stat)
            continue
        if (
            not any(acts)
            and tainted
            and _call_body(eqn) is not None
            and any(_is_float(v.aval) for v in eqn.outvars)
        ):
            # a call on integer inputs only (a jitted jnp.take): an embedding lookup may be inside
            cls, out = _classify(jaxpr, i, eqn, acts, info, taint, uses, root_of, fused_into)
            eqns.append(cls)
            for v, o in zip(eqn.outvars, out):
                if o is not None and _is_float(v.aval):
                    info[v] = o
            continue
        if not any(acts):
            cls = _Eqn("plain")
            if (
                eqn.primitive.name in ("gather", "dynamic_slice")
                and tainted
                and _is_float(eqn.outvars[0].aval)
            ):
                cls = _Eqn("embed")  # a lookup of constants by input-dependent (integer) indices
                info[eqn.outvars[0]] = _Var()
            eqns.append(cls)
            continue
        cls, out = _classify(jaxpr, i, eqn, acts, info, taint, uses, root_of, fused_into)
        if cls.held:
            held_at[i] = cls.held
        _propagate_stat(eqn, [a and k not in cls.held for k, a in enumerate(acts)], info, out)
        eqns.append(cls)
        for v, o in zip(eqn.outvars, out):
            if o is not None and _is_float(v.aval):
                info[v] = o
    # liveness: which activations can still send relevance to an output
    live: set[Any] = {v for v in jaxpr.outvars if not isinstance(v, Literal) and v in info}
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if not any(v in live for v in eqn.outvars) or eqns[i].kind == "plain":
            continue
        held = held_at.get(i, ())
        for k, v in enumerate(eqn.invars):
            if k not in held and is_act(v):
                live.add(v)
    exits = set()
    for i, eqn in enumerate(jaxpr.eqns):
        if eqns[i].kind != "region":
            continue
        v = eqn.outvars[0]
        for j in uses.get(v, []):
            if j < 0 or eqns[j].kind != "region" or eqns[j].root is not eqns[i].root:
                exits.add(v)
    out_acts = [is_act(v) for v in jaxpr.outvars]
    result = _Analysis(eqns, info, live, exits, out_acts, uses, taint)
    _ANALYSES[key] = (jaxpr, result)
    return result


_LINEAR_IN_ONE = EW_LINEAR | STRUCTURAL | {"add", "sub", "add_any", "neg"}


def _propagate_stat(eqn: Any, acts: Sequence[bool], info: Mapping[Any, _Var], out: list[_Var | None]) -> None:
    """A function of statistics only is a statistic too (a variance, its rsqrt, a norm)."""
    name = eqn.primitive.name
    act_vars = [v for v, a in zip(eqn.invars, acts) if a]
    if name in REDUCTIONS or not act_vars or not out or out[0] is None or out[0].stat is not None:
        return
    stats = [info[v].stat for v in act_vars]
    if any(s is None for s in stats):
        return
    linear = (
        name in _LINEAR_IN_ONE
        or (name == "mul" and len(act_vars) == 1)
        or (name == "div" and acts[0] and len(act_vars) == 1)
    )
    out[0].stat = _Stat(
        powered=any(s.powered for s in stats) or name in POWERS or (name == "div" and not acts[0]),
        linear=all(s.linear for s in stats) and linear,
        exp=any(s.exp for s in stats),
    )


def _classify(jaxpr, i, eqn, acts, info, taint, uses, root_of, fused_into) -> tuple[_Eqn, list[_Var | None]]:
    """The class of an equation with activation operands, and what is known of its outputs."""
    name = eqn.primitive.name
    invars = eqn.invars
    out_vars = eqn.outvars
    n_out = len(out_vars)
    act_vars = [v for v, a in zip(invars, acts) if a]
    stats = [info[v].stat for v in act_vars]

    def fresh() -> list[_Var | None]:
        return [_Var() for _ in range(n_out)]

    # ---- call-like primitives
    body = _call_body(eqn)
    if name == "custom_vjp_call" and "jlrp_r" in str(eqn.source_info.name_stack):
        return _Eqn("rule"), fresh()
    if body is not None or name in CALLS:
        ew = _elementwise_kind(body[0]) if body is not None and name not in ("remat2", "checkpoint") else None
        if ew is not None and all(_shape(v) == _shape(out_vars[0]) for v in act_vars):
            info, root_of = _cut(eqn, acts, act_vars, info, root_of, ew, taint)
            if len({id(root_of(v)) for v in act_vars}) == 1:
                return _region(eqn, acts, info, taint, root_of, ew)
        if name == "scan":
            scan_acts, scan_taint = _scan_acts(
                eqn, acts, [not isinstance(v, Literal) and v in taint for v in invars]
            )
            inner = _analyse(eqn.params["jaxpr"].jaxpr, scan_acts, scan_taint)
            return _Eqn("call"), [_Var() if a else None for a in inner.out_acts]
        if name == "cond":
            branch_acts = acts[1:]
            out = [False] * n_out
            for branch in eqn.params["branches"]:
                inner = _analyse(branch.jaxpr, branch_acts)
                out = [a or b for a, b in zip(out, inner.out_acts)]
            return _Eqn("call"), [_Var() if a else None for a in out]
        if name == "while":
            return _Eqn("uncovered", name="while", note="a while loop on the relevance path"), fresh()
        if body is not None:
            inner = _analyse(body[0], acts, [not isinstance(v, Literal) and v in taint for v in invars])
            outs = [
                _Var(stat=inner.info[v].stat) if a and not isinstance(v, Literal) else (_Var() if a else None)
                for a, v in zip(inner.out_acts, body[0].outvars)
            ]
            return _Eqn("call"), outs
        return _Eqn("uncovered", name=name), fresh()

    if name == "stop_gradient":
        return _Eqn("plain"), [None]

    # ---- statistics held constant: x * rsqrt(var), x / norm
    held: tuple[int, ...] = ()
    if name in _SCALES and len(act_vars) == 2:
        powered = [s is not None and s.powered for s in stats]
        position = [k for k, a in enumerate(acts) if a]
        if powered[1] and stats[0] is None:
            held = (position[1],)
        elif powered[0] and stats[1] is None and name == "mul":
            held = (position[0],)
        if held:
            acts = [a and k not in held for k, a in enumerate(acts)]
            act_vars = [v for v, a in zip(invars, acts) if a]
            stats = [info[v].stat for v in act_vars]

    # ---- statistics of activations (reductions and what is computed from them)
    if name in REDUCTIONS and _is_float(out_vars[0].aval):
        source = info[act_vars[0]]
        stat = _Stat(
            powered=bool(source.stat and source.stat.powered),
            linear=name == "reduce_sum"
            and not source.nonlinear
            and (source.stat is None or source.stat.linear),
            exp=source.exp or bool(source.stat and source.stat.exp),
        )
        if name == "reduce_sum":
            fused = _fusable_scale(jaxpr, out_vars[0], uses, info)
            if fused is not None:
                fused_into[fused] = i
            cls = _Eqn("op", Mean if fused is not None else ReduceSum, fused=fused)
        else:
            cls = _Eqn("wta")
        return cls, [_Var(stat=stat)]

    # ---- element-wise regions
    ew_kind = _elementwise_prim(
        eqn, acts, taint, any(info[v].root is not None and not info[v].cut for v in act_vars)
    )
    if ew_kind is not None and all(_shape(v) == _shape(out_vars[0]) for v in act_vars):
        info, root_of = _cut(eqn, acts, act_vars, info, root_of, ew_kind, taint)
        roots = {id(root_of(v)) for v in act_vars}
        if len(roots) == 1:
            cls, out = _region(eqn, acts, info, taint, root_of, ew_kind)
            cls.held = held
            return cls, out

    # ---- structural
    if name in STRUCTURAL or (name == "select_n" and not any(a for a in acts[:1])):
        out = [_Var(stat=stats[0] if stats and all(s is not None for s in stats) else None)]
        if stats and stats[0] is not None and len(act_vars) == 1:
            out = [_Var(stat=stats[0])]
        return _Eqn("structural"), out + [None] * (n_out - 1)

    # ---- winner-takes-all
    if name in WINNER_TAKES_ALL or (name in ("max", "min") and len(act_vars) == 2):
        return _Eqn("wta"), fresh()

    # ---- linear mixing
    if name in ("add", "sub", "add_any"):
        if len(act_vars) == 2:
            if any(s is not None and not s.linear for s in stats) and not all(s is not None for s in stats):
                if any(s is not None and s.exp for s in stats):
                    return _Eqn("uncovered", name="log_softmax", note=_SOFTMAX_NOTE), fresh()
                note = "a sum with a non-linear statistic of activations"
                return _Eqn("uncovered", name=name, note=note), fresh()
            if all(s is not None for s in stats):
                return _Eqn("structural"), [_Var(stat=_Stat(all(s.linear for s in stats)))]
            return _Eqn("op", Add, name=name), fresh()
        return _Eqn("op", Affine), fresh()  # act of a smaller shape plus a constant
    if name in ("mul", "div") and len(act_vars) == 1 and (name == "mul" or acts[0]):
        return _Eqn("op", Affine, held=held, name=name), fresh()  # a scale that broadcasts: Norm
    if name in ("reduce_window_sum", "cumsum", "cumlogsumexp"):
        if name == "reduce_window_sum":
            fused = _fusable_scale(jaxpr, out_vars[0], uses, info)
            if fused is not None:
                fused_into[fused] = i
            return _Eqn("op", AvgPool, fused=fused), fresh()
        if name == "cumsum":
            return _Eqn("op", ReduceSum, name="cumsum"), fresh()
    if name in ("dot_general", "conv_general_dilated"):
        if len(act_vars) == 1:
            return _Eqn("op", Contraction, name=name), fresh()
        return _Eqn(
            "uncovered", name=name, note="a product of two activations (attention, bilinear)"
        ), fresh()

    # ---- multiplicative interactions of two activations
    if name in _SCALES:
        exp_stat = any(s is not None and s.exp for s in stats)
        if name == "div" and exp_stat:
            return _Eqn("uncovered", name="softmax", note=_SOFTMAX_NOTE), fresh()
        return _Eqn("uncovered", name=name, note="a product of two activations (gating)"), fresh()
    return _Eqn("uncovered", name=name), fresh()


def _cut(eqn, acts, act_vars, info, root_of, ew_kind, taint):
    """``(info, root_of)`` after cutting the region before ``eqn`` where it must be: a bias after a
    non-linearity, or a non-linearity after a bias, starts a new region rooted at the operand (a bias
    keeps its share of relevance; one Pass over both would skip it). The cut stays: every later
    element-wise use of that operand belongs to the new region."""
    bias = _adds_constant_array(eqn, acts, taint)
    if len(act_vars) == 1 and info[act_vars[0]].root is not None and not info[act_vars[0]].cut:
        source = info[act_vars[0]]
        if (bias and source.nonlinear) or (ew_kind in ("nonlinear", "relu") and source.bias):
            source.cut = True
    return info, root_of


def _adds_constant_array(eqn: Any, acts: Sequence[bool], taint: set[Any]) -> bool:
    """Whether ``eqn`` adds (or subtracts) a constant that is an array, not a literal (a bias).

    A value computed from the input but cut off from the gradient (softmax's
    ``x - stop_gradient(max(x))``) is no bias: it is part of the function (softmax is invariant to it).
    """
    if eqn.primitive.name not in ("add", "sub", "add_any") or sum(acts) != 1:
        return False
    other = next(v for v, a in zip(eqn.invars, acts) if not a)
    return not isinstance(other, Literal) and other not in taint


def _elementwise_prim(eqn: Any, acts: Sequence[bool], taint: set[Any], in_region: bool) -> str | None:
    """The element-wise kind of a primitive applied to its activation operands, or ``None``."""
    name = eqn.primitive.name
    n_acts = sum(acts)
    if name in ("convert_element_type", "copy", "copy_p", "reduce_precision"):
        return "linear" if in_region else None
    if name == "neg":
        return "scale"
    if name in ("add", "sub", "add_any"):
        if n_acts == 1:
            other = next(v for v, a in zip(eqn.invars, acts) if not a)
            # a shift by a value cut off from the input's gradient (softmax's max) is no constant
            return "linear" if not isinstance(other, Literal) and other in taint else "shift"
        return "linear"
    if name == "mul":
        return "scale" if n_acts == 1 else "nonlinear"
    if name == "div":
        return "scale" if acts[0] and n_acts == 1 else "nonlinear"
    if name == "select_n":
        predicate = eqn.invars[0]
        if not isinstance(predicate, Literal) and predicate in taint:
            return "nonlinear"
        return None
    if name in ("max", "min") and n_acts == 2:
        return None  # winner-takes-all between two activations
    if name == "max" and any(_is_zero_literal(a) for a in eqn.invars):
        return "relu"
    if name in EW_NONLINEAR:
        return "nonlinear"
    return None


def _region(eqn, acts, info, taint, root_of, kind) -> tuple[_Eqn, list[_Var | None]]:
    """Join (or start) the element-wise region of the equation's activation operand(s)."""
    act_vars = [v for v, a in zip(eqn.invars, acts) if a]
    if kind == "select":
        predicates = [
            v for v, a in zip(eqn.invars, acts) if not a and not isinstance(v, Literal) and v in taint
        ]
        kind = "nonlinear" if predicates else "linear"
    root = root_of(act_vars[0])
    sources = [info[v] for v in act_vars if not info[v].cut]  # a cut operand is the new region's root
    in_region = any(s.root is not None and not s.cut for s in sources)
    out = _Var(
        root=root,
        nonlinear=any(s.nonlinear for s in sources) or kind in ("nonlinear", "relu"),
        shift=any(s.shift for s in sources) or kind == "shift",
        bias=any(s.bias for s in sources) or _adds_constant_array(eqn, acts, taint),
        relu=kind == "relu" and not in_region,
        exp=any(s.exp for s in sources) or eqn.primitive.name == "exp",
    )
    return _Eqn("region", root=root), [out] + [None] * (len(eqn.outvars) - 1)


def _fusable_scale(
    jaxpr: Any, var: Any, uses: Mapping[Any, list[int]], info: Mapping[Any, _Var]
) -> int | None:
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
    if isinstance(other, Literal) or (other not in info and _shape(other) == ()):
        return j
    return None


# --------------------------------------------------------------------------------------------
# signs (non-negativity proofs, for the sign-specialised rules)


def _is_relu_jaxpr(jaxpr: Any) -> bool:
    return _elementwise_kind(jaxpr) == "relu"


_KEEPS_SIGN = frozenset(
    {
        "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
        "rev", "copy", "copy_p", "convert_element_type", "reduce_max", "reduce_min", "reduce_sum",
        "reduce_window_sum", "reduce_precision", "sqrt", "stop_gradient", "cumsum", "cummax",
    }
)  # fmt: skip
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
    """Whether ``eqn``'s result is provably ``>= 0`` given which operands are (a sound, partial test)."""
    name = eqn.primitive.name
    if name == "max":
        return any(flags)
    if name in ("custom_jvp_call", "pjit", "jit"):
        body = _call_body(eqn)
        return body is not None and _is_relu_jaxpr(body[0])
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
    if isinstance(params, tuple):
        subfuns, params = params
        return eqn.primitive.bind(*subfuns, *invals, **params)
    return eqn.primitive.bind(*invals, **params)


def _bind_list(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    out = _bind(eqn, invals)
    return list(out) if eqn.primitive.multiple_results else [out]


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
# embedding probes: relevance at the output of lookups by integer inputs


@dataclasses.dataclass
class EmbeddingProbes:
    """Zero arrays added to the output of every embedding lookup (a gather from a constant table by
    indices that come from an integer input leaf), so that their cotangent is the relevance there.

    Attributes:
        leaf: the index of the integer leaf (among the input's leaves) whose lookups are probed.
        values: the probes to add, in lookup order; ``None`` only records the lookups' shapes.
        found: ``(shape, dtype)`` of every lookup, in order (filled while tracing).
    """

    leaf: int
    values: Sequence[Any] | None = None
    found: list[tuple[tuple[int, ...], Any]] = dataclasses.field(default_factory=list)


_PROBES: contextvars.ContextVar[EmbeddingProbes | None] = contextvars.ContextVar("jlrp_probes", default=None)


@contextlib.contextmanager
def probing_embeddings(probes: EmbeddingProbes) -> Iterator[EmbeddingProbes]:
    """While active, explained forwards add ``probes.values`` at the embedding lookups of ``probes.leaf``."""
    with context_value(_PROBES, probes):
        yield probes


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
        fields = {f.name for f in dataclasses.fields(self.record_cls)}
        extra = {"source": source} if "source" in fields else {}
        self.records.append(self.record_cls(path, kind, rule, needs_rule, note, **extra))

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
        kind = _KIND[op_cls] if op_cls is not Add else ("sub" if primitive == "sub" else "add")
        path = self._path(owner_path, kind)
        rule = self.resolver.rule_for(path, op_cls(primitive, path))
        self._record(path, op_cls.__name__, rule, not issubclass(op_cls, _GRADIENT_OK), source=_source(eqn))
        if rule is None:
            return None
        layer_fn, params, x = layer()
        return apply_rule(
            rule, layer_fn, params, x, f"'{path}' ({op_cls.__name__})", absorbs=op_cls is Affine
        )

    def run(self, jaxpr, consts, args, arg_acts, prefix, arg_non_negative=None, arg_taint=None, top=False):
        """Evaluate ``jaxpr``; return its outputs and which of them are provably ``>= 0``."""
        analysis = _analyse(jaxpr, list(arg_acts), None if arg_taint is None else list(arg_taint))
        env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))
        non_negative = {v for v, n in zip(jaxpr.invars, arg_non_negative or ()) if n}
        region_eqns: dict[int, list[int]] = {}

        def read(v):
            return v.val if isinstance(v, Literal) else env[v]

        def known_non_negative(v):
            return _literal_non_negative(v) if isinstance(v, Literal) else v in non_negative

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
            elif cls.kind == "op" and live:
                outs = self._op(jaxpr, eqn, cls, invals, stack, env, analysis, skip)
            elif cls.kind == "embed":
                outs = _bind_list(eqn, invals)
                self.embeddings += 1
                probes = _PROBES.get()
                if probes is not None:
                    k = len(probes.found)
                    probes.found.append((tuple(jnp.shape(outs[0])), jnp.result_type(outs[0])))
                    if probes.values is not None:
                        outs = [outs[0] + probes.values[k]] + outs[1:]
            elif cls.kind == "call":
                outs = self._call(eqn, invals, stack, flags, analysis, env)
            elif cls.kind == "uncovered" and live:
                self._record(
                    self._path(self._owner(stack), cls.name or eqn.primitive.name),
                    cls.name or eqn.primitive.name, None, True, cls.note, _source(eqn),
                )  # fmt: skip
                final = cls.name in ("softmax", "log_softmax") and top
                if final and self._reaches_output(jaxpr, analysis, eqn.outvars[0]):
                    self.final_softmax.append(_source(eqn) or "the model output")
            if outs is None:
                rule_call = self._rule_call(eqn, stack, flags)
                if rule_call is not None:
                    outs = [rule_call.call_non_negative(invals)]
                else:
                    outs = _bind_list(eqn, invals)
            if len(eqn.outvars) == 1 and _non_negative_result(eqn, flags):
                non_negative.add(eqn.outvars[0])
            env.update(zip(eqn.outvars, outs))
        return [read(v) for v in jaxpr.outvars], [known_non_negative(v) for v in jaxpr.outvars]

    @staticmethod
    def _reaches_output(jaxpr: Any, analysis: _Analysis, var: Any) -> bool:
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
                for v, held in zip(e.invars, range(len(e.invars))):
                    if (
                        not isinstance(v, Literal)
                        and v in analysis.info
                        and held not in analysis.eqns[j].held
                    ):
                        needed.add(id(v))
        chain.reverse()
        if var.relu and len(chain) == 1:
            op_cls: type = ReLU
        elif not var.nonlinear:
            op_cls = Affine if var.shift else Scale
        else:
            op_cls = Activation
        consts: list[Any] = []
        slots: list[list[Any]] = []
        for j in chain:
            e = jaxpr.eqns[j]
            row = []
            for k, v in enumerate(e.invars):
                inside = (
                    not isinstance(v, Literal)
                    and v in analysis.info
                    and k not in analysis.eqns[j].held
                    and (v is root or (analysis.info[v].root is root and v is not root))
                )
                if inside:
                    row.append(("var", v))
                else:
                    value = v.val if isinstance(v, Literal) else env[v]
                    if k in analysis.eqns[j].held:
                        value = jax.lax.stop_gradient(value)
                    row.append(("const", len(consts)))
                    consts.append(value)
            slots.append(row)

        def region_fn(params, a):
            local = {id(root): a}
            for j, row in zip(chain, slots):
                e = jaxpr.eqns[j]
                vals = [local[id(ref)] if tag == "var" else params[ref] for tag, ref in row]
                for v, value in zip(e.outvars, _bind_list(e, vals)):
                    local[id(v)] = value
            return local[id(out)]

        def layer():
            return region_fn, tuple(consts), env[root]

        primitive = eqn.primitive.name if len(chain) == 1 else "elementwise"
        return self._apply_op(op_cls, eqn, stack, layer, primitive)

    def _op(self, jaxpr, eqn, cls, invals, stack, env, analysis, skip):
        acts = [
            not isinstance(v, Literal) and v in analysis.info and k not in cls.held
            for k, v in enumerate(eqn.invars)
        ]
        follow = jaxpr.eqns[cls.fused] if cls.fused is not None else None
        out_shape = _shape(eqn.outvars[0])

        def layer():
            if cls.op is Add:
                dtype = eqn.outvars[0].aval.dtype
                stacked = jnp.stack([jnp.broadcast_to(jnp.asarray(v, dtype), out_shape) for v in invals])
                sign = -1.0 if eqn.primitive.name == "sub" else 1.0
                return (lambda p, s: s[0] + sign * s[1]), (), stacked
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

        if cls.op is Add and sum(acts) != 2:
            return None
        output = self._apply_op(cls.op, eqn, stack, layer, cls.name or eqn.primitive.name)
        if output is None:
            return None
        if follow is not None:
            skip.add(cls.fused)
            env[eqn.outvars[0]] = _bind_list(eqn, invals)[0]
            env[follow.outvars[0]] = output
            return [env[eqn.outvars[0]]]
        return [output]

    def _call(self, eqn, invals, stack, flags, analysis, env):
        """Evaluate a call-like equation by interpreting its body (rebuilding scan/cond/checkpoint)."""
        name = eqn.primitive.name
        acts = [not isinstance(v, Literal) and v in analysis.info for v in eqn.invars]
        if name == "scan":
            return self._scan(eqn, invals, acts, stack)
        if name == "cond":
            return self._cond(eqn, invals, acts, stack)
        jaxpr, consts = _call_body(eqn)
        if name in ("remat2", "checkpoint"):
            box: list[Any] = []

            def body(*args):
                outs, out_flags = self.run(
                    jaxpr, consts, args, acts, stack, flags, self._taint(eqn, analysis)
                )
                box.append(out_flags)
                return outs

            outs = jax.checkpoint(
                body, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
            )(*invals)
            return list(outs)
        outs, _ = self.run(jaxpr, consts, invals, acts, stack, flags, self._taint(eqn, analysis))
        return outs

    @staticmethod
    def _taint(eqn: Any, analysis: _Analysis) -> list[bool]:
        return [not isinstance(v, Literal) and v in analysis.taint for v in eqn.invars]

    def _scan(self, eqn, invals, acts, stack):
        params = eqn.params
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        body = params["jaxpr"]
        body_acts, _ = _scan_acts(eqn, acts, acts)
        consts, init, xs = (
            invals[:n_consts],
            invals[n_consts : n_consts + n_carry],
            invals[n_consts + n_carry :],
        )

        def step(carry, x):
            outs, _ = self.run(body.jaxpr, body.consts, [*consts, *carry, *x], body_acts, stack)
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
                outs, _ = self.run(branch.jaxpr, branch.consts, ops, acts[1:], stack)
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
    probes = _PROBES.get()
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
    _ANALYSES.clear()
    _EW_CACHE.clear()
    try:
        flat_out, _ = interpreter.run(
            closed.jaxpr, closed.consts, flat_args, arg_acts, "", arg_taint=arg_taint, top=True
        )
    finally:
        _ANALYSES.clear()
        _EW_CACHE.clear()
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
