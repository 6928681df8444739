"""Token relevance as text: HTML heatmaps, terminal colours, sub-word tokens merged into words.

The relevance of a token (e.g. ``jlrp.attribute(explained, variables, ids, mask)[1][i]`` for integer
``ids``, the relevance at the word-embedding lookup summed over features) is drawn as the background of
the token, with a symmetric, zero-centred colour map (a :mod:`jlrp.cmap` map, by default ``'bwr'``:
negative blue, zero white, positive red), normalised per sequence by the largest :math:`|R|`:

.. math:: p_t = \\frac{1}{2} \\left(1 + \\frac{R_t}{s}\\right), \\qquad s = \\max_t |R_t|,

so the colour at position :math:`p_t \\in [0, 1]` of the map says the sign and the size relative to the
largest token of the sequence (all tokens white when :math:`s = 0`). Special tokens (:data:`SPECIAL_TOKENS`:
``[CLS]``, ``[SEP]``, ``[PAD]``, ``<|endoftext|>``...) are shown (``special='show'``), dimmed without
colour (``'dim'``, default) or dropped (``'drop'``); dimmed and dropped ones do not count for :math:`s`.

- :func:`merge_subwords`: WordPiece (``##`` marks a continuation), byte-level BPE (``Ġ`` marks a word
  start; the bytes are decoded) and SentencePiece (``▁`` marks a word start) pieces merged into words; the
  relevance of a word is the sum of its pieces' (relevance is additive over the input, so the sum keeps
  conservation).
- :func:`html_tokens`: one sequence as coloured ``<span>`` s with the value as tooltip;
  :func:`html_page` / :func:`write_html`: a whole page of sections, rows of one or more sequences (a
  sentence pair) and a legend, written atomically.
- :func:`ansi_tokens`: the same for a terminal (24-bit ANSI background colours), or plain text with the
  values in brackets where colours are off.

Example::

    enc = tokenizer.encode(sentence)
    out, rel = jlrp.attribute(explained, variables, ids, mask)
    words, word_rel = jlrp.text.merge_subwords(enc.tokens, rel[0])
    print(jlrp.text.ansi_tokens(words, word_rel))
    jlrp.text.write_html('relevance.html', [jlrp.text.TextSection('example', [
        jlrp.text.TextRow.of('AttnLRP', enc.tokens, rel[0])])], merge=True)
"""

from __future__ import annotations

import dataclasses
import functools
import html
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ._files import atomic_path
from .cmap import ColorMap
from .errors import InputError, UsageError, UsageTypeError

__all__ = [
    "SPECIAL_TOKENS",
    "TextRow",
    "TextSection",
    "merge_subwords",
    "token_colors",
    "html_tokens",
    "html_page",
    "write_html",
    "ansi_tokens",
]

SPECIAL_TOKENS: frozenset[str] = frozenset(
    {
        "[CLS]",
        "[SEP]",
        "[PAD]",
        "[MASK]",
        "<|endoftext|>",
        "<s>",
        "</s>",
        "<pad>",
        "<mask>",
        "<bos>",
        "<eos>",
    }
)
"""Tokens treated as special by default: BERT's ``[CLS] [SEP] [PAD] [MASK]``, GPT-2's ``<|endoftext|>`` and
the RoBERTa/SentencePiece ``<s> </s> <pad> <mask> <bos> <eos>``. ``[UNK]`` is not special: it stands for
a word of the text."""

Scheme = Literal["auto", "wordpiece", "bpe", "sentencepiece", "none"]
SpecialMode = Literal["show", "dim", "drop"]

_WORDPIECE = "##"
_BPE_SPACE = "\u0120"  # 'Ġ', byte-level BPE's picture of the space byte
_BPE_NEWLINE = "\u010a"  # 'Ċ', the newline byte
_SENTENCEPIECE = "\u2581"  # '▁'


# --------------------------------------------------------------------------------------------------
# input checks


def _check_tokens(tokens: Any) -> list[str]:
    if isinstance(tokens, str) or not isinstance(tokens, Iterable):
        raise UsageTypeError(
            f"tokens must be a sequence of token strings (e.g. tokenizer.encode(text).tokens), "
            f"got {type(tokens).__name__}"
        )
    tokens = list(tokens)
    bad = [t for t in tokens if not isinstance(t, str)]
    if bad:
        raise UsageTypeError(
            f"tokens must be strings, got {type(bad[0]).__name__} {bad[0]!r}; convert ids with "
            f"tokenizer.id_to_token or pass encoding.tokens"
        )
    return tokens


