"""Conservation (completeness) of an attribution: does the relevance sum to the explained score?"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ..errors import UsageError
from ..targets import Target, TargetLike, as_target, output_cotangent, select_output

__all__ = ["ConservationResult", "conservation"]


@dataclasses.dataclass(frozen=True)
class ConservationResult:
    """What :func:`conservation` measured, per sample (every field has shape ``(N,)``).

    Attributes:
        relevance_sum: :math:`\\sum_i R_i`.
        score: :math:`S`, the summed starting relevance (for a class index :math:`c`: :math:`f_c(x)`).
        error: :math:`\\sum_i R_i - S` (negative: relevance was absorbed, e.g. by biases or epsilon).
        relative_error: :math:`|\\sum_i R_i - S| / \\max(|S|, \\text{tiny})`.
    """

    relevance_sum: jax.Array
    score: jax.Array
    error: jax.Array
    relative_error: jax.Array

    @property
    def max_relative_error(self) -> float:
        """The largest relative error over the batch."""
        return float(jnp.max(self.relative_error))


@jax.jit
def _conservation_core(relevance: Any, output: jax.Array, target: Target) -> tuple[jax.Array, ...]:
    start = output_cotangent(output, target)
    score = start.reshape(start.shape[0], -1).sum(axis=1)
    total = sum(
        leaf.reshape(leaf.shape[0], -1).sum(axis=1).astype(score.dtype)
        for leaf in jax.tree_util.tree_leaves(relevance)
    )
    error = total - score
    tiny = jnp.finfo(score.dtype).tiny
    return total, score, error, jnp.abs(error) / jnp.maximum(jnp.abs(score), tiny)


def conservation(relevance: Any, output: Any, target: TargetLike = None) -> ConservationResult:
    """Check conservation (completeness): does the relevance of each sample sum to the explained score?

    LRP redistributes the starting relevance :math:`S = \\sum_j r_j(f(x))` (for a class index :math:`c`,
    :math:`S = f_c(x)`: the output times a one-hot) layer by layer; a conservative rule set keeps the
    total, so

    .. math::

        \\sum_i R_i = S, \\qquad \\text{error} = \\sum_i R_i - S, \\qquad
        \\text{relative error} = \\frac{|\\sum_i R_i - S|}{\\max(|S|, \\text{tiny})}.

    Biases, the epsilon of Epsilon, and the stabilizers absorb part of the relevance (the error is then
    negative for positive scores); ZBox, Flat and bias-free Epsilon layers conserve it. Gradient-based
    attributions (plain gradient, SmoothGrad) are not meant to conserve; Integrated Gradients conserves
    approximately (completeness, up to the Riemann sum and the baseline's score).

    Args:
        relevance: the relevance, batch on axis 0 (any shape), or a pytree of them (several inputs: the
            sum runs over every leaf).
        output: the explained output for the same batch, ``(N, n_classes)``: the array
            :func:`jlrp.attribute` returns (already selected with its ``output=``).
        target: as :func:`jlrp.attribute`: ``None`` (the predicted class), an int, one int per sample,
            a mask broadcastable to the output, a callable ``output -> starting relevance`` or a
            :class:`jlrp.targets.Target`; it must be the target the relevance was computed for.

    Returns:
        A :class:`ConservationResult` (relevance_sum, score, error, relative_error), each of shape ``(N,)``.

    Raises:
        TargetError: ``output`` is not an array (e.g. a model's ``(logits, aux)`` tuple: pass the array
            that was explained), or a target that does not fit it.
        UsageError: relevance and output with different batch sizes.
    """
    output = jnp.asarray(select_output(output, None))
    relevance = jax.tree_util.tree_map(jnp.asarray, relevance)
    leaves = jax.tree_util.tree_leaves(relevance)
    if (
        not leaves
        or output.ndim < 1
        or any(leaf.ndim < 1 or leaf.shape[0] != output.shape[0] for leaf in leaves)
    ):
        shapes = jax.tree_util.tree_map(jnp.shape, relevance)
        raise UsageError(
            f"relevance {shapes} and output {output.shape} must have the same batch size on axis 0"
        )
    target = as_target(target, tuple(output.shape))
    return ConservationResult(*_conservation_core(relevance, output, target))
