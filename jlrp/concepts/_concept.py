"""Concepts as masks: channels of conv and Dense outputs, attention heads (zennit-crp's ``ChannelConcept``).

A concept is a set of units of one layer's output. Its *mask* selects them (the conditions of
:func:`jlrp.concepts.attribute`); its *relevance* is the relevance of those units summed (CRP,
Achtibat et al. 2023, Eq. 6: :math:`R(\\theta) = \\sum_{i \\in \\theta} R_i`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import UsageError, UsageTypeError

__all__ = ["ChannelConcept", "HeadConcept"]


def _shape_of(like: Any) -> tuple[int, ...]:
    shape = getattr(like, "shape", like)
    try:
        return tuple(int(s) for s in shape)
    except TypeError:
        raise UsageTypeError(
            f"pass the layer output's shape (a tuple), an array, or a TapPoint, got {type(like).__name__}"
        ) from None


def _ids(concepts: int | Iterable[int] | None, n: int) -> np.ndarray:
    if concepts is None:
        return np.arange(n)
    ids = np.atleast_1d(np.asarray(concepts))
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UsageTypeError(f"concept ids must be ints or a 1-D list of ints, got {concepts!r}")
    bad = ids[(ids < -n) | (ids >= n)]
    if bad.size:
        raise UsageError(f"concept ids {bad.tolist()} out of range: the layer has {n} of them")
    return ids % n


@dataclasses.dataclass(frozen=True)
class ChannelConcept:
    """Each channel of a layer output is a concept (Flax is channels-last: ``axis=-1``).

    Args:
        axis: the channel axis of the layer output (``-1`` for NHWC convolutions and Dense layers; use
            ``-2`` for attention outputs laid out ``(N, T, heads, head_dim)``).
    """

    axis: int = -1

    def _axis(self, shape: tuple[int, ...]) -> int:
        if not -len(shape) <= self.axis < len(shape) or len(shape) < 2:
            raise UsageError(f"axis {self.axis} does not fit a layer output of shape {shape} (batch first)")
        axis = self.axis % len(shape)
        if axis == 0:
            raise UsageError("the concept axis cannot be the batch axis 0")
        return axis

    def size(self, like: Any) -> int:
        """The number of concepts of a layer output (``like``: its shape, an array or a TapPoint)."""
        shape = _shape_of(like)
        return shape[self._axis(shape)]

    def masks(self, concepts: int | Iterable[int] | None, like: Any) -> jax.Array:
        """One mask per concept id: ``(K, *trailing)``, broadcastable to the output after the ``K`` axis.

        Args:
            concepts: channel ids (``None``: every channel, in order).
            like: the layer output's shape (batch first), an array, or a :class:`jlrp.ops.TapPoint`.

        Returns:
            Float masks with 1 on the concept's units, of shape ``(K, C, 1, ..., 1)`` (the channel axis
            and the axes after it); for ``axis=-1`` simply ``(K, C)``.
        """
        shape = _shape_of(like)
        axis = self._axis(shape)
        n = shape[axis]
        ids = _ids(concepts, n)
        onehot = np.eye(n, dtype=np.float32)[ids]
        return jnp.asarray(onehot.reshape((len(ids), n) + (1,) * (len(shape) - axis - 1)))

    def attribute(self, relevance: jax.Array, abs_norm: bool = False, batch_axes: int = 1) -> jax.Array:
        """The relevance of every concept: the layer relevance summed over each sample's units.

        Args:
            relevance: a layer's relevance (``ConceptAttribution.relevances[key]``), ``(N, ..., C, ...)``,
                or ``(K, N, ...)`` with conditions (then ``batch_axes=2``).
            abs_norm: divide by the sum of ``|R|`` over the concepts of each sample (zennit-crp's
                ``abs_norm``), so relevances are fractions of the layer's total.
            batch_axes: how many leading axes to keep (1: the batch; 2: condition sets and batch).

        Returns:
            ``(*leading, C)``: e.g. ``(N, C)`` or ``(K, N, C)``.
        """
        relevance = jnp.asarray(relevance)
        axis = self.axis if self.axis < 0 else self.axis + batch_axes - 1
        moved = jnp.moveaxis(relevance, axis, -1)
        if moved.ndim < batch_axes + 1:
            raise UsageError(
                f"relevance of shape {relevance.shape} has no axes besides {batch_axes} leading ones"
            )
        scores = jnp.sum(moved, axis=tuple(range(batch_axes, moved.ndim - 1)))
        if abs_norm:
            scores = scores / (jnp.sum(jnp.abs(scores), axis=-1, keepdims=True) + 1e-10)
        return scores

    def top_k(
        self, relevance: jax.Array, k: int, abs_norm: bool = False, batch_axes: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """The ``k`` most relevant concepts per sample: ``(values (*leading, k), ids (*leading, k))``,
        in descending order (see :meth:`attribute`)."""
        return jax.lax.top_k(self.attribute(relevance, abs_norm, batch_axes), k)


@dataclasses.dataclass(frozen=True)
class HeadConcept:
    """Each attention head is a concept, for outputs that lay the heads out along the last axis as
    ``num_heads`` blocks of ``head_dim`` features (``(N, T, num_heads * head_dim)``: the output of the
    attention before its output projection, or of the projection's input).

    Args:
        num_heads: the number of heads.
    """

    num_heads: int

    def _check(self, width: int) -> int:
        if self.num_heads < 1 or width % self.num_heads:
            raise UsageError(f"a last axis of {width} features does not split into {self.num_heads} heads")
        return width // self.num_heads

    def size(self, like: Any) -> int:
        """The number of heads (checks that the output's last axis splits into them)."""
        self._check(_shape_of(like)[-1])
        return self.num_heads

    def masks(self, concepts: int | Iterable[int] | None, like: Any) -> jax.Array:
        """``(K, num_heads * head_dim)`` masks, one per head id (``None``: every head)."""
        width = _shape_of(like)[-1]
        head_dim = self._check(width)
        ids = _ids(concepts, self.num_heads)
        onehot = np.eye(self.num_heads, dtype=np.float32)[ids]
        return jnp.asarray(np.repeat(onehot, head_dim, axis=1))

    def attribute(self, relevance: jax.Array, abs_norm: bool = False, batch_axes: int = 1) -> jax.Array:
        """The relevance of every head: ``(*leading, num_heads)`` from ``(*leading, ..., heads * head_dim)``
        (see :meth:`ChannelConcept.attribute`)."""
        relevance = jnp.asarray(relevance)
        head_dim = self._check(relevance.shape[-1])
        split = relevance.reshape(relevance.shape[:-1] + (self.num_heads, head_dim))
        return ChannelConcept(-2).attribute(split, abs_norm, batch_axes)

    def top_k(
        self, relevance: jax.Array, k: int, abs_norm: bool = False, batch_axes: int = 1
    ) -> tuple[jax.Array, jax.Array]:
        """The ``k`` most relevant heads per sample: ``(values, ids)`` of shape ``(*leading, k)``."""
        return jax.lax.top_k(self.attribute(relevance, abs_norm, batch_axes), k)