def _check_relevance(tokens: list[str], relevance: Any, *, one_dim: bool) -> np.ndarray:
    rel = np.asarray(relevance, dtype=np.float64)
    if one_dim and rel.ndim != 1:
        raise UsageError(
            f"relevance for one sequence must be 1-D (one value per token), got shape {rel.shape}; "
            f"pass one sample's relevance, e.g. rel[i]"
        )
    if rel.ndim == 0 or rel.shape[-1] != len(tokens):
        raise UsageError(
            f"{len(tokens)} tokens but relevance of shape {rel.shape} has "
            f"{rel.shape[-1] if rel.ndim else 0} values along its last axis; pass one relevance value "
            f"per token (the tokens of the same, unpadded or padded, encoding)"
        )
    if not np.all(np.isfinite(rel)):
        raise InputError("relevance contains NaN or inf; it cannot be drawn")
    return rel


def _get_cmap(cmap: str | ColorMap) -> ColorMap:
    from .image import get_cmap

    return get_cmap(cmap)


def _check_special(special: str) -> None:
    if special not in ("show", "dim", "drop"):
        raise UsageError(f"special must be 'show', 'dim' or 'drop', got {special!r}")


# --------------------------------------------------------------------------------------------------
# sub-word merging


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's map from its printable stand-in characters back to bytes (GPT-2, Radford et al. 2019).

    The printable bytes ``!``..``~``, ``¡``..``¬`` and ``®``..``ÿ`` stand for themselves; the other 68
    bytes, in increasing order, are drawn as the characters ``U+0100``, ``U+0101``, ... (so the space byte
    32 is ``Ġ`` = ``U+0120`` and the newline 10 is ``Ċ``).
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    decoder = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder


def _decode_bpe(text: str) -> str:
    decoder = _byte_decoder()
    if not all(char in decoder for char in text):  # not byte-level: only the space marker is known
        return text.replace(_BPE_SPACE, " ")
    return bytes(decoder[char] for char in text).decode("utf-8", errors="replace")


def _resolve_scheme(tokens: list[str], special_tokens: frozenset[str] | set[str], scheme: str) -> str:
    if scheme not in ("auto", "wordpiece", "bpe", "sentencepiece", "none"):
        raise UsageError(
            f"scheme must be 'auto', 'wordpiece', 'bpe', 'sentencepiece' or 'none', got {scheme!r}"
        )
    if scheme != "auto":
        return scheme
    plain = [t for t in tokens if t not in special_tokens]
    if any(t.startswith(_WORDPIECE) and len(t) > 2 for t in plain):
        return "wordpiece"
    if any(t.startswith((_BPE_SPACE, _BPE_NEWLINE)) for t in plain):
        return "bpe"
    if any(t.startswith(_SENTENCEPIECE) for t in plain):
        return "sentencepiece"
    return "none"


def _word_groups(
    tokens: list[str], special_tokens: frozenset[str] | set[str], scheme: str
) -> list[list[int]]:
    """Indices of the tokens of every word, in order; a special token is always a word of its own."""
    groups: list[list[int]] = []
    open_word = False  # whether the last group may be continued
    for i, tok in enumerate(tokens):
        if tok in special_tokens:
            groups.append([i])
            open_word = False
            continue
        if scheme == "wordpiece":
            starts = not (tok.startswith(_WORDPIECE) and len(tok) > 2)
        elif scheme == "bpe":
            starts = tok.startswith((_BPE_SPACE, _BPE_NEWLINE))
        elif scheme == "sentencepiece":
            starts = tok.startswith(_SENTENCEPIECE)
        else:
            starts = True
        if starts or not open_word:
            groups.append([i])
        else:
            groups[-1].append(i)
        # a line break ends a word: the next piece starts a new one even without a space marker
        open_word = not (scheme == "bpe" and tok.endswith(_BPE_NEWLINE))
    return groups


def _display(pieces: list[str], scheme: str, special: bool) -> str:
    """The text of a word made of ``pieces`` (one piece: a token shown on its own)."""
    if special:
        return pieces[0]
    if scheme == "wordpiece":
        return pieces[0] + "".join(p[2:] if p.startswith(_WORDPIECE) else p for p in pieces[1:])
    if scheme == "bpe":
        text = _decode_bpe("".join(pieces))
        return text.strip(" ") or text
    if scheme == "sentencepiece":
        text = "".join(pieces).replace(_SENTENCEPIECE, " ")
        return text.strip(" ") or text
    return "".join(pieces)


