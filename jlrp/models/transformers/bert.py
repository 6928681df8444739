"""BERT (Devlin et al., 2019) and sentence-transformer heads, in Flax linen and Flax NNX.

Written as Flax users write an encoder: attention is :class:`flax.linen.MultiHeadDotProductAttention`
/ :class:`flax.nnx.MultiHeadAttention` with a padding mask from ``make_attention_mask``, the
feed-forward activation is ``nn.gelu(x, approximate=False)`` (exact erf GELU, as BERT), residual
adds are ``x + h`` before a post-norm ``LayerNorm``, and the position table is a parameter added to
the input stream. There is no dropout (inference models).

Submodule names (linen paths = NNX attribute paths; Hugging Face ``BertModel`` key in brackets):

- ``embeddings/word_embeddings`` [``embeddings.word_embeddings``], ``embeddings/position_embeddings``
  (a parameter) [``embeddings.position_embeddings.weight``], ``embeddings/token_type_embeddings``,
  ``embeddings/LayerNorm``;
- ``layer_<i>/attention/{query,key,value}`` [``encoder.layer.<i>.attention.self.{query,key,value}``],
  ``layer_<i>/attention/out`` [``encoder.layer.<i>.attention.output.dense``],
  ``layer_<i>/attention_norm`` [``...attention.output.LayerNorm``], ``layer_<i>/intermediate``
  [``...intermediate.dense``], ``layer_<i>/output`` [``...output.dense``], ``layer_<i>/output_norm``
  [``...output.LayerNorm``];
- ``pooler`` [``pooler.dense``].

The sentence heads hold the encoder as ``bert`` (no pooler), so :class:`SentenceEmbedding` and
:class:`SentenceSimilarity` share one set of variables.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jlrp.errors import InputError
from jlrp.models.transformers.attention import nnx_self_attention
from jlrp.models.transformers.config import BertConfig, activation
from jlrp.models.transformers.pooling import cosine_similarity, l2_normalize, mean_pool

__all__ = [
    "Bert",
    "BertEmbeddings",
    "BertLayer",
    "SentenceEmbedding",
    "SentenceSimilarity",
    "NNXBert",
    "NNXBertEmbeddings",
    "NNXBertLayer",
    "NNXSentenceEmbedding",
    "NNXSentenceSimilarity",
]

Dtype = Any
init = nn.initializers.normal(0.02)  # BERT's truncated-normal(0.02) initialiser, untruncated


def _check_ids(ids: jax.Array, max_length: int, where: str) -> None:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputError(f"{where} takes integer token ids, got dtype {ids.dtype}")
    if ids.shape[-1] > max_length:
        raise InputError(
            f"{where}: sequence length {ids.shape[-1]} exceeds max_position_embeddings={max_length}; "
            f"truncate the input"
        )


def _key_padding_mask(mask: jax.Array | None, ids: jax.Array) -> jax.Array:
    """``(..., 1, T, T)`` attention mask from a ``(..., T)`` padding mask.

    Only keys are masked (every query row attends to the real tokens), as Hugging Face's BERT does,
    so padded positions get the same states as there.
    """
    if mask is None:
        mask = jnp.ones(ids.shape, jnp.int32)
    return nn.make_attention_mask(jnp.ones_like(mask), mask)


def _check_pairs(ids: jax.Array, mask: jax.Array) -> None:
    if ids.ndim != 3 or ids.shape[1] != 2 or mask.shape != ids.shape:
        raise InputError(
            f"SentenceSimilarity takes ids and mask of shape (batch, 2, tokens), got {ids.shape} and "
            f"{mask.shape}"
        )


def _similarity(embeddings: jax.Array) -> jax.Array:
    return cosine_similarity(embeddings[:, 0], embeddings[:, 1])


# ------------------------------------------------------------------------------------ linen


class BertEmbeddings(nn.Module):
    """``LayerNorm(word + position + token type)`` embeddings.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype (``None``: inferred).
        param_dtype: parameter dtype.
    """

    config: BertConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """Embed ``(B, T)`` token ids (and segment ids, default 0) to ``(B, T, H)``."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        x = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init, name="word_embeddings", **kw)(ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        types = nn.Embed(
            c.type_vocab_size, c.hidden_size, embedding_init=init, name="token_type_embeddings", **kw
        )
        positions = self.param(
            "position_embeddings", init, (c.max_position_embeddings, c.hidden_size), self.param_dtype
        )
        x = x + types(token_type_ids) + positions[: ids.shape[-1]].astype(x.dtype)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="LayerNorm", **kw)(x)


