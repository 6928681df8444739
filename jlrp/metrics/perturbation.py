"""Region perturbation (pixel flipping): replace input regions in relevance order and track the score.

Bach et al. (2015), "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance
propagation"; Samek et al. (2017), "Evaluating the visualization of what a deep neural network has learned".
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import InputDtypeError, InputError, UsageError, UsageTypeError
from ..targets import OutputSelector, select_output
from ._common import (
    _as_key,
    _check_target,
    _chunks,
    _normalized_curve,
    _pad,
    _target_score,
    _trapezoid_auc,
    step_counts,
)

__all__ = ["PerturbationResult", "region_perturbation", "pixel_flipping", "region_ids", "Order", "Baseline"]

Order = Literal["morf", "lerf"]
Baseline = float | np.ndarray | jax.Array | Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class PerturbationResult:
    """What :func:`region_perturbation` measured, per sample.

    With :math:`L` = ``n_steps`` and :math:`s_k` the target score after step :math:`k`:

    Attributes:
        scores: raw scores :math:`s_k`, shape ``(N, L + 1)``; column 0 is the clean input, column
            :math:`L` the fully perturbed one (every region replaced by the baseline).
        curve: the curve the summaries are computed on, shape ``(N, L + 1)``: with ``normalize=True``
            :math:`c_k = (s_k - s_L) / (s_0 - s_L)` (1 at the start, 0 at the end; NaN where
            :math:`s_0 = s_L`), else :math:`c_k = s_k`.
        fractions: :math:`f_k = m_k / K`, the fraction of the :math:`K` regions replaced after step
            :math:`k`, shape ``(L + 1,)``.
        auc: area under the curve over the fractions (trapezoid rule), shape ``(N,)``.
        aopc: area over the perturbation curve, shape ``(N,)``.
        target: the class whose score was tracked, shape ``(N,)``.
        order: ``'morf'`` or ``'lerf'``.
        n_regions: :math:`K`.
    """

    scores: jax.Array
    curve: jax.Array
    fractions: jax.Array
    auc: jax.Array
    aopc: jax.Array
    target: jax.Array
    order: str
    n_regions: int


# --------------------------------------------------------------------------------------------------
# helpers


def _channel_axis(x_ndim: int, channel_axis: int | None | Literal["auto"]) -> int | None:
    if channel_axis == "auto":
        return x_ndim - 1 if x_ndim == 4 else None
    if channel_axis is None:
        return None
    axis = int(channel_axis) % x_ndim
    if axis == 0:
        raise UsageError("channel_axis cannot be the batch axis 0")
    return axis


def region_ids(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[np.ndarray, int]:
    """The region of every position of a ``spatial_shape`` grid tiled by ``patch_size`` patches.

    Regions are the cells of a grid of patches anchored at the origin, numbered in row-major order;
    patches at the far edges are cut short where an axis is not a multiple of the patch size.

    Args:
        spatial_shape: the sizes of the spatial axes, e.g. ``(H, W)``.
        patch_size: the patch size along every spatial axis, or one per axis.

    Returns:
        ``(ids, K)``: an ``int32`` array of shape ``spatial_shape`` with values in ``0 .. K-1``, and the
        number of regions :math:`K = \\prod_a \\lceil S_a / p_a \\rceil`.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    sizes = (patch_size,) * len(spatial_shape) if isinstance(patch_size, (int, np.integer)) else patch_size
    sizes = tuple(int(p) for p in sizes)
    if len(sizes) != len(spatial_shape) or any(p < 1 for p in sizes):
        raise UsageError(
            f"patch_size must be a positive int or one positive int per spatial axis {spatial_shape}, "
            f"got {patch_size!r}"
        )
    counts = tuple(math.ceil(s / p) for s, p in zip(spatial_shape, sizes))
    grids = np.meshgrid(*[np.arange(s) // p for s, p in zip(spatial_shape, sizes)], indexing="ij")
    ids = np.ravel_multi_index(tuple(grids), counts) if spatial_shape else np.zeros((), np.int64)
    return ids.astype(np.int32), int(math.prod(counts))


@functools.partial(
    jax.jit,
    static_argnames=(
        "fn",
        "has_params",
        "morf",
        "n_regions",
        "n_steps",
        "score",
        "normalize",
        "step_chunk",
        "channel_axis",
        "output",
    ),
)
def _perturbation_core(
    params: Any,
    x: jax.Array,
    rel_map: jax.Array,
    base: jax.Array,
    target: jax.Array,
    ids: jax.Array,
    *,
    fn: Callable[..., jax.Array],
    has_params: bool,
    morf: bool,
    n_regions: int,
    n_steps: int,
    score: str,
    normalize: bool,
    step_chunk: int,
    channel_axis: int | None,
    output: OutputSelector,
) -> tuple[jax.Array, ...]:
    apply = functools.partial(_apply, fn, has_params, params, output=output)
    n = x.shape[0]
    # summed relevance per region: (N, K)
    flat_ids = ids.reshape(-1)
    region_rel = jax.vmap(lambda r: jax.ops.segment_sum(r.reshape(-1), flat_ids, num_segments=n_regions))(
        rel_map
    )
    key = -region_rel if morf else region_rel
    ranking = jnp.argsort(key, axis=1, stable=True)  # ranking[n, j]: the j-th region to replace
    rank = jnp.argsort(ranking, axis=1)  # rank[n, region]: its position in the ranking
    pixel_rank = rank[:, flat_ids].reshape((n,) + rel_map.shape[1:])
    if channel_axis is not None:  # every channel of a position goes together
        pixel_rank = jnp.expand_dims(pixel_rank, channel_axis)
    counts = jnp.asarray(step_counts(n_regions, n_steps))

    def step(m: jax.Array) -> jax.Array:
        perturbed = jnp.where(pixel_rank < m, base, x)
        return _target_score(apply(perturbed), target, score)

    scores = lax.map(step, counts, batch_size=step_chunk if step_chunk > 1 else None).T  # (N, L+1)
    curve = _normalized_curve(scores) if normalize else scores
    fractions = counts.astype(scores.dtype) / n_regions
    auc = _trapezoid_auc(fractions, curve)
    aopc = jnp.mean(curve[:, :1] - curve, axis=1)
    return scores, curve, fractions, auc, aopc


def _apply(
    fn: Callable[..., Any], has_params: bool, params: Any, x: jax.Array, *, output: OutputSelector
) -> jax.Array:
    """The explained (selected) output of ``fn`` at ``x``."""
    return select_output(fn(params, x) if has_params else fn(x), output)


# --------------------------------------------------------------------------------------------------
# public API


def region_perturbation(
    fn: Callable[..., jax.Array],
    x: Any,
    relevance: Any,
    target: Any = None,
    *,
    params: Any = None,
    order: Order = "morf",
    patch_size: int | Sequence[int] = 1,
    n_steps: int | None = None,
    baseline: Baseline = 0.0,
    score: Literal["logit", "softmax"] = "logit",
    normalize: bool = True,
    channel_axis: int | None | Literal["auto"] = "auto",
    batch_size: int | None = None,
    step_chunk: int = 1,
    rng: Any = 0,
    output: OutputSelector = None,
) -> PerturbationResult:
    """Region perturbation (pixel flipping): replace regions in relevance order and track the target score.

    The spatial positions of ``x`` (every non-batch axis except the channel axis) are tiled into
    :math:`K` regions of ``patch_size`` (:func:`region_ids`). Each region :math:`r` gets the summed
    relevance :math:`R_r = \\sum_{i \\in r} R_i` (summed over channels too), and the regions are
    ranked by :math:`R_r`: descending for MoRF (most relevant first), ascending for LeRF (least
    relevant first); ties keep their row-major order. After step :math:`k = 0 .. L` the first

    .. math:: m_k = \\operatorname{round}(k K / L)

    regions of the ranking are replaced by the baseline :math:`b`, all channels of a position together:
    :math:`x^{(k)} = M_k \\odot b + (1 - M_k) \\odot x`, and the score :math:`s_k` of the target class
    :math:`c` is recorded (``score='logit'``: :math:`s_k = f_c(x^{(k)})`; ``'softmax'``: its softmax
    probability). So :math:`x^{(0)} = x` and :math:`x^{(L)}` is all baseline. The curve is normalised by
    the two ends, which no ordering changes, so curves of different methods compare directly:

    .. math::

        c_k = \\frac{s_k - s_L}{s_0 - s_L}, \\qquad
        \\mathrm{AUC} = \\sum_{k=0}^{L-1} (f_{k+1} - f_k) \\frac{c_k + c_{k+1}}{2}, \\qquad
        \\mathrm{AOPC} = \\frac{1}{L + 1} \\sum_{k=0}^{L} (c_0 - c_k),

    with :math:`f_k = m_k / K` (Samek et al. 2017, eq. 12, for AOPC; with ``normalize=False``,
    :math:`c_k = s_k`). A good attribution gives a *low* MoRF AUC and a *high* MoRF AOPC (the score
    drops at once), and a *high* LeRF AUC (the score survives removing the irrelevant regions).
    Compare with :func:`random_attribution` on the same call.

    Args:
        fn: the model, ``fn(x) -> output`` of shape ``(N, n_classes)``, or ``fn(params, x)`` when
            ``params`` is given. ``fn`` is a static argument of the compiled function (hashed by
            identity): reuse one function object (e.g. ``model.apply`` with ``params=variables``) to
            compile once.
        x: inputs, batch on axis 0: ``(N, H, W, C)`` images, or any ``(N, *spatial[, C])``.
        relevance: shaped like ``x``, or like ``x`` without its channel axis (a heatmap).
        target: ``None`` (the class the model predicts for the clean ``x``), an int, or one int per sample.
        params: the first argument of ``fn`` (traced: new weights do not recompile).
        order: ``'morf'`` or ``'lerf'``.
        patch_size: region size along each spatial axis (int or one per axis); 1 is pixel flipping.
        n_steps: :math:`L`, default :math:`K` (one region per step). Each step evaluates the model once
            on the batch.
        baseline: the replacement value: a scalar, an array broadcastable to ``x`` (e.g. the per-channel
            mean, or one image per sample), or ``baseline(x, key) -> array like x`` (e.g. uniform noise,
            as Samek et al.: ``lambda x, k: jax.random.uniform(k, x.shape, x.dtype)``), evaluated once
            on the whole ``x`` with the key from ``rng``.
        score: ``'logit'`` (the raw output) or ``'softmax'``.
        normalize: normalise the curve by its ends (above); ``False``: summaries of the raw scores.
        channel_axis: the axis whose entries are replaced together and summed in the relevance;
            ``'auto'``: the last axis of 4-D inputs (NHWC), none otherwise.
        batch_size: samples per compiled call (the last chunk is padded to the same size); default: all.
        step_chunk: perturbation steps evaluated at once (vmapped); memory grows with it.
        rng: an int seed or a ``jax.random`` key for a callable baseline.
        output: which output of ``fn`` holds the scores when it returns several (``(logits, aux)``):
            an int, a str, a path tuple or a callable, as in :func:`jlrp.attribute`; ``None``: the
            output itself.

    Returns:
        A :class:`PerturbationResult` (scores, curve, fractions, auc, aopc, target).

    Raises:
        UsageError: shapes that do not fit, an unknown order or score (a ``ValueError``).
        InputDtypeError: a non-floating ``x``.
        TargetError: a target out of range or of the wrong shape, an output that is not an array
            without ``output=``.
    """
    if order not in ("morf", "lerf"):
        raise UsageError(f"order must be 'morf' or 'lerf', got {order!r}")
    if score not in ("logit", "softmax"):
        raise UsageError(f"score must be 'logit' or 'softmax', got {score!r}")
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputDtypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise InputError(f"x needs a batch axis and at least one more, got shape {x.shape}")
    relevance = jnp.asarray(relevance)
    axis = _channel_axis(x.ndim, channel_axis)
    reduced_shape = x.shape if axis is None else x.shape[:axis] + x.shape[axis + 1 :]
    if relevance.shape == x.shape:
        rel_map = relevance if axis is None else relevance.sum(axis=axis)
    elif relevance.shape == reduced_shape:
        rel_map = relevance
    else:
        raise UsageError(
            f"relevance of shape {relevance.shape} does not fit x of shape {x.shape}: it must be shaped "
            f"like x or like x without its channel axis {reduced_shape}"
        )
    rel_map = rel_map.astype(jnp.promote_types(rel_map.dtype, jnp.float32))
    ids, n_regions = region_ids(reduced_shape[1:], patch_size)
    n_steps = n_regions if n_steps is None else int(n_steps)
    if n_steps < 1:
        raise UsageError(f"n_steps must be >= 1, got {n_steps}")
    if callable(baseline):
        base = jnp.asarray(baseline(x, _as_key(rng)), dtype=x.dtype)
    else:
        base = jnp.asarray(baseline, dtype=x.dtype)
    try:
        base = jnp.broadcast_to(base, x.shape)
    except ValueError:
        raise UsageError(
            f"the baseline of shape {base.shape} does not broadcast to x of shape {x.shape}"
        ) from None
    has_params = params is not None
    apply = functools.partial(_apply, fn, has_params, params, output=output)
    out_shape = jax.eval_shape(apply, x[:1]).shape
    if len(out_shape) != 2:
        raise UsageError(f"fn must return (N, n_classes) scores, got shape {out_shape} for one sample")
    n = x.shape[0]
    target_arr = _check_target(target, n, out_shape[-1])
    if target_arr is None:
        target_arr = _predict(fn, has_params, params, x, batch_size, output)
    static = dict(
        fn=fn,
        has_params=has_params,
        morf=order == "morf",
        n_regions=n_regions,
        n_steps=n_steps,
        score=score,
        normalize=bool(normalize),
        step_chunk=int(step_chunk),
        channel_axis=axis,
        output=output,
    )
    ids_arr = jnp.asarray(ids)
    parts = []
    for start, stop, pad in _chunks(n, batch_size):
        chunk = [_pad(a[start:stop], pad) for a in (x, rel_map, base, target_arr)]
        result = _perturbation_core(params, *chunk, ids_arr, **static)
        parts.append([r if i == 2 else r[: stop - start] for i, r in enumerate(result)])  # 2: fractions
    fractions = parts[0][2]
    scores, curve, auc, aopc = (jnp.concatenate([p[i] for p in parts]) for i in (0, 1, 3, 4))
    return PerturbationResult(scores, curve, fractions, auc, aopc, target_arr, order, n_regions)


def pixel_flipping(
    fn: Callable[..., jax.Array], x: Any, relevance: Any, target: Any = None, **kwargs: Any
) -> PerturbationResult:
    """Pixel flipping (Bach et al. 2015): :func:`region_perturbation` with ``patch_size=1``.

    Every position (all its channels together) is one region; see :func:`region_perturbation` for the
    formulas and the other arguments.
    """
    if "patch_size" in kwargs:
        raise UsageTypeError("pixel_flipping flips single pixels; use region_perturbation for patch_size")
    return region_perturbation(fn, x, relevance, target, patch_size=1, **kwargs)


@functools.partial(jax.jit, static_argnames=("fn", "has_params", "output"))
def _predict_core(
    params: Any, x: jax.Array, *, fn: Callable[..., jax.Array], has_params: bool, output: OutputSelector
) -> jax.Array:
    out = _apply(fn, has_params, params, x, output=output)
    return jnp.argmax(out, axis=-1).astype(jnp.int32)


def _predict(
    fn: Callable[..., jax.Array],
    has_params: bool,
    params: Any,
    x: jax.Array,
    batch_size: int | None,
    output: OutputSelector = None,
) -> jax.Array:
    parts = []
    for start, stop, pad in _chunks(x.shape[0], batch_size):
        chunk = _pad(x[start:stop], pad)
        parts.append(
            _predict_core(params, chunk, fn=fn, has_params=has_params, output=output)[: stop - start]
        )
    return jnp.concatenate(parts)
