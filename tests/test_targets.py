"""Targets as a jit pytree, the ``output=`` selector, and pytree (multi-input) model inputs.

- :class:`jlrp.targets.Target` goes through ``jax.jit`` as an argument; the output-shape cache is keyed
  on the model's keyword arguments (a kwarg that widens the output must not see a stale shape).
- ``output=`` picks the explained array from a model that returns ``(logits, aux)`` or a dict, in
  :func:`jlrp.attribute`, every attributor and the metrics, for linen and NNX.
- The model input may be a tuple or dict of arrays: the relevance has the same structure.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites, metrics, targets
from jlrp.attribution import Gradient, IntegratedGradients, Occlusion, SmoothGrad
from jlrp.errors import InputDtypeError, InputError, JlrpError, TargetError
from jlrp.explain import check_input

N, D, CLASSES = 4, 6, 5


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def rand(shape, seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def init(model, *inputs):
    """Float64 NumPy-random variables (no jax.random: its first compile is slow on CPU)."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.5, s.shape)), shapes)


def lrp_reference(explained, variables, x, target, n_classes=CLASSES, **kwargs):
    """Relevance from the explained model's VJP by hand (DESIGN.md section 1)."""
    y, vjp = jax.vjp(lambda inp: explained(variables, inp, **kwargs), x)
    return vjp(y * jax.nn.one_hot(target, n_classes, dtype=y.dtype))[0]


# ------------------------------------------------------------------------------ Target pytree


class Widening(nn.Module):
    """``wide=True`` returns all 10 scores, the default only the first 5."""

    @nn.compact
    def __call__(self, x, wide: bool = False):
        out = nn.Dense(10)(nn.relu(nn.Dense(8)(x)))
        return out if wide else out[:, :CLASSES]


def test_output_shape_cache_sees_model_kwargs():
    model = Widening()
    x = rand((N, D), 1)
    variables = init(model, x)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    _, rel = jlrp.attribute(explained, variables, x, target=1)
    assert rel_err(rel, lrp_reference(explained, variables, x, 1)) < 1e-12
    out, rel = jlrp.attribute(explained, variables, x, target=7, wide=True)
    assert out.shape == (N, 10)
    assert rel_err(rel, lrp_reference(explained, variables, x, 7, n_classes=10, wide=True)) < 1e-12
    with pytest.raises(TargetError, match="outside"):
        jlrp.attribute(explained, variables, x, target=7)


def test_target_is_a_jit_pytree():
    out = rand((N, CLASSES), 2)
    target = targets.as_target(np.arange(N) % CLASSES, out.shape)
    assert isinstance(target, targets.Target) and target.kind == "index"
    assert len(jax.tree_util.tree_leaves(target)) == 1  # the classes; kind and fn are static
    cotangent = jax.jit(targets.output_cotangent)
    np.testing.assert_allclose(cotangent(out, target), out * jax.nn.one_hot(np.arange(N) % CLASSES, CLASSES))
    size = cotangent._cache_size()
    cotangent(out, targets.as_target((np.arange(N) + 1) % CLASSES, out.shape))  # new classes: no retrace
    assert cotangent._cache_size() == size

    def square(o):
        return o**2

    with pytest.raises(TargetError, match="broadcast"):
        targets.as_target(targets.Target("mask", jnp.ones(3)), out.shape)
    callable_target = targets.as_target(square, out.shape)
    assert jax.tree_util.tree_leaves(callable_target) == []
    np.testing.assert_allclose(cotangent(out, callable_target), out**2)
    np.testing.assert_allclose(
        cotangent(out, targets.as_target(None, out.shape)), out * jax.nn.one_hot(out.argmax(-1), CLASSES)
    )


def test_one_hot_target_is_the_class_gradient():
    model = Widening()
    x = rand((N, D), 3)
    variables = init(model, x)
    classes = np.arange(N) % CLASSES
    _, grad = Gradient(model)(variables, x, target=targets.one_hot(classes))
    ref = jax.grad(lambda inp: model.apply(variables, inp)[np.arange(N), classes].sum())(x)
    assert rel_err(grad, ref) < 1e-12
    with pytest.raises(TargetError, match="outside"):
        Gradient(model)(variables, x, target=targets.one_hot(np.full(N, CLASSES)))


