"""Recognise linear layers by what their call computes, and find the kernel they actually apply.

Two kinds of module defeat a class-based layer map:

- a third-party layer that is not a Flax ``Conv``/``Dense`` subclass but owns a ``kernel`` (and
  maybe a ``bias``) and computes ``conv(x, kernel) + bias`` (efficientnet-jax's ``Conv2d``, wrappers
  that pad 'SAME' by hand): no type key matches it;
- a layer that transforms its weights before use (a weight-standardised ``StdConv(nn.Conv)``,
  weight norm, spectral norm): rules that modify the *stored* kernel are transformed again by the
  module, so ZPlus/Flat/Gamma act on the wrong weights.

:func:`analyse` traces a module's pure apply once, abstractly (``jax.make_jaxpr``: no computation),
inlines ``jit``/``remat``/``custom_jvp`` bodies and accepts the call only if the path from the input
to the output is

    structural ops (reshape, transpose, broadcast, slice, zero padding, dtype casts)
    -> exactly one ``conv_general_dilated`` or ``dot_general`` of the input with a weight
    -> structural ops, at most one ``add`` of a weight (the bias), structural ops

where the weight operands may be any function of the parameters (and other state), never of the
input. The result, a :class:`LinearCall`, says whether it is a convolution or a dense layer
(:attr:`LinearCall.like`, for the composite's type keys), and, when the contraction's weight is
computed rather than stored (:attr:`LinearCall.effective`), gives the *effective* parameters
``{'kernel': K_eff, 'bias': b_eff}`` and a layer function that replays the traced program with them
substituted: rules then act on the kernel the layer applies (Flat, ZPlus, Gamma on ``K_eff``).

Limits: only modules that own ``kernel`` (+ ``bias``) parameters and no sub-modules are analysed;
anything else on the input path (an activation, a second contraction, a product of the input with
itself, a data-dependent normalisation of the input) rejects the module, which then keeps the
behaviour of its class. The analysis costs one abstract trace of the layer per explained trace.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.extend.core import Literal

from .. import types as _types
from ..core import context_value, split_arrays

__all__ = ["LinearCall", "analyse", "analysing", "is_plain_flax_linear"]

#: set while :func:`analyse` traces a module: front-end hooks let every call pass straight through
_ANALYSING: contextvars.ContextVar[bool] = contextvars.ContextVar("jlrp_analysing", default=False)

#: primitives that only move, copy or cast values (the gradient routes relevance exactly)
_STRUCTURAL = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "slice",
        "rev",
        "copy",
        "copy_p",
        "pad",
    }
)
#: primitives whose bodies are inlined before the analysis (forward semantics only)
_INLINE = frozenset(
    {"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call"}
)
_CONTRACTIONS = frozenset({"conv_general_dilated", "dot_general"})


def analysing() -> bool:
    """Whether :func:`analyse` is tracing a module (front-end hooks then pass calls through)."""
    return _ANALYSING.get()


def is_plain_flax_linear(module: Any) -> bool:
    """Whether the module is exactly a Flax linear class (not a subclass): no analysis needed."""
    cls = vars(type(module)).get("_jlrp_original_class", type(module))
    return cls in _types.Linear


# --------------------------------------------------------------------------------------------
# a flat program: the traced jaxpr with jit/remat/custom_jvp bodies inlined


class _Var:
    """A value of the flat program (compared by identity); ``shape`` is its static shape."""

    __slots__ = ("shape",)

    def __init__(self, shape: Sequence[int] = ()) -> None:
        self.shape = tuple(int(d) for d in shape)


@dataclasses.dataclass(frozen=True, eq=False)
class _Const:
    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class _Eqn:
    primitive: Any
    params: Mapping[str, Any]
    ins: tuple[Any, ...]  # _Var | _Const
    outs: tuple[_Var, ...]

    @property
    def name(self) -> str:
        return self.primitive.name


def _body(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    if eqn.primitive.name not in _INLINE:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr, consts
    return None


def _flatten(jaxpr: Any, consts: Sequence[Any], ins: Sequence[Any], out: list[_Eqn]) -> list[Any]:
    env: dict[Any, Any] = {v: _Const(c) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, ins))

    def read(atom: Any) -> Any:
        return _Const(atom.val) if isinstance(atom, Literal) else env[atom]

    for eqn in jaxpr.eqns:
        args = [read(a) for a in eqn.invars]
        body = _body(eqn)
        if body is not None:
            results = _flatten(body[0], body[1], args, out)
        else:
            results = [_Var(getattr(v.aval, "shape", ())) for v in eqn.outvars]
            out.append(_Eqn(eqn.primitive, dict(eqn.params), tuple(args), tuple(results)))
        for var, value in zip(eqn.outvars, results):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _evaluate(eqns: Sequence[_Eqn], env: dict[Any, Any], wanted: Sequence[Any]) -> list[Any]:
    """Evaluate only the equations ``wanted`` needs, given the values in ``env``."""
    producer = {id(o): e for e in eqns for o in e.outs}
    needed: set[int] = set()
    stack = [w for w in wanted if isinstance(w, _Var)]
    while stack:
        var = stack.pop()
        if var in env or id(var) in needed:
            continue
        needed.add(id(var))
        eqn = producer[id(var)]
        stack.extend(a for a in eqn.ins if isinstance(a, _Var))
    for eqn in eqns:
        if not any(id(o) in needed for o in eqn.outs):
            continue
        args = [a.value if isinstance(a, _Const) else env[a] for a in eqn.ins]
        results = eqn.primitive.bind(*args, **eqn.params)
        if not eqn.primitive.multiple_results:
            results = [results]
        env.update(zip(eqn.outs, results))
    return [w.value if isinstance(w, _Const) else env[w] for w in wanted]


# --------------------------------------------------------------------------------------------
# the analysis


@dataclasses.dataclass(frozen=True, eq=False)
class LinearCall:
    """A module call that is one contraction of its input with a (stored or computed) kernel.

    Attributes:
        kind: ``'conv'`` (``conv_general_dilated``) or ``'dense'`` (``dot_general``).
        effective: the kernel or bias the contraction uses is computed from the parameters in the
            call (weight standardisation, weight norm, ...), not the stored parameter.
        canonical: output channel ``o`` is ``contraction(x, kernel[..., o]) + bias[o]`` over the last
            axes of the (effective) kernel and of the output: a BatchNorm after the layer can be
            folded into ``kernel`` and ``bias`` exactly.
        before_ok: also a BatchNorm *before* the layer can be folded in (canonical, the input is not
            padded or dilated, and the kernel's second-to-last axis is the input channel).
        groups: the contraction's ``feature_group_count`` (1 for dense layers).
    """

    kind: str
    effective: bool
    canonical: bool
    before_ok: bool
    groups: int
    _eqns: tuple[_Eqn, ...]
    _param_vars: Mapping[str, Any]
    _state_vars: tuple[Any, ...]
    _x_var: Any
    _out: Any
    _kernel_root: Any
    _bias_root: Any

    def like(self, module: Any) -> type:
        """The Flax class whose composite entries apply (``nn.Conv``/``nn.Dense``, NNX for NNX modules)."""
        if isinstance(module, nnx.Module):
            return nnx.Conv if self.kind == "conv" else nnx.Linear
        return nn.Conv if self.kind == "conv" else nn.Dense

    def effective_params(self, params: Mapping[str, Any], state: Any) -> dict[str, Any]:
        """``{'kernel': K_eff[, 'bias': b_eff]}``: the weights the contraction and the bias add use.

        Args:
            params: the module's stored parameters (values of the current trace).
            state: the pure apply's state ``(other_state, args, kwargs)``.
        """
        env: dict[Any, Any] = {self._param_vars[k]: v for k, v in params.items()}
        env.update(zip(self._state_vars, split_arrays(state)[0]))
        wanted = [self._kernel_root] + ([self._bias_root] if self._bias_root is not None else [])
        values = _evaluate(self._eqns, env, wanted)
        out = {"kernel": values[0]}
        if self._bias_root is not None:
            out["bias"] = values[1]
        return out

    def layer_fn(self, params: Mapping[str, Any], x: Any, state: Any = None) -> Any:
        """The traced call replayed with ``params['kernel']`` (and ``params['bias']``) substituted for
        the effective kernel (and bias): ``contraction(x, K) + b`` with the module's own padding etc."""
        env: dict[Any, Any] = {self._x_var: x, self._kernel_root: params["kernel"]}
        if self._bias_root is not None:
            env[self._bias_root] = params["bias"]
        (out,) = _evaluate(self._eqns, env, [self._out])
        return out


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(np.shape(v))


def analyse(
    params: Mapping[str, Any], x: Any, state: Any, layer_fn: Callable[[Any, Any, Any], Any]
) -> LinearCall | None:
    """Trace ``layer_fn(params, x, state)`` abstractly and recognise one contraction with a kernel.

    Args:
        params: the module's parameters; only ``{'kernel'}`` or ``{'kernel', 'bias'}`` qualify.
        x: the module input (an array or tracer; only its shape and dtype are used).
        state: the rest of the pure apply's arguments.
        layer_fn: the module's pure apply.

    Returns:
        A :class:`LinearCall`, or ``None`` if the call is anything else (or cannot be traced).
    """
    if not isinstance(params, Mapping) or "kernel" not in params or not set(params) <= {"kernel", "bias"}:
        return None
    if not all(hasattr(v, "shape") and hasattr(v, "dtype") for v in params.values()):
        return None
    if not (hasattr(x, "shape") and hasattr(x, "dtype")) or not np.issubdtype(x.dtype, np.floating):
        return None
    names = sorted(params)
    arrays, rebuild = split_arrays(state)

    def abstract(v: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(_shape(v), v.dtype)

    def fn(p: list[Any], x: Any, s: list[Any]) -> Any:
        return layer_fn(dict(zip(names, p)), x, rebuild(s))

    try:
        with context_value(_ANALYSING, True):
            closed = jax.make_jaxpr(fn)(
                [abstract(params[k]) for k in names], abstract(x), [abstract(a) for a in arrays]
            )
    except Exception:  # noqa: BLE001 -- anything that does not trace is simply not recognised
        return None
    jaxpr = closed.jaxpr
    if len(jaxpr.outvars) != 1:
        return None
    param_vars = {k: _Var(_shape(params[k])) for k in names}
    x_var = _Var(_shape(x))
    state_vars = tuple(_Var(_shape(a)) for a in arrays)
    eqns: list[_Eqn] = []
    try:
        (out,) = _flatten(jaxpr, closed.consts, [param_vars[k] for k in names] + [x_var, *state_vars], eqns)
    except Exception:  # noqa: BLE001
        return None
    return _classify(tuple(eqns), param_vars, state_vars, x_var, out)


def _classify(
    eqns: tuple[_Eqn, ...],
    param_vars: Mapping[str, Any],
    state_vars: tuple[Any, ...],
    x_var: Any,
    out: Any,
) -> LinearCall | None:
    # stage of every input-dependent value: 'pre' (before the contraction), 'post' (after it)
    stage: dict[Any, str] = {x_var: "pre"}
    # parameters each input-independent value depends on
    deps: dict[Any, frozenset[str]] = {v: frozenset({k}) for k, v in param_vars.items()}
    deps.update({v: frozenset({"@state"}) for v in state_vars})
    producer: dict[Any, _Eqn] = {}
    folded: dict[Any, Any] = {}
    contraction: _Eqn | None = None
    weight = bias_operand = None
    for eqn in eqns:
        for o in eqn.outs:
            producer[o] = eqn
        xs = [a for a in eqn.ins if isinstance(a, _Var) and a in stage]
        if not xs and all(isinstance(a, _Const) or a in folded for a in eqn.ins):
            try:  # a constant (e.g. the fill value of jnp.pad): fold it
                with jax.ensure_compile_time_eval():
                    args = [a.value if isinstance(a, _Const) else folded[a] for a in eqn.ins]
                    results = eqn.primitive.bind(*args, **eqn.params)
                results = results if eqn.primitive.multiple_results else [results]
                folded.update(zip(eqn.outs, results))
            except Exception:  # noqa: BLE001 -- not foldable: an ordinary weight-side value
                pass
        if not xs:
            d = frozenset().union(*(deps.get(a, frozenset()) for a in eqn.ins if isinstance(a, _Var)))
            for o in eqn.outs:
                deps[o] = d
            continue
        if len(xs) != 1 or len(eqn.outs) != 1:
            return None
        (xv,) = xs
        (o,) = eqn.outs
        others = [a for a in eqn.ins if a is not xv]
        name = eqn.name
        if name in _STRUCTURAL:
            if eqn.ins[0] is not xv:
                return None
            if name == "pad":
                fill = eqn.ins[1]
                fill = fill.value if isinstance(fill, _Const) else folded.get(fill)
                if fill is None or not np.all(np.asarray(fill) == 0):
                    return None
            elif others:
                return None
            stage[o] = stage[xv]
        elif name in _CONTRACTIONS:
            if contraction is not None or stage[xv] != "pre":
                return None
            if name == "conv_general_dilated" and eqn.ins[0] is not xv:
                return None
            (w,) = others
            if not isinstance(w, _Var) or "kernel" not in deps.get(w, frozenset()):
                return None
            contraction, weight = eqn, w
            stage[o] = "post"
        elif name in ("add", "add_any"):
            (b,) = others
            if stage[xv] != "post" or bias_operand is not None or not isinstance(b, _Var):
                return None
            if deps.get(b, frozenset()) - {"bias", "@state"} or "bias" not in deps.get(b, frozenset()):
                return None
            bias_operand = b
            stage[o] = "post"
        else:
            return None
    if contraction is None or stage.get(out) != "post":
        return None

    def root(v: Any, param: str) -> tuple[Any, list[_Eqn]]:
        """Walk back through structural ops of one operand to the stored parameter or a computed value."""
        chain: list[_Eqn] = []
        while v is not param_vars.get(param):
            eqn = producer.get(v)
            if eqn is None or eqn.name not in _STRUCTURAL or eqn.name == "pad":
                return v, chain
            if len([a for a in eqn.ins if isinstance(a, _Var)]) != 1:
                return v, chain
            chain.append(eqn)
            v = eqn.ins[0]
        return v, chain

    kernel_root, kernel_chain = root(weight, "kernel")
    bias_root, bias_chain = (None, []) if bias_operand is None else root(bias_operand, "bias")
    effective = kernel_root is not param_vars["kernel"] or (
        bias_root is not None and bias_root is not param_vars.get("bias")
    )
    kind = "conv" if contraction.name == "conv_general_dilated" else "dense"
    canonical, before_ok, groups = _canonical(
        contraction, kernel_chain, bias_chain, bias_root, eqns, stage, out
    )
    return LinearCall(
        kind,
        effective,
        canonical,
        before_ok,
        groups,
        eqns,
        dict(param_vars),
        state_vars,
        x_var,
        out,
        kernel_root,
        bias_root,
    )


def _canonical(
    contraction: _Eqn,
    kernel_chain: list[_Eqn],
    bias_chain: list[_Eqn],
    bias_root: Any,
    eqns: Sequence[_Eqn],
    stage: Mapping[Any, str],
    out: Any,
) -> tuple[bool, bool, int]:
    """``(canonical, before_ok, groups)`` of a recognised call (see :class:`LinearCall`).

    Canonical: the kernel reaches the contraction unchanged (dtype casts only); the contraction maps
    the kernel's last axis to the output's last axis; after it come only casts, reshapes that keep the
    last axis and the bias add; the bias is one value per output channel broadcast along the last axis.
    """
    no = (False, False, 1)
    if any(e.name != "convert_element_type" for e in kernel_chain):
        return no
    lhs, rhs = contraction.ins
    (c_out,) = contraction.outs
    params = contraction.params
    k_ndim = len(rhs.shape)
    groups = 1
    if contraction.name == "conv_general_dilated":
        dn = params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        if rhs_spec[0] != k_ndim - 1 or out_spec[1] != k_ndim - 1 or params.get("batch_group_count", 1) != 1:
            return no
        groups = int(params.get("feature_group_count", 1))
        before = (
            rhs_spec[1] == k_ndim - 2
            and lhs_spec[1] == k_ndim - 1
            and all(int(lo) == 0 and int(hi) == 0 for lo, hi in params["padding"])
            and all(int(d) == 1 for d in (params.get("lhs_dilation") or ()))
        )
    else:
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        if lb or rb or not (isinstance(lhs, _Var) and lhs in stage) or sorted(rc) != list(range(k_ndim - 1)):
            return no
        before = sorted(lc) == [len(lhs.shape) - 1] and k_ndim == 2
    channels = rhs.shape[-1]
    if c_out.shape[-1:] != (channels,):
        return no
    users = {id(a): e for e in eqns for a in e.ins if isinstance(a, _Var) and stage.get(a) == "post"}
    v = c_out
    while v is not out:
        e = users.get(id(v))
        if e is None or e.name not in ("convert_element_type", "reshape", "add", "add_any"):
            return no
        (v,) = e.outs
        if v.shape[-1:] != (channels,):
            return no
    if bias_root is not None:
        if bias_root.shape != (channels,):
            return no
        for e in bias_chain:
            if e.name == "broadcast_in_dim":
                dims = tuple(e.params["broadcast_dimensions"])
                if dims[-1:] != (len(e.params["shape"]) - 1,):
                    return no
            elif e.name == "reshape":
                sizes = tuple(e.params["new_sizes"])
                if sizes[-1:] != (channels,) or any(int(d) != 1 for d in sizes[:-1]):
                    return no
            elif e.name != "convert_element_type":
                return no
    padded = any(e.name == "pad" and stage.get(e.outs[0]) == "pre" for e in eqns)
    return True, before and not padded, groups
