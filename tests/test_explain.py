"""jlrp.explain / jlrp.attribute on linen models: transformations, dtypes, conservation, errors."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlrp
from jlrp import composites, rules
from jlrp.errors import CompositeError, InputDtypeError, InputError, RuleError, TargetError


class CNN(nn.Module):
    classes: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(6, (3, 3), name="conv_b")(x))
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(self.classes)(x)


class MLP(nn.Module):
    widths: tuple[int, ...] = (6, 5, 3)
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w, use_bias=self.use_bias)(x)
            if i < len(self.widths) - 1:
                x = nn.relu(x)
        return x


@pytest.fixture(scope="module")
def cnn():
    model = CNN()
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 2))
    variables = model.init(jax.random.PRNGKey(0), x)
    variables = jax.tree_util.tree_map(lambda a: a + 0.05, variables)  # non-zero biases
    return model, variables, x


def _relevance(explained, variables, x, target):
    y, pullback = jax.vjp(lambda v: explained(variables, v), x)
    return pullback(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype))[0]


def test_forward_is_unchanged(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonGammaBox(-3.0, 3.0))
    np.testing.assert_array_equal(explained(variables, x), model.apply(variables, x))


@pytest.mark.parametrize("name", ["epsilon_plus_flat", "epsilon_alpha2_beta1", "excitation_backprop"])
def test_jit_equals_eager_and_vmap_equals_loop(cnn, name):
    model, variables, x = cnn
    explained = jlrp.explain(model, name)
    target = jnp.array([0, 1, 2, 0])
    eager = _relevance(explained, variables, x, target)
    jitted = jax.jit(_relevance, static_argnums=0)(explained, variables, x, target)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-7)
    single = lambda xs, t: _relevance(explained, variables, xs[None], t)[0]
    vmapped = jax.vmap(single)(x, target)
    looped = jnp.stack([single(x[i], target[i]) for i in range(x.shape[0])])
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-5, atol=1e-7)


def test_vmap_over_unbatched_samples(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    per_sample = jax.vmap(lambda xs: _relevance(explained, variables, xs, 1))(x)
    np.testing.assert_allclose(per_sample, _relevance(explained, variables, x, 1), rtol=1e-5, atol=1e-7)


def test_checkpoint(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    plain = _relevance(explained, variables, x, 2)
    remat = _relevance(jax.checkpoint(explained), variables, x, 2)
    np.testing.assert_allclose(remat, plain, rtol=1e-6, atol=1e-8)


def test_no_retrace_on_second_call_and_new_numbers_for_new_epsilon(cnn):
    model, variables, x = cnn
    traces = []

    class Counted(CNN):
        def __call__(self, x):
            traces.append(1)
            return super().__call__(x)

    model = Counted()
    first = jlrp.explain(model, {nn.Dense: rules.Epsilon(1e-6), nn.Conv: rules.ZPlus()})
    _, r1 = jlrp.attribute(first, variables, x, target=0)
    n = len(traces)
    _, r1b = jlrp.attribute(first, variables, x + 0.5, target=1)
    assert len(traces) == n, "second call with the same shapes must not retrace"
    second = jlrp.explain(model, {nn.Dense: rules.Epsilon(10.0), nn.Conv: rules.ZPlus()})
    _, r2 = jlrp.attribute(second, variables, x, target=0)
    assert not np.allclose(r1, r2), "a new epsilon must give new numbers"


def test_dtypes_preserved_and_bfloat16_finite(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonGammaBox(-3.0, 3.0))
    for dtype in (jnp.float32, jnp.float64):
        vs = jax.tree_util.tree_map(lambda a: a.astype(dtype), variables)
        out, rel = jlrp.attribute(explained, vs, x.astype(dtype), target=0)
        assert out.dtype == dtype and rel.dtype == dtype
    vs = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), variables)
    out, rel = jlrp.attribute(explained, vs, x.astype(jnp.bfloat16), target=0)
    assert rel.dtype == jnp.bfloat16 and bool(jnp.isfinite(rel.astype(jnp.float32)).all())
    ref = jlrp.attribute(explained, variables, x.astype(jnp.float32), target=0)[1]
    assert np.corrcoef(np.ravel(rel.astype(jnp.float32)), np.ravel(ref))[0, 1] > 0.9


@settings(max_examples=6, deadline=None)
@given(
    widths=st.lists(st.integers(2, 7), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
    n_in=st.integers(2, 6),
)
def test_conservation_epsilon_zero_bias(widths, seed, n_in):
    """Epsilon with tiny epsilon and no bias on a ReLU network: sum of relevance = target score."""
    model = MLP(widths=tuple(widths) + (3,), use_bias=False)
    kx, kp = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (2, n_in), dtype=jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(kp, x))
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(1e-12)})
    out, relevance = jlrp.attribute(explained, variables, x, target=np.array([0, 2]))
    np.testing.assert_allclose(relevance.sum(-1), out[np.arange(2), [0, 2]], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("rule", [rules.ZPlus(1e-12), rules.AlphaBeta(1.0, 0.0, 1e-12)])
def test_conservation_zplus_zero_bias(rule):
    """Without bias, z+ conserves relevance wherever the explained score is positive (a negative
    score whose every contribution is negative has z+ = 0: its relevance is dropped)."""
    model = MLP(use_bias=False)
    x = jax.random.uniform(jax.random.PRNGKey(3), (16, 4), dtype=jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(4), x))
    explained = jlrp.explain(model, {nn.Dense: rule})
    out, relevance = jlrp.attribute(explained, variables, x)
    score = out.max(-1)
    assert (score > 0).sum() >= 4
    np.testing.assert_allclose(relevance.sum(-1)[score > 0], score[score > 0], rtol=1e-5)


def test_targets(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    out, by_int = jlrp.attribute(explained, variables, x, target=2)
    _, by_array = jlrp.attribute(explained, variables, x, target=np.full(4, 2))
    _, by_mask = jlrp.attribute(explained, variables, x, target=np.eye(3)[2])
    _, by_callable = jlrp.attribute(
        explained, variables, x, target=lambda y: y * jax.nn.one_hot(2, 3, dtype=y.dtype)
    )
    for other in (by_array, by_mask, by_callable):
        np.testing.assert_allclose(other, by_int, rtol=1e-6)
    _, by_default = jlrp.attribute(explained, variables, x)
    predicted = np.asarray(out.argmax(-1))
    _, by_pred = jlrp.attribute(explained, variables, x, target=predicted)
    np.testing.assert_allclose(by_default, by_pred, rtol=1e-6)
    np.testing.assert_allclose(by_int, _relevance(explained, variables, x, 2), rtol=1e-5, atol=1e-7)


def test_target_errors(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    with pytest.raises(TargetError, match="outside the output's range 0..2"):
        jlrp.attribute(explained, variables, x, target=3)
    with pytest.raises(TargetError, match="outside"):
        jlrp.attribute(explained, variables, x, target=-1)
    with pytest.raises(TargetError, match="one target per sample"):
        jlrp.attribute(explained, variables, x, target=np.array([0, 1]))
    with pytest.raises(TargetError, match="broadcast"):
        jlrp.attribute(explained, variables, x, target=np.ones((4, 5)))


def test_input_errors(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    with pytest.raises(InputDtypeError, match="floating-point"):
        jlrp.attribute(explained, variables, (x * 10).astype(jnp.int32), target=0)
    with pytest.raises(InputDtypeError):
        explained(variables, np.ones((1, 8, 8, 2), dtype=np.uint8))
    bad = np.asarray(x).copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        jlrp.attribute(explained, variables, bad, target=0)


def test_wrong_input_shape_names_the_layer(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    with pytest.raises(InputError, match=r"'Conv_0' \(Conv\) cannot take its input of shape \(4, 8, 8, 3\)"):
        jlrp.attribute(explained, variables, jnp.ones((4, 8, 8, 3)), target=0)
    with pytest.raises(InputError, match=r"'Dense_0' \(Dense\) cannot take its input of shape \(4, 150\)"):
        jlrp.attribute(explained, variables, jnp.ones((4, 11, 11, 2)), target=0)


def test_unmatched_path_lists_existing_paths(cnn):
    model, variables, x = cnn
    explained = jlrp.explain(model, {"features/Conv_*": rules.ZBox(-1.0, 1.0), nn.Dense: rules.Epsilon()})
    with pytest.raises(CompositeError, match=r"features/Conv_\*.*Conv_0, Dense_0, Dense_1, conv_b"):
        explained(variables, x)


def test_composite_without_rule_raises(cnn):
    model, variables, x = cnn
    with pytest.raises(CompositeError, match="no rule on any layer.*Conv_0 \\(Conv\\)"):
        jlrp.explain(model, {nn.ConvTranspose: rules.Epsilon()})(variables, x)
    # presets on a model without some layer types are fine (an MLP has no convolutions)
    mlp = MLP()
    xm = jnp.ones((2, 4))
    vm = mlp.init(jax.random.PRNGKey(0), xm)
    jlrp.attribute(jlrp.explain(mlp, composites.EpsilonGammaBox(-1.0, 1.0)), vm, xm, target=0)


def test_rule_on_container_raises(cnn):
    model, variables, x = cnn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Dense(4)(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(Block(name="block")(x))

    net = Net()
    xb = jnp.ones((1, 3))
    vb = net.init(jax.random.PRNGKey(0), xb)
    with pytest.raises(RuleError, match="'block', a container.*'block/Dense_0'"):
        jlrp.explain(net, {"block": rules.AlphaBeta(1.0, 0.0)})(vb, xb)
    with pytest.raises(RuleError, match="container"):
        jlrp.attribute(jlrp.explain(net, {Block: rules.Epsilon()}), vb, xb, target=0)
    # the fix the message suggests works
    jlrp.attribute(jlrp.explain(net, {"block/*": rules.AlphaBeta(1.0, 0.0)}), vb, xb, target=0)


def test_rule_needing_params_on_parameter_free_module_raises():
    from jlrp.layers import AvgPool

    pool = AvgPool((2, 2), strides=(2, 2))
    with pytest.raises(RuleError, match="needs a layer with its own parameters"):
        jlrp.explain(pool, {AvgPool: rules.Epsilon()})({}, jnp.ones((1, 4, 4, 1)))


def test_pass_on_shape_changing_layer_raises(cnn):
    model, variables, x = cnn
    with pytest.raises(RuleError, match="element-wise"):
        jlrp.explain(model, {nn.Dense: rules.Pass()})(variables, x)


def test_unknown_composite_name():
    with pytest.raises(CompositeError, match="unknown composite 'epsilon_pluss'.*epsilon_plus"):
        jlrp.explain(CNN(), "epsilon_pluss")
    with pytest.raises(TypeError, match="rule map"):
        jlrp.explain(CNN(), 42)


def test_module_called_twice_gets_rule_each_time():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(3)
            return dense(nn.relu(dense(x)))

    model = Twice()
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 3), dtype=jnp.float64)
    variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), model.init(jax.random.PRNGKey(1), x))
    variables = {"params": {"Dense_0": {**variables["params"]["Dense_0"], "bias": jnp.zeros(3)}}}
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(1e-12)})
    _, records = explained.trace(variables, x)
    assert [r.path for r in records if r.rule is not None] == ["Dense_0", "Dense_0"]
    out, relevance = jlrp.attribute(explained, variables, x, target=0)
    np.testing.assert_allclose(relevance.sum(-1), out[:, 0], rtol=1e-8)


def test_first_layer_is_first_in_execution_order():
    class Reversed(nn.Module):
        def setup(self):
            self.late = nn.Dense(3)  # defined first, called last
            self.early = nn.Dense(4)  # defined second, called first

        def __call__(self, x):
            return self.late(nn.relu(self.early(x)))

    model = Reversed()
    x = jnp.ones((1, 2))
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    _, records = explained.trace(variables, x)
    got = {r.path: r.rule for r in records if r.rule is not None}
    assert isinstance(got["early"], rules.Flat) and isinstance(got["late"], rules.Epsilon)


def test_path_globs():
    from jlrp.composites import glob_to_regex

    assert glob_to_regex("features/Conv_*").match("features/Conv_12")
    assert not glob_to_regex("features/*").match("features/block/Conv_0")
    assert glob_to_regex("features/**").match("features/block/Conv_0")
    assert glob_to_regex("layer?_0/conv1").match("layer3_0/conv1")
    # '**/' also matches no segment at all, so '**/@*' finds the root's ops too
    assert glob_to_regex("**/@*").match("@add_0") and glob_to_regex("**/@*").match("a/b/@add_0")
    assert glob_to_regex("a/**/c").match("a/c") and not glob_to_regex("**/@*").match("a/b")


def test_composites_are_immutable_and_hashable():
    a = composites.EpsilonGammaBox(np.zeros(3), np.ones(3), layer_map=[(nn.Dense, rules.Epsilon(0.5))])
    b = composites.EpsilonGammaBox(np.zeros(3), np.ones(3), layer_map=[(nn.Dense, rules.Epsilon(0.5))])
    assert a == b and hash(a) == hash(b)
    assert a != composites.EpsilonGammaBox(np.zeros(3), 2 * np.ones(3))
    assert set(composites.COMPOSITES) == {
        "epsilon_gamma_box",
        "epsilon_plus",
        "epsilon_alpha2_beta1",
        "epsilon_plus_flat",
        "epsilon_alpha2_beta1_flat",
        "guided_backprop",
        "deconvnet",
        "excitation_backprop",
        "beta_smooth",
        "attn_lrp",
        "cp_lrp",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.gamma = 2.0  # type: ignore[misc]


def test_user_layer_map_entries_come_first(cnn):
    model, variables, x = cnn
    composite = composites.EpsilonPlus(layer_map=[(nn.Conv, rules.Gamma(0.5))])
    _, records = jlrp.explain(model, composite).trace(variables, x)
    assert all(isinstance(r.rule, rules.Gamma) for r in records if r.kind == "Conv")


def test_mixed_and_name_layer_composites(cnn):
    model, variables, x = cnn
    mixed = composites.MixedComposite(
        [composites.NameMapComposite([("conv_b", rules.Gamma(0.5))]), composites.EpsilonPlusFlat()]
    )
    _, records = jlrp.explain(model, mixed).trace(variables, x)
    got = {r.path: r.rule for r in records if r.rule is not None}
    assert got["conv_b"] == rules.Gamma(0.5) and isinstance(got["Conv_0"], rules.Flat)
    named = composites.NameLayerMapComposite(
        name_map=[(("Dense_1",), None)], layer_map=[(nn.Dense, rules.Epsilon())]
    )
    _, records = jlrp.explain(model, named).trace(variables, x)
    got = {r.path: r.rule for r in records}
    assert got["Dense_1"] is None and got["Dense_0"] == rules.Epsilon()