def merge_subwords(
    tokens: Sequence[str],
    relevance: Any,
    *,
    scheme: Scheme = "auto",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
) -> tuple[list[str], np.ndarray]:
    """Merge sub-word tokens into words; a word's relevance is the sum of its pieces'.

    .. math:: R_w = \\sum_{t \\in w} R_t

    Word boundaries by ``scheme``:

    - ``'wordpiece'`` (BERT): a token ``##xy`` continues the previous word (``un ##believ ##able`` ->
      ``unbelievable``);
    - ``'bpe'`` (GPT-2, RoBERTa byte-level BPE): a token starting with ``Ġ`` (a space) or ``Ċ`` (a line
      break) starts a word, any other token continues the previous one, and a token ending in a line
      break ends its word (``ĠHel lo , Ġworld`` -> ``Hello,`` ``world``); the word's characters are
      decoded back to UTF-8 text (``Ã©`` -> ``é``);
    - ``'sentencepiece'``: a token starting with ``▁`` starts a word;
    - ``'none'``: every token is a word;
    - ``'auto'`` (default): ``'wordpiece'`` if a token starts with ``##``, else ``'bpe'`` if one starts
      with ``Ġ``/``Ċ``, else ``'sentencepiece'`` if one starts with ``▁``, else ``'none'``.

    Special tokens are always words of their own (and never continue or get continued).

    Args:
        tokens: the ``T`` token strings, e.g. ``tokenizer.encode(text).tokens``.
        relevance: per-token relevance of shape ``(..., T)`` (e.g. ``(T,)``, or ``(M, T)`` for ``M``
            methods on the same tokens); numpy or jax.
        scheme: see above.
        special_tokens: tokens that are words of their own (default :data:`SPECIAL_TOKENS`).

    Returns:
        ``(words, word_relevance)``: ``W`` word strings and a float64 array of shape ``(..., W)``.

    Raises:
        UsageTypeError: ``tokens`` is a single string or holds non-strings.
        UsageError: the last axis of ``relevance`` does not have ``T`` entries; an unknown ``scheme``.
        InputError: NaN or inf in ``relevance``.
    """
    tokens = _check_tokens(tokens)
    rel = _check_relevance(tokens, relevance, one_dim=False)
    special = frozenset(special_tokens)
    resolved = _resolve_scheme(tokens, special, scheme)
    groups = _word_groups(tokens, special, resolved)
    words = [_display([tokens[i] for i in g], resolved, tokens[g[0]] in special) for g in groups]
    membership = np.zeros((len(tokens), len(groups)), dtype=np.float64)  # token t belongs to word w
    for w, group in enumerate(groups):
        membership[group, w] = 1.0
    return words, rel @ membership


def _display_tokens(tokens: list[str], special: frozenset[str]) -> list[str]:
    """Tokens shown one by one: byte-level BPE decoded, word-start markers dropped, ``##`` kept."""
    scheme = _resolve_scheme(tokens, special, "auto")
    if scheme not in ("bpe", "sentencepiece"):
        return tokens
    return [t if t in special else _display([t], scheme, False) for t in tokens]


# --------------------------------------------------------------------------------------------------
# colours


def token_colors(relevance: Any, *, scale: float | None = None, cmap: str | ColorMap = "bwr") -> np.ndarray:
    """Colours of token relevance: the colour map at :math:`p_t = (1 + R_t / s) / 2`, clipped to [0, 1].

    Args:
        relevance: shape ``(T,)`` (any shape works; the colour axis is appended).
        scale: :math:`s`; default :math:`\\max_t |R_t|` (all tokens at the map's centre when it is 0).
        cmap: a :data:`jlrp.cmap.CMAPS` name (``'bwr'``, ``'coldnhot'``...), colour-map source code
            (``'00f,80:fff,f00'``) or a :class:`jlrp.cmap.ColorMap`; symmetric maps (centre at ``80``)
            make zero the centre colour.

    Returns:
        ``uint8`` RGB of shape ``relevance.shape + (3,)``.

    Raises:
        InputError: NaN or inf in ``relevance``.
        UsageError: a negative or non-finite ``scale``; an unknown colour map.
    """
    rel = np.asarray(relevance, dtype=np.float64)
    if not np.all(np.isfinite(rel)):
        raise InputError("relevance contains NaN or inf; it cannot be drawn")
    if scale is None:
        scale = float(np.abs(rel).max()) if rel.size else 0.0
    scale = float(scale)
    if not np.isfinite(scale) or scale < 0:
        raise UsageError(f"scale must be a finite number >= 0, got {scale}")
    pos = 0.5 + 0.5 * (rel / scale if scale > 0 else np.zeros_like(rel))
    return np.round(_get_cmap(cmap)(pos) * 255).astype(np.uint8)


