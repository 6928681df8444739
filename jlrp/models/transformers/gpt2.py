"""GPT-2-style causal decoder (Radford et al., 2019) in Flax linen and Flax NNX.

Pre-norm blocks ``x = x + attn(LN(x))``, ``x = x + W2 gelu_tanh(W1 LN(x))``; the attention is
hand-written (:func:`jlrp.models.transformers.attention.dot_product_attention`: ``jnp.einsum`` +
``jax.nn.softmax``) with a causal mask from ``make_causal_mask``; position embeddings are a
parameter added to the token embeddings; the LM head is tied to the token embedding
(``Embed.attend``). No dropout.

Submodule names equal Hugging Face ``GPT2Model`` keys with ``.<i>`` written ``_<i>``: ``wte``,
``wpe`` (a parameter), ``h_<i>/ln_1``, ``h_<i>/attn/c_attn``, ``h_<i>/attn/c_proj``, ``h_<i>/ln_2``,
``h_<i>/mlp/c_fc``, ``h_<i>/mlp/c_proj``, ``ln_f``. Hugging Face's ``Conv1D`` stores ``(in, out)``
weights, so the Dense kernels are its weights unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jlrp.errors import InputError
from jlrp.models.transformers.attention import dot_product_attention
from jlrp.models.transformers.config import GPT2Config, activation

__all__ = ["GPT2", "GPT2Block", "NNXGPT2", "NNXGPT2Block"]

Dtype = Any
init = nn.initializers.normal(0.02)


def _mask(ids: jax.Array, n_positions: int, mask: jax.Array | None) -> jax.Array:
    """Causal ``(B, 1, T, T)`` mask, combined with a ``(B, T)`` key padding mask if given."""
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(f"GPT2 takes integer token ids, got dtype {ids.dtype}")
    if ids.shape[-1] > n_positions:
        raise InputError(f"GPT2: sequence length {ids.shape[-1]} exceeds n_positions={n_positions}")
    causal = nn.make_causal_mask(ids)
    if mask is None:
        return causal
    return nn.combine_masks(causal, nn.make_attention_mask(jnp.ones_like(mask), mask))


def _heads(qkv: jax.Array, n_head: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = jnp.split(qkv, 3, axis=-1)
    shape = (*q.shape[:-1], n_head, q.shape[-1] // n_head)
    return q.reshape(shape), k.reshape(shape), v.reshape(shape)


# ------------------------------------------------------------------------------------ linen


class GPT2Attention(nn.Module):
    """Causal self-attention with fused ``c_attn`` (queries, keys, values) and ``c_proj``.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: GPT2Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, T, H)`` states, ``(B, 1, T, T)`` mask -> ``(B, T, H)``."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        q, k, v = _heads(nn.Dense(3 * c.n_embd, kernel_init=init, name="c_attn", **kw)(x), c.n_head)
        return nn.Dense(c.n_embd, kernel_init=init, name="c_proj", **kw)(dot_product_attention(q, k, v, mask))


class GPT2MLP(nn.Module):
    """Feed-forward ``c_proj(gelu(c_fc(x)))``.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: GPT2Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, T, H)`` -> ``(B, T, H)``."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.Dense(c.inner_size, kernel_init=init, name="c_fc", **kw)(x)
        h = activation(c.activation_function)(h)
        return nn.Dense(c.n_embd, kernel_init=init, name="c_proj", **kw)(h)


class GPT2Block(nn.Module):
    """Pre-norm decoder block.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: GPT2Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, T, H)`` states, ``(B, 1, T, T)`` mask -> ``(B, T, H)``."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = x + GPT2Attention(c, name="attn", **kw)(
            nn.LayerNorm(c.layer_norm_epsilon, name="ln_1", **kw)(x), mask
        )
        return x + GPT2MLP(c, name="mlp", **kw)(nn.LayerNorm(c.layer_norm_epsilon, name="ln_2", **kw)(x))


