"""Evaluation metrics for attributions: region perturbation (pixel flipping), conservation, a random baseline.

Everything here is jit-compiled and batched over samples (axis 0 of ``x``). Memory stays bounded: the
perturbation steps are evaluated one chunk at a time under :func:`jax.lax.map`, and ``batch_size`` splits
the samples into chunks of one compiled size.

- :func:`region_perturbation` (and :func:`pixel_flipping`, its ``patch_size=1`` case): Bach et al. (2015),
  "On pixel-wise explanations for non-linear classifier decisions by layer-wise relevance propagation";
  Samek et al. (2017), "Evaluating the visualization of what a deep neural network has learned". Regions
  of ``patch_size x patch_size`` pixels are ranked by their summed relevance and replaced by a baseline,
  most relevant first (MoRF) or least relevant first (LeRF); the score of the target class is recorded
  after every step, and its area under the curve (AUC) and the area over the perturbation curve (AOPC)
  summarise it per sample.
- :func:`conservation`: LRP's completeness property, :math:`\\sum_i R_i = f_c(x)`, checked per sample.
- :func:`random_attribution`: seeded random relevance, the baseline every method should beat.

Example::

    fn = model.apply                                    # fn(params, x) -> logits
    _, rel = jlrp.attribute(jlrp.explain(model, 'epsilon_plus_flat'), variables, x)
    morf = metrics.region_perturbation(fn, x, rel, params=variables, order='morf', patch_size=2)
    lerf = metrics.region_perturbation(fn, x, rel, params=variables, order='lerf', patch_size=2)
    rand = metrics.region_perturbation(fn, x, metrics.random_attribution(x, seed=0), params=variables)
    print(morf.auc.mean(), lerf.auc.mean(), morf.aopc.mean(), rand.auc.mean())
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

from .errors import InputDtypeError, InputError, TargetError, UsageError, UsageTypeError
from .targets import OutputSelector, Target, TargetLike, as_target, output_cotangent, select_output

__all__ = [
    "PerturbationResult",
    "ConservationResult",
    "region_perturbation",
    "pixel_flipping",
    "conservation",
    "random_attribution",
    "region_ids",
    "step_counts",
]

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


@dataclasses.dataclass(frozen=True)
class ConservationResult:
    """What :func:`conservation` measured, per sample (every field has shape ``(N,)``).

    Attributes:
        relevance_sum: :math:`\\sum_i R_i`.
        score: :math:`S`, the summed starting relevance (for a class index :math:`c`: :math:`f_c(x)`).
        error: :math:`\\sum_i R_i - S` (negative: relevance was absorbed, e.g. by biases or epsilon).
        relative_error: :math:`|\\sum_i R_i - S| / \\max(|S|, \\text{tiny})`.
    """

    relevance_sum: jax.Array
    score: jax.Array
    error: jax.Array
    relative_error: jax.Array

    @property
    def max_relative_error(self) -> float:
        """The largest relative error over the batch."""
        return float(jnp.max(self.relative_error))


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


def step_counts(n_regions: int, n_steps: int) -> np.ndarray:
    """:math:`m_k = \\operatorname{round}(k K / L)`, the number of regions replaced after step ``k = 0 .. L``."""
    return np.rint(np.arange(n_steps + 1) * n_regions / n_steps).astype(np.int32)


def _target_score(output: jax.Array, target: jax.Array, score: str) -> jax.Array:
    if score == "softmax":
        output = jax.nn.softmax(output, axis=-1)
    return jnp.take_along_axis(output, target[:, None], axis=-1)[:, 0]


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
    if normalize:
        first, last = scores[:, :1], scores[:, -1:]
        denom = first - last
        curve = jnp.where(denom == 0, jnp.nan, (scores - last) / jnp.where(denom == 0, 1, denom))
    else:
        curve = scores
    fractions = counts.astype(scores.dtype) / n_regions
    widths = jnp.diff(fractions)
    auc = jnp.sum(widths * (curve[:, 1:] + curve[:, :-1]) / 2, axis=1)
    aopc = jnp.mean(curve[:, :1] - curve, axis=1)
    return scores, curve, fractions, auc, aopc


def _as_key(rng: Any) -> jax.Array:
    if isinstance(rng, (int, np.integer)):
        return jax.random.PRNGKey(int(rng))
    return rng


def _apply(
    fn: Callable[..., Any], has_params: bool, params: Any, x: jax.Array, *, output: OutputSelector
) -> jax.Array:
    """The explained (selected) output of ``fn`` at ``x``."""
    return select_output(fn(params, x) if has_params else fn(x), output)


def _check_target(target: Any, n: int, n_classes: int) -> jax.Array | None:
    if target is None:
        return None
    arr = np.asarray(target)
    if not np.issubdtype(arr.dtype, np.integer) or arr.ndim > 1:
        raise TargetError(
            f"target must be None (the predicted class), an int, or one int per sample; got {target!r}"
        )
    arr = np.broadcast_to(arr, (n,)) if arr.ndim == 0 else arr
    if arr.shape != (n,):
        raise TargetError(f"one target per sample needs shape ({n},), got {arr.shape}")
    if ((arr < 0) | (arr >= n_classes)).any():
        raise TargetError(f"target classes must lie in 0..{n_classes - 1}, got {arr.min()}..{arr.max()}")
    return jnp.asarray(arr, dtype=jnp.int32)


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


def _chunks(n: int, batch_size: int | None) -> list[tuple[int, int, int]]:
    """``(start, stop, padding)`` of every chunk; the last is padded up to ``batch_size``."""
    if batch_size is None or batch_size >= n:
        return [(0, n, 0)]
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n), max(0, s + batch_size - n)) for s in range(0, n, batch_size)]


def _pad(a: jax.Array, pad: int) -> jax.Array:
    """Append ``pad`` copies of the last row (padding rows are computed and dropped)."""
    if pad == 0:
        return a
    return jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)])


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


@jax.jit
def _conservation_core(relevance: Any, output: jax.Array, target: Target) -> tuple[jax.Array, ...]:
    start = output_cotangent(output, target)
    score = start.reshape(start.shape[0], -1).sum(axis=1)
    total = sum(
        leaf.reshape(leaf.shape[0], -1).sum(axis=1).astype(score.dtype)
        for leaf in jax.tree_util.tree_leaves(relevance)
    )
    error = total - score
    tiny = jnp.finfo(score.dtype).tiny
    return total, score, error, jnp.abs(error) / jnp.maximum(jnp.abs(score), tiny)


def conservation(relevance: Any, output: Any, target: TargetLike = None) -> ConservationResult:
    """Check conservation (completeness): does the relevance of each sample sum to the explained score?

    LRP redistributes the starting relevance :math:`S = \\sum_j r_j(f(x))` (for a class index :math:`c`,
    :math:`S = f_c(x)`: the output times a one-hot) layer by layer; a conservative rule set keeps the
    total, so

    .. math::

        \\sum_i R_i = S, \\qquad \\text{error} = \\sum_i R_i - S, \\qquad
        \\text{relative error} = \\frac{|\\sum_i R_i - S|}{\\max(|S|, \\text{tiny})}.

    Biases, the epsilon of Epsilon, and the stabilizers absorb part of the relevance (the error is then
    negative for positive scores); ZBox, Flat and bias-free Epsilon layers conserve it. Gradient-based
    attributions (plain gradient, SmoothGrad) are not meant to conserve; Integrated Gradients conserves
    approximately (completeness, up to the Riemann sum and the baseline's score).

    Args:
        relevance: the relevance, batch on axis 0 (any shape), or a pytree of them (several inputs: the
            sum runs over every leaf).
        output: the explained output for the same batch, ``(N, n_classes)``: the array
            :func:`jlrp.attribute` returns (already selected with its ``output=``).
        target: as :func:`jlrp.attribute`: ``None`` (the predicted class), an int, one int per sample,
            a mask broadcastable to the output, a callable ``output -> starting relevance`` or a
            :class:`jlrp.targets.Target`; it must be the target the relevance was computed for.

    Returns:
        A :class:`ConservationResult` (relevance_sum, score, error, relative_error), each of shape ``(N,)``.

    Raises:
        TargetError: ``output`` is not an array (e.g. a model's ``(logits, aux)`` tuple: pass the array
            that was explained), or a target that does not fit it.
        UsageError: relevance and output with different batch sizes.
    """
    output = jnp.asarray(select_output(output, None))
    relevance = jax.tree_util.tree_map(jnp.asarray, relevance)
    leaves = jax.tree_util.tree_leaves(relevance)
    if (
        not leaves
        or output.ndim < 1
        or any(leaf.ndim < 1 or leaf.shape[0] != output.shape[0] for leaf in leaves)
    ):
        shapes = jax.tree_util.tree_map(jnp.shape, relevance)
        raise UsageError(
            f"relevance {shapes} and output {output.shape} must have the same batch size on axis 0"
        )
    target = as_target(target, tuple(output.shape))
    return ConservationResult(*_conservation_core(relevance, output, target))


def random_attribution(
    x_or_shape: Any,
    seed: int | jax.Array = 0,
    *,
    distribution: Literal["uniform", "normal"] = "uniform",
    dtype: Any = None,
) -> jax.Array:
    """Seeded random relevance: the baseline an attribution method must beat.

    ``'uniform'`` draws :math:`R_i \\sim U[-1, 1)`, ``'normal'`` :math:`R_i \\sim \\mathcal N(0, 1)`,
    independently per element, from ``jax.random.PRNGKey(seed)`` (or the key passed). Used as the
    ranking of :func:`region_perturbation`, it gives a uniformly random order of positions (and a
    random order of patches, as every patch sums the same number of i.i.d. values).

    Args:
        x_or_shape: an array (its shape and float dtype are used) or a shape tuple.
        seed: an int seed or a ``jax.random`` key.
        distribution: ``'uniform'`` or ``'normal'``.
        dtype: the result dtype; default: that of ``x`` (float32 for a shape).

    Returns:
        An array of the requested shape.
    """
    if isinstance(x_or_shape, (tuple, list)):
        shape = tuple(int(s) for s in x_or_shape)
        dtype = dtype or jnp.float32
    else:
        arr = jnp.asarray(x_or_shape)
        shape = arr.shape
        if dtype is None:
            dtype = arr.dtype if jnp.issubdtype(arr.dtype, jnp.floating) else jnp.float32
    key = _as_key(seed)
    if distribution == "uniform":
        return jax.random.uniform(key, shape, dtype, minval=-1.0, maxval=1.0)
    if distribution == "normal":
        return jax.random.normal(key, shape, dtype)
    raise UsageError(f"distribution must be 'uniform' or 'normal', got {distribution!r}")