# ------------------------------------------------------------------------------ output= selector


class TupleOut(nn.Module):
    """big_vision style: ``(logits, aux)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(x))
        logits = nn.Dense(CLASSES)(h)
        return logits, {"pre_logits": h}


class DictOut(TupleOut):
    def __call__(self, x):
        logits, aux = super().__call__(x)
        return {"logits": logits, **aux}


class LogitsOnly(TupleOut):
    def __call__(self, x):
        return super().__call__(x)[0]


def first(out):
    return out[0]


@pytest.fixture(scope="module")
def tuple_model():
    x = rand((N, D), 4)
    variables = init(TupleOut(), x)
    plain = jlrp.explain(LogitsOnly(), composites.EpsilonPlus())
    return x, variables, plain


def test_tuple_output_needs_a_selector(tuple_model):
    x, variables, _ = tuple_model
    explained = jlrp.explain(TupleOut(), composites.EpsilonPlus())
    for target in (1, lambda out: out):
        with pytest.raises(TargetError, match=r"tuple\(f64\[4,5\], dict\(pre_logits=f64\[4,8\]\)\).*output="):
            jlrp.attribute(explained, variables, x, target=target)
    with pytest.raises(TargetError, match="output="):
        Gradient(explained)(variables, x, target=1)
    with pytest.raises(TargetError, match="does not fit"):
        jlrp.attribute(explained, variables, x, target=1, output="logits")
    with pytest.raises(TargetError, match="not an array"):
        jlrp.attribute(explained, variables, x, target=1, output=1)


@pytest.mark.parametrize("model, selector", [(TupleOut(), 0), (TupleOut(), first), (DictOut(), "logits")])
def test_attribute_with_output_selector(tuple_model, model, selector):
    x, variables, plain = tuple_model
    explained = jlrp.explain(model, composites.EpsilonPlus())
    ref_out, ref = jlrp.attribute(plain, variables, x, target=2)
    out, rel = jlrp.attribute(explained, variables, x, target=2, output=selector)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    assert rel_err(rel, ref) < 1e-12
    _, rel = jlrp.attribute(explained, variables, x, target=lambda o: o * (o > 0), output=selector)
    assert rel_err(rel, jlrp.attribute(plain, variables, x, target=lambda o: o * (o > 0))[1]) < 1e-12
    _, rel = jlrp.attribute(
        explained, variables, x, target=np.arange(N) % CLASSES, output=selector, batch_size=3
    )
    assert rel_err(rel, jlrp.attribute(plain, variables, x, target=np.arange(N) % CLASSES)[1]) < 1e-12


@pytest.mark.parametrize(
    "make",
    [
        Gradient,
        lambda m: SmoothGrad(m, n_iter=2, chunk_size=2),
        lambda m: IntegratedGradients(m, n_iter=2, chunk_size=2),
        lambda m: Occlusion(m, window=2, stride=2),
    ],
    ids=["Gradient", "SmoothGrad", "IntegratedGradients", "Occlusion"],
)
def test_attributors_with_output_selector(tuple_model, make):
    x, variables, _ = tuple_model
    out, rel = make(TupleOut())(variables, x, target=1, output=0)
    ref_out, ref = make(LogitsOnly())(variables, x, target=1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    assert rel_err(rel, ref) < 1e-12


class NNXTuple(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(D, 8, rngs=rngs)
        self.head = nnx.Linear(8, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.hidden(x))
        return self.head(h), {"pre_logits": h}


class NNXLogits(NNXTuple):
    def __call__(self, x):
        return super().__call__(x)[0]


def test_nnx_output_selector():
    x = rand((N, D), 5)
    model, plain = NNXTuple(nnx.Rngs(0)), NNXLogits(nnx.Rngs(0))
    explained = jlrp.explain(model, composites.EpsilonPlus())
    with pytest.raises(TargetError, match="output="):
        jlrp.attribute(explained, x, target=1)
    out, rel = jlrp.attribute(explained, x, target=1, output=0)
    ref_out, ref = jlrp.attribute(jlrp.explain(plain, composites.EpsilonPlus()), x, target=1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    assert rel_err(rel, ref) < 1e-12
    _, grad = Gradient(model)(x, target=1, output=first)
    assert rel_err(grad, Gradient(plain)(x, target=1)[1]) < 1e-12


def test_metrics_with_output_selector(tuple_model):
    x, variables, plain = tuple_model
    out, rel = jlrp.attribute(plain, variables, x, target=1)
    images = x.reshape(N, 2, 3, 1)

    def tuple_fn(params, inp):
        return TupleOut().apply(params, inp.reshape(inp.shape[0], D))

    def logits_fn(params, inp):
        return LogitsOnly().apply(params, inp.reshape(inp.shape[0], D))

    heat = rel.reshape(N, 2, 3, 1)
    res = metrics.pixel_flipping(tuple_fn, images, heat, params=variables, output=0)
    ref = metrics.pixel_flipping(logits_fn, images, heat, params=variables)
    np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-12)
    np.testing.assert_array_equal(res.target, ref.target)
    with pytest.raises(TargetError, match="output="):
        metrics.pixel_flipping(tuple_fn, images, heat, params=variables)
    with pytest.raises(TargetError, match="not an array"):
        metrics.conservation(rel, TupleOut().apply(variables, x), 1)
    assert np.isfinite(metrics.conservation(rel, out, 1).relative_error).all()


# ------------------------------------------------------------------------------ pytree inputs


class TwoInputs(nn.Module):
    """``a = Dense(x1)``, ``b = Dense(x2)``, ``out = Dense(a + b)``."""

    @nn.compact
    def __call__(self, x):
        x1, x2 = x
        return nn.Dense(CLASSES)(nn.relu(nn.Dense(8)(x1) + nn.Dense(8)(x2)))


class DictInputs(nn.Module):
    @nn.compact
    def __call__(self, x):
        return TwoInputs()((x["a"], x["b"]))


@pytest.fixture(scope="module")
def two_inputs():
    x = (rand((N, 3), 6), rand((N, 7), 7))
    variables = init(TwoInputs(), x)
    return x, variables, jlrp.explain(TwoInputs(), composites.EpsilonPlus())


def test_two_input_model(two_inputs):
    x, variables, explained = two_inputs
    classes = np.arange(N) % CLASSES
    out, rel = jlrp.attribute(explained, variables, x, target=classes)
    assert isinstance(rel, tuple) and len(rel) == 2
    assert [r.shape for r in rel] == [x[0].shape, x[1].shape]
    ref = lrp_reference(explained, variables, x, classes)
    assert max(rel_err(r, f) for r, f in zip(rel, ref)) < 1e-12
    _, chunked = jlrp.attribute(explained, variables, x, target=classes, batch_size=3)
    assert max(rel_err(r, f) for r, f in zip(chunked, ref)) < 1e-12
    jitted = jax.jit(lambda v, inp: jlrp.attribute(explained, v, inp, target=classes)[1])
    assert max(rel_err(r, f) for r, f in zip(jitted(variables, x), ref)) < 1e-12
    # Epsilon + ZPlus without a bias-free chain do not conserve exactly, but both inputs get relevance
    assert all(float(jnp.abs(r).sum()) > 0 for r in rel)
    cons = metrics.conservation(rel, out, classes)
    np.testing.assert_allclose(cons.relevance_sum, sum(r.sum(axis=1) for r in rel), rtol=1e-12)


def test_dict_input_and_attributors(two_inputs):
    x, variables, _ = two_inputs
    x_dict = {"a": x[0], "b": x[1]}
    explained = jlrp.explain(DictInputs(), composites.EpsilonPlus())
    _, rel = jlrp.attribute(explained, {"params": {"TwoInputs_0": variables["params"]}}, x_dict, target=1)
    assert set(rel) == {"a", "b"} and rel["a"].shape == (N, 3) and rel["b"].shape == (N, 7)
    for make in (Gradient, lambda m: SmoothGrad(m, n_iter=3), lambda m: IntegratedGradients(m, n_iter=4)):
        out, attr = make(TwoInputs())(variables, x, target=1)
        assert [a.shape for a in attr] == [x[0].shape, x[1].shape]
        assert all(np.isfinite(np.asarray(a)).all() for a in attr)
    with pytest.raises(JlrpError, match="one input array"):
        Occlusion(TwoInputs())(variables, x, target=1)


def test_integrated_gradients_two_linear_inputs():
    class Linear2(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(CLASSES, use_bias=False)(x[0]) + nn.Dense(CLASSES, use_bias=False)(x[1])

    x = (rand((N, 3), 8), rand((N, 7), 9))
    variables = init(Linear2(), x)
    out, rel = IntegratedGradients(Linear2(), n_iter=3)(variables, x, target=targets.one_hot(2))
    # a linear model, a zero baseline, the class gradient: completeness is exact, each leaf gets x * w_c
    np.testing.assert_allclose(rel[0].sum(1) + rel[1].sum(1), out[:, 2], rtol=1e-12)
    np.testing.assert_allclose(rel[1], x[1] * variables["params"]["Dense_1"]["kernel"][:, 2], rtol=1e-12)


def test_pytree_input_checks(two_inputs):
    x, variables, explained = two_inputs
    bad = (x[0], x[1].at[1, 2].set(jnp.nan))
    with pytest.raises(InputError, match=r"input\[1\].*NaN"):
        jlrp.attribute(explained, variables, bad, target=1)
    with pytest.raises(InputError, match=r"input\[1\]"):
        explained(variables, bad)
    with pytest.raises(
        InputDtypeError, match=r"input\[1\] has dtype int.*feeds no embedding lookup.*cast it"
    ):
        jlrp.attribute(explained, variables, (x[0], jnp.ones((N, 7), jnp.int32)), target=1)
    with pytest.raises(InputDtypeError, match=r"input\['b'\]"):
        check_input({"a": x[0], "b": np.ones(3, bool)})  # integers may be token ids; booleans never


def test_integer_leaves_get_embedding_relevance_or_stay_outside():
    """Token ids inside the explained input get relevance at their embedding lookup (per token); the
    advice for indices that are not explained, a further positional argument, works too."""

    class Embedded(nn.Module):
        @nn.compact
        def __call__(self, inputs, extra_ids=None):
            x, ids = inputs if extra_ids is None else (inputs, extra_ids)
            return nn.Dense(CLASSES)(x + nn.Embed(11, 3)(ids).sum(1))

    x, ids = rand((N, 3), 10), jnp.asarray(np.arange(N * 2).reshape(N, 2) % 11)
    variables = init(Embedded(), (x, ids))
    explained = jlrp.explain(Embedded(), composites.EpsilonPlus())
    out, (rel_x, rel_ids) = jlrp.attribute(explained, variables, (x, ids), target=1)
    assert rel_x.shape == x.shape and rel_ids.shape == ids.shape
    assert np.isfinite(np.asarray(rel_ids)).all() and float(jnp.abs(rel_ids).sum()) > 0
    out, rel = jlrp.attribute(explained, variables, x, ids, target=1)
    assert rel.shape == x.shape and np.isfinite(np.asarray(rel)).all()
    np.testing.assert_allclose(rel, rel_x, rtol=1e-9, atol=1e-12)


def test_one_score_per_sample_with_target_none_raises():
    """A (N,) output (a sentence similarity) with target=None explained only the sample with the
    largest score (the argmax over the samples); now it raises and says to pass target=1.0."""
    import flax.linen as nn

    class Score(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(x)[:, 0]

    model = Score()
    x = jnp.arange(6.0).reshape(3, 2)
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, jlrp.composites.EpsilonPlus())
    with pytest.raises(jlrp.errors.TargetError, match="target=1.0"):
        jlrp.attribute(explained, variables, x)
    out, rel = jlrp.attribute(explained, variables, x, target=1.0)
    np.testing.assert_allclose(rel.sum(1), out, rtol=1e-5)  # every sample explained, bias-free Dense init
    single, _ = jlrp.attribute(explained, variables, x[:1])  # one sample: argmax of (1,) is the output
    np.testing.assert_allclose(single, out[:1], rtol=1e-6)
