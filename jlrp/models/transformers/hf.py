"""Load Hugging Face state dicts (``BertModel``, ``ViTForImageClassification``, ``GPT2LMHeadModel``)
into the Flax transformers of :mod:`jlrp.models`.

As :mod:`jlrp.models.convert`, the converters are driven by the *Flax* model: every parameter the
model has is looked up under the Hugging Face key its path maps to, converted, and checked for
shape; anything missing, mis-shaped or left over is reported in one :class:`StateDictError`, and
nothing is filled in silently. Values may be NumPy arrays (``safetensors.numpy.load_file``), JAX
arrays or torch tensors (torch itself is never imported).

Layouts (Flax shape <- Hugging Face shape):

==========================  ============================  ======================================
Flax leaf                   Hugging Face                  conversion
==========================  ============================  ======================================
``Dense`` kernel            ``nn.Linear.weight``          ``(out, in)`` -> ``(in, out)``
attention q/k/v kernel      ``nn.Linear.weight``          ``(heads*d, H)`` -> ``(H, heads, d)``
attention q/k/v bias        ``nn.Linear.bias``            ``(heads*d,)`` -> ``(heads, d)``
attention ``out`` kernel    ``nn.Linear.weight``          ``(H, heads*d)`` -> ``(heads, d, H)``
GPT-2 ``Dense`` kernel      ``Conv1D.weight``             ``(in, out)``, unchanged
patch ``Conv`` kernel       ``nn.Conv2d.weight``          ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``
``Embed`` table, LN scale   ``weight``                    unchanged
==========================  ============================  ======================================

Prefixes: the base-model keys may carry the head model's prefix (``bert.``, ``vit.``,
``transformer.``, or sentence-transformers' ``0.auto_model.``); the prefix that matches most keys is
used. Buffers (``position_ids``, GPT-2's ``attn.bias`` / ``attn.masked_bias``) are skipped; a
``lm_head.weight`` must equal ``wte`` (the Flax head is tied).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jlrp.errors import StateDictError, UnknownNameError, UsageError, UsageTypeError
from jlrp.models.convert import _as_state_dict, _check_dtype, _to_jax, raise_if_problems, to_numpy
from jlrp.models.transformers import bert, gpt2, vit
from jlrp.models.transformers.config import BertConfig, GPT2Config, ViTConfig

__all__ = ["HF_ARCHS", "from_hf", "load_hf_nnx", "hf_key"]

#: Linen model classes by ``from_hf`` architecture name, ``cls(config)``.
HF_ARCHS: dict[str, type[nn.Module]] = {
    "bert": bert.Bert,
    "sentence_embedding": bert.SentenceEmbedding,
    "sentence_similarity": bert.SentenceSimilarity,
    "vit": vit.ViT,
    "gpt2": gpt2.GPT2,
}

_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "embedding": "weight"}


def _module(flax: str, hf: str, kernel: str = "dense", bias: str = "copy") -> list[tuple[str, str, str]]:
    """Rules for the leaves of one Flax layer ``flax`` (a regex) stored as ``hf`` (a template)."""
    kinds = {"kernel": kernel, "bias": bias, "scale": "copy", "embedding": "copy"}
    return [(f"{flax}/{leaf}", f"{hf}.{_LEAF[leaf]}", kind) for leaf, kind in kinds.items()]


_N = r"layer_(\d+)"
_BERT = [
    *_module("embeddings/(word_embeddings|token_type_embeddings)", r"embeddings.\1"),
    ("embeddings/position_embeddings", "embeddings.position_embeddings.weight", "copy"),
    *_module("embeddings/LayerNorm", "embeddings.LayerNorm"),
    *_module(rf"{_N}/attention/(query|key|value)", r"encoder.layer.\1.attention.self.\2", "dense", "flat"),
    *_module(rf"{_N}/attention/out", r"encoder.layer.\1.attention.output.dense", "dense_out"),
    *_module(rf"{_N}/attention_norm", r"encoder.layer.\1.attention.output.LayerNorm"),
    *_module(rf"{_N}/intermediate", r"encoder.layer.\1.intermediate.dense"),
    *_module(rf"{_N}/output", r"encoder.layer.\1.output.dense"),
    *_module(rf"{_N}/output_norm", r"encoder.layer.\1.output.LayerNorm"),
    *_module("pooler", "pooler.dense"),
]
_VIT = [
    *_module("patch_embeddings", "embeddings.patch_embeddings.projection", "conv"),
    ("cls_token", "embeddings.cls_token", "copy"),
    ("position_embeddings", "embeddings.position_embeddings", "copy"),
    *_module(rf"{_N}/(layernorm_before|layernorm_after)", r"encoder.layer.\1.\2"),
    *_module(
        rf"{_N}/attention/(query|key|value)", r"encoder.layer.\1.attention.attention.\2", "dense", "flat"
    ),
    *_module(rf"{_N}/attention/out", r"encoder.layer.\1.attention.output.dense", "dense_out"),
    *_module(rf"{_N}/(intermediate|output)", r"encoder.layer.\1.\2.dense"),
    *_module("layernorm", "layernorm"),
]
_GPT2 = [
    *_module("wte", "wte"),
    ("wpe", "wpe.weight", "copy"),
    *_module(r"h_(\d+)/(ln_1|ln_2|ln_f)", r"h.\1.\2"),
    *_module(r"h_(\d+)/(attn|mlp)/(c_attn|c_proj|c_fc)", r"h.\1.\2.\3", "conv1d"),
    *_module("ln_f", "ln_f"),
]


@dataclass(frozen=True)
class _Family:
    """How one architecture's Flax paths map to Hugging Face keys."""

    rules: tuple[tuple[re.Pattern[str], str, str], ...]
    prefixes: tuple[str, ...]  # candidate prefixes of base-model keys, preferred first
    head: tuple[tuple[re.Pattern[str], str, str], ...] = ()  # rules of keys without prefix
    buffers: tuple[str, ...] = ()  # globs (after the prefix) of non-parameter entries to skip
    root: str = ""  # wrapper component in front of the Flax path (the sentence heads' "bert")
    config: type = object