def _hex(rgb: np.ndarray) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _text_color(rgb: np.ndarray) -> np.ndarray:
    """Black on light backgrounds, white on dark ones (ITU-R BT.601 luma)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.array([0, 0, 0] if luma >= 128 else [255, 255, 255], dtype=np.uint8)


def _prepare(
    tokens: Any,
    relevance: Any,
    merge: bool,
    scheme: Scheme,
    special: str,
    special_tokens: Iterable[str],
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(shown texts, relevance, is_special)`` of the items to draw, merged and filtered."""
    _check_special(special)
    tokens = _check_tokens(tokens)
    rel = _check_relevance(tokens, relevance, one_dim=True)
    specials = frozenset(special_tokens)
    if merge:
        texts, rel = merge_subwords(tokens, rel, scheme=scheme, special_tokens=specials)
        is_special = np.array([t in specials for t in texts], dtype=bool)
    else:
        is_special = np.array([t in specials for t in tokens], dtype=bool)
        texts = _display_tokens(tokens, specials)
    if special == "drop":
        keep = ~is_special
        texts = [t for t, k in zip(texts, keep) if k]
        rel, is_special = rel[keep], is_special[keep]
    elif special == "show":
        is_special = np.zeros_like(is_special)
    return texts, rel, is_special


def _auto_scale(rel: np.ndarray, is_special: np.ndarray) -> float:
    shown = np.abs(rel[~is_special])
    return float(shown.max()) if shown.size else 0.0


# --------------------------------------------------------------------------------------------------
# HTML


def html_tokens(
    tokens: Sequence[str],
    relevance: Any,
    *,
    merge: bool = False,
    scheme: Scheme = "auto",
    special: SpecialMode = "dim",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    scale: float | None = None,
    cmap: str | ColorMap = "bwr",
    precision: int = 4,
) -> str:
    """One sequence as HTML: a ``<span class="jlrp-text">`` of coloured token ``<span>`` s.

    Every token (or word, with ``merge=True``) becomes
    ``<span class="jlrp-tok" style="background-color:#rrggbb;color:#000000" title="+0.1234">text</span>``,
    its background from :func:`token_colors` (positive red, negative blue with ``'bwr'``), its text black
    or white for contrast, its exact relevance in the tooltip; the text is HTML-escaped. Dimmed special
    tokens are ``<span class="jlrp-tok jlrp-special" title=...>`` without a background (the page's style
    greys them). Tokens are separated by a space.

    Args:
        tokens: the ``T`` token strings. Without merging, byte-level BPE tokens are shown decoded and
            without their ``Ġ``; WordPiece ``##`` pieces keep their ``##``.
        relevance: shape ``(T,)``.
        merge: merge sub-word tokens into words first (:func:`merge_subwords`).
        scheme: the merging scheme (see :func:`merge_subwords`).
        special: ``'show'`` special tokens like the others, ``'dim'`` them (no colour, not counted for the
            scale) or ``'drop'`` them.
        special_tokens: which tokens are special (default :data:`SPECIAL_TOKENS`).
        scale: :math:`s`, the :math:`|R|` drawn at full colour; default the largest :math:`|R|` of the
            shown, non-special tokens (pass one value to several sequences to compare them).
        cmap: colour map (see :func:`token_colors`).
        precision: significant digits of the tooltip values.

    Returns:
        An HTML fragment (str).

    Raises:
        UsageTypeError: ``tokens`` is a single string or holds non-strings.
        UsageError: ``relevance`` is not 1-D with one value per token; a bad ``special``, ``scheme``,
            ``scale`` or colour map.
        InputError: NaN or inf in ``relevance``.
    """
    texts, rel, is_special = _prepare(tokens, relevance, merge, scheme, special, special_tokens)
    if scale is None:
        scale = _auto_scale(rel, is_special)
    colors = token_colors(rel, scale=scale, cmap=cmap)
    spans = []
    for text, value, spec, rgb in zip(texts, rel, is_special, colors):
        title = html.escape(f"{value:+.{precision}g}", quote=True)
        body = html.escape(text, quote=False)
        if spec:
            spans.append(f'<span class="jlrp-tok jlrp-special" title="{title}">{body}</span>')
        else:
            style = f"background-color:{_hex(rgb)};color:{_hex(_text_color(rgb))}"
            spans.append(f'<span class="jlrp-tok" style="{style}" title="{title}">{body}</span>')
    return '<span class="jlrp-text">' + " ".join(spans) + "</span>"


