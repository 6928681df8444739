"""Vision Transformer (Dosovitskiy et al., 2021) in Flax linen and Flax NNX.

Images are ``NHWC``. Patches are embedded by a strided convolution, a class token (``'token'``
head) is concatenated in front, the position table (a parameter) is added, and pre-norm encoder
layers follow: ``x = x + MHA(LN(x))``, ``x = x + W2 gelu(W1 LN(x))`` with Flax's attention module
and exact GELU. The head reads the class token (``'token'``) or the mean of all tokens (``'gap'``)
after the final LayerNorm.

Submodule names (Hugging Face ``ViTForImageClassification`` key in brackets, ``vit.`` prefix
omitted): ``patch_embeddings`` [``embeddings.patch_embeddings.projection``], ``cls_token``
[``embeddings.cls_token``], ``position_embeddings`` [``embeddings.position_embeddings``],
``layer_<i>/layernorm_before``, ``layer_<i>/attention/{query,key,value}``
[``encoder.layer.<i>.attention.attention.*``], ``layer_<i>/attention/out``
[``...attention.output.dense``], ``layer_<i>/layernorm_after``, ``layer_<i>/intermediate``
[``...intermediate.dense``], ``layer_<i>/output`` [``...output.dense``], ``layernorm``,
``classifier`` [``classifier``, no prefix].
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jlrp.errors import InputError
from jlrp.models.transformers.attention import nnx_self_attention
from jlrp.models.transformers.config import ViTConfig, activation

__all__ = ["ViT", "ViTLayer", "NNXViT", "NNXViTLayer"]

Dtype = Any
init = nn.initializers.normal(0.02)


def _check_images(x: jax.Array, c: ViTConfig) -> None:
    expected = (c.image_size, c.image_size, c.num_channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise InputError(
            f"ViT takes images of shape (batch, {c.image_size}, {c.image_size}, {c.num_channels}) (NHWC), "
            f"got {tuple(x.shape)}; resize them (the position table is fixed to image_size)"
        )


def _tokens(patches: jax.Array) -> jax.Array:
    b, h, w, d = patches.shape
    return patches.reshape(b, h * w, d)


def _head(x: jax.Array, c: ViTConfig) -> jax.Array:
    return x[:, 0] if c.classifier == "token" else jnp.mean(x, axis=1)


# ------------------------------------------------------------------------------------ linen


class ViTLayer(nn.Module):
    """Pre-norm encoder layer.

    Attributes:
        config: hyper-parameters.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: ViTConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``(B, N, H)`` tokens."""
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm_before", **kw)(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=c.num_attention_heads,
            qkv_features=c.hidden_size,
            out_features=c.hidden_size,
            kernel_init=init,
            deterministic=True,
            name="attention",
            **kw,
        )(h)
        x = x + h
        h = nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm_after", **kw)(x)
        h = nn.Dense(c.intermediate_size, kernel_init=init, name="intermediate", **kw)(h)
        h = activation(c.hidden_act)(h)
        h = nn.Dense(c.hidden_size, kernel_init=init, name="output", **kw)(h)
        return x + h


class ViT(nn.Module):
    """Vision Transformer classifier, as Hugging Face's ``ViTForImageClassification`` (``'token'``).

    Attributes:
        config: hyper-parameters (``config.classifier``: ``'token'`` or ``'gap'``).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    config: ViTConfig
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    hf_family: ClassVar[str] = "vit"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Classify images.

        Args:
            x: ``(B, image_size, image_size, num_channels)`` images (``NHWC``, normalised as the
                weights expect).

        Returns:
            ``(B, num_labels)`` logits, or ``(B, H)`` features when ``num_labels == 0``.

        Raises:
            InputError: for images of another size.
        """
        c = self.config
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        _check_images(x, c)
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", name="patch_embeddings", **kw)(x)
        x = _tokens(x)
        if c.classifier == "token":
            cls = self.param("cls_token", nn.initializers.zeros, (1, 1, c.hidden_size), self.param_dtype)
            x = jnp.concatenate(
                [jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x], axis=1
            )
        positions = self.param("position_embeddings", init, (1, x.shape[1], c.hidden_size), self.param_dtype)
        x = x + positions.astype(x.dtype)
        for i in range(c.num_hidden_layers):
            x = ViTLayer(c, name=f"layer_{i}", **kw)(x)
        x = _head(nn.LayerNorm(epsilon=c.layer_norm_eps, name="layernorm", **kw)(x), c)
        if c.num_labels:
            x = nn.Dense(c.num_labels, name="classifier", **kw)(x)
        return x


# ------------------------------------------------------------------------------------ NNX


class NNXViTLayer(nnx.Module):
    """NNX :class:`ViTLayer`; arguments as its attributes, plus ``rngs``."""

    def __init__(
        self,
        config: ViTConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.layernorm_before = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.attention = nnx_self_attention(c.num_attention_heads, c.hidden_size, kernel_init=init, **kw)
        self.layernorm_after = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.intermediate = nnx.Linear(c.hidden_size, c.intermediate_size, kernel_init=init, **kw)
        self.output = nnx.Linear(c.intermediate_size, c.hidden_size, kernel_init=init, **kw)
        self.act = activation(c.hidden_act)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the layer to ``(B, N, H)`` tokens."""
        x = x + self.attention(self.layernorm_before(x))
        h = self.output(self.act(self.intermediate(self.layernorm_after(x))))
        return x + h


class NNXViT(nnx.Module):
    """NNX :class:`ViT`; same arguments and call, plus ``rngs``."""

    hf_family: ClassVar[str] = "vit"

    def __init__(
        self,
        config: ViTConfig,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        c = config
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        self.config = c
        p = c.patch_size
        self.patch_embeddings = nnx.Conv(
            c.num_channels, c.hidden_size, (p, p), strides=(p, p), padding="VALID", **kw
        )
        tokens = c.num_patches
        if c.classifier == "token":
            self.cls_token = nnx.Param(jnp.zeros((1, 1, c.hidden_size), param_dtype))
            tokens += 1
        self.position_embeddings = nnx.Param(init(rngs.params(), (1, tokens, c.hidden_size), param_dtype))
        for i in range(c.num_hidden_layers):
            setattr(self, f"layer_{i}", NNXViTLayer(c, **kw))
        self.layernorm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
        self.classifier = nnx.Linear(c.hidden_size, c.num_labels, **kw) if c.num_labels else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Classify ``NHWC`` images; see :meth:`ViT.__call__`."""
        c = self.config
        _check_images(x, c)
        x = _tokens(self.patch_embeddings(x))
        if c.classifier == "token":
            cls = self.cls_token[...].astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
        x = x + self.position_embeddings[...].astype(x.dtype)
        for i in range(c.num_hidden_layers):
            x = getattr(self, f"layer_{i}")(x)
        x = _head(self.layernorm(x), c)
        return self.classifier(x) if self.classifier is not None else x