def _compile(rules: list[tuple[str, str, str]]) -> tuple[tuple[re.Pattern[str], str, str], ...]:
    return tuple((re.compile(p), t, k) for p, t, k in rules)


_FAMILIES = {
    "bert": _Family(
        _compile(_BERT),
        ("", "bert.", "0.auto_model."),
        buffers=("embeddings.position_ids",),
        root="bert",
        config=BertConfig,
    ),
    "vit": _Family(
        _compile(_VIT),
        ("vit.", ""),
        head=_compile(_module("classifier", "classifier")),
        config=ViTConfig,
    ),
    "gpt2": _Family(
        _compile(_GPT2),
        ("transformer.", ""),
        buffers=("h.*.attn.bias", "h.*.attn.masked_bias"),
        config=GPT2Config,
    ),
}


def _family(model: Any) -> tuple[str, _Family]:
    cls = model if isinstance(model, type) else type(model)
    name = getattr(cls, "hf_family", None)
    if name not in _FAMILIES:
        raise UsageTypeError(
            f"{cls.__name__} has no Hugging Face layout; use one of the jlrp.models transformers "
            f"({', '.join(HF_ARCHS)}) or a model with their submodule names"
        )
    return name, _FAMILIES[name]


def hf_key(family: str, path: Sequence[Any]) -> tuple[str, str, bool]:
    """Hugging Face key of a Flax parameter.

    Args:
        family: ``'bert'``, ``'vit'`` or ``'gpt2'``.
        path: the parameter's path without the ``'params'`` collection, e.g.
            ``('layer_0', 'attention', 'query', 'kernel')`` (a leading ``'bert'`` of the sentence
            heads is dropped).

    Returns:
        ``(key, kind, prefixed)``: the key without the head model's prefix, e.g.
        ``'encoder.layer.0.attention.self.query.weight'``; the layout conversion (``'copy'``,
        ``'flat'``, ``'dense'``, ``'dense_out'``, ``'conv'``, ``'conv1d'``); whether the key takes the
        base-model prefix.

    Raises:
        UnknownNameError: for an unknown family or a path without counterpart.
    """
    if family not in _FAMILIES:
        raise UnknownNameError(f"unknown Hugging Face family {family!r}; known: {', '.join(_FAMILIES)}")
    fam = _FAMILIES[family]
    parts = [str(p) for p in path]
    if fam.root and len(parts) > 1 and parts[0] == fam.root:
        parts = parts[1:]
    name = "/".join(parts)
    for rules, prefixed in ((fam.rules, True), (fam.head, False)):
        for pattern, template, kind in rules:
            match = pattern.fullmatch(name)
            if match:
                return match.expand(template), kind, prefixed
    raise UnknownNameError(f"no Hugging Face {family} counterpart for parameter {'/'.join(map(str, path))!r}")


