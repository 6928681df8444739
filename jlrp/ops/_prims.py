"""Primitive tables: which JAX primitives are structural, element-wise, linear mixing, winner-takes-all.

Every primitive that can carry relevance must be in one of these tables (or be a call-like
primitive the interpreter enters); any other primitive on the relevance path is *uncovered*.
"""

from __future__ import annotations

#: Shape changes and routing: the gradient moves relevance without changing it (DESIGN.md section 3).
STRUCTURAL = frozenset(
    {
        "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
        "gather", "concatenate", "stack", "unstack", "pad", "rev", "dynamic_update_slice", "split", "copy", "copy_p",
        "convert_element_type", "reduce_precision", "sharding_constraint", "device_put",
        "optimization_barrier", "mesh_cast", "reshard", "pvary", "squeeze_p", "real", "select_and_gather_add",
    }
)  # fmt: skip

#: Element-wise primitives that are linear in their one activation operand (others constant).
EW_LINEAR = frozenset({"neg", "convert_element_type", "copy", "copy_p", "reduce_precision", "real"})

#: Element-wise primitives that are non-linear (one activation operand, constants elsewhere).
EW_NONLINEAR = frozenset(
    {
        "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "asin", "acos",
        "atan", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv", "sqrt", "rsqrt",
        "cbrt", "integer_pow", "square", "abs", "sign", "pow", "floor", "ceil", "round", "max", "min",
        "clamp", "atan2", "rem", "nextafter", "lgamma", "digamma", "is_finite",
    }
)  # fmt: skip

#: Element-wise arithmetic whose class depends on its operands (act + const is affine, ...).
EW_ARITH = frozenset({"add", "sub", "mul", "div", "add_any"})

#: ``sqrt``-like primitives: a statistic that went through one of them is a scale (a std or a norm).
POWERS = frozenset({"sqrt", "rsqrt", "cbrt", "pow"})

#: Reductions that make a statistic of an activation.
REDUCTIONS = frozenset({"reduce_sum", "reduce_max", "reduce_min", "argmax", "argmin", "reduce_prod"})

#: Winner-takes-all: gradient (as zennit does for max pooling).
WINNER_TAKES_ALL = frozenset(
    {"reduce_max", "reduce_min", "reduce_window_max", "reduce_window_min", "cummax", "cummin",
     "argmax", "argmin", "sort", "top_k"}
)  # fmt: skip

#: Primitives that call a sub-jaxpr.
CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "custom_jvp_call",
                   "custom_vjp_call", "custom_vjp_call_jaxpr", "scan", "cond", "while"})  # fmt: skip
