"""Non-negativity proofs: which values of the trace are provably ``>= 0`` (for the sign-specialised
rules, see :func:`jlrp.core.apply_rule`'s ``non_negative``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._analysis import call_body, elementwise_kind

# --------------------------------------------------------------------------------------------
# signs (non-negativity proofs, for the sign-specialised rules)


def _is_relu_jaxpr(jaxpr: Any) -> bool:
    return elementwise_kind(jaxpr) == "relu"


_KEEPS_SIGN = frozenset(
    {
        "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice", "dynamic_slice",
        "rev", "copy", "copy_p", "convert_element_type", "reduce_max", "reduce_min", "reduce_sum",
        "reduce_window_sum", "reduce_precision", "sqrt", "stop_gradient", "cumsum", "cummax",
    }
)  # fmt: skip
_ALL_NON_NEGATIVE = frozenset({"add", "add_any", "mul", "div", "min", "concatenate"})


def literal_non_negative(atom: Any) -> bool:
    try:
        return bool(np.all(np.asarray(atom.val) >= 0))
    except (TypeError, ValueError):
        return False


def _window_never_all_padding(params: Mapping[str, Any]) -> bool:
    windows = params["window_dimensions"]
    dilated = any(d != 1 for d in (*params.get("base_dilation", ()), *params.get("window_dilation", ())))
    return not dilated and all(lo < w and hi < w for (lo, hi), w in zip(params["padding"], windows))


def non_negative_result(eqn: Any, flags: Sequence[bool]) -> bool:
    """Whether ``eqn``'s result is provably ``>= 0`` given which operands are (a sound, partial test)."""
    name = eqn.primitive.name
    if name == "max":
        return any(flags)
    if name in ("custom_jvp_call", "pjit", "jit"):
        body = call_body(eqn)
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
