"""The op kinds (the types composites key on) and the module scopes that name ops by module path."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import jax


@dataclasses.dataclass(frozen=True)
class Op:
    """A function-level op found in the model's trace.

    Attributes:
        primitive: the JAX primitive behind it, e.g. ``'add'`` (``'elementwise'`` for a region).
        path: where it sits: the enclosing module's path plus the op's kind and index.
    """

    primitive: str
    path: str

    #: the path segment of the kind (``'@add_0'``)
    kind: ClassVar[str] = "op"
    #: whether the plain gradient already is this op's LRP treatment (no rule needed, never uncovered)
    gradient_is_rule: ClassVar[bool] = False
    #: how many activations the op's layer takes (2: its rule gets a tuple ``(a, b)`` as input)
    operands: ClassVar[int] = 1


class ReLU(Op):
    """``nn.relu`` / ``jax.nn.relu`` / ``jnp.maximum(x, 0)`` called as a function."""

    kind = "relu"
    gradient_is_rule = True


class Activation(Op):
    """An element-wise non-linear function of one activation (``gelu``, ``silu``, ``tanh``, ``elu``...),
    however many primitives it is made of."""

    kind = "activation"


class Scale(Op):
    """An activation multiplied or divided by constants (element-wise)."""

    kind = "scale"
    gradient_is_rule = True


class Affine(Op):
    """An element-wise affine map of an activation with an additive constant (``x * a + b``)."""

    kind = "affine"


class Add(Op):
    """The sum or difference of two activations (a residual connection ``x + h``, ``x - mean``)."""

    kind = "add"


class ReduceSum(Op):
    """A sum over axes of an activation (``jnp.sum``)."""

    kind = "sum"


class Mean(Op):
    """A mean over axes of an activation (``jnp.mean``, global average pooling)."""

    kind = "mean"


class AvgPool(Op):
    """Average pooling called as a function (``nn.avg_pool``)."""

    kind = "avg_pool"


class Contraction(Op):
    """A ``dot_general`` or convolution of an activation with constant weights, outside a ruled module."""

    kind = "contraction"


class Softmax(Op):
    """A softmax of an activation, ``s = exp(x) / sum(exp(x))`` over some axes, recognised as one unit
    (``jax.nn.softmax``, ``flax`` attention weights, or written by hand with a max shift and masks).
    Its rule sees the layer ``x -> s``."""

    kind = "softmax"


class MatMul(Op):
    """A ``dot_general`` of two activations (``q @ k.T``, ``einsum('bqk,bkd->bqd', p, v)``: attention's
    bilinear products). Its rule sees the layer ``(a, b) -> a . b`` with a tuple of two inputs."""

    kind = "matmul"
    operands = 2


class Multiply(Op):
    """An element-wise product of two activations (gating: ``silu(gate) * up``, GLU), with broadcasting.
    Its rule sees the layer ``(a, b) -> a * b`` with a tuple of two inputs."""

    kind = "multiply"
    operands = 2


_SCOPE = re.compile(r"jlrp_m(\d+)")


class ModuleScopes:
    """Per-trace registry of module calls; front ends wrap each call in :meth:`scope`.

    The named scope ``jlrp_m<index>`` ends up in the name stack of every equation the call traces,
    which is how :func:`run_with_op_rules` names the ops inside a module.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def scope(self, path: str, owns_variables: bool = False) -> Any:
        """A context manager for the call of the module at ``path``.

        Args:
            path: the module path.
            owns_variables: kept for the front ends; the arithmetic of a module without a rule is
                classified like any function-level op (paths under the module's path).
        """
        self.calls.append((path, owns_variables))
        return jax.named_scope(f"jlrp_m{len(self.calls) - 1}")

    def owner(self, name_stack: str) -> tuple[str, bool] | None:
        found = _SCOPE.findall(name_stack)
        return self.calls[int(found[-1])] if found else None