class GPT2(nn.Module):
    """GPT-2 language model with tied head, as Hugging Face's ``GPT2LMHeadModel``.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: GPT2Config
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    hf_family: ClassVar[str] = "gpt2"

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Next-token logits.

        Args:
            ids: ``(B, T)`` integer token ids.
            mask: ``(B, T)`` key padding mask, 1 for tokens (default: none).

        Returns:
            ``(B, T, vocab_size)`` logits.

        Raises:
            InputError: for non-integer ids or sequences longer than ``n_positions``.
        """
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        attention_mask = _mask(ids, c.n_positions, mask)
        wte = nn.Embed(c.vocab_size, c.n_embd, embedding_init=init, name="wte", **kw)
        wpe = self.param("wpe", nn.initializers.normal(0.01), (c.n_positions, c.n_embd), self.param_dtype)
        x = wte(ids)
        x = x + wpe[: ids.shape[-1]].astype(x.dtype)
        for i in range(c.n_layer):
            x = GPT2Block(c, name=f"h_{i}", **kw)(x, attention_mask)
        x = nn.LayerNorm(c.layer_norm_epsilon, name="ln_f", **kw)(x)
        return wte.attend(x)


# ------------------------------------------------------------------------------------ NNX


class NNXGPT2Attention(nnx.Module):
    """NNX :class:`GPT2Attention`."""

    def __init__(
        self, config: GPT2Config, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.n_head = config.n_head
        self.c_attn = nnx.Linear(config.n_embd, 3 * config.n_embd, kernel_init=init, **kw)
        self.c_proj = nnx.Linear(config.n_embd, config.n_embd, kernel_init=init, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, T, H)`` states, ``(B, 1, T, T)`` mask -> ``(B, T, H)``."""
        q, k, v = _heads(self.c_attn(x), self.n_head)
        return self.c_proj(dot_product_attention(q, k, v, mask))


class NNXGPT2MLP(nnx.Module):
    """NNX :class:`GPT2MLP`."""

    def __init__(
        self, config: GPT2Config, *, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.c_fc = nnx.Linear(config.n_embd, config.inner_size, kernel_init=init, **kw)
        self.c_proj = nnx.Linear(config.inner_size, config.n_embd, kernel_init=init, **kw)
        self.act = activation(config.activation_function)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, T, H)`` -> ``(B, T, H)``."""
        return self.c_proj(self.act(self.c_fc(x)))


class NNXGPT2Block(nnx.Module):
    """NNX :class:`GPT2Block`; arguments as its attributes, plus ``rngs``."""

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.ln_1 = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, **kw)
        self.attn = NNXGPT2Attention(config, **kw)
        self.ln_2 = nnx.LayerNorm(config.n_embd, epsilon=config.layer_norm_epsilon, **kw)
        self.mlp = NNXGPT2MLP(config, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, T, H)`` states, ``(B, 1, T, T)`` mask -> ``(B, T, H)``."""
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class NNXGPT2(nnx.Module):
    """NNX :class:`GPT2`; same arguments and call, plus ``rngs``."""

    hf_family: ClassVar[str] = "gpt2"

    def __init__(
        self,
        config: GPT2Config,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.config = c
        self.wte = nnx.Embed(c.vocab_size, c.n_embd, embedding_init=init, **kw)
        self.wpe = nnx.Param(
            nn.initializers.normal(0.01)(rngs.params(), (c.n_positions, c.n_embd), param_dtype)
        )
        for i in range(c.n_layer):
            setattr(self, f"h_{i}", NNXGPT2Block(c, **kw))
        self.ln_f = nnx.LayerNorm(c.n_embd, epsilon=c.layer_norm_epsilon, **kw)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Next-token logits; see :meth:`GPT2.__call__`."""
        c = self.config
        attention_mask = _mask(ids, c.n_positions, mask)
        x = self.wte(ids)
        x = x + self.wpe[...][: ids.shape[-1]].astype(x.dtype)
        for i in range(c.n_layer):
            x = getattr(self, f"h_{i}")(x, attention_mask)
        return self.wte.attend(self.ln_f(x))
