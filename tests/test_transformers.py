"""Tests of the transformer models of :mod:`jlrp.models` (BERT, sentence heads, ViT, GPT-2) and of
the Hugging Face converters.

Torch-free tests: NNX equals linen on the same weights, causality, converter errors, configs.
``crosscheck`` tests: random small Hugging Face models (``transformers``, torch CPU) converted to
Flax give the same outputs (1e-10 relative in float64, 1e-5 in float32), and the real offline
all-MiniLM-L6-v2 gives sentence-transformers' embeddings (1e-5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import jlrp.models as jm
from jlrp.errors import InputError, StateDictError, UsageError

BERT = jm.BertConfig(
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    max_position_embeddings=12,
)
VIT = jm.ViTConfig(
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=24,
    image_size=8,
    patch_size=4,
    num_labels=5,
)
GPT = jm.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=4)

IDS = np.array([[2, 7, 11, 3, 9, 4], [2, 5, 8, 3, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.int32)
IMAGES = np.random.default_rng(0).normal(size=(2, 8, 8, 3))

# name -> (linen model, NNX constructor, inputs)
MODELS = {
    "bert": (jm.linen.Bert(BERT), lambda **kw: jm.nnx.Bert(BERT, **kw), (IDS, MASK)),
    "sentence_embedding": (
        jm.linen.SentenceEmbedding(BERT),
        lambda **kw: jm.nnx.SentenceEmbedding(BERT, **kw),
        (IDS, MASK),
    ),
    "sentence_similarity": (
        jm.linen.SentenceSimilarity(BERT),
        lambda **kw: jm.nnx.SentenceSimilarity(BERT, **kw),
        (IDS.reshape(1, 2, 6), MASK.reshape(1, 2, 6)),
    ),
    "vit": (jm.linen.ViT(VIT), lambda **kw: jm.nnx.ViT(VIT, **kw), (IMAGES,)),
    "vit_gap": (
        jm.linen.ViT(VIT.__class__(**{**VIT.__dict__, "classifier": "gap"})),
        lambda **kw: jm.nnx.ViT(VIT.__class__(**{**VIT.__dict__, "classifier": "gap"}), **kw),
        (IMAGES,),
    ),
    "gpt2": (jm.linen.GPT2(GPT), lambda **kw: jm.nnx.GPT2(GPT, **kw), (IDS,)),
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_linen(model: nn.Module, inputs, seed: int = 0, dtype=jnp.float64):
    """linen variables with every parameter random (biases, LayerNorm scales included)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    flat = traverse_util.flatten_dict(dict(shapes))
    rng = np.random.default_rng(seed)
    return traverse_util.unflatten_dict(
        {p: jnp.asarray(rng.normal(0.0, 0.3, s.shape), dtype) for p, s in flat.items()}
    )


