"""Baselines every attribution method must beat."""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp

from ..errors import UsageError
from ._common import _as_key

__all__ = ["random_attribution"]


def random_attribution(
    x_or_shape: Any,
    seed: int | jax.Array = 0,
    *,
    distribution: Literal["uniform", "normal"] = "uniform",
    dtype: Any = None,
) -> jax.Array:
    """Seeded random relevance: the baseline an attribution method must beat.

    ``'uniform'`` draws :math:`R_i \\sim U[-1, 1)`, ``'normal'`` :math:`R_i \\sim \\mathcal N(0, 1)`,
    independently per element, from ``jax.random.PRNGKey(seed)`` (or the key passed). Used as the
    ranking of :func:`region_perturbation`, it gives a uniformly random order of positions (and a
    random order of patches, as every patch sums the same number of i.i.d. values).

    Args:
        x_or_shape: an array (its shape and float dtype are used) or a shape tuple.
        seed: an int seed or a ``jax.random`` key.
        distribution: ``'uniform'`` or ``'normal'``.
        dtype: the result dtype; default: that of ``x`` (float32 for a shape).

    Returns:
        An array of the requested shape.
    """
    if isinstance(x_or_shape, (tuple, list)):
        shape = tuple(int(s) for s in x_or_shape)
        dtype = dtype or jnp.float32
    else:
        arr = jnp.asarray(x_or_shape)
        shape = arr.shape
        if dtype is None:
            dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else jnp.float32
    key = _as_key(seed)
    if distribution == "uniform":
        return jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
    if distribution == "normal":
        return jax.random.normal(key, shape, dtype)
    raise UsageError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")
