"""Hand-written scaled dot-product attention, as GPT-style Flax code writes it.

BERT and ViT use Flax's attention modules (:class:`flax.linen.MultiHeadDotProductAttention`,
:class:`flax.nnx.MultiHeadAttention`); the GPT-2 decoder spells the same maths out with
``jnp.einsum`` and ``jax.nn.softmax``, the second idiom jlrp has to recognise.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["dot_product_attention", "nnx_attention_fn", "nnx_self_attention"]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked multi-head attention ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al., 2017, eq. 1).

    Masked scores are set to the dtype's most negative finite value (as Hugging Face's GPT-2), so a
    fully masked row stays finite.

    Args:
        q: queries, ``(..., T_q, heads, d)``.
        k: keys, ``(..., T_k, heads, d)``.
        v: values, ``(..., T_k, heads, d_v)``.
        mask: boolean, broadcastable to ``(..., heads, T_q, T_k)``; ``True`` = may attend.

    Returns:
        ``(..., T_q, heads * d_v)``: the heads' outputs concatenated.
    """
    scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    return out.reshape(*out.shape[:-2], -1)


def nnx_attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    is_causal: bool = False,
    **kwargs: Any,
) -> jax.Array:
    """``attention_fn`` for :class:`flax.nnx.MultiHeadAttention`: Flax's explicit einsum-softmax attention.

    NNX's default ``attention_fn`` dispatches to :func:`jax.nn.dot_product_attention`, whose XLA
    implementation always computes the softmax in float32 (so float64 models lose precision, and the
    attention is a different op sequence than linen's). This passes the call to
    :func:`flax.linen.dot_product_attention` instead, the attention linen's
    ``MultiHeadDotProductAttention`` uses, so NNX and linen models compute the same thing.

    Args:
        query: ``(..., T_q, heads, d)``.
        key: ``(..., T_k, heads, d)``.
        value: ``(..., T_k, heads, d_v)``.
        bias: optional additive bias of the scores, broadcastable to ``(..., heads, T_q, T_k)``.
        mask: optional boolean mask, broadcastable to ``(..., heads, T_q, T_k)``.
        is_causal: NNX's flag; adds a causal mask.
        **kwargs: dropout, dtype, precision and module arguments, passed on.

    Returns:
        ``(..., T_q, heads, d_v)``.
    """
    if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    return nn.dot_product_attention(query, key, value, bias, mask, **kwargs)


def nnx_self_attention(num_heads: int, features: int, **kwargs: Any) -> nnx.MultiHeadAttention:
    """An inference-mode :class:`flax.nnx.MultiHeadAttention` (``features`` wide in and out) that computes
    what linen's ``MultiHeadDotProductAttention`` computes (:func:`nnx_attention_fn`), as BERT and ViT use.

    Args:
        num_heads: attention heads.
        features: width of the queries, keys, values and output.
        **kwargs: ``kernel_init``, ``dtype``, ``param_dtype``, ``rngs``, ... passed on.
    """
    return nnx.MultiHeadAttention(
        num_heads,
        features,
        features,
        features,
        deterministic=True,
        decode=False,
        keep_rngs=False,
        attention_fn=nnx_attention_fn,
        **kwargs,
    )
