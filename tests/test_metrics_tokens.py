"""Tests of :mod:`jlrp.metrics.tokens` (token deletion) against curves computed by hand.

The model is a bag of tokens, ``score = sum_t w[id_t] * mask_t``: deleting a token changes the score by
``w[replace_id] - w[id]`` (replace mode) or ``-w[id]`` (mask mode), so every curve below is written out
by hand in the comments.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jlrp import metrics
from jlrp.errors import InputDtypeError, InputError, JlrpError, TargetError, UsageError
from jlrp.metrics import tokens as tokens_module

PAD, CLS, SEP, UNK = 0, 1, 2, 3
# ids:          PAD  CLS   SEP   UNK  4    5    6     7
WEIGHTS = jnp.array([0.0, 10.0, 10.0, 0.5, 0.0, 3.0, -1.0, 2.0])
SPECIAL = (PAD, CLS, SEP)


def bag(ids, mask):
    """One score per sample: sum of token weights over the real tokens (any number of token axes)."""
    contrib = WEIGHTS[ids] * mask
    return contrib.reshape(contrib.shape[0], -1).sum(axis=1)


def bag_params(weights, ids, mask):
    contrib = weights[ids] * mask
    return contrib.reshape(contrib.shape[0], -1).sum(axis=1)


def bag_classes(ids, mask):
    """Two classes: the bag score and a constant 0."""
    s = bag(ids, mask)
    return jnp.stack([s, jnp.zeros_like(s)], axis=1)


def bag_no_mask(ids):
    return WEIGHTS[ids].sum(axis=1)


# sample 0: [CLS] 5 6 7 [SEP]; the specials get the largest relevance and must still never go
IDS0 = [CLS, 5, 6, 7, SEP]
REL0 = [9.0, 3.0, -1.0, 2.0, 9.0]
# sample 1: [CLS] 6 5 [SEP] [PAD]; the padding gets the largest relevance and must still never go
IDS1 = [CLS, 6, 5, SEP, PAD]
REL1 = [0.0, 5.0, -5.0, 0.0, 100.0]


def batch():
    ids = jnp.array([IDS0, IDS1], jnp.int32)
    mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], jnp.int32)
    rel = jnp.array([REL0, REL1], jnp.float32)
    return ids, mask, rel


def test_replace_mode_hand_curves():
    ids, mask, rel = batch()
    kw = dict(mode="replace", replace_id=UNK, special_ids=SPECIAL)
    morf = metrics.token_deletion(bag, ids[:1], rel[:1], mask[:1], order="morf", **kw)
    lerf = metrics.token_deletion(bag, ids[:1], rel[:1], mask[:1], order="lerf", **kw)
    # s0 = 10 + 3 - 1 + 2 + 10 = 24; every deletion adds w[UNK] = 0.5
    # MoRF: 5 (24 - 3 + .5 = 21.5), 7 (21.5 - 2 + .5 = 20), 6 (20 + 1 + .5 = 21.5)
    np.testing.assert_allclose(morf.scores[0], [24, 21.5, 20, 21.5])
    # LeRF: 6 (24 + 1 + .5 = 25.5), 7 (25.5 - 2 + .5 = 24), 5 (24 - 3 + .5 = 21.5)
    np.testing.assert_allclose(lerf.scores[0], [24, 25.5, 24, 21.5])
    np.testing.assert_allclose(morf.fractions[0], [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_array_equal(morf.n_deleted[0], [0, 1, 2, 3])
    # trapezoids of width 1/3: (22.75 + 20.75 + 20.75) / 3 and (24.75 + 24.75 + 22.75) / 3
    np.testing.assert_allclose(morf.auc, [64.25 / 3], rtol=1e-6)
    np.testing.assert_allclose(lerf.auc, [72.25 / 3], rtol=1e-6)
    np.testing.assert_array_equal(morf.n_deletable, [3])
    assert morf.target is None and morf.order == "morf" and morf.mode == "replace"


def test_mask_mode_with_padding_and_uneven_lengths():
    ids, mask, rel = batch()
    result = metrics.token_faithfulness(bag, ids, rel, mask, mode="mask", special_ids=SPECIAL)
    # sample 0, K = 3 = L: MoRF 24, 21, 19, 20; LeRF 24, 25, 23, 20
    np.testing.assert_allclose(result.morf.scores[0], [24, 21, 19, 20])
    np.testing.assert_allclose(result.lerf.scores[0], [24, 25, 23, 20])
    # sample 1, K = 2, L = 3: m_k = round(2k/3) = 0, 1, 1, 2; s0 = 10 - 1 + 3 + 10 = 22
    np.testing.assert_array_equal(result.morf.n_deleted[1], [0, 1, 1, 2])
    np.testing.assert_allclose(result.morf.fractions[1], [0, 0.5, 0.5, 1])
    np.testing.assert_allclose(result.morf.scores[1], [22, 23, 23, 20])  # token 6 (w = -1) first
    np.testing.assert_allclose(result.lerf.scores[1], [22, 19, 19, 20])  # token 5 (w = 3) first
    # sample 1: MoRF .5 * 22.5 + 0 + .5 * 21.5 = 22; LeRF .5 * 20.5 + .5 * 19.5 = 20
    # sample 0: MoRF (22.5 + 20 + 19.5) / 3 = 62 / 3; LeRF (24.5 + 24 + 21.5) / 3 = 70 / 3
    np.testing.assert_allclose(result.morf.auc, [62 / 3, 22], rtol=1e-6)
    np.testing.assert_allclose(result.lerf.auc, [70 / 3, 20], rtol=1e-6)
    np.testing.assert_allclose(result.area_between, [8 / 3, -2], rtol=1e-6)
    np.testing.assert_array_equal(result.morf.n_deletable, [3, 2])


def test_sentence_pairs_rank_across_both_sentences():
    ids = jnp.array([[[CLS, 5, SEP], [CLS, 7, SEP]]], jnp.int32)  # (N, 2, T)
    mask = jnp.ones_like(ids)
    rel = jnp.array([[[0.0, 1.0, 0.0], [0.0, 4.0, 0.0]]])
    morf = metrics.token_deletion(bag, ids, rel, mask, mode="mask", special_ids=SPECIAL)
    # s0 = 10 + 3 + 10 + 10 + 2 + 10 = 45; the second sentence's 7 (relevance 4) goes first
    np.testing.assert_allclose(morf.scores[0], [45, 43, 40])
    lerf = metrics.token_deletion(bag, ids, rel, mask, order="lerf", mode="mask", special_ids=SPECIAL)
    np.testing.assert_allclose(lerf.scores[0], [45, 42, 40])


def test_keep_never_deletes_and_n_steps():
    ids, mask, rel = batch()
    keep = jnp.zeros(ids.shape, bool).at[0, 1].set(True)  # token 5 of sample 0 stays
    result = metrics.token_deletion(
        bag, ids[:1], rel[:1], mask[:1], mode="mask", special_ids=SPECIAL, keep=keep[:1], n_steps=1
    )
    # deletable: 6 and 7 only; one step deletes both: 24 + 1 - 2 = 23
    np.testing.assert_allclose(result.scores[0], [24, 23])
    np.testing.assert_array_equal(result.n_deletable, [2])
    # the trapezoid over [0, 1]: (24 + 23) / 2
    np.testing.assert_allclose(result.auc, [23.5])


def test_without_special_ids_the_specials_are_deleted_too():
    ids, mask, rel = batch()
    result = metrics.token_deletion(bag, ids[:1], rel[:1], mask[:1], mode="mask")
    # relevance 9 for both specials: [CLS] then [SEP] first (row-major tie), then 5, 7, 6
    np.testing.assert_allclose(result.scores[0], [24, 14, 4, 1, -1, 0])


def test_class_scores_target_and_softmax():
    ids, mask, rel = batch()
    kw = dict(mode="mask", special_ids=SPECIAL)
    logit = metrics.token_deletion(bag_classes, ids[:1], rel[:1], mask[:1], **kw)
    np.testing.assert_allclose(logit.scores[0], [24, 21, 19, 20])
    np.testing.assert_array_equal(logit.target, [0])  # the predicted class of the clean input
    soft = metrics.token_deletion(bag_classes, ids[:1], rel[:1], mask[:1], score="softmax", **kw)
    expected = 1 / (1 + np.exp(-np.array([24.0, 21, 19, 20])))  # softmax of [s, 0], class 0
    np.testing.assert_allclose(soft.scores[0], expected, rtol=1e-6)
    other = metrics.token_deletion(bag_classes, ids[:1], rel[:1], mask[:1], target=1, **kw)
    np.testing.assert_allclose(other.scores[0], [0, 0, 0, 0])


def test_normalized_curve_params_and_no_mask():
    ids, mask, rel = batch()
    weights = WEIGHTS
    result = metrics.token_deletion(
        bag_params,
        ids[:1],
        rel[:1],
        mask[:1],
        params=weights,
        mode="mask",
        special_ids=SPECIAL,
        normalize=True,
    )
    # (s - s_L) / (s_0 - s_L) with s = 24, 21, 19, 20
    np.testing.assert_allclose(result.curve[0], [1, 0.25, -0.25, 0], atol=1e-6)
    np.testing.assert_allclose(result.scores[0], [24, 21, 19, 20])
    plain = metrics.token_deletion(bag_no_mask, ids[:1], rel[:1], replace_id=4, special_ids=SPECIAL)
    # w[4] = 0, so replacing deletes the weight: the mask-mode curve
    np.testing.assert_allclose(plain.scores[0], [24, 21, 19, 20])


def test_batch_size_chunks_equal_one_call_and_no_recompile():
    ids, mask, rel = batch()
    kw = dict(mode="mask", special_ids=SPECIAL)
    whole = metrics.token_deletion(bag, ids, rel, mask, **kw)
    chunked = metrics.token_deletion(bag, ids, rel, mask, batch_size=1, step_chunk=2, **kw)
    np.testing.assert_allclose(chunked.scores, whole.scores)
    np.testing.assert_allclose(chunked.auc, whole.auc)
    size = tokens_module._deletion_core._cache_size()
    metrics.token_deletion(bag, ids, rel * 2.0, mask, **kw)
    metrics.token_deletion(bag, ids, rel, mask, order="lerf", **kw)  # the order is traced too
    assert tokens_module._deletion_core._cache_size() == size


def test_random_order_baseline_is_about_zero_and_beaten():
    rng = np.random.default_rng(0)
    n, t = 64, 12
    body = rng.integers(4, 8, size=(1, t))
    ids = jnp.asarray(np.repeat(body, n, axis=0), jnp.int32)
    mask = jnp.ones_like(ids)
    truth = WEIGHTS[ids]  # the exact contributions of the bag model
    exact = metrics.token_faithfulness(bag, ids, truth, mask, mode="mask")
    random = metrics.token_faithfulness(bag, ids, metrics.random_attribution(ids, seed=3), mask, mode="mask")
    again = metrics.token_faithfulness(bag, ids, metrics.random_attribution(ids, seed=3), mask, mode="mask")
    np.testing.assert_array_equal(random.area_between, again.area_between)  # seeded
    exact_area = float(exact.area_between[0])
    assert exact_area > 1.0
    assert abs(float(random.area_between.mean())) < 0.15 * exact_area
    assert float(random.area_between.max()) < exact_area + 1e-5  # the exact order is the best one


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel[:, :4], mask, mode="mask"), UsageError),
        (lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel, mask[:, :4], mode="mask"), UsageError),
        (
            lambda ids, mask, rel: metrics.token_deletion(bag, ids * 1.0, rel, mask, mode="mask"),
            InputDtypeError,
        ),
        (
            lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel * jnp.nan, mask, mode="mask"),
            InputError,
        ),
        (lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel, mask), UsageError),  # no replace_id
        (lambda ids, mask, rel: metrics.token_deletion(bag_no_mask, ids, rel, mode="mask"), UsageError),
        (lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel, mask, mode="drop"), UsageError),
        (
            lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel, mask, order="x", mode="mask"),
            UsageError,
        ),
        (lambda ids, mask, rel: metrics.token_deletion(bag, ids, rel, mask, 0, mode="mask"), TargetError),
        (
            lambda ids, mask, rel: metrics.token_deletion(bag_classes, ids, rel, mask, 2, mode="mask"),
            TargetError,
        ),
        (lambda ids, mask, rel: metrics.token_faithfulness(bag, ids, rel, mask, order="morf"), UsageError),
    ],
)
def test_bad_input_raises_a_jlrp_error(call, error):
    ids, mask, rel = batch()
    with pytest.raises(error) as info:
        call(ids, mask, rel)
    assert isinstance(info.value, JlrpError)
