"""Drop-in modules for plain operations, for Flax linen and Flax NNX.

Idiomatic Flax code writes residual adds, average pools and global pools as plain function calls
(``x + h``, ``nn.avg_pool(...)``, ``jnp.mean(...)``). The modules here perform exactly the same
computation, but as *modules*, so that an LRP composite can attach a rule to them by type or by
path, like it does for ``nn.Conv`` or ``nn.Dense``.

Naming convention: the linen modules carry the plain names (:class:`Sum`, :class:`AvgPool`,
:class:`AdaptiveAvgPool`); their Flax NNX counterparts carry an ``NNX`` prefix
(:class:`NNXSum`, :class:`NNXAvgPool`, :class:`NNXAdaptiveAvgPool`) and subclass
:class:`flax.nnx.Module`. Both variants of a pair compute the same function with the same
arguments; none of them has parameters or state.

All spatial modules work on channels-last input (``NHWC`` for 2-D, in general
``(batch, *spatial, features)``), Flax's layout.

Example::

    import jax.numpy as jnp
    from jlrp.layers import Sum

    y = Sum()(jnp.stack([x, h], axis=-1))   # == x + h, as a module
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from .errors import UsageError

__all__ = [
    "Sum",
    "AvgPool",
    "AdaptiveAvgPool",
    "NNXSum",
    "NNXAvgPool",
    "NNXAdaptiveAvgPool",
    "adaptive_avg_pool",
]

Padding = str | Sequence[tuple[int, int]]


def _as_tuple(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to an ``ndim``-tuple, or check the length of a sequence."""
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(int(v) for v in value)
    if len(value) != ndim:
        raise UsageError(f"{name} must have {ndim} entries, got {value!r}")
    return value


def _adaptive_bounds(size: int, out: int) -> list[tuple[int, int]]:
    """Window ``[start, end)`` of each output cell, with torch's AdaptiveAvgPool formula."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


def adaptive_avg_pool(x: jnp.ndarray, output_size: int | Sequence[int]) -> jnp.ndarray:
    """Adaptive average pooling on channels-last input, exactly like torch's AdaptiveAvgPoolNd.

    Output cell ``i`` of a spatial axis of length ``H`` averages the input cells
    ``floor(i * H / out) <= h < ceil((i + 1) * H / out)``; windows may overlap or differ in size
    when ``H`` is not a multiple of ``out``, and an output larger than the input replicates
    cells. Each spatial axis is pooled separately (the windows are separable), with exact means.

    Args:
        x: input of shape ``(batch, *spatial, features)`` (``NHWC`` for 2-D).
        output_size: size of the spatial output, an int for every spatial axis or one per axis.

    Returns:
        Array of shape ``(batch, *output_size, features)``; ``x`` itself when its spatial shape
        already equals ``output_size``.
    """
    ndim = x.ndim - 2
    if ndim < 1:
        raise UsageError(f"adaptive_avg_pool needs input (batch, *spatial, features), got shape {x.shape}")
    out = _as_tuple(output_size, ndim, "output_size")
    if any(o < 1 for o in out):
        raise UsageError(f"output_size must be positive, got {out}")
    for axis, (size, o) in enumerate(zip(x.shape[1:-1], out, strict=True), start=1):
        if size == o:
            continue
        if size % o == 0:
            # Equal, non-overlapping windows: one reshape and one mean.
            k = size // o
            shape = x.shape[:axis] + (o, k) + x.shape[axis + 1 :]
            x = jnp.mean(x.reshape(shape), axis=axis + 1)
            continue
        cells = [
            jnp.mean(x[(slice(None),) * axis + (slice(start, end),)], axis=axis, keepdims=True)
            for start, end in _adaptive_bounds(size, o)
        ]
        x = jnp.concatenate(cells, axis=axis)
    return x


def _avg_pool(
    x: jnp.ndarray,
    window_shape: Sequence[int],
    strides: Sequence[int] | None,
    padding: Padding,
    count_include_pad: bool,
) -> jnp.ndarray:
    return nn.avg_pool(
        x,
        tuple(window_shape),
        strides=None if strides is None else tuple(strides),
        padding=padding,
        count_include_pad=count_include_pad,
    )


# --------------------------------------------------------------------------------------- linen


class Sum(nn.Module):
    """Sum over one axis of a stacked input (linen), e.g. a residual add as a module.

    ``Sum()(jnp.stack([x, h], axis=-1))`` equals ``x + h``.

    Attributes:
        axis: the axis to sum over (default: the last one, where ``jnp.stack(..., -1)`` puts the
            summands).
    """

    axis: int = -1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Return ``jnp.sum(x, axis=self.axis)``."""
        return jnp.sum(x, axis=self.axis)


