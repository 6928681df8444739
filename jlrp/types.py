"""Layer groups as plain tuples of classes, for linen and NNX alike.

Use them as keys of layer maps and rule maps (``isinstance`` semantics), like zennit's
``zennit.types``::

    {jlrp.types.Convolution: ZPlus(), jlrp.types.Dense: Epsilon()}

Flax has no activation *modules* for ReLU & co. (``nn.relu`` is a function), so
:data:`Activation` holds the few activation modules Flax and jlrp provide; function-level
activations are handled by the front ends.
"""

from __future__ import annotations

from flax import linen as nn
from flax import nnx

from . import layers, ops


def _layer_types(*names: str) -> tuple[type, ...]:
    return tuple(getattr(layers, n) for n in names if hasattr(layers, n))


__all__ = [
    "Dense",
    "Convolution",
    "Linear",
    "BatchNorm",
    "AvgPool",
    "Sum",
    "Scale",
    "ReLU",
    "Affine",
    "Contraction",
    "LinearMixing",
    "Normalization",
    "Softmax",
    "MatMul",
    "Multiply",
    "Interaction",
    "Activation",
    "Container",
]

#: fully connected layers: ``y = x W + b`` (possibly over several axes).
Dense: tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum, nnx.Linear, nnx.LinearGeneral, nnx.Einsum)

#: convolutions of any dimension, transposed and locally connected ones included.
Convolution: tuple[type, ...] = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nnx.Conv, nnx.ConvTranspose)

#: every layer with a kernel: :data:`Dense` and :data:`Convolution` (zennit's ``Linear``).
Linear: tuple[type, ...] = Dense + Convolution

#: batch normalisation (merged into the preceding linear layer by ``canonizers.MergeBatchNorm``).
BatchNorm: tuple[type, ...] = (nn.BatchNorm, nnx.BatchNorm)

#: average pooling modules.
AvgPool: tuple[type, ...] = _layer_types("AvgPool", "AdaptiveAvgPool", "NNXAvgPool", "NNXAdaptiveAvgPool") + (
    ops.AvgPool,
    ops.Mean,
)

#: explicit summation modules (residual connections written as modules).
Sum: tuple[type, ...] = _layer_types("Sum", "NNXSum") + (ops.Add, ops.ReduceSum)

#: an activation multiplied or divided by a constant, as found in the trace.
Scale: tuple[type, ...] = (ops.Scale,)

#: ReLUs: the function ``nn.relu``/``jax.nn.relu`` as found in the trace.
ReLU: tuple[type, ...] = (ops.ReLU,)

#: activation modules, function-level ReLUs and any other element-wise non-linear function of one
#: activation found in the trace (gelu, silu, tanh, elu, ... however many primitives each is).
Activation: tuple[type, ...] = (nn.PReLU,) + ReLU + (ops.Activation,)

#: an element-wise affine map with an additive constant (a bias or an unmerged BatchNorm as arithmetic).
Affine: tuple[type, ...] = (ops.Affine,)

#: a ``dot_general``/convolution of an activation with constant weights outside any ruled module.
Contraction: tuple[type, ...] = (ops.Contraction,)

#: every linear mixing of activations: sums, differences, means, pools, affine maps, contractions.
LinearMixing: tuple[type, ...] = Sum + AvgPool + Affine + Contraction

#: softmaxes found in the trace (``jax.nn.softmax``, attention weights, hand-written ones), as one unit.
Softmax: tuple[type, ...] = (ops.Softmax,)

#: ``dot_general``/``einsum``/``@`` of two activations (attention's ``q k^T`` and ``p v``).
MatMul: tuple[type, ...] = (ops.MatMul,)

#: element-wise products of two activations (gating, GLU).
Multiply: tuple[type, ...] = (ops.Multiply,)

#: every multiplicative interaction of activations: the ops the transformer rules (AttnLRP/CP-LRP) cover.
Interaction: tuple[type, ...] = Softmax + MatMul + Multiply

#: normalisation modules; their statistic (1/std) is held constant and the centring is a linear op
#: (see :mod:`jlrp.ops`), whether they are modules or plain functions.
Normalization: tuple[type, ...] = tuple(
    getattr(module, name)
    for module in (nn, nnx)
    for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
    if hasattr(module, name)
)

#: modules that only hold other modules.
Container: tuple[type, ...] = (
    (nn.Sequential, nnx.Sequential) if hasattr(nnx, "Sequential") else (nn.Sequential,)
)