def _hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Hugging Face shape that converts to Flax ``shape``."""
    size = int(np.prod(shape))
    if kind == "flat":
        return (size,)
    if kind == "dense":  # (in, *out) <- (prod(out), in)
        return (size // shape[0], shape[0])
    if kind == "dense_out":  # (heads, d, out) <- (out, heads*d)
        return (int(np.prod(shape[2:])), shape[0] * shape[1])
    if kind == "conv":  # (kh, kw, I, O) <- (O, I, kh, kw)
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _to_flax(kind: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if kind in ("dense", "dense_out"):
        return value.T.reshape(shape)
    if kind == "conv":
        return value.transpose(2, 3, 1, 0)
    return value.reshape(shape)


def _convert(
    state_dict: Mapping[str, Any],
    family_name: str,
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    dtype: np.dtype,
    ignore: Sequence[str],
    what: str,
) -> dict[tuple[str, ...], np.ndarray]:
    """Look up, convert and check every expected parameter; raise one error listing all problems."""
    state_dict = _as_state_dict(state_dict)
    fam = _FAMILIES[family_name]
    keys, unknown = {}, []
    for path in expected:
        try:
            keys[path] = hf_key(family_name, path)
        except UnknownNameError:
            unknown.append("/".join(path))
    if unknown:
        raise StateDictError(
            f"{what} has parameters without a Hugging Face {family_name} counterpart: {', '.join(unknown)}"
        )
    base = [key for key, _, prefixed in keys.values() if prefixed]
    prefix = max(fam.prefixes, key=lambda p: sum(p + k in state_dict for k in base))
    out: dict[tuple[str, ...], np.ndarray] = {}
    missing, misshaped, used = [], [], set()
    for path, shape in expected.items():
        key, kind, prefixed = keys[path]
        key = prefix + key if prefixed else key
        hf_shape = _hf_shape(kind, tuple(shape))
        if key not in state_dict:
            missing.append(f"{key} (for {'/'.join(path)}, shape {hf_shape})")
            continue
        used.add(key)
        value = to_numpy(state_dict[key])
        if tuple(value.shape) != hf_shape:
            misshaped.append(f"{key}: got {tuple(value.shape)}, expected {hf_shape}")
            continue
        out[path] = np.array(_to_flax(kind, value, tuple(shape)), dtype=dtype, order="C", copy=True)
    notes = []
    if family_name == "gpt2" and "lm_head.weight" in state_dict:
        used.add("lm_head.weight")
        wte = out.get(("wte", "embedding"))
        if wte is not None and not np.array_equal(to_numpy(state_dict["lm_head.weight"]).astype(dtype), wte):
            misshaped.append("lm_head.weight: differs from wte.weight, but the Flax GPT2 head is tied to wte")
    skip = [prefix + b for b in fam.buffers] + list(ignore)
    unexpected = sorted(
        k for k in state_dict if k not in used and not any(fnmatch.fnmatchcase(str(k), g) for g in skip)
    )
    if unexpected:
        notes.append(
            f"(base-model prefix used: {prefix!r}; pass ignore=['pattern*'] to skip keys on purpose)"
        )
    raise_if_problems(what, missing, misshaped, unexpected, *notes)
    return out


def _config(family: _Family, config: Any) -> Any:
    if isinstance(config, family.config):
        return config
    if config is None:
        raise UsageError(
            f"from_hf needs the model's config: a {family.config.__name__}, a config.json path or its dict"
        )
    return family.config.from_hf_json(config)


def _dummy(family_name: str, model: Any) -> tuple[Any, ...]:
    if family_name == "vit":
        c = model.config
        return (jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32),)
    if isinstance(model, bert.SentenceSimilarity):
        return (jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2, 2), jnp.int32))
    return (jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))


def _default_ignore(model: Any) -> tuple[str, ...]:
    # sentence-transformers keeps BERT's pooler in its checkpoints but never uses it
    if isinstance(model, bert.SentenceEmbedding | bert.SentenceSimilarity) or isinstance(
        model, bert.NNXSentenceEmbedding | bert.NNXSentenceSimilarity
    ):
        return ("pooler.*", "bert.pooler.*", "0.auto_model.pooler.*")
    return ()


def from_hf(
    state_dict: Mapping[str, Any],
    arch: str | nn.Module,
    config: Any = None,
    *,
    dtype: Any = np.float32,
    ignore: Sequence[str] = (),
) -> dict[str, Any]:
    """Convert a Hugging Face state dict into linen variables.

    Example::

        from safetensors.numpy import load_file
        config = jlrp.models.BertConfig.from_hf_json("all-MiniLM-L6-v2/config.json")
        variables = jlrp.models.from_hf(load_file("all-MiniLM-L6-v2/model.safetensors"),
                                        "sentence_embedding", config)
        embeddings = jlrp.models.linen.SentenceEmbedding(config).apply(variables, ids, mask)

    Args:
        state_dict: Hugging Face-layout state dict (``BertModel`` / ``Bert*`` heads,
            ``ViTForImageClassification`` / ``ViTModel``, ``GPT2LMHeadModel`` / ``GPT2Model``);
            values NumPy arrays or torch tensors; a torch module is accepted too.
        arch: ``'bert'`` (with pooler iff the state dict has one), ``'sentence_embedding'``,
            ``'sentence_similarity'`` (BERT's pooler keys are then skipped), ``'vit'``, ``'gpt2'``, or a
            linen model of :mod:`jlrp.models.transformers`.
        config: the model's :class:`BertConfig` / :class:`ViTConfig` / :class:`GPT2Config`, its
            ``config.json`` path or dict (ignored when ``arch`` is a module).
        dtype: dtype of the returned arrays (``np.float64`` needs ``jax_enable_x64``).
        ignore: glob patterns of state-dict keys to skip on purpose (e.g. ``'cls.*'`` of a
            ``BertForPreTraining`` checkpoint).

    Returns:
        ``{'params': ...}`` (nested dicts of JAX arrays) with exactly the parameters ``model.init``
        creates.

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key.
        UnknownNameError: for an unknown architecture name.
        UsageError: for a missing config.
    """
    dtype = _check_dtype(dtype)
    state_dict = _as_state_dict(state_dict)
    if isinstance(arch, str):
        if arch not in HF_ARCHS:
            raise UnknownNameError(f"unknown architecture {arch!r}; known: {', '.join(HF_ARCHS)}")
        cls = HF_ARCHS[arch]
        family_name, family = _family(cls)
        config = _config(family, config)
        if cls is bert.Bert:
            model = cls(
                config, add_pooling_layer=any(str(k).endswith("pooler.dense.weight") for k in state_dict)
            )
        else:
            model = cls(config)
    else:
        model = arch
    family_name, _ = _family(model)
    dummy = _dummy(family_name, model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy))
    flat = traverse_util.flatten_dict(dict(shapes))
    if any(path[0] != "params" for path in flat):
        raise StateDictError(
            f"{type(model).__name__} has non-parameter variables, which Hugging Face does not store"
        )
    expected = {path[1:]: tuple(leaf.shape) for path, leaf in flat.items()}
    arrays = _convert(
        state_dict, family_name, expected, dtype, (*_default_ignore(model), *ignore), type(model).__name__
    )
    return {"params": traverse_util.unflatten_dict({path: _to_jax(a) for path, a in arrays.items()})}


def load_hf_nnx(
    model: nnx.Module, state_dict: Mapping[str, Any], *, dtype: Any = None, ignore: Sequence[str] = ()
) -> nnx.Module:
    """Load a Hugging Face state dict into an NNX transformer of :mod:`jlrp.models`, in place.

    The model may be abstract (:func:`flax.nnx.eval_shape`), which skips a random initialisation
    about to be overwritten::

        model = nnx.eval_shape(lambda: jlrp.models.nnx.SentenceEmbedding(config, rngs=nnx.Rngs(0)))
        jlrp.models.load_hf_nnx(model, state_dict)

    Args:
        model: an NNX model of :mod:`jlrp.models.transformers` (``NNXBert``, ``NNXSentenceEmbedding``,
            ``NNXSentenceSimilarity``, ``NNXViT``, ``NNXGPT2``) or one with their attribute names.
        state_dict: Hugging Face-layout state dict, as for :func:`from_hf`.
        dtype: dtype of the loaded arrays; ``None`` (default): the model's parameter dtype. It must
            equal the ``param_dtype`` the model was built with, because NNX layers with ``dtype=None``
            compute in their ``param_dtype`` (``nnx.Embed`` would silently round float64 weights
            to float32).
        ignore: glob patterns of state-dict keys to skip on purpose.

    Returns:
        ``model`` itself, updated.

    Raises:
        StateDictError: naming every missing, unexpected and mis-shaped key, or abstract non-parameter
            state (the model is left unchanged).
        UsageError: if ``dtype`` differs from the model's parameter dtype.
        UsageTypeError: for a model without Hugging Face layout.
    """
    family_name, _ = _family(model)
    params: dict[tuple[str, ...], nnx.Variable] = {}
    abstract = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            params[tuple(str(p) for p in path)] = node
        elif isinstance(node, nnx.Variable) and isinstance(node.get_value(), jax.ShapeDtypeStruct):
            abstract.append(f"{'/'.join(map(str, path))} ({type(node).__name__})")
    model_dtypes = sorted({str(np.dtype(var.get_value().dtype)) for var in params.values()})
    if dtype is None:
        if len(model_dtypes) != 1:
            raise UsageError(f"{type(model).__name__} mixes parameter dtypes {model_dtypes}; pass dtype=")
        dtype = model_dtypes[0]
    dtype = _check_dtype(dtype)
    if model_dtypes != [str(dtype)]:
        raise UsageError(
            f"dtype={dtype} but {type(model).__name__} was built with parameters of dtype {', '.join(model_dtypes)}; "
            f"build it with param_dtype={dtype} (its layers compute in their param_dtype)"
        )
    expected = {path: tuple(var.get_value().shape) for path, var in params.items()}
    arrays = _convert(
        state_dict, family_name, expected, dtype, (*_default_ignore(model), *ignore), type(model).__name__
    )
    if abstract:
        raise StateDictError(
            f"{type(model).__name__} has abstract variables that a state dict does not provide: "
            + ", ".join(abstract)
        )
    for path, array in arrays.items():
        params[path].set_value(_to_jax(array))
    return model