class AvgPool(nn.Module):
    """Average pooling as a module (linen), the same as :func:`flax.linen.avg_pool`.

    Attributes:
        window_shape: shape of the pooling window over the spatial axes, e.g. ``(2, 2)``.
        strides: strides over the spatial axes (default: ``(1, ...)``, as in flax).
        padding: ``'VALID'``, ``'SAME'`` or a sequence of ``(low, high)`` pairs.
        count_include_pad: whether padded cells count in the divisor (``True``, as flax and torch
            default) or not.
    """

    window_shape: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Padding = "VALID"
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Average-pool channels-last input ``x``."""
        return _avg_pool(x, self.window_shape, self.strides, self.padding, self.count_include_pad)


class AdaptiveAvgPool(nn.Module):
    """Adaptive average pooling (linen), exactly torch's ``AdaptiveAvgPool2d`` on ``NHWC`` input.

    See :func:`adaptive_avg_pool`; the input is returned unchanged when it already has the output
    size.

    Attributes:
        output_size: spatial output size, an int for every spatial axis or one per axis.
    """

    output_size: int | Sequence[int]

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Pool channels-last input ``x`` to ``output_size``."""
        return adaptive_avg_pool(x, self.output_size)


# ----------------------------------------------------------------------------------------- NNX


class NNXSum(nnx.Module):
    """Sum over one axis of a stacked input (Flax NNX); see :class:`Sum`.

    Args:
        axis: the axis to sum over (default: the last one).
    """

    def __init__(self, axis: int = -1) -> None:
        self.axis = axis

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Return ``jnp.sum(x, axis=self.axis)``."""
        return jnp.sum(x, axis=self.axis)


class NNXAvgPool(nnx.Module):
    """Average pooling as a module (Flax NNX), the same as :func:`flax.linen.avg_pool`.

    Args:
        window_shape: shape of the pooling window over the spatial axes, e.g. ``(2, 2)``.
        strides: strides over the spatial axes (default: ``(1, ...)``, as in flax).
        padding: ``'VALID'``, ``'SAME'`` or a sequence of ``(low, high)`` pairs.
        count_include_pad: whether padded cells count in the divisor.
    """

    def __init__(
        self,
        window_shape: Sequence[int],
        strides: Sequence[int] | None = None,
        padding: Padding = "VALID",
        count_include_pad: bool = True,
    ) -> None:
        self.window_shape = tuple(window_shape)
        self.strides = None if strides is None else tuple(strides)
        self.padding: Any = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.count_include_pad = count_include_pad

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Average-pool channels-last input ``x``."""
        return _avg_pool(x, self.window_shape, self.strides, self.padding, self.count_include_pad)


class NNXAdaptiveAvgPool(nnx.Module):
    """Adaptive average pooling (Flax NNX), exactly torch's ``AdaptiveAvgPool2d`` on ``NHWC``.

    Args:
        output_size: spatial output size, an int for every spatial axis or one per axis.
    """

    def __init__(self, output_size: int | Sequence[int]) -> None:
        self.output_size = output_size if isinstance(output_size, int) else tuple(output_size)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Pool channels-last input ``x`` to ``output_size``."""
        return adaptive_avg_pool(x, self.output_size)
