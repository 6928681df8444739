"""Function-level ops: the stand-in "modules" for ops that idiomatic Flax code calls as functions.

Flax models write residual connections as ``x + h``, global average pooling as ``jnp.mean`` and
activations as ``nn.relu(x)``. jlrp finds these ops on the relevance path of the traced model and
matches them against composites exactly like modules, by type (the classes below, grouped in
:mod:`jlrp.types`) and by path (``'<module path>/<op name>_<n>'``).
"""

from __future__ import annotations

import dataclasses

__all__ = ["Op", "ReLU", "Add", "ReduceSum", "Mean", "AvgPool", "Scale"]


@dataclasses.dataclass(frozen=True)
class Op:
    """A function-level op found in the model's trace.

    Attributes:
        primitive: the JAX primitive (or named function) behind it, e.g. ``'add'``.
        path: where it sits: the path of the enclosing module plus the op's name and index.
    """

    primitive: str
    path: str


class ReLU(Op):
    """``nn.relu`` / ``jax.nn.relu`` called as a function."""


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
