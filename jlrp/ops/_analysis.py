"""The symbolic sweep over a jaxpr: which values are activations, their element-wise regions and
roots, statistics (held constant where they normalise), liveness, and the class of every equation.

:func:`analyse` is pure: it reads avals and parameters only, so the interpreter
(:mod:`jlrp.ops._interpreter`) can ask it about nested bodies before evaluating them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from ._kinds import Add, Affine, AvgPool, Contraction, MatMul, Mean, Multiply, ReduceSum, Softmax
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

_SCALES = {"mul", "div"}
_LOG_SOFTMAX_NOTE = "a log-softmax (log of a normalisation by a sum of exponentials); explain the logits"
_SOFTMAX_TANGLED = "a softmax whose intermediate values (exp, sum) are also used elsewhere"


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(getattr(aval, "dtype", np.float32), jnp.floating)


def _is_zero_literal(atom: Any) -> bool:
    return isinstance(atom, Literal) and getattr(atom.val, "shape", ()) == () and float(atom.val) == 0.0


def aval_shape(atom: Any) -> tuple[int, ...]:
    return tuple(getattr(atom.aval, "shape", ()))


# --------------------------------------------------------------------------------------------
# sub-jaxprs of call-like primitives


def call_body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
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


def elementwise_kind(jaxpr: Any) -> str | None:
    """``'relu'``, ``'linear'``, ``'select'`` or ``'nonlinear'`` if every equation of ``jaxpr`` is
    element-wise (one output of the inputs' shape), else ``None``."""
    key = id(jaxpr)
    if key in _EW_CACHE and _EW_CACHE[key][0] is jaxpr:
        return _EW_CACHE[key][1]
    kind: str | None = "linear"
    outs = [aval_shape(v) for v in jaxpr.outvars]
    if len(outs) != 1 or any(aval_shape(v) not in ((), outs[0]) for v in jaxpr.invars):
        kind = None
    else:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            body = call_body(eqn)
            if body is not None and name not in ("remat2", "checkpoint"):
                inner = elementwise_kind(body[0])
                if inner is None:
                    kind = None
                    break
                kind = "nonlinear" if "nonlinear" in (kind, inner) or inner == "relu" else kind
                continue
            if name == "select_n":
                kind = kind if kind == "nonlinear" else "select"
            elif name in ("broadcast_in_dim",) and all(aval_shape(v) == () for v in eqn.invars):
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
        if kind is not None and len(jaxpr.eqns) == 1 and call_body(jaxpr.eqns[0]) is not None:
            if elementwise_kind(call_body(jaxpr.eqns[0])[0]) == "relu":
                kind = "relu"
    _EW_CACHE[key] = (jaxpr, kind)
    return kind


# --------------------------------------------------------------------------------------------
# analysis


@dataclasses.dataclass
class _Stat:
    """A statistic of activations (computed through a reduction).

    Statistics are relative: ``depth`` counts the reductions between a value and the last fresh
    activation (a layer output) it comes from, so ``x - mean(x)`` and ``(x - mean(x)) * rsqrt(var(x))``
    are recognised whether ``x`` is a conv map or itself a pooled feature (a ConvNeXt/ViT head).
    """

    powered: bool = False  # through sqrt/rsqrt/pow: a std or a norm
    linear: bool = True  # a linear function (a sum/mean) of an activation
    exp: bool = False  # a sum of exponentials (a softmax denominator)
    depth: int = 1


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

    kind: str  # plain, region, op, call, rule, structural, wta, uncovered, embed, fused, member
    op: type | None = None
    fused: int | None = None
    held: tuple[int, ...] = ()  # operand positions held constant (normalisation)
    root: Any = None  # a region's root; a softmax's input
    members: tuple[int, ...] = ()  # the equations of a softmax unit before its division
    name: str = ""
    note: str = ""


@dataclasses.dataclass
class Analysis:
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


def scan_acts(eqn: Any, in_acts: Sequence[bool], in_taint: Sequence[bool]) -> tuple[list[bool], list[bool]]:
    """Activation flags of a scan body's inputs, carries iterated to a fixed point."""
    body = eqn.params["jaxpr"].jaxpr
    n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
    acts, taint = list(in_acts), list(in_taint)
    for _ in range(len(acts) + 1):
        out = analyse(body, acts, taint)
        new = list(acts)
        for k in range(n_carry):
            new[n_consts + k] = acts[n_consts + k] or out.out_acts[k]
        if new == acts:
            break
        acts = new
    return acts, taint


_ANALYSES: dict[tuple[int, tuple[bool, ...], tuple[bool, ...]], tuple[Any, Analysis]] = {}


def analyse(jaxpr: Any, in_acts: Sequence[bool], in_taint: Sequence[bool] | None = None) -> Analysis:
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
            and call_body(eqn) is not None
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
    for i, cls in enumerate(eqns):
        if cls.op is Softmax:
            eqns[i] = _softmax_unit(jaxpr, i, info, taint, uses, eqns, live)
    exits = set()
    for i, eqn in enumerate(jaxpr.eqns):
        if eqns[i].kind != "region":
            continue
        v = eqn.outvars[0]
        for j in uses.get(v, []):
            if j < 0 or eqns[j].kind != "region" or eqns[j].root is not eqns[i].root:
                exits.add(v)
    out_acts = [is_act(v) for v in jaxpr.outvars]
    result = Analysis(eqns, info, live, exits, out_acts, uses, taint)
    _ANALYSES[key] = (jaxpr, result)
    return result


_LINEAR_IN_ONE = EW_LINEAR | STRUCTURAL | {"add", "sub", "add_any", "neg"}


def depth_of(info: Mapping[Any, _Var], v: Any) -> int:
    """How many reductions separate ``v`` from the last fresh activation (0: not a statistic)."""
    stat = info[v].stat
    return 0 if stat is None else stat.depth


_PROPAGATES = EW_LINEAR | EW_NONLINEAR | EW_ARITH | STRUCTURAL | {"select_n"}


def _propagate_stat(eqn: Any, acts: Sequence[bool], info: Mapping[Any, _Var], out: list[_Var | None]) -> None:
    """The statistic an element-wise or structural equation makes of statistics (a variance, its
    rsqrt, a norm). Its depth is that of the operands with the output's shape (``x - mean(x)`` is
    as deep as ``x``), or of the deepest one when all are broadcast."""
    name = eqn.primitive.name
    act_vars = [v for v, a in zip(eqn.invars, acts) if a]
    if name not in _PROPAGATES or not act_vars or not out or out[0] is None or out[0].stat is not None:
        return
    full = [v for v in act_vars if aval_shape(v) == aval_shape(eqn.outvars[0])]
    depth = min(depth_of(info, v) for v in full) if full else max(depth_of(info, v) for v in act_vars)
    if depth == 0:
        return
    stats = [info[v].stat for v in act_vars if depth_of(info, v) >= depth]
    linear = (
        name in _LINEAR_IN_ONE
        or (name == "mul" and len(act_vars) == 1)
        or (name == "div" and acts[0] and len(act_vars) == 1)
    )
    out[0].stat = _Stat(
        powered=any(s.powered for s in stats) or name in POWERS or (name == "div" and not acts[0]),
        linear=all(s.linear for s in stats) and linear,
        exp=any(s.exp for s in stats),
        depth=depth,
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
    body = call_body(eqn)
    if name == "custom_vjp_call" and "jlrp_r" in str(eqn.source_info.name_stack):
        return _Eqn("rule"), fresh()
    if body is not None or name in CALLS:
        ew = elementwise_kind(body[0]) if body is not None and name not in ("remat2", "checkpoint") else None
        if ew is not None and all(aval_shape(v) == aval_shape(out_vars[0]) for v in act_vars):
            info, root_of = _cut(eqn, acts, act_vars, info, root_of, ew, taint)
            if len({id(root_of(v)) for v in act_vars}) == 1:
                return _region(eqn, acts, info, taint, root_of, ew)
        if name == "scan":
            body_acts, body_taint = scan_acts(
                eqn, acts, [not isinstance(v, Literal) and v in taint for v in invars]
            )
            inner = analyse(eqn.params["jaxpr"].jaxpr, body_acts, body_taint)
            return _Eqn("call"), [_Var() if a else None for a in inner.out_acts]
        if name == "cond":
            branch_acts = acts[1:]
            out = [False] * n_out
            for branch in eqn.params["branches"]:
                inner = analyse(branch.jaxpr, branch_acts)
                out = [a or b for a, b in zip(out, inner.out_acts)]
            return _Eqn("call"), [_Var() if a else None for a in out]
        if name == "while":
            return _Eqn("uncovered", name="while", note="a while loop on the relevance path"), fresh()
        if body is not None:
            inner = analyse(body[0], acts, [not isinstance(v, Literal) and v in taint for v in invars])
            offset = max((depth_of(info, v) for v in act_vars), default=0)

            def shifted(v: Any) -> _Stat | None:
                stat = None if isinstance(v, Literal) else inner.info[v].stat
                return None if stat is None else dataclasses.replace(stat, depth=stat.depth + offset)

            outs = [_Var(stat=shifted(v)) if a else None for a, v in zip(inner.out_acts, body[0].outvars)]
            return _Eqn("call"), outs
        return _Eqn("uncovered", name=name), fresh()

    if name == "stop_gradient":
        return _Eqn("plain"), [None]

    # ---- statistics held constant: x * rsqrt(var), x / norm
    held: tuple[int, ...] = ()
    if name in _SCALES and len(act_vars) == 2:
        powered = [s is not None and s.powered for s in stats]
        depths = [depth_of(info, v) for v in act_vars]
        position = [k for k, a in enumerate(acts) if a]
        if powered[1] and depths[1] > depths[0]:
            held = (position[1],)
        elif powered[0] and depths[0] > depths[1] and name == "mul":
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
            depth=depth_of(info, act_vars[0]) + 1,
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
    if ew_kind is not None and all(aval_shape(v) == aval_shape(out_vars[0]) for v in act_vars):
        info, root_of = _cut(eqn, acts, act_vars, info, root_of, ew_kind, taint)
        roots = {id(root_of(v)) for v in act_vars}
        if len(roots) == 1:
            cls, out = _region(eqn, acts, info, taint, root_of, ew_kind)
            cls.held = held
            return cls, out

    # ---- structural
    if name in STRUCTURAL or (name == "select_n" and not any(a for a in acts[:1])):
        # every piece of a split is an activation; statistics: _propagate_stat
        return _Eqn("structural"), fresh()

    # ---- winner-takes-all
    if name in WINNER_TAKES_ALL or (name in ("max", "min") and len(act_vars) == 2):
        return _Eqn("wta"), fresh()

    # ---- linear mixing
    if name in ("add", "sub", "add_any"):
        if len(act_vars) == 2:
            depths = [depth_of(info, v) for v in act_vars]
            if depths[0] != depths[1]:  # an activation and a statistic of it
                deeper = stats[depths.index(max(depths))]
                if deeper.exp and not deeper.linear:
                    return _Eqn("uncovered", name="log_softmax", note=_LOG_SOFTMAX_NOTE), fresh()
                if not deeper.linear:
                    note = "a sum with a non-linear statistic of activations"
                    return _Eqn("uncovered", name=name, note=note), fresh()
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
        if name == "dot_general":
            return _Eqn("op", MatMul, name=name), fresh()
        return _Eqn("uncovered", name=name, note="a convolution of two activations"), fresh()

    # ---- multiplicative interactions of two activations
    if name in _SCALES:
        exp_stat = len(act_vars) == 2 and stats[1] is not None and stats[1].exp
        numerator = info[act_vars[0]]
        if (
            name == "div"
            and exp_stat
            and numerator.exp
            and depth_of(info, act_vars[1]) > depth_of(info, act_vars[0])
        ):
            return _Eqn("op", Softmax, name="softmax"), fresh()
        if name == "mul":
            return _Eqn("op", Multiply, name=name), fresh()
        return _Eqn("uncovered", name=name, note="a quotient of two activations"), fresh()
    return _Eqn("uncovered", name=name), fresh()


def _softmax_unit(jaxpr, index, info, taint, uses, eqns, live) -> _Eqn:
    """The softmax ``exp(x - c) / sum(exp(x - c))`` ending at ``jaxpr.eqns[index]`` as one unit.

    Its input ``x`` is the root of the numerator's element-wise region; its members are the equations
    between ``x`` and the division (shift, exp, sum, broadcasts, masks). The unit is only clean if no
    member's value is used outside it by an equation that can still pass relevance on; otherwise the
    softmax stays uncovered.
    """
    eqn = jaxpr.eqns[index]
    numerator = eqn.invars[0]
    root = info[numerator].root if info[numerator].root is not None else numerator
    producers = {v: j for j, e in enumerate(jaxpr.eqns[:index]) for v in e.outvars}
    while root in producers:
        # softmax is shift invariant: a shift by a value cut off from the gradient (the row maximum)
        # belongs to the unit, whose input (the Taylor point of its rule) is the unshifted logits
        e = jaxpr.eqns[producers[root]]
        acts = [not isinstance(v, Literal) and v in info for v in e.invars]
        if e.primitive.name not in ("sub", "add") or sum(acts) != 1 or not acts[0]:
            break
        shift = e.invars[1]
        if isinstance(shift, Literal) or shift not in taint:
            break
        root = e.invars[0]
    needed = {v for v in eqn.invars if not isinstance(v, Literal) and v in info}
    members: list[int] = []
    for j in range(index - 1, -1, -1):
        e = jaxpr.eqns[j]
        if not any(v in needed for v in e.outvars):
            continue
        members.append(j)
        for k, v in enumerate(e.invars):
            if not isinstance(v, Literal) and v in info and k not in eqns[j].held and v is not root:
                needed.add(v)
    produced = {v for j in members for v in jaxpr.eqns[j].outvars}
    inside = set(members) | {index}
    clean = needed <= produced and all(
        j in inside or (j >= 0 and not any(w in live for w in jaxpr.eqns[j].outvars))
        for v in produced
        for j in uses.get(v, [])
    )
    if not clean:
        return _Eqn("uncovered", name="softmax", note=_SOFTMAX_TANGLED)
    for j in members:
        eqns[j] = _Eqn("member")
    return _Eqn("op", Softmax, name="softmax", root=root, members=tuple(sorted(members)))


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
    if isinstance(other, Literal) or (other not in info and aval_shape(other) == ()):
        return j
    return None


def clear_caches() -> None:
    """Forget the analyses of earlier traces (their jaxprs may be gone and their ids reused)."""
    _ANALYSES.clear()
    _EW_CACHE.clear()