@dataclasses.dataclass(frozen=True, eq=False)
class TextRow:
    """One row of an HTML page: a label and one or more token sequences (e.g. the two sentences of a pair).

    Attributes:
        label: shown in the first column (e.g. the method's name).
        sequences: ``((tokens, relevance), ...)``, each ``tokens`` a tuple of ``T_i`` strings and
            ``relevance`` of shape ``(T_i,)``.
        note: optional text after the sequences (e.g. the score).
        shared_scale: draw all sequences of the row with one scale (the largest :math:`|R|` among them),
            so that the sentences of a pair compare directly; else one scale per sequence.
    """

    label: str
    sequences: tuple[tuple[tuple[str, ...], np.ndarray], ...]
    note: str = ""
    shared_scale: bool = True

    @classmethod
    def of(cls, label: str, *pairs: Any, note: str = "", shared_scale: bool = True) -> TextRow:
        """``TextRow.of(label, tokens, relevance[, tokens2, relevance2, ...], note=...)``.

        Raises:
            UsageError: an odd number of positional arguments after the label, or no sequence.
        """
        if not pairs or len(pairs) % 2:
            raise UsageError("TextRow.of takes the label, then tokens and relevance for every sequence")
        sequences = tuple(
            (tuple(_check_tokens(pairs[i])), np.asarray(pairs[i + 1], dtype=np.float64))
            for i in range(0, len(pairs), 2)
        )
        return cls(label, sequences, note, shared_scale)


@dataclasses.dataclass(frozen=True)
class TextSection:
    """A section of an HTML page: a heading, an optional paragraph and rows.

    Attributes:
        heading: the section's ``<h2>``.
        rows: the :class:`TextRow` s.
        text: optional paragraph under the heading (plain text, escaped).
    """

    heading: str
    rows: tuple[TextRow, ...] | list[TextRow]
    text: str = ""


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table.jlrp-rows { border-collapse: collapse; }
table.jlrp-rows th { text-align: left; font-weight: 600; padding: 4px 12px 4px 0; white-space: nowrap;
  vertical-align: top; }
