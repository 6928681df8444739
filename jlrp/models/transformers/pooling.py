"""Sentence-embedding pooling: masked mean, L2 normalisation and cosine similarity.

The formulas of sentence-transformers' ``Pooling(mean)`` + ``Normalize`` modules (Reimers &
Gurevych, 2019): the mean of the token states over real (unpadded) tokens, divided by its
Euclidean norm. Shared by the linen and NNX sentence models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mean_pool", "l2_normalize", "cosine_similarity"]


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the token states over the tokens where ``mask`` is set.

    ``sum_t m_t h_t / max(sum_t m_t, 1e-9)`` (sentence-transformers' clamp).

    Args:
        hidden: token states, ``(..., T, H)``.
        mask: ``(..., T)``, 1 for tokens, 0 for padding (any numeric or boolean dtype).

    Returns:
        ``(..., H)``.
    """
    m = mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * m, axis=-2) / jnp.maximum(jnp.sum(m, axis=-2), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / max(||x||_2, 1e-12)`` over the last axis (``torch.nn.functional.normalize``).

    Args:
        x: ``(..., H)``.

    Returns:
        Unit vectors, ``(..., H)``.
    """
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_similarity(e1: jax.Array, e2: jax.Array) -> jax.Array:
    """Dot product of two L2-normalised embeddings, ``sum_i e1_i e2_i``.

    Args:
        e1: ``(..., H)``, unit norm.
        e2: ``(..., H)``, unit norm.

    Returns:
        ``(...)``: the cosine similarity.
    """
    return jnp.sum(e1 * e2, axis=-1)
