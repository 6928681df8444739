"""The Flax NNX front end: parity with linen on the same weights, paths, the clone, transforms, errors."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites, ops, rules
from jlrp.errors import CanonizerError, CompositeError, InputDtypeError, InputError, RuleError
from jlrp.nnx import NNXExplained, original_class, rule_carrying_class

# ------------------------------------------------------------------------------- twin models


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(6, (3, 3), name="conv2")(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8, name="fc1")(x))
        return nn.Dense(3, name="fc2")(x)


class NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, size: int = 8, cin: int = 2):
        self.conv1 = nnx.Conv(cin, 4, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(size * size * 6, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.fc1(x))
        return self.fc2(x)


class LinenBNCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(nn.Conv(4, (3, 3), name="conv1")(x)))
        x = nn.BatchNorm(use_running_average=True, name="bn2")(
            nn.Conv(6, (3, 3), use_bias=False, name="conv2")(x)
        )
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(3, name="fc")(x)


class NNXBNCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
        self.conv2 = nnx.Conv(4, 6, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(6, use_running_average=True, rngs=rngs)
        self.fc = nnx.Linear(8 * 8 * 6, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = nnx.relu(x).reshape(x.shape[0], -1)
        return self.fc(x)


class LinenBackbone(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((6, 5)):
            x = nn.relu(nn.Dense(width, name=f"layers_{i}")(x))
        return x


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(LinenBackbone(name="backbone")(x))


class NNXBackbone(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(4, 6, rngs=rngs), nnx.Linear(6, 5, rngs=rngs)])

    def __call__(self, x):
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return x


class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.backbone = NNXBackbone(rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(self.backbone(x))


def _random_fill(tree, seed: int):
    """NumPy random float64 values for a tree of shapes (compiling nothing keeps the tests fast).

    Kernels get N(0, 1/fan_in), biases and other vectors U(-0.2, 0.2) (non-zero biases), scales and
    variances U(0.5, 1.5).
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        shape = tuple(leaf.shape)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape)
        if len(shape) > 1:
            return rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        return rng.uniform(-0.2, 0.2, shape)

    return jax.tree_util.tree_map_with_path(lambda p, leaf: jnp.asarray(fill(p, leaf)), tree)


def build(ctor, seed: int = 0) -> nnx.Module:
    """An NNX model built abstractly (``nnx.eval_shape``) and filled with NumPy random weights."""
    model = nnx.eval_shape(ctor)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, _random_fill(nnx.to_pure_dict(state), seed))
    nnx.update(model, state)
    return model