def nnx_from_linen(make, variables):
    """The NNX model with the linen parameters put at the same paths (fails on any path mismatch)."""
    model = nnx.eval_shape(lambda: make(param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    flat = {p[1:]: v for p, v in traverse_util.flatten_dict(variables).items()}
    seen = set()
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            key = tuple(str(p) for p in path)
            assert key in flat, f"NNX parameter {key} has no linen counterpart"
            assert tuple(node.get_value().shape) == flat[key].shape, key
            node.set_value(flat[key])
            seen.add(key)
    assert seen == set(flat), f"linen parameters missing in NNX: {set(flat) - seen}"
    return model


# ------------------------------------------------------------------------------------ torch-free


@pytest.mark.parametrize("name", list(MODELS))
def test_nnx_equals_linen_on_the_same_weights(name):
    linen_model, make, inputs = MODELS[name]
    variables = random_linen(linen_model, inputs)
    expected = linen_model.apply(variables, *inputs)
    got = nnx_from_linen(make, variables)(*inputs)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert e.dtype == jnp.float64 and e.shape == g.shape
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)


def test_output_shapes_and_unit_norm():
    outs = {n: m.apply(random_linen(m, x), *x) for n, (m, _, x) in MODELS.items()}
    hidden, pooled = outs["bert"]
    assert hidden.shape == (2, 6, 16) and pooled.shape == (2, 16)
    assert outs["sentence_embedding"].shape == (2, 16)
    np.testing.assert_allclose(jnp.linalg.norm(outs["sentence_embedding"], axis=-1), 1.0, rtol=1e-12)
    assert outs["sentence_similarity"].shape == (1,)
    e = outs["sentence_embedding"]
    # the similarity of the pair (row 0, row 1) is the dot product of the two embeddings
    np.testing.assert_allclose(outs["sentence_similarity"][0], jnp.dot(e[0], e[1]), rtol=1e-12)
    assert outs["vit"].shape == (2, 5) and outs["vit_gap"].shape == (2, 5)
    assert outs["gpt2"].shape == (2, 6, 40)


def test_padding_does_not_change_the_sentence_embedding():
    model, _, _ = MODELS["sentence_embedding"]
    variables = random_linen(model, (IDS, MASK))
    short = model.apply(variables, IDS[1:, :4], MASK[1:, :4])
    padded = model.apply(variables, IDS[1:], MASK[1:])
    np.testing.assert_allclose(padded, short, rtol=1e-12, atol=1e-14)


def test_gpt2_is_causal():
    model, _, _ = MODELS["gpt2"]
    variables = random_linen(model, (IDS,))
    changed = IDS.copy()
    changed[:, 4] = 1
    a, b = model.apply(variables, IDS), model.apply(variables, changed)
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert np.max(np.abs(a[:, 4:] - b[:, 4:])) > 1e-3


def test_gpt2_head_is_tied_to_the_token_embedding():
    model, _, _ = MODELS["gpt2"]
    variables = random_linen(model, (IDS,))
    assert set(variables["params"]) == {"wte", "wpe", "h_0", "h_1", "ln_f"}


def test_bad_inputs_raise():
    bert, _, _ = MODELS["bert"]
    variables = random_linen(bert, (IDS, MASK))
    with pytest.raises(InputError, match="max_position_embeddings"):
        bert.apply(variables, np.zeros((1, 13), np.int32))
    with pytest.raises(InputError, match="integer token ids"):
        bert.apply(variables, IDS.astype(np.float32))
    sim, _, _ = MODELS["sentence_similarity"]
    with pytest.raises(InputError, match=r"\(batch, 2, tokens\)"):
        sim.apply(variables | {"params": {"bert": variables["params"]}}, IDS, MASK)
    vit, _, _ = MODELS["vit"]
    with pytest.raises(InputError, match="NHWC"):
        vit.init(jax.random.key(0), np.zeros((1, 3, 8, 8)))


def fake_hf_state_dict(model: nn.Module, inputs, seed: int = 0) -> dict[str, np.ndarray]:
    """A random Hugging Face-layout state dict for ``model``; shapes follow HF's conventions."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    rng = np.random.default_rng(seed)
    sd = {}
    for path, leaf in traverse_util.flatten_dict(dict(shapes)).items():
        key, kind, _ = jm.hf_key(model.hf_family, path[1:])
        s = leaf.shape
        if kind == "flat":
            hf_shape = (int(np.prod(s)),)
        elif kind == "dense":
            hf_shape = (int(np.prod(s[1:])), s[0])
        elif kind == "dense_out":
            hf_shape = (s[2], s[0] * s[1])
        elif kind == "conv":
            hf_shape = (s[3], s[2], s[0], s[1])
        else:
            hf_shape = s
        sd[key] = rng.normal(size=hf_shape).astype(np.float32)
    return sd


def test_converter_reports_every_problem_in_one_error():
    model, _, inputs = MODELS["bert"]
    sd = fake_hf_state_dict(model, inputs)
    jm.from_hf(sd, "bert", BERT)  # the intact dict loads
    del sd["encoder.layer.1.attention.self.key.weight"]
    sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"].T
    sd["cls.predictions.bias"] = np.zeros(3, np.float32)
    with pytest.raises(StateDictError) as info:
        jm.from_hf(sd, "bert", BERT)
    msg = str(info.value)
    assert "missing keys (1): encoder.layer.1.attention.self.key.weight" in msg
    assert (
        "mis-shaped keys (1): encoder.layer.0.intermediate.dense.weight: got (16, 24), expected (24, 16)"
        in msg
    )
    assert "unexpected keys (1): cls.predictions.bias" in msg
    # the same for NNX, and the model is left unchanged
    nnx_model = jm.nnx.Bert(BERT, rngs=nnx.Rngs(0))
    before = nnx_model.layer_0.intermediate.kernel[...].copy()
    with pytest.raises(StateDictError, match="encoder.layer.1.attention.self.key.weight"):
        jm.load_hf_nnx(nnx_model, sd)
    np.testing.assert_array_equal(nnx_model.layer_0.intermediate.kernel[...], before)
    # keys skipped on purpose
    sd["encoder.layer.1.attention.self.key.weight"] = np.zeros((16, 16), np.float32)
    sd["encoder.layer.0.intermediate.dense.weight"] = sd["encoder.layer.0.intermediate.dense.weight"].T
    jm.from_hf(sd, "bert", BERT, ignore=["cls.*"])
    # an NNX model computes in the param_dtype it was built with: loading float64 into float32 is refused
    with pytest.raises(UsageError, match="param_dtype=float64"):
        jm.load_hf_nnx(nnx_model, sd, dtype=np.float64, ignore=["cls.*"])


def test_converter_layouts_and_prefixes():
    model, _, inputs = MODELS["bert"]
    sd = fake_hf_state_dict(model, inputs, seed=1)
    params = jm.from_hf({"bert." + k: v for k, v in sd.items()}, "bert", BERT)["params"]
    q = sd["encoder.layer.1.attention.self.query.weight"]  # (out, in) = (heads*d, H)
    np.testing.assert_array_equal(params["layer_1"]["attention"]["query"]["kernel"].reshape(16, 16), q.T)
    o = sd["encoder.layer.0.attention.output.dense.weight"]  # (H, heads*d)
    np.testing.assert_array_equal(params["layer_0"]["attention"]["out"]["kernel"].reshape(16, 16), o.T)
    np.testing.assert_array_equal(params["pooler"]["kernel"], sd["pooler.dense.weight"].T)
    # the sentence heads nest the encoder as "bert" and skip the pooler
    nested = jm.from_hf(sd, "sentence_similarity", BERT)["params"]
    assert set(nested) == {"bert"} and "pooler" not in nested["bert"]
    # GPT-2: Conv1D weights are (in, out) already; a tied lm_head must equal wte
    gmodel, _, ginputs = MODELS["gpt2"]
    gsd = {"transformer." + k: v for k, v in fake_hf_state_dict(gmodel, ginputs).items()}
    gparams = jm.from_hf(gsd | {"lm_head.weight": gsd["transformer.wte.weight"]}, "gpt2", GPT)["params"]
    np.testing.assert_array_equal(
        gparams["h_0"]["attn"]["c_attn"]["kernel"], gsd["transformer.h.0.attn.c_attn.weight"]
    )
    with pytest.raises(StateDictError, match="lm_head.weight: differs"):
        jm.from_hf(gsd | {"lm_head.weight": gsd["transformer.wte.weight"] + 1}, "gpt2", GPT)
    # ViT: patch convolution (O, I, kh, kw) -> (kh, kw, I, O); the classifier has no "vit." prefix
    vmodel, _, vinputs = MODELS["vit"]
    vsd = fake_hf_state_dict(vmodel, vinputs)
    vsd = {(k if k.startswith("classifier") else "vit." + k): v for k, v in vsd.items()}
    vparams = jm.from_hf(vsd, "vit", VIT)["params"]
    w = vsd["vit.embeddings.patch_embeddings.projection.weight"]
    np.testing.assert_array_equal(vparams["patch_embeddings"]["kernel"][1, 2], w[:, :, 1, 2].T)


def test_configs_from_hf_json(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2}'
    )
    assert jm.BertConfig.from_hf_json(tmp_path).hidden_size == 8
    assert jm.ViTConfig.from_hf_json({"id2label": {"0": "a", "1": "b", "2": "c"}}).num_labels == 3
    with pytest.raises(UsageError, match="position_embedding_type"):
        jm.BertConfig.from_hf_json({"position_embedding_type": "relative_key"})
    with pytest.raises(UsageError, match="model_type 'gpt2'"):
        jm.BertConfig.from_hf_json({"model_type": "gpt2"})
    with pytest.raises(UsageError, match="activation"):
        jm.GPT2Config.from_hf_json({"activation_function": "swish"})
    with pytest.raises(UsageError, match="no Hugging Face config"):
        jm.GPT2Config.from_hf_json(tmp_path / "nothing")


def test_float64_needs_x64_and_unknown_arch():
    with pytest.raises(KeyError, match="unknown architecture"):
        jm.from_hf({}, "t5", BERT)
    with pytest.raises(UsageError, match="config"):
        jm.from_hf({}, "bert")


def test_public_names_resolve():
    for name in ("Bert", "SentenceEmbedding", "SentenceSimilarity", "ViT", "GPT2"):
        assert name in jm.linen.__all__ and name in jm.nnx.__all__
        assert issubclass(getattr(jm.linen, name), nn.Module)
        assert issubclass(getattr(jm.nnx, name), nnx.Module)
    for name in ("from_hf", "load_hf_nnx", "load_minilm", "BertConfig", "ViTConfig", "GPT2Config"):
        assert name in jm.__all__
    assert all(hasattr(jm, name) for name in jm.__all__)