table.jlrp-rows td { padding: 4px 12px 4px 0; vertical-align: top; }
.jlrp-text { line-height: 2; }
.jlrp-tok { padding: 2px 3px; border-radius: 3px; font-family: ui-monospace, monospace; white-space: pre; }
.jlrp-special { color: #999; opacity: 0.6; }
.jlrp-note { color: #555; font-size: 0.9em; white-space: nowrap; }
.jlrp-legend { display: flex; align-items: center; gap: 8px; font-size: 0.9em; margin: 1em 0; }
.jlrp-bar { display: inline-block; width: 240px; height: 14px; border: 1px solid #ccc; }
"""


def _legend(cmap: ColorMap) -> str:
    stops = token_colors(np.linspace(-1.0, 1.0, 9), scale=1.0, cmap=cmap)
    gradient = ", ".join(_hex(c) for c in stops)
    return (
        '<div class="jlrp-legend"><span>negative</span>'
        f'<span class="jlrp-bar" style="background: linear-gradient(to right, {gradient})"></span>'
        "<span>positive</span><span>colour: relevance / largest |relevance| of the row "
        "(&minus;1 &hellip; 0 &hellip; +1); hover a token for its value; grey: special tokens</span></div>"
    )


def html_page(
    sections: Sequence[TextSection],
    *,
    title: str = "jlrp token relevance",
    intro: str = "",
    merge: bool = False,
    scheme: Scheme = "auto",
    special: SpecialMode = "dim",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    cmap: str | ColorMap = "bwr",
    legend: bool = True,
    precision: int = 4,
) -> str:
    """A self-contained HTML page: title, intro, legend, then every section as a table of rows.

    Each :class:`TextRow` is a table row: its label, one cell per sequence (drawn by :func:`html_tokens`
    with the row's scale, see :attr:`TextRow.shared_scale`) and its note. All text is HTML-escaped.

    Args:
        sections: the :class:`TextSection` s.
        title: the page's ``<title>`` and ``<h1>``.
        intro: a paragraph under the title (plain text, escaped).
        merge, scheme, special, special_tokens, cmap, precision: as :func:`html_tokens`.
        legend: draw the colour legend under the title.

    Returns:
        The page (str).

    Raises:
        UsageTypeError: a section that is not a :class:`TextSection`, a row that is not a :class:`TextRow`.
        And what :func:`html_tokens` raises.
    """
    colormap = _get_cmap(cmap)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    if legend:
        parts.append(_legend(colormap))
    kw = dict(
        merge=merge,
        scheme=scheme,
        special=special,
        special_tokens=frozenset(special_tokens),
        cmap=colormap,
        precision=precision,
    )
    for section in sections:
        if not isinstance(section, TextSection):
            raise UsageTypeError(f"sections must be TextSection objects, got {type(section).__name__}")
        parts.append(f"<section><h2>{html.escape(section.heading)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.append('<table class="jlrp-rows">')
        for row in section.rows:
            if not isinstance(row, TextRow):
                raise UsageTypeError(f"rows must be TextRow objects, got {type(row).__name__}")
            scale = _row_scale(row, kw) if row.shared_scale else None
            cells = [html_tokens(tokens, rel, scale=scale, **kw) for tokens, rel in row.sequences]
            note = f'<td class="jlrp-note">{html.escape(row.note)}</td>' if row.note else ""
            parts.append(
                f"<tr><th>{html.escape(row.label)}</th>"
                + "".join(f"<td>{cell}</td>" for cell in cells)
                + note
                + "</tr>"
            )
        parts.append("</table></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _row_scale(row: TextRow, kw: dict[str, Any]) -> float:
    scales = []
    for tokens, rel in row.sequences:
        _, shown, is_special = _prepare(
            tokens, rel, kw["merge"], kw["scheme"], kw["special"], kw["special_tokens"]
        )
        scales.append(_auto_scale(shown, is_special))
    return max(scales, default=0.0)


def write_html(path: str | os.PathLike, sections: Sequence[TextSection], **kwargs: Any) -> Path:
    """Write :func:`html_page` ``(sections, **kwargs)`` to ``path`` atomically (UTF-8).

    The page is written to a temporary file in the same folder and renamed over ``path``, so a reader
    never sees half a page and a failure leaves an existing file as it was.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        What :func:`html_page` raises; ``OSError`` when the folder cannot be written.
    """
    page = html_page(sections, **kwargs)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# terminal


def _colors_wanted(color: bool | None) -> bool:
    if color is not None:
        return bool(color)
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(sys.stdout, "isatty", lambda: False)())


def ansi_tokens(
    tokens: Sequence[str],
    relevance: Any,
    *,
    merge: bool = False,
    scheme: Scheme = "auto",
    special: SpecialMode = "dim",
    special_tokens: Iterable[str] = SPECIAL_TOKENS,
    scale: float | None = None,
    cmap: str | ColorMap = "bwr",
    color: bool | None = None,
    precision: int = 2,
) -> str:
    """One sequence for a terminal: 24-bit ANSI background colours, or plain text with the values.

    With colours every token is ``ESC[48;2;R;G;Bm ESC[38;2;r;g;bm text ESC[0m`` (background from
    :func:`token_colors`, black or white text); dimmed special tokens are faint (``ESC[2m``). Without
    colours every token is ``text(+0.12)`` and dimmed special tokens are shown bare. Tokens are separated
    by a space.

    Args:
        tokens, relevance, merge, scheme, special, special_tokens, scale, cmap: as :func:`html_tokens`.
        color: ``True``/``False`` to force colours on or off; ``None``: on when standard output is a
            terminal and the ``NO_COLOR`` environment variable is unset.
        precision: significant digits of the plain values.

    Returns:
        The line (str, no trailing newline).

    Raises:
        As :func:`html_tokens`.
    """
    texts, rel, is_special = _prepare(tokens, relevance, merge, scheme, special, special_tokens)
    if not _colors_wanted(color):
        return " ".join(
            text if spec else f"{text}({value:+.{precision}g})"
            for text, value, spec in zip(texts, rel, is_special)
        )
    if scale is None:
        scale = _auto_scale(rel, is_special)
    colors = token_colors(rel, scale=scale, cmap=cmap)
    out = []
    for text, spec, rgb in zip(texts, is_special, colors):
        if spec:
            out.append(f"\x1b[2m{text}\x1b[0m")
        else:
            fg = _text_color(rgb)
            out.append(
                f"\x1b[48;2;{rgb[0]};{rgb[1]};{rgb[2]}m\x1b[38;2;{fg[0]};{fg[1]};{fg[2]}m{text}\x1b[0m"
            )
    return " ".join(out)
