"""Helpers shared by the perturbation metrics: step counts, sample chunks, targets and scores."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import TargetError, UsageError

__all__ = ["step_counts"]


def step_counts(n_regions: int, n_steps: int) -> np.ndarray:
    """:math:`m_k = \\operatorname{round}(k K / L)`, the number of regions replaced after step ``k = 0 .. L``."""
    return np.rint(np.arange(n_steps + 1) * n_regions / n_steps).astype(np.int32)


def _target_score(output: jax.Array, target: jax.Array, score: str) -> jax.Array:
    """The score of class ``target[n]`` of every sample: ``(N, C)`` output -> ``(N,)``."""
    if score == "softmax":
        output = jax.nn.softmax(output, axis=-1)
    return jnp.take_along_axis(output, target[:, None], axis=-1)[:, 0]


def _as_key(rng: Any) -> jax.Array:
    """A ``jax.random`` key from an int seed (a key passes through)."""
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    return rng


def _check_target(target: Any, n: int, n_classes: int) -> jax.Array | None:
    """``None`` (predict later), or one checked class per sample as ``int32`` of shape ``(n,)``."""
    if target is None:
        return None
    arr = np.asarray(target)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
        raise TargetError(
            f"target must be None (the predicted class), an int, or one int per sample; got {target!r}"
        )
    arr = np.broadcast_to(arr, (n,)) if arr.ndim == 0 else arr
    if arr.shape != (n,):
        raise TargetError(f"one target per sample needs shape ({n},), got {arr.shape}")
    if ((arr < 0) | (arr >= n_classes)).any():
        raise TargetError(f"target classes must lie in 0..{n_classes - 1}, got {arr.min()}..{arr.max()}")
    return jnp.asarray(arr, dtype=jnp.int32)


def _chunks(n: int, batch_size: int | None) -> list[tuple[int, int, int]]:
    """``(start, stop, padding)`` of every chunk; the last is padded up to ``batch_size``."""
    if batch_size is None or batch_size >= n:
        return [(0, n, 0)]
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n), max(0, s + batch_size - n)) for s in range(0, n, batch_size)]


def _pad(a: jax.Array, pad: int) -> jax.Array:
    """Append ``pad`` copies of the last row (padding rows are computed and dropped)."""
    if pad == 0:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])


def _normalized_curve(scores: jax.Array) -> jax.Array:
    """:math:`c_k = (s_k - s_L) / (s_0 - s_L)` along the last axis; NaN where :math:`s_0 = s_L`."""
    first, last = scores[..., :1], scores[..., -1:]
    denom = first - last
    return jnp.where(denom == 0, jnp.nan, (scores - last) / jnp.where(denom == 0, 1, denom))


def _trapezoid_auc(fractions: jax.Array, curve: jax.Array) -> jax.Array:
    """:math:`\\sum_k (f_{k+1} - f_k) (c_k + c_{k+1}) / 2` along the last axis (``fractions`` broadcasts)."""
    widths = jnp.diff(fractions, axis=-1)
    return jnp.sum(widths * (curve[..., 1:] + curve[..., :-1]) / 2, axis=-1)
