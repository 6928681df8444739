"""``jlrp.explain``: wrap a Flax model so that its VJP is the relevance of the chosen composite.

The explained function computes exactly the model's forward pass; only its backward changes. With
the model output masked to the explained class as cotangent, the VJP with respect to the input is
the relevance (DESIGN.md section 1)::

    explained = jlrp.explain(model, composites.EpsilonPlusFlat())   # linen: f(variables, x, ...)
    y, vjp = jax.vjp(lambda x: explained(variables, x), x)
    (relevance,) = vjp(y * jax.nn.one_hot(target, y.shape[-1]))
"""

from __future__ import annotations

from typing import Any

from flax import linen as nn
from flax import nnx

from .composites import as_composite
from .errors import UsageTypeError, integer_input_error
from .frontends.explained import (
    Explained,
    LayerRecord,
    check_input,
    display_path,
    uncovered_ops,
    validate_records,
)
from .linen import LinenExplained
from .nnx import explain_nnx

__all__ = [
    "explain",
    "Explained",
    "LayerRecord",
    "check_input",
    "display_path",
    "integer_input_error",
    "uncovered_ops",
    "validate_records",
]


def explain(model: Any, composite: Any, *, strict: bool = False) -> Explained:
    """Wrap a Flax model so that its VJP computes LRP relevance.

    Args:
        model: a ``flax.linen.Module`` (the result is called like ``model.apply``:
            ``explained(variables, x, *args, **kwargs)``) or a ``flax.nnx.Module`` (called like the
            model: ``explained(x, *args, **kwargs)``).
        composite: a composite (:mod:`jlrp.composites`), a registry key such as ``'epsilon_plus'``, or
            a plain rule map ``{layer type or path glob: rule}``.
        strict: raise :class:`~jlrp.errors.CoverageError` when a linear layer or op on the relevance
            path gets no rule.

    Returns:
        The explained model, a pure function that works under ``jax.jit``, ``jax.vmap`` and
        ``jax.checkpoint``.
    """
    composite = as_composite(composite)
    if isinstance(model, nn.Module):
        return LinenExplained(model, composite, strict=strict)
    if isinstance(model, nnx.Module):
        return explain_nnx(model, composite, strict=strict)
    if isinstance(model, Explained):
        raise UsageTypeError("this model is already explained; pass the original model to jlrp.explain")
    raise UsageTypeError(f"jlrp.explain needs a flax.linen or flax.nnx Module, got {type(model).__name__}")
