"""Tests of :mod:`jlrp.metrics`: region perturbation (pixel flipping), conservation, the random baseline.

Constructed cases with known answers: a model that looks at one pixel only (flipping it first gives the
lowest possible MoRF AUC, exactly ``1 / (2K)``), a linear model whose true contributions ``w * x`` beat a
random ranking under LeRF, and a bias-free ReLU MLP whose Epsilon-LRP relevance conserves the score.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import metrics
from jlrp.rules import Epsilon

H = W = 6
PIXEL = (2, 3)


def one_pixel_fn(x: jax.Array) -> jax.Array:
    """Two classes that look at pixel (2, 3) of channel 0 only: class 0 scores it, class 1 its negative."""
    v = x[:, PIXEL[0], PIXEL[1], 0]
    return jnp.stack([v, -v], axis=-1)


@pytest.fixture(scope="module")
def images() -> jax.Array:
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.uniform(0.5, 1.0, (5, H, W, 2)).astype(np.float32))


def true_relevance(x: jax.Array) -> jax.Array:
    return jnp.zeros_like(x).at[:, PIXEL[0], PIXEL[1], 0].set(x[:, PIXEL[0], PIXEL[1], 0])


def test_one_pixel_model_morf_and_lerf_have_the_known_areas(images):
    k = H * W
    rel = true_relevance(images)
    morf = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, order="morf")
    lerf = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, order="lerf")
    # MoRF: the score is gone after the first step, c = [1, 0, 0, ...]; LeRF: c = [1, ..., 1, 0]
    np.testing.assert_allclose(morf.curve[:, 0], 1.0)
    np.testing.assert_allclose(morf.curve[:, 1:], 0.0, atol=1e-6)
    np.testing.assert_allclose(lerf.curve[:, :-1], 1.0, atol=1e-6)
    np.testing.assert_allclose(morf.auc, 1 / (2 * k), rtol=1e-5)
    np.testing.assert_allclose(lerf.auc, 1 - 1 / (2 * k), rtol=1e-5)
    np.testing.assert_allclose(morf.aopc, k / (k + 1), rtol=1e-5)
    np.testing.assert_allclose(morf.fractions, np.arange(k + 1) / k, rtol=1e-6)
    assert morf.scores.shape == (5, k + 1) and morf.n_regions == k
    np.testing.assert_allclose(morf.scores[:, 0], one_pixel_fn(images)[:, 0], rtol=1e-6)


def test_flipping_the_only_pixel_first_gives_the_lowest_morf_auc(images):
    rel = true_relevance(images)
    best = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0).auc
    others = {
        "random": metrics.random_attribution(images, seed=1),
        "reversed": -rel,
        "constant": jnp.ones_like(images),
    }
    for name, other in others.items():
        auc = metrics.pixel_flipping(one_pixel_fn, images, other, target=0).auc
        assert np.all(best <= auc + 1e-7), name
        assert np.mean(best) < np.mean(auc), name


def test_regions_are_ranked_by_summed_relevance(images):
    rel = true_relevance(images)
    # 6x6 in 2x2 patches: 9 regions, the pixel's region goes first; n_steps=3 flips 3 regions a step
    result = metrics.region_perturbation(one_pixel_fn, images, rel, target=0, patch_size=2, n_steps=3)
    assert result.n_regions == 9
    np.testing.assert_allclose(result.fractions, [0, 1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_allclose(result.curve, np.tile([1.0, 0.0, 0.0, 0.0], (5, 1)), atol=1e-6)
    np.testing.assert_allclose(result.auc, 1 / 6, rtol=1e-5)
    # LeRF leaves it to the last region
    lerf = metrics.region_perturbation(
        one_pixel_fn, images, rel, target=0, patch_size=2, n_steps=9, order="lerf"
    )
    np.testing.assert_allclose(lerf.curve[:, :-1], 1.0, atol=1e-6)


def test_region_ids_cut_edge_patches_short():
    ids, k = metrics.region_ids((5, 5), 2)
    assert k == 9 and ids.shape == (5, 5)
    np.testing.assert_array_equal(ids[0], [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(ids[:, 0], [0, 0, 3, 3, 6])
    ids, k = metrics.region_ids((4, 6), (2, 3))
    assert k == 4 and ids[3, 5] == 3
    np.testing.assert_array_equal(metrics.step_counts(10, 4), [0, 2, 5, 8, 10])


def test_heatmap_relevance_and_channels_move_together(images):
    rel = true_relevance(images)
    full = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0)
    heat = metrics.pixel_flipping(one_pixel_fn, images, rel.sum(-1), target=0)
    np.testing.assert_allclose(full.scores, heat.scores)
    # without a channel axis every element is its own region
    flat = images.reshape(5, -1)
    fn = lambda v: one_pixel_fn(v.reshape(-1, H, W, 2))
    per_element = metrics.pixel_flipping(fn, flat, rel.reshape(5, -1), target=0)
    assert per_element.n_regions == H * W * 2
    np.testing.assert_allclose(per_element.auc, 1 / (4 * H * W), rtol=1e-5)


class LinearNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, use_bias=False)(x.reshape(x.shape[0], -1))


def test_lerf_of_true_relevance_beats_random():
    model = LinearNet()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(16, 5, 5, 1)))
    variables = model.init(jax.random.PRNGKey(0), x)
    x = x * jnp.sign(model.apply(variables, x)[:, :1, None, None])  # a positive score of class 0
    explained = jlrp.explain(model, {nn.Dense: Epsilon(epsilon=1e-12)})
    output, rel = jlrp.attribute(explained, variables, x, target=0)
    # bias-free linear model: LRP-epsilon is exactly the contribution w_i x_i, and the score of the
    # inputs that remain is the sum of their contributions: LeRF of the true relevance keeps the largest
    # sum at every step (MoRF the smallest), so no ranking beats it anywhere on the curve
    kernel = variables["params"]["Dense_0"]["kernel"][:, 0]
    np.testing.assert_allclose(rel.reshape(16, -1), x.reshape(16, -1) * kernel, rtol=1e-6, atol=1e-12)
    kw = dict(params=variables, target=0)
    lerf = metrics.pixel_flipping(model.apply, x, rel, order="lerf", **kw)
    morf = metrics.pixel_flipping(model.apply, x, rel, order="morf", **kw)
    for seed in range(3):
        random = metrics.random_attribution(x, seed)
        random_lerf = metrics.pixel_flipping(model.apply, x, random, order="lerf", **kw)
        random_morf = metrics.pixel_flipping(model.apply, x, random, order="morf", **kw)
        assert np.all(lerf.curve >= random_lerf.curve - 1e-9)
        assert np.all(morf.curve <= random_morf.curve + 1e-9)
        assert np.all(lerf.auc > random_lerf.auc) and np.all(morf.auc < random_morf.auc)
    assert np.all(morf.auc < lerf.auc)
    assert float(np.mean(morf.aopc)) > 0.5


def test_baselines_scores_and_normalisation(images):
    rel = true_relevance(images)
    const = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, baseline=0.25, normalize=False)
    np.testing.assert_allclose(const.scores[:, -1], 0.25, rtol=1e-6)
    np.testing.assert_allclose(const.curve, const.scores)
    per_sample = jnp.arange(5, dtype=jnp.float32).reshape(5, 1, 1, 1) / 10
    arr = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, baseline=per_sample, normalize=False)
    np.testing.assert_allclose(arr.scores[:, -1], np.arange(5) / 10, atol=1e-7)
    noise = lambda x, key: jax.random.uniform(key, x.shape, x.dtype)
    a = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, baseline=noise, rng=3, normalize=False)
    b = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, baseline=noise, rng=3, normalize=False)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert np.all((a.scores[:, -1] >= 0) & (a.scores[:, -1] < 1))
    soft = metrics.pixel_flipping(one_pixel_fn, images, rel, target=0, score="softmax", normalize=False)
    np.testing.assert_allclose(soft.scores[:, 0], jax.nn.softmax(one_pixel_fn(images))[:, 0], rtol=1e-6)


def test_predicted_target_and_per_sample_targets(images):
    rel = true_relevance(images)
    x = images.at[::2].multiply(-1.0)  # class 1 wins on the even samples
    pred = metrics.pixel_flipping(one_pixel_fn, x, rel)
    np.testing.assert_array_equal(pred.target, [1, 0, 1, 0, 1])
    explicit = metrics.pixel_flipping(one_pixel_fn, x, rel, target=np.array([1, 0, 1, 0, 1]))
    np.testing.assert_allclose(pred.scores, explicit.scores)


def test_chunking_does_not_change_results_and_does_not_retrace(images):
    traces = {"n": 0}

    def counting(x):
        traces["n"] += 1
        return one_pixel_fn(x)

    rel = metrics.random_attribution(images, 0)
    whole = metrics.region_perturbation(counting, images, rel, target=0, patch_size=2)
    chunked = metrics.region_perturbation(
        counting, images, rel, target=0, patch_size=2, batch_size=2, step_chunk=4
    )
    np.testing.assert_allclose(whole.scores, chunked.scores)
    np.testing.assert_allclose(whole.auc, chunked.auc)
    assert chunked.scores.shape == (5, 10)
    before = traces["n"]
    metrics.region_perturbation(counting, images * 0.9, rel, target=0, patch_size=2)
    assert traces["n"] <= before + 1  # at most the target check's eval_shape: no new compilation


def test_float32_stays_float32(images):
    result = metrics.pixel_flipping(one_pixel_fn, images, true_relevance(images), target=0)
    assert result.scores.dtype == jnp.float32 and result.auc.dtype == jnp.float32


def test_perturbation_argument_errors(images):
    rel = true_relevance(images)
    with pytest.raises(ValueError, match="order"):
        metrics.pixel_flipping(one_pixel_fn, images, rel, order="most")
    with pytest.raises(ValueError, match="does not fit"):
        metrics.pixel_flipping(one_pixel_fn, images, rel[:, :4])
    with pytest.raises(ValueError, match="0..1"):
        metrics.pixel_flipping(one_pixel_fn, images, rel, target=2)
    with pytest.raises(ValueError, match="broadcast"):
        metrics.pixel_flipping(one_pixel_fn, images, rel, baseline=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="patch_size"):
        metrics.region_perturbation(one_pixel_fn, images, rel, patch_size=0)
    with pytest.raises(TypeError, match="floating"):
        metrics.pixel_flipping(one_pixel_fn, images.astype(jnp.int32), rel)


class BiasFreeMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, use_bias=False)(x))
        x = nn.relu(nn.Dense(16, use_bias=False)(x))
        return nn.Dense(4, use_bias=False)(x)


class BiasedMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, bias_init=nn.initializers.constant(0.5))(x))
        return nn.Dense(4, bias_init=nn.initializers.constant(-2.0))(x)


def test_conservation_of_epsilon_on_a_bias_free_relu_mlp():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 10)))
    model = BiasFreeMLP()
    variables = model.init(jax.random.PRNGKey(1), x)
    explained = jlrp.explain(model, {nn.Dense: Epsilon(epsilon=1e-12)})
    output, rel = jlrp.attribute(explained, variables, x)
    check = metrics.conservation(rel, output)  # target None: the predicted class, as attribute used
    assert check.relevance_sum.shape == (8,)
    np.testing.assert_allclose(check.score, output.max(axis=1))
    assert check.max_relative_error < 1e-9
    np.testing.assert_allclose(check.error, check.relevance_sum - check.score)
    # per-sample targets and a mask target give the same check
    target = np.arange(8) % 4
    _, rel_t = jlrp.attribute(explained, variables, x, target=target)
    by_index = metrics.conservation(rel_t, output, target)
    by_mask = metrics.conservation(rel_t, output, jax.nn.one_hot(target, 4))
    assert by_index.max_relative_error < 1e-9
    # the default epsilon (1e-6) absorbs a little relevance where a pre-activation is small
    _, rel_default = jlrp.attribute(jlrp.explain(model, {nn.Dense: Epsilon()}), variables, x)
    assert metrics.conservation(rel_default, output).max_relative_error < 1e-3
    np.testing.assert_allclose(by_index.score, by_mask.score)


def test_conservation_detects_relevance_absorbed_by_biases():
    x = jnp.asarray(np.random.default_rng(3).uniform(size=(8, 10)))
    model = BiasedMLP()
    variables = model.init(jax.random.PRNGKey(0), x)
    output, rel = jlrp.attribute(jlrp.explain(model, {nn.Dense: Epsilon()}), variables, x, target=0)
    check = metrics.conservation(rel, output, 0)
    assert check.max_relative_error > 0.05
    with pytest.raises(ValueError, match="batch"):
        metrics.conservation(rel[:3], output)


def test_random_attribution_is_seeded():
    x = jnp.zeros((2, 4, 4, 3), jnp.float32)
    a, b, c = (metrics.random_attribution(x, s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert float(a.min()) >= -1 and float(a.max()) < 1
    n = metrics.random_attribution((3, 5), jax.random.PRNGKey(7), distribution="normal")
    assert n.shape == (3, 5) and n.dtype == jnp.float32
    with pytest.raises(ValueError, match="distribution"):
        metrics.random_attribution(x, 0, distribution="cauchy")
