"""``jlrp.explain``: wrap a Flax model so that its VJP is the relevance of the chosen composite.

The explained function computes exactly the model's forward pass; only its backward changes. With
the model output masked to the explained class as cotangent, the VJP with respect to the input is
the relevance (DESIGN.md section 1)::

    explained = jlrp.explain(model, composites.EpsilonPlusFlat())   # linen: f(variables, x, ...)
    y, vjp = jax.vjp(lambda x: explained(variables, x), x)
    (relevance,) = vjp(y * jax.nn.one_hot(target, y.shape[-1]))
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .composites import Composite, as_composite
from .core import Rule
from .errors import CompositeError, InputDtypeError, InputError

__all__ = ["explain", "Explained", "LayerRecord", "check_input"]


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One module (or function-level op) call seen while explaining.

    Attributes:
        path: the module path (``''`` is the root module).
        kind: the module's class name (or the op's).
        rule: the rule it got, ``None`` if it kept its gradient.
        linear: whether it is a linear layer/op whose plain gradient would not be an LRP rule.
    """

    path: str
    kind: str
    rule: Rule | None
    linear: bool = False


def display_path(path: str) -> str:
    return path if path else "<root>"


def check_input(x: Any, name: str = "input") -> None:
    """Raise a clear error for non-float inputs, and for NaN/inf where ``x`` is concrete."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise InputDtypeError(
            f"the {name} has dtype {dtype}; relevance is defined for floating-point inputs only. "
            f"Cast it first, e.g. x.astype(jnp.float32) (and scale images to the range the model expects)."
        )
    if not isinstance(x, jax.core.Tracer):
        finite = np.isfinite(np.asarray(x))
        if not finite.all():
            raise InputError(
                f"the {name} contains {int((~finite).sum())} NaN/inf value(s) (first at index "
                f"{tuple(int(i) for i in np.argwhere(~finite)[0])}); relevance would be NaN. Clean the input."
            )


class Explained:
    """An explained model: a pure function with the model's call signature and an LRP backward.

    Created by :func:`explain`; the front end (linen or NNX) decides the exact call signature.
    Hashable by identity, so it can be a static argument of ``jax.jit``.
    """

    def __init__(self, model: Any, composite: Composite, strict: bool = False):
        self.model = model
        self.composite = composite
        self.strict = strict

    def trace(self, *args: Any, **kwargs: Any) -> tuple[Any, list[LayerRecord]]:
        """Run the explained forward and also return the records of every layer call."""
        resolver = self.composite.resolver()
        records: list[LayerRecord] = []
        output = self._forward(resolver, records, *args, **kwargs)
        validate_records(self.composite, resolver, records)
        return output, records

    def _forward(self, resolver: Any, records: list[LayerRecord], *args: Any, **kwargs: Any) -> Any:
        """Front-end specific: run the model, asking ``resolver.rule_for(path, module)`` for every layer
        call in execution order, appending a :class:`LayerRecord` per call, and applying rules with
        :func:`jlrp.core.apply_rule`."""
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.trace(*args, **kwargs)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {self.composite!r})"


def validate_records(composite: Composite, resolver: Any, records: list[LayerRecord]) -> None:
    """The checks after a traced forward: unmatched path entries, no rule anywhere."""
    paths = sorted({display_path(r.path) for r in records})
    unmatched = resolver.unmatched()
    if unmatched:
        raise CompositeError(
            f"path entries {unmatched} of {type(composite).__name__} match no module of the model. "
            f"The module paths are: {', '.join(paths)}"
        )
    if not any(r.rule is not None for r in records):
        layers = sorted({f"{display_path(r.path)} ({r.kind})" for r in records})
        raise CompositeError(
            f"{type(composite).__name__} puts no rule on any layer of the model, so the result would be "
            f"the plain gradient times the output. The layers are: {', '.join(layers)}. Map the layer types "
            "(jlrp.types.Dense, jlrp.types.Convolution, or your own classes) or their paths to rules."
        )


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
    from flax import linen as nn

    if isinstance(model, nn.Module):
        from .linen import LinenExplained

        return LinenExplained(model, composite, strict=strict)
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx in supported versions
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        from .nnx import explain_nnx

        return explain_nnx(model, composite, strict=strict)
    if isinstance(model, Explained):
        raise TypeError("this model is already explained; pass the original model to jlrp.explain")
    raise TypeError(f"jlrp.explain needs a flax.linen or flax.nnx Module, got {type(model).__name__}")