class BertLayer(nn.Module):
    """Post-norm encoder layer: ``x = LN(x + MHA(x))``, ``x = LN(x + W2 gelu(W1 x))``.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: BertConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Apply the layer to ``(B, T, H)`` states with a ``(B, 1, T, T)`` boolean mask."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.MultiHeadDotProductAttention(
            num_heads=c.num_attention_heads,
            qkv_features=c.hidden_size,
            out_features=c.hidden_size,
            kernel_init=init,
            deterministic=True,
            name="attention",
            **kw,
        )(x, mask=attention_mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm", **kw)(x + h)
        h = nn.Dense(c.intermediate_size, kernel_init=init, name="intermediate", **kw)(x)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, kernel_init=init, name="output", **kw)(h)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, name="output_norm", **kw)(x + h)


class Bert(nn.Module):
    """BERT encoder, as Hugging Face's ``BertModel``.

    Example::

        config = jlrp.models.BertConfig.from_hf_json("model_dir")
        variables = jlrp.models.from_hf(state_dict, "bert", config)
        hidden, pooled = jlrp.models.linen.Bert(config).apply(variables, ids, mask)

    Attributes:
        config: hyper-parameters.
        add_pooling_layer: whether to compute the pooler ``tanh(W h_[CLS] + b)``.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: BertConfig
    add_pooling_layer: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    hf_family: ClassVar[str] = "bert"

    @nn.compact
    def __call__(
        self, ids: jax.Array, mask: jax.Array | None = None, token_type_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encode token ids.

        Args:
            ids: ``(B, T)`` integer token ids (any number of leading batch axes).
            mask: ``(B, T)``, 1 for tokens, 0 for padding (default: no padding).
            token_type_ids: ``(B, T)`` segment ids (default: 0).

        Returns:
            ``(hidden, pooled)``: the last hidden states ``(B, T, H)`` and the pooler output
            ``(B, H)`` (``None`` without pooling layer).

        Raises:
            InputError: for non-integer ids or sequences longer than the position table.
        """
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        _check_ids(ids, c.max_position_embeddings, "Bert")
        x = BertEmbeddings(c, name="embeddings", **kw)(ids, token_type_ids)
        attention_mask = _key_padding_mask(mask, ids)
        for i in range(c.num_hidden_layers):
            x = BertLayer(c, name=f"layer_{i}", **kw)(x, attention_mask)
        if not self.add_pooling_layer:
            return x, None
        pooled = jnp.tanh(nn.Dense(c.hidden_size, kernel_init=init, name="pooler", **kw)(x[..., 0, :]))
        return x, pooled


class SentenceEmbedding(nn.Module):
    """Sentence embedding: BERT, masked mean pooling, L2 normalisation (sentence-transformers).

    Attributes:
        config: hyper-parameters of the encoder.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: BertConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    hf_family: ClassVar[str] = "bert"

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Embed sentences.

        Args:
            ids: ``(B, T)`` integer token ids.
            mask: ``(B, T)``, 1 for tokens, 0 for padding.

        Returns:
            ``(B, H)`` unit-norm sentence embeddings.
        """
        bert = Bert(self.config, False, self.dtype, self.param_dtype, name="bert")
        hidden, _ = bert(ids, mask)
        return l2_normalize(mean_pool(hidden, mask))


class SentenceSimilarity(nn.Module):
    """Cosine similarity of two sentences: the dot product of their :class:`SentenceEmbedding` s.

    Same variables as :class:`SentenceEmbedding` (the encoder is ``bert``).

    Attributes:
        config: hyper-parameters of the encoder.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: BertConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    hf_family: ClassVar[str] = "bert"

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Similarity of sentence pairs.

        Args:
            ids: ``(B, 2, T)`` integer token ids (both sentences padded to ``T``).
            mask: ``(B, 2, T)``, 1 for tokens, 0 for padding.

        Returns:
            ``(B,)`` cosine similarities in ``[-1, 1]``.

        Raises:
            InputError: if ``ids``/``mask`` are not ``(B, 2, T)``.
        """
        _check_pairs(ids, mask)
        bert = Bert(self.config, False, self.dtype, self.param_dtype, name="bert")
        hidden, _ = bert(ids, mask)  # (B, 2, T, H): the encoder takes any leading batch axes
        return _similarity(l2_normalize(mean_pool(hidden, mask)))


# ------------------------------------------------------------------------------------ NNX


class NNXBertEmbeddings(nnx.Module):
    """NNX :class:`BertEmbeddings`; arguments as its attributes, plus ``rngs``."""

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.word_embeddings = nnx.Embed(c.vocab_size, c.hidden_size, embedding_init=init, **kw)
        self.position_embeddings = nnx.Param(
            init(rngs.params(), (c.max_position_embeddings, c.hidden_size), param_dtype)
        )
        self.token_type_embeddings = nnx.Embed(c.type_vocab_size, c.hidden_size, embedding_init=init, **kw)
        self.LayerNorm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)

    def __call__(self, ids: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """Embed ``(B, T)`` token ids (and segment ids, default 0) to ``(B, T, H)``."""
        x = self.word_embeddings(ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        positions = self.position_embeddings[...][: ids.shape[-1]]
        x = x + self.token_type_embeddings(token_type_ids) + positions.astype(x.dtype)
        return self.LayerNorm(x)


class NNXBertLayer(nnx.Module):
    """NNX :class:`BertLayer`; arguments as its attributes, plus ``rngs``."""

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.attention = nnx_self_attention(c.num_attention_heads, c.hidden_size, kernel_init=init, **kw)
        self.attention_norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.intermediate = nnx.Linear(c.hidden_size, c.intermediate_size, kernel_init=init, **kw)
        self.output = nnx.Linear(c.intermediate_size, c.hidden_size, kernel_init=init, **kw)
        self.output_norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.act = activation(c.hidden_act)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Apply the layer to ``(B, T, H)`` states with a ``(B, 1, T, T)`` boolean mask."""
        x = self.attention_norm(x + self.attention(x, mask=attention_mask))
        h = self.output(self.act(self.intermediate(x)))
        return self.output_norm(x + h)


class NNXBert(nnx.Module):
    """NNX :class:`Bert`; same arguments and call, plus ``rngs``."""

    hf_family: ClassVar[str] = "bert"

    def __init__(
        self,
        config: BertConfig,
        add_pooling_layer: bool = True,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.config = config
        self.embeddings = NNXBertEmbeddings(config, **kw)
        for i in range(config.num_hidden_layers):
            setattr(self, f"layer_{i}", NNXBertLayer(config, **kw))
        self.pooler = (
            nnx.Linear(config.hidden_size, config.hidden_size, kernel_init=init, **kw)
            if add_pooling_layer
            else None
        )

    def __call__(
        self, ids: jax.Array, mask: jax.Array | None = None, token_type_ids: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """Encode token ids; see :meth:`Bert.__call__`."""
        _check_ids(ids, self.config.max_position_embeddings, "Bert")
        x = self.embeddings(ids, token_type_ids)
        attention_mask = _key_padding_mask(mask, ids)
        for i in range(self.config.num_hidden_layers):
            x = getattr(self, f"layer_{i}")(x, attention_mask)
        if self.pooler is None:
            return x, None
        return x, jnp.tanh(self.pooler(x[..., 0, :]))


class NNXSentenceEmbedding(nnx.Module):
    """NNX :class:`SentenceEmbedding`; same arguments and call, plus ``rngs``."""

    hf_family: ClassVar[str] = "bert"

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.bert = NNXBert(config, False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, T)`` ids and mask -> ``(B, H)`` unit-norm embeddings."""
        hidden, _ = self.bert(ids, mask)
        return l2_normalize(mean_pool(hidden, mask))


class NNXSentenceSimilarity(nnx.Module):
    """NNX :class:`SentenceSimilarity`; same arguments and call, plus ``rngs``."""

    hf_family: ClassVar[str] = "bert"

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        self.bert = NNXBert(config, False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """``(B, 2, T)`` ids and mask -> ``(B,)`` cosine similarities."""
        _check_pairs(ids, mask)
        hidden, _ = self.bert(ids, mask)
        return _similarity(l2_normalize(mean_pool(hidden, mask)))
