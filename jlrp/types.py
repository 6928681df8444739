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

#: activation modules and function-level ReLUs.
Activation: tuple[type, ...] = (nn.PReLU,) + ReLU

#: modules that only hold other modules.
Container: tuple[type, ...] = (
    (nn.Sequential, nnx.Sequential) if hasattr(nnx, "Sequential") else (nn.Sequential,)
)
