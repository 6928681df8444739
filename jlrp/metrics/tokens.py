"""Token deletion: delete input tokens in relevance order and track the model's score (faithfulness on text).

The text counterpart of region perturbation (:mod:`jlrp.metrics.perturbation`), as the AttnLRP authors
evaluate token relevance (Achtibat et al., "AttnLRP: Attention-aware layer-wise relevance propagation for
transformers", ICML 2024, section 4.1, after Blücher et al. 2024, "Decoupling pixel flipping and occlusion
strategy for consistent XAI benchmarks"): the tokens of every sample are deleted one after the other, most
relevant first (MoRF) and least relevant first (LeRF), the model's score is recorded after every step,
and the area between the LeRF and the MoRF curve summarises how faithful the relevance is (larger is
better: deleting the tokens called relevant destroys the score, deleting those called irrelevant keeps it).

A token is *deleted* either by replacing its id (``mode='replace'``, e.g. by ``[UNK]`` or ``[MASK]``) or by
removing it from the attention mask (``mode='mask'``). Special tokens (``special_ids``, ``keep``) and
padding (``mask == 0``) are never deleted.

Example (a sentence-pair similarity model, ids and mask of shape ``(N, 2, T)``)::

    fn = lambda variables, ids, mask: model.apply(variables, ids, mask)      # -> (N,) similarities
    result = metrics.token_faithfulness(fn, ids, rel, mask, params=variables, mode='replace',
                                        replace_id=tokenizer.token_to_id('[UNK]'),
                                        special_ids=(cls_id, sep_id, pad_id))
    print(result.morf.auc.mean(), result.lerf.auc.mean(), result.area_between.mean())
    random = metrics.token_faithfulness(fn, ids, metrics.random_attribution(ids, seed=0), mask, ...)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import InputDtypeError, InputError, TargetError, UsageError
from ..targets import OutputSelector, select_output
from ._common import _check_target, _chunks, _normalized_curve, _pad, _target_score, _trapezoid_auc
from .perturbation import Order

__all__ = ["TokenDeletionResult", "TokenFaithfulness", "token_deletion", "token_faithfulness"]

DeletionMode = Literal["replace", "mask"]


@dataclasses.dataclass(frozen=True, eq=False)
class TokenDeletionResult:
    """What :func:`token_deletion` measured, per sample.

    With :math:`L` = ``n_steps``, :math:`K_n` the number of deletable tokens of sample :math:`n` and
    :math:`s_k` its score after step :math:`k`:

    Attributes:
        scores: raw scores :math:`s_k`, shape ``(N, L + 1)``; column 0 is the clean input, column :math:`L`
            the input with every deletable token deleted.
        curve: the curve the AUC is computed on, shape ``(N, L + 1)``: :math:`s_k` (``normalize=False``)
            or :math:`(s_k - s_L) / (s_0 - s_L)` (``normalize=True``; NaN where :math:`s_0 = s_L`).
        n_deleted: :math:`m_{n,k} = \\operatorname{round}(k K_n / L)` tokens deleted after step :math:`k`,
            ``int32`` of shape ``(N, L + 1)``.
        fractions: :math:`f_{n,k} = m_{n,k} / K_n`, shape ``(N, L + 1)`` (NaN where :math:`K_n = 0`).
        auc: area under the curve over the fractions (trapezoid rule), shape ``(N,)`` (NaN where
            :math:`K_n = 0`).
        n_deletable: :math:`K_n`, shape ``(N,)``.
        target: the tracked class per sample, shape ``(N,)``, or ``None`` for a model with one score per
            sample.
        order: ``'morf'`` or ``'lerf'``.
        mode: ``'replace'`` or ``'mask'``.
    """

    scores: jax.Array
    curve: jax.Array
    n_deleted: jax.Array
    fractions: jax.Array
    auc: jax.Array
    n_deletable: jax.Array
    target: jax.Array | None
    order: str
    mode: str


@dataclasses.dataclass(frozen=True, eq=False)
class TokenFaithfulness:
    """Both deletion orders of :func:`token_faithfulness` and the area between their curves.

    Attributes:
        morf: the most-relevant-first run.
        lerf: the least-relevant-first run.
    """

    morf: TokenDeletionResult
    lerf: TokenDeletionResult

    @property
    def area_between(self) -> jax.Array:
        """:math:`\\mathrm{AUC}_\\text{LeRF} - \\mathrm{AUC}_\\text{MoRF}` per sample, shape ``(N,)``:
        larger is more faithful; about 0 for a random order."""
        return self.lerf.auc - self.morf.auc


def _score(out: jax.Array, target: jax.Array | None, score: str) -> jax.Array:
    if out.ndim == 1:
        return out
    return _target_score(out, target, score)


@functools.partial(
    jax.jit,
    static_argnames=(
        "fn",
        "has_params",
        "has_mask",
        "predict",
        "mode",
        "n_steps",
        "score",
        "normalize",
        "step_chunk",
        "output",
    ),
)
def _deletion_core(
    params: Any,
    ids: jax.Array,
    mask: jax.Array,
    relevance: jax.Array,
    valid: jax.Array,
    target: jax.Array,
    replace_id: jax.Array,
    morf: jax.Array,
    *,
    fn: Callable[..., Any],
    has_params: bool,
    has_mask: bool,
    predict: bool,
    mode: str,
    n_steps: int,
    score: str,
    normalize: bool,
    step_chunk: int,
    output: OutputSelector,
) -> tuple[jax.Array, ...]:
    def apply(ids_k: jax.Array, mask_k: jax.Array) -> jax.Array:
        args = (ids_k, mask_k) if has_mask else (ids_k,)
        return select_output(fn(params, *args) if has_params else fn(*args), output)

    n = ids.shape[0]
    if predict:
        target = jnp.argmax(apply(ids, mask), axis=-1).astype(jnp.int32)
    flat_valid = valid.reshape(n, -1)
    flat_rel = relevance.reshape(n, -1)
    # tokens that are never deleted sort last; ties keep their row-major position. The order is traced,
    # so MoRF and LeRF share one compilation.
    key = jnp.where(flat_valid, jnp.where(morf, -flat_rel, flat_rel), jnp.inf)
    ranking = jnp.argsort(key, axis=1, stable=True)
    rank = jnp.argsort(ranking, axis=1).reshape(ids.shape)  # rank[n, ...]: when the token goes
    n_deletable = flat_valid.sum(axis=1).astype(jnp.int32)
    steps = jnp.arange(n_steps + 1, dtype=jnp.float32)[:, None]
    counts = jnp.rint(steps * n_deletable[None, :] / n_steps).astype(jnp.int32)  # (L + 1, N)
    expand = (n,) + (1,) * (ids.ndim - 1)

    def step(m: jax.Array) -> jax.Array:
        deleted = rank < m.reshape(expand)
        if mode == "replace":
            out = apply(jnp.where(deleted, replace_id, ids), mask)
        else:
            out = apply(ids, jnp.where(deleted, jnp.zeros_like(mask), mask))
        return _score(out, target, score)

    scores = lax.map(step, counts, batch_size=step_chunk if step_chunk > 1 else None).T  # (N, L + 1)
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    curve = _normalized_curve(scores) if normalize else scores
    n_deleted = counts.T
    denom = n_deletable[:, None].astype(scores.dtype)
    fractions = jnp.where(denom == 0, jnp.nan, n_deleted / jnp.where(denom == 0, 1, denom))
    auc = _trapezoid_auc(fractions, curve)
    return scores, curve, n_deleted, fractions, auc, n_deletable, target


def token_deletion(
    fn: Callable[..., jax.Array],
    ids: Any,
    relevance: Any,
    mask: Any = None,
    target: Any = None,
    *,
    params: Any = None,
    order: Order = "morf",
    mode: DeletionMode = "replace",
    replace_id: int | None = None,
    special_ids: Sequence[int] = (),
    keep: Any = None,
    n_steps: int | None = None,
    score: Literal["logit", "softmax"] = "logit",
    normalize: bool = False,
    batch_size: int | None = None,
    step_chunk: int = 1,
    output: OutputSelector = None,
) -> TokenDeletionResult:
    """Token deletion: delete tokens in relevance order (MoRF or LeRF) and track the model's score.

    Let :math:`V_n` be the deletable tokens of sample :math:`n` (``mask != 0``, id not in ``special_ids``,
    ``keep`` false), :math:`K_n = |V_n|`. They are ranked by relevance :math:`R_t`, descending for MoRF
    (most relevant first) and ascending for LeRF; ties keep their row-major position (for pairs
    ``(N, 2, T)``: the first sentence's tokens first). The ranking runs over all non-batch axes at
    once, so the tokens of a sentence pair compete with each other. After step :math:`k = 0 .. L` the first

    .. math:: m_{n,k} = \\operatorname{round}(k K_n / L)

    tokens of the ranking are deleted and the score :math:`s_{n,k}` recorded (the output itself for a
    model with one score per sample, e.g. a cosine similarity; else the logit, or softmax probability,
    of the target class). The summary is the area under the curve over the deleted fraction
    :math:`f_{n,k} = m_{n,k} / K_n`:

    .. math:: \\mathrm{AUC}_n = \\sum_{k=0}^{L-1} (f_{n,k+1} - f_{n,k}) \\frac{c_{n,k} + c_{n,k+1}}{2}

    with :math:`c = s` (``normalize=False``, default: the score's own units, as AttnLRP reports it) or
    :math:`c_k = (s_k - s_L) / (s_0 - s_L)`. A faithful relevance gives a low MoRF and a high LeRF AUC;
    :func:`token_faithfulness` runs both and reports the area between them. Compare with a seeded random
    order: ``relevance=jlrp.metrics.random_attribution(ids, seed=0)``.

    Args:
        fn: the model: ``fn(ids, mask)``, or ``fn(params, ids, mask)`` when ``params`` is given; without
            a ``mask``, ``fn(ids)`` / ``fn(params, ids)``. It returns ``(N,)`` scores or ``(N, C)`` class
            scores. ``fn`` is a static argument of the compiled function (hashed by identity): reuse one
            function object to compile once.
        ids: integer token ids, batch on axis 0: ``(N, T)``, or e.g. ``(N, 2, T)`` for sentence pairs.
        relevance: per-token relevance, the shape of ``ids`` (e.g. from :func:`jlrp.attribute` with
            integer ids).
        mask: the attention mask, the shape of ``ids`` (nonzero = real token), or ``None`` (every token is
            real, ``fn`` takes no mask).
        target: for ``(N, C)`` outputs: ``None`` (the class predicted for the clean input), an int or one
            int per sample; must be ``None`` for ``(N,)`` outputs.
        params: the first argument of ``fn`` (traced: new weights do not recompile).
        order: ``'morf'`` or ``'lerf'``.
        mode: ``'replace'``: a deleted token's id becomes ``replace_id``; ``'mask'``: its mask entry
            becomes 0 (needs ``mask``).
        replace_id: the id that replaces deleted tokens (``mode='replace'``), e.g. ``[UNK]`` or ``[MASK]``.
        special_ids: ids never deleted (e.g. ``[CLS]``, ``[SEP]``, ``[PAD]``, ``<|endoftext|>``).
        keep: optional boolean array shaped like ``ids``, true where a token must never be deleted.
        n_steps: :math:`L`, default the largest :math:`K_n` of the batch (one token per step). Each step
            evaluates the model once on the batch.
        score: ``'logit'`` (the raw output) or ``'softmax'`` (only for ``(N, C)`` outputs).
        normalize: normalise the curve by its ends (above).
        batch_size: samples per compiled call (the last chunk padded to the same size); default: all.
        step_chunk: deletion steps evaluated at once (vmapped); memory grows with it.
        output: which output of ``fn`` holds the scores when it returns several, as in
            :func:`jlrp.attribute`.

    Returns:
        A :class:`TokenDeletionResult` (scores, curve, n_deleted, fractions, auc, n_deletable, target).

    Raises:
        InputDtypeError: non-integer ``ids``.
        InputError: NaN or inf in ``relevance``.
        UsageError: ``relevance``/``mask``/``keep`` not shaped like ``ids``, an unknown order, mode or
            score, ``mode='replace'`` without ``replace_id``, ``mode='mask'`` without ``mask``, a model
            output that is neither ``(N,)`` nor ``(N, C)``, or a bad ``n_steps``/``batch_size``.
        TargetError: a target out of range or of the wrong shape, or a target for ``(N,)`` outputs.
    """
    if order not in ("morf", "lerf"):
        raise UsageError(f"order must be 'morf' or 'lerf', got {order!r}")
    if mode not in ("replace", "mask"):
        raise UsageError(f"mode must be 'replace' (new id) or 'mask' (attention mask 0), got {mode!r}")
    if score not in ("logit", "softmax"):
        raise UsageError(f"score must be 'logit' or 'softmax', got {score!r}")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise InputDtypeError(f"ids must be an integer array of token ids, got dtype {ids.dtype}")
    if ids.ndim < 2:
        raise InputError(f"ids need a batch axis and a token axis, e.g. (N, T); got shape {ids.shape}")
    relevance = _like_ids("relevance", relevance, ids.shape)
    relevance = relevance.astype(jnp.promote_types(relevance.dtype, jnp.float32))
    if not bool(jnp.all(jnp.isfinite(relevance))):
        raise InputError("relevance contains NaN or inf; token deletion needs a finite ranking")
    has_mask = mask is not None
    if has_mask:
        mask = _like_ids("mask", mask, ids.shape)
    elif mode == "mask":
        raise UsageError("mode='mask' deletes tokens from the attention mask: pass the mask")
    else:
        mask = jnp.ones(ids.shape, jnp.int32)
    if mode == "replace":
        if replace_id is None:
            raise UsageError("mode='replace' needs replace_id, e.g. tokenizer.token_to_id('[UNK]')")
        replace = jnp.asarray(int(replace_id), ids.dtype)
    else:
        replace = jnp.asarray(0, ids.dtype)
    valid = mask != 0
    special = np.asarray(list(special_ids), dtype=np.int64)
    if special.size:
        valid = valid & ~jnp.isin(ids, jnp.asarray(special, ids.dtype))
    if keep is not None:
        valid = valid & ~_like_ids("keep", keep, ids.shape).astype(bool)

    has_params = params is not None
    n = ids.shape[0]

    def apply_one(i, m):
        args = (i, m) if has_mask else (i,)
        return select_output(fn(params, *args) if has_params else fn(*args), output)

    out_shape = tuple(jax.eval_shape(apply_one, ids[:1], mask[:1]).shape)
    if len(out_shape) not in (1, 2) or out_shape[0] != 1:
        raise UsageError(
            f"fn must return (N,) scores or (N, C) class scores, got shape {out_shape} for one sample"
        )
    per_sample = len(out_shape) == 1
    if per_sample:
        if target is not None:
            raise TargetError("the model returns one score per sample (N,); pass target=None")
        if score == "softmax":
            raise UsageError("score='softmax' needs (N, C) class scores; this model returns (N,)")
        target_arr = jnp.zeros((n,), jnp.int32)
    else:
        checked = _check_target(target, n, out_shape[-1])
        target_arr = jnp.zeros((n,), jnp.int32) if checked is None else checked
    max_k = int(jnp.max(valid.reshape(n, -1).sum(axis=1)))
    n_steps = max(max_k, 1) if n_steps is None else int(n_steps)
    if n_steps < 1:
        raise UsageError(f"n_steps must be >= 1, got {n_steps}")
    static = dict(
        fn=fn,
        has_params=has_params,
        has_mask=has_mask,
        predict=not per_sample and target is None,
        mode=mode,
        n_steps=n_steps,
        score=score,
        normalize=bool(normalize),
        step_chunk=int(step_chunk),
        output=output,
    )
    parts = []
    for start, stop, pad in _chunks(n, batch_size):
        chunk = [_pad(a[start:stop], pad) for a in (ids, mask, relevance, valid, target_arr)]
        result = _deletion_core(params, *chunk, replace, jnp.asarray(order == "morf"), **static)
        parts.append([r[: stop - start] for r in result])
    scores, curve, n_deleted, fractions, auc, n_deletable, used_target = (
        jnp.concatenate([p[i] for p in parts]) for i in range(7)
    )
    return TokenDeletionResult(
        scores,
        curve,
        n_deleted,
        fractions,
        auc,
        n_deletable,
        None if per_sample else used_target,
        order,
        mode,
    )


def token_faithfulness(
    fn: Callable[..., jax.Array],
    ids: Any,
    relevance: Any,
    mask: Any = None,
    target: Any = None,
    **kwargs: Any,
) -> TokenFaithfulness:
    """Token deletion in both orders: MoRF, LeRF and the area between their curves.

    .. math:: \\Delta A = \\mathrm{AUC}_\\text{LeRF} - \\mathrm{AUC}_\\text{MoRF}

    per sample (Achtibat et al. 2024; Blücher et al. 2024): larger is more faithful, about 0 for a
    random order, negative for an order worse than random. Both runs share every setting, so their
    ends (clean input, all deletable tokens deleted) are the same.

    Args:
        fn, ids, relevance, mask, target: as :func:`token_deletion`.
        **kwargs: the keyword arguments of :func:`token_deletion` except ``order``.

    Returns:
        A :class:`TokenFaithfulness` (``morf``, ``lerf``, ``area_between``).

    Raises:
        UsageError: ``order`` in ``kwargs``; and everything :func:`token_deletion` raises.
    """
    if "order" in kwargs:
        raise UsageError("token_faithfulness runs both orders; call token_deletion for one")
    morf = token_deletion(fn, ids, relevance, mask, target, order="morf", **kwargs)
    lerf = token_deletion(fn, ids, relevance, mask, target, order="lerf", **kwargs)
    return TokenFaithfulness(morf, lerf)


def _like_ids(name: str, value: Any, shape: tuple[int, ...]) -> jax.Array:
    arr = jnp.asarray(value)
    if arr.shape != shape:
        raise UsageError(f"{name} must have the shape of ids {shape}, got {arr.shape}")
    return arr