def _linen_params_to_nnx(params: dict) -> dict:
    """linen's ``layers_0`` naming to the NNX attribute path ``layers/0`` (kernels share their layout)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            value = _linen_params_to_nnx(value)
        if key.startswith("layers_"):
            out.setdefault("layers", {})[int(key.split("_")[1])] = value
        else:
            out[key] = value
    return out


def _merge_collections(variables: dict) -> dict:
    """linen's ``{'params': {m: p}, 'batch_stats': {m: s}}`` as NNX's ``{m: {**p, **s}}``."""
    out: dict = {}
    for collection in variables.values():
        stack = [(out, collection)]
        while stack:
            target, source = stack.pop()
            for key, value in source.items():
                if isinstance(value, dict):
                    stack.append((target.setdefault(key, {}), value))
                else:
                    target[key] = value
    return out


def _twins(linen_model: nn.Module, nnx_ctor, x: jax.Array):
    """A linen and an NNX model with the same float64 weights (non-zero biases, batch statistics)."""
    shapes = jax.eval_shape(linen_model.init, jax.random.PRNGKey(0), x)
    variables = _random_fill(shapes, seed=0)
    nnx_model = nnx.eval_shape(nnx_ctor)
    state = nnx.state(nnx_model)
    nnx.replace_by_pure_dict(state, _linen_params_to_nnx(_merge_collections(variables)))
    nnx.update(nnx_model, state)
    return variables, nnx_model


@pytest.fixture(scope="module")
def cnn():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8, 8, 2)))
    linen_model = LinenCNN()
    variables, nnx_model = _twins(linen_model, lambda: NNXCNN(nnx.Rngs(0)), x)
    return linen_model, variables, nnx_model, x


@pytest.fixture(scope="module")
def mlp():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)))
    linen_model = LinenMLP()
    variables, nnx_model = _twins(linen_model, lambda: NNXMLP(nnx.Rngs(0)), x)
    return linen_model, variables, nnx_model, x


def _pull(fn, x, target):
    y, pullback = jax.vjp(fn, x)
    return y, pullback(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype))[0]


def module_records(records):
    """The records of module calls (function-level ops, whose naming ``jlrp.ops`` owns, left out)."""
    return [r for r in records if not isinstance(r.kind, str) or r.kind not in _OP_KINDS]


def op_records(records, kind: str):
    return [r for r in records if r.kind == kind]


_OP_KINDS = {cls.__name__ for cls in vars(ops).values() if isinstance(cls, type)} | {
    "dot_general",
    "conv_general_dilated",
    "cumsum",
    "sub",
}


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------- parity with linen

_PRESETS = {
    "epsilon_gamma_box": lambda: composites.EpsilonGammaBox(-3.0, 3.0),
    "epsilon_plus": composites.EpsilonPlus,
    "epsilon_alpha2_beta1": composites.EpsilonAlpha2Beta1,
    "epsilon_plus_flat": composites.EpsilonPlusFlat,
    "epsilon_alpha2_beta1_flat": composites.EpsilonAlpha2Beta1Flat,
    "excitation_backprop": composites.ExcitationBackprop,
    "guided_backprop": composites.GuidedBackprop,
    "deconvnet": composites.DeconvNet,
    "beta_smooth": composites.BetaSmooth,
    "attn_lrp": composites.AttnLRP,
    "cp_lrp": composites.CPLRP,
}


def test_every_registered_composite_is_covered():
    assert set(composites.COMPOSITES) == set(_PRESETS)


@pytest.mark.parametrize("name", list(_PRESETS))
@pytest.mark.parametrize("twins", ["cnn", "mlp"])
def test_relevance_equals_linen(name, twins, request):
    linen_model, variables, nnx_model, x = request.getfixturevalue(twins)
    composite = _PRESETS[name]()
    linen, explained = jlrp.explain(linen_model, composite), jlrp.explain(nnx_model, composite)
    both = jax.jit(lambda v: (_pull(lambda u: linen(variables, u), v, 1), _pull(explained, v, 1)))
    (y_linen, r_linen), (y_nnx, r_nnx) = both(x)
    assert r_nnx.dtype == jnp.float64
    np.testing.assert_array_equal(y_nnx, y_linen)
    assert rel_err(r_nnx, r_linen) <= 1e-10
    assert float(jnp.abs(r_nnx).max()) > 0


@pytest.fixture(scope="module")
def bncnn():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 8, 2)))
    linen_model = LinenBNCNN()
    variables, nnx_model = _twins(linen_model, lambda: NNXBNCNN(nnx.Rngs(0)), x)
    return linen_model, variables, nnx_model, x


@pytest.mark.parametrize("canonizers", [None, ()], ids=["merge_batchnorm", "no_canonizers"])
@pytest.mark.parametrize("name", ["epsilon_gamma_box", "epsilon_alpha2_beta1_flat"])
def test_batchnorm_relevance_equals_linen(bncnn, name, canonizers):
    linen_model, variables, nnx_model, x = bncnn
    composite = _PRESETS[name]()
    if canonizers is not None:
        composite = dataclasses.replace(composite, canonizers=canonizers)
    linen, explained = jlrp.explain(linen_model, composite), jlrp.explain(nnx_model, composite)
    both = jax.jit(lambda v: (_pull(lambda u: linen(variables, u), v, 2), _pull(explained, v, 2)))
    (y_linen, r_linen), (y_nnx, r_nnx) = both(x)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-12)
    assert rel_err(r_nnx, r_linen) <= 1e-10
    _, records = explained.trace(x)
    notes = {r.path: r.note for r in records if r.note}
    if canonizers is None:
        assert notes == {
            "conv1": "BatchNorm 'bn1' merged in",
            "bn1": "merged into 'conv1'",
            "conv2": "BatchNorm 'bn2' merged in",
            "bn2": "merged into 'conv2'",
        }
    else:
        # an unmerged BatchNorm has no module rule: its affine arithmetic gets Norm
        rules_at = {r.path: type(r.rule).__name__ for r in records}
        assert notes == {} and rules_at["bn1"] == "NoneType" and rules_at["bn1/@affine_0"] == "Norm"


def test_batchnorm_in_training_mode_is_not_merged_silently(bncnn):
    _, _, model, x = bncnn
    train = nnx.clone(model)
    train.bn2.use_running_average = False
    with pytest.raises(CanonizerError, match="'bn2' runs in training mode"):
        jlrp.explain(train, composites.EpsilonPlus())(x)


def test_path_glob_rule_map_equals_linen(mlp):
    linen_model, variables, nnx_model, x = mlp
    explained = jlrp.explain(nnx_model, {"backbone/layers/*": rules.ZPlus(), nnx.Linear: rules.Epsilon()})
    _, records = explained.trace(x)
    assert [(r.path, r.kind, type(r.rule).__name__) for r in module_records(records)] == [
        ("", "NNXMLP", "NoneType"),
        ("backbone", "NNXBackbone", "NoneType"),
        ("backbone/layers/0", "Linear", "ZPlus"),
        ("backbone/layers/1", "Linear", "ZPlus"),
        ("head", "Linear", "Epsilon"),
    ]
    assert [r.linear for r in module_records(records)] == [False, False, True, True, True]
    relus = op_records(records, "ReLU")  # nnx.relu calls inside the backbone, found in the trace
    assert len(relus) == 2 and all(r.path.startswith("backbone/") and r.rule is None for r in relus)
    linen = jlrp.explain(linen_model, {"backbone/layers_*": rules.ZPlus(), nn.Dense: rules.Epsilon()})
    (_, r_linen), (_, r_nnx) = jax.jit(
        lambda v: (_pull(lambda u: linen(variables, u), v, 0), _pull(explained, v, 0))
    )(x)
    assert rel_err(r_nnx, r_linen) <= 1e-10
    # a single-segment glob does not cross '/', '**' does
    _, records = jlrp.explain(nnx_model, {"backbone/*/1": rules.ZPlus(), "**/0": rules.Flat()}).trace(x)
    got = {r.path: type(r.rule).__name__ for r in module_records(records) if r.rule is not None}
    assert got == {"backbone/layers/0": "Flat", "backbone/layers/1": "ZPlus"}


def test_first_layer_is_first_in_execution_order():
    class Reversed(nnx.Module):
        def __init__(self, rngs):
            self.a_late = nnx.Linear(4, 3, rngs=rngs)  # first in attribute order, called last
            self.z_early = nnx.Linear(2, 4, rngs=rngs)

        def __call__(self, x):
            return self.a_late(nnx.relu(self.z_early(x)))

    _, records = jlrp.explain(build(lambda: Reversed(nnx.Rngs(0))), composites.EpsilonPlusFlat()).trace(
        jnp.ones((1, 2))
    )
    got = {r.path: type(r.rule).__name__ for r in module_records(records) if r.rule is not None}
    assert got == {"z_early": "Flat", "a_late": "Epsilon"}


# ------------------------------------------------------------------------------- the clone


def test_user_model_untouched_and_clone_keeps_isinstance_and_attributes(cnn):
    _, _, model, x = cnn
    before = jax.tree_util.tree_map(np.array, nnx.state(model))
    explained = jlrp.explain(model, composites.EpsilonPlus())
    # the explained forward, the plain model and the clone outside an explained trace, in one program
    (y, relevance), (y_plain, g_plain), (y_clone, g_clone) = jax.jit(
        lambda v: (_pull(explained, v, 0), _pull(model, v, 0), _pull(explained.model, v, 0))
    )(x)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(y_clone, y_plain)
    np.testing.assert_array_equal(g_clone, g_plain)  # no trace active: the plain gradient
    assert not np.allclose(relevance, g_plain)
    # the user's model: same classes, same state
    assert type(model.conv1) is nnx.Conv and type(model.fc1) is nnx.Linear and type(model) is NNXCNN
    jax.tree_util.tree_map(np.testing.assert_array_equal, nnx.state(model), before)
    # the clone: rule-carrying subclasses that look like the originals
    clone = explained.model
    assert clone is not model and clone.conv1 is not model.conv1
    assert (
        isinstance(clone, NNXCNN) and isinstance(clone.conv1, nnx.Conv) and isinstance(clone.fc2, nnx.Linear)
    )
    assert type(clone.conv1) is not nnx.Conv and type(clone.conv1).__name__ == "Conv"
    np.testing.assert_array_equal(clone.conv1.kernel[...], model.conv1.kernel[...])
    assert clone.fc1.in_features == model.fc1.in_features
    # one cached subclass per original class
    other = jlrp.explain(model, composites.EpsilonPlusFlat())
    assert type(other.model.conv1) is type(clone.conv1) is type(clone.conv2) is rule_carrying_class(nnx.Conv)
    assert rule_carrying_class(type(clone.conv1)) is type(clone.conv1)
    assert "NNXCNN" in repr(explained)
    with pytest.raises(TypeError, match="already explained"):
        jlrp.explain(explained, composites.EpsilonPlus())


def test_snapshot_and_fresh_weights(mlp):
    _, _, model, x = mlp
    model = nnx.clone(model)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    y0 = explained(x)
    model.head.bias[...] = model.head.bias[...] + 1.0  # a later update of the user's model ...
    np.testing.assert_array_equal(explained(x), y0)  # ... is not seen by the snapshot
    np.testing.assert_allclose(explained.pure(nnx.state(model), x), model(x), rtol=1e-14)
    nnx.update(explained.model, nnx.state(model))
    np.testing.assert_allclose(explained(x), model(x), rtol=1e-14)


# ------------------------------------------------------------------------------- transforms


def test_eager_jit_vmap_and_attribute(mlp):
    _, _, model, x = mlp
    rule_map = {
        "backbone/layers/0": rules.ZBox(-3.0, 3.0),
        "backbone/layers/1": rules.ZPlus(),
        nnx.Linear: rules.Epsilon(),
    }
    explained = jlrp.explain(model, rule_map)
    target = jnp.array([0, 1, 2, 0, 1])

    # the functional route under jax.jit
    @jax.jit
    def functional(state, x):
        return _pull(lambda v: explained.pure(state, v), x, target)

    y, expected = functional(explained.state, x)
    np.testing.assert_allclose(y, model(x), rtol=1e-12)

    # the object itself through nnx.jit and jax.jit (it is a pytree holding the clone)
    for jit in (nnx.jit, jax.jit):
        r = jit(lambda e, v: _pull(e, v, target)[1])(explained, x)
        np.testing.assert_allclose(r, expected, rtol=1e-10, atol=1e-14)

    # vmap over batches == loop
    xs = jnp.stack([x, 2.0 * x, -x])
    batched = jax.jit(jax.vmap(lambda v: functional(explained.state, v)[1]))(xs)
    looped = jnp.stack([functional(explained.state, v)[1] for v in xs])
    np.testing.assert_allclose(batched, looped, rtol=1e-10, atol=1e-14)

    # attribute
    out, relevance = jlrp.attribute(explained, x, target=target)
    np.testing.assert_allclose(out, y, rtol=1e-12)
    np.testing.assert_allclose(relevance, expected, rtol=1e-10, atol=1e-14)

    # eagerly: explained(x) under jax.vjp (an Epsilon-only map: eager dispatch compiles every op)
    eps = jlrp.explain(model, {nnx.Linear: rules.Epsilon()})
    _, eager = _pull(eps, x, target)
    np.testing.assert_allclose(eager, jlrp.attribute(eps, x, target=target)[1], rtol=1e-10, atol=1e-14)


def test_attribute_does_not_retrace():
    traces = []

    class Counted(NNXMLP):
        def __call__(self, x):
            traces.append(1)
            return super().__call__(x)

    explained = jlrp.explain(build(lambda: Counted(nnx.Rngs(0))), composites.EpsilonPlus())
    assert isinstance(explained, NNXExplained)
    x = jnp.ones((2, 4))
    jlrp.attribute(explained, x, target=0)
    n = len(traces)
    jlrp.attribute(explained, x + 1.0, target=1)
    assert len(traces) == n


def test_modules_with_state_keywords_sequential_and_non_pytree_classes():
    class Net(nnx.Module, pytree=False):
        def __init__(self, rngs):
            self.body = nnx.Sequential(nnx.Linear(3, 4, rngs=rngs), nnx.relu, nnx.Linear(4, 4, rngs=rngs))
            self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
            self.drop = nnx.Dropout(0.5, deterministic=True)
            self.out = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(inputs=self.drop(self.bn(self.body(x))))

    model = build(lambda: Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(3), (3, 3))
    explained = jlrp.explain(model, composites.EpsilonPlus())
    _, records = explained.trace(x)
    got = {r.path: type(r.rule).__name__ for r in module_records(records)}
    assert [(r.path.startswith("body/"), type(r.rule).__name__) for r in op_records(records, "ReLU")] == [
        (True, "Pass")
    ]
    assert got == {
        "": "NoneType",
        "body": "NoneType",
        "body/layers/0": "Epsilon",
        "body/layers/2": "Epsilon",
        "bn": "NoneType",  # merged into body/layers/2 (the named composites merge BatchNorms)
        "drop": "NoneType",
        "out": "Epsilon",
    }
    assert [r.note for r in records if r.path == "bn"] == ["merged into 'body/layers/2'"]
    assert [r.note for r in records if r.path == "body/layers/2"] == ["BatchNorm 'bn' merged in"]
    assert original_class(explained.model) is Net and explained.model._pytree__is_pytree is False
    out, relevance = jlrp.attribute(explained, x, target=0)
    np.testing.assert_allclose(out, model(x), rtol=1e-6)
    np.testing.assert_allclose(nnx.jit(lambda e, v: e(v))(explained, x), out, rtol=1e-6)
    assert relevance.shape == x.shape and bool(jnp.isfinite(relevance).all())


def test_nnx_transforms_inside_the_forward_pass():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return nnx.relu(self.linear(x))

    class Net(nnx.Module):
        def __init__(self, rngs, remat: bool):
            self.block = Block(rngs)
            self.out = nnx.Linear(4, 2, rngs=rngs)
            self.remat = remat

        def __call__(self, x):
            call = nnx.remat(lambda block, h: block(h)) if self.remat else (lambda block, h: block(h))
            return self.out(call(self.block, x))

    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)))
    results = []
    for remat in (False, True):
        explained = jlrp.explain(build(lambda remat=remat: Net(nnx.Rngs(0), remat)), composites.EpsilonPlus())
        _, records = explained.trace(x)
        assert [r.path for r in module_records(records)] == ["", "block", "block/linear", "out"]
        results.append(jlrp.attribute(explained, x, target=1)[1])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)


# ------------------------------------------------------------------------------- errors


def test_rule_on_container_raises(mlp):
    _, _, model, x = mlp
    with pytest.raises(RuleError, match=r"'backbone', a container.*'backbone/layers/0' \(Linear\)"):
        jlrp.explain(model, {"backbone": rules.AlphaBeta(1.0, 0.0)})(x)
    with pytest.raises(RuleError, match="'<root>', a container"):
        jlrp.attribute(jlrp.explain(model, {NNXMLP: rules.Epsilon()}), x, target=0)
    # the suggested fix works
    jlrp.attribute(jlrp.explain(model, {"backbone/*/*": rules.AlphaBeta(1.0, 0.0)}), x, target=0)


_CNN_PATHS = ("conv1", "conv2", "fc1", "fc2")


def test_unmatched_path_lists_paths(cnn):
    _, _, model, x = cnn
    explained = jlrp.explain(model, {"features/conv*": rules.ZPlus(), nnx.Linear: rules.Epsilon()})
    with pytest.raises(CompositeError, match=r"features/conv\*.*The module paths are: <root>, ") as info:
        explained(x)
    assert all(f" {path}," in str(info.value) or str(info.value).endswith(path) for path in _CNN_PATHS)
    with pytest.raises(CompositeError, match=r"no rule on any layer.*conv1 \(Conv\)"):
        jlrp.explain(model, {nnx.ConvTranspose: rules.Epsilon()})(x)


def test_input_errors(cnn):
    _, _, model, x = cnn
    explained = jlrp.explain(model, composites.EpsilonPlus())
    with pytest.raises(InputDtypeError, match="floating-point"):
        explained(jnp.ones(x.shape, jnp.int32))
    bad = np.array(x)
    bad[0, 1, 2, 0] = np.inf
    with pytest.raises(InputError, match="NaN/inf"):
        explained(bad)
    with pytest.raises(InputError, match="NaN/inf"):
        explained.pure(explained.state, bad)
