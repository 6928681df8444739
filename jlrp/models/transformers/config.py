"""Hyper-parameters of the transformer models, read from Hugging Face ``config.json`` files.

Each config is a frozen (hashable) dataclass, so it can be a linen module attribute. The field
names are Hugging Face's, so ``BertConfig(**hf_dict)`` style code reads naturally; options that the
Flax models do not implement are rejected by :meth:`from_hf_json` instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import flax.linen as nn
import jax

from jlrp.errors import UsageError, UsageTypeError

__all__ = ["BertConfig", "ViTConfig", "GPT2Config", "activation"]

_C = TypeVar("_C")

# Hugging Face activation names -> GELU variant. "gelu" is the exact (erf) GELU, the others are
# the tanh approximation of Hendrycks & Gimpel (2016), eq. in section 2.
_GELU_EXACT = ("gelu",)
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The element-wise activation a Hugging Face ``hidden_act`` / ``activation_function`` names.

    Args:
        name: ``'gelu'`` (exact, ``erf``), ``'gelu_new'`` / ``'gelu_pytorch_tanh'`` / ``'gelu_fast'``
            (tanh approximation) or ``'relu'``.

    Returns:
        A function ``x -> act(x)`` calling :func:`flax.linen.gelu` / :func:`flax.linen.relu`.

    Raises:
        UsageError: for any other name.
    """
    if name in _GELU_EXACT:
        return lambda x: nn.gelu(x, approximate=False)
    if name in _GELU_TANH:
        return lambda x: nn.gelu(x, approximate=True)
    if name == "relu":
        return nn.relu
    raise UsageError(
        f"activation {name!r} is not implemented; use one of {', '.join((*_GELU_EXACT, *_GELU_TANH, 'relu'))}"
    )


def _read(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A config dict from a mapping, a ``config.json`` path or a directory holding one."""
    if isinstance(source, Mapping):
        return dict(source)
    if not isinstance(source, str | os.PathLike):
        raise UsageTypeError(
            f"expected a config dict, a config.json path or a model directory, got {type(source).__name__}"
        )
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UsageError(f"no Hugging Face config at {str(path)!r}: pass the config.json or its directory")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _build(cls: type[_C], hf: dict[str, Any], model_types: tuple[str, ...], **extra: Any) -> _C:
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in model_types:
        raise UsageError(
            f"config has model_type {model_type!r}, but {cls.__name__} reads {' / '.join(model_types)} configs"
        )
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs = {k: v for k, v in hf.items() if k in names}
    kwargs.update(extra)
    return cls(**kwargs)


def _require(hf: Mapping[str, Any], key: str, supported: tuple[Any, ...], what: str) -> None:
    if key in hf and hf[key] not in supported:
        raise UsageError(f"{what} with {key}={hf[key]!r} is not implemented (supported: {supported})")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyper-parameters (Devlin et al., 2019), Hugging Face ``BertConfig`` names and defaults.

    Attributes:
        vocab_size: number of word-piece tokens.
        hidden_size: width ``H`` of the residual stream.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: heads per attention layer (``H`` must be divisible by it).
        intermediate_size: width of the feed-forward layer.
        max_position_embeddings: longest sequence the position table covers.
        type_vocab_size: number of token types (segments).
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_act: feed-forward activation (see :func:`activation`; BERT: exact ``'gelu'``).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_hf_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> BertConfig:
        """Read a Hugging Face BERT ``config.json``.

        Args:
            source: the parsed dict, the path of ``config.json``, or the model directory.

        Returns:
            The config (unknown keys such as dropout rates are ignored: the models are inference-only).

        Raises:
            UsageError: for a missing file, another model type, or options not implemented
                (relative position embeddings, an unknown activation).
        """
        hf = _read(source)
        _require(hf, "position_embedding_type", ("absolute",), "BERT")
        config = _build(cls, hf, ("bert",))
        activation(config.hidden_act)
        return config


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Vision Transformer hyper-parameters (Dosovitskiy et al., 2021), Hugging Face ``ViTConfig`` names.

    Attributes:
        hidden_size: width ``H`` of the residual stream.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: heads per attention layer.
        intermediate_size: width of the feed-forward layer.
        image_size: input height and width in pixels (the position table is fixed to it).
        patch_size: side of the square patches (stride of the patch-embedding convolution).
        num_channels: input channels.
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_act: feed-forward activation (ViT: exact ``'gelu'``).
        num_labels: classes of the linear head; 0 returns the normalised pooled features.
        classifier: ``'token'`` (class token, as Hugging Face) or ``'gap'`` (no class token, mean
            of all patch tokens).
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    num_labels: int = 1000
    classifier: str = "token"

    def __post_init__(self) -> None:
        if self.classifier not in ("token", "gap"):
            raise UsageError(f"ViTConfig.classifier must be 'token' or 'gap', got {self.classifier!r}")
        if self.image_size % self.patch_size:
            raise UsageError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        """Number of patch tokens, ``(image_size / patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> ViTConfig:
        """Read a Hugging Face ViT ``config.json``.

        ``num_labels`` is the length of ``id2label`` when present (as in Hugging Face), else
        ``num_labels``, else 2 (Hugging Face's default).

        Args:
            source: the parsed dict, the path of ``config.json``, or the model directory.

        Returns:
            The config (``classifier='token'``).

        Raises:
            UsageError: for a missing file, another model type, or options not implemented
                (``qkv_bias=False``, ``encoder_stride`` heads are ignored).
        """
        hf = _read(source)
        _require(hf, "qkv_bias", (True,), "ViT")
        num_labels = len(hf["id2label"]) if "id2label" in hf else int(hf.get("num_labels", 2))
        config = _build(cls, hf, ("vit",), num_labels=num_labels, classifier="token")
        activation(config.hidden_act)
        return config


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyper-parameters (Radford et al., 2019), Hugging Face ``GPT2Config`` names and defaults.

    Attributes:
        vocab_size: number of tokens (the LM head is tied to the token embedding).
        n_positions: longest sequence the position table covers.
        n_embd: width ``H`` of the residual stream.
        n_layer: number of decoder blocks.
        n_head: heads per attention layer.
        n_inner: width of the feed-forward layer (``None``: ``4 * n_embd``).
        layer_norm_epsilon: epsilon of every LayerNorm.
        activation_function: feed-forward activation (GPT-2: tanh ``'gelu_new'``).
    """

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"

    @property
    def inner_size(self) -> int:
        """Width of the feed-forward layer."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @classmethod
    def from_hf_json(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> GPT2Config:
        """Read a Hugging Face GPT-2 ``config.json``.

        Args:
            source: the parsed dict, the path of ``config.json``, or the model directory.

        Returns:
            The config.

        Raises:
            UsageError: for a missing file, another model type, or options not implemented
                (unscaled or layer-scaled attention, reordered-and-upcast attention).
        """
        hf = _read(source)
        _require(hf, "scale_attn_weights", (True,), "GPT-2")
        _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "GPT-2")
        _require(hf, "add_cross_attention", (False,), "GPT-2")
        config = _build(cls, hf, ("gpt2",))
        activation(config.activation_function)
        return config
