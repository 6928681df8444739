"""Tests of the attributors (:mod:`jlrp.attribution`): Gradient, SmoothGrad, IntegratedGradients, Occlusion.

Hand-derivable cases on linear models, invariances (chunk size, batch vs. per sample), no retracing,
and exact parity with zennit's attributors on the same float64 weights (``crosscheck``).
"""

from __future__ import annotations

import importlib
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites
from jlrp.attribution import (
    Gradient,
    IntegratedGradients,
    Occlusion,
    SmoothGrad,
    occlude_independent,
)
from jlrp.errors import InputDtypeError, TargetError

H = W = 8
C_IN, N_CLASSES = 3, 3


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


class SmallCNN(nn.Module):
    """Conv-ReLU and a full-size VALID conv head (flatten-free, so NHWC and NCHW agree)."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding=1)(x))
        x = nn.Conv(N_CLASSES, (H, W), padding="VALID")(x)
        return x.reshape(x.shape[0], -1)


class LinearModel(nn.Module):
    """One Dense without bias on the flattened input."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(N_CLASSES, use_bias=False)(x.reshape(x.shape[0], -1))


class Flatten(nn.Module):
    """No parameters: the output is the input, flattened (its VJP returns the cotangent)."""

    @nn.compact
    def __call__(self, x):
        return x.reshape(x.shape[0], -1)


TRACES = {"n": 0}


class CountingCNN(SmallCNN):
    def __call__(self, x):
        TRACES["n"] += 1
        return super().__call__(x)


def random_variables(model: nn.Module, x: jax.Array, seed: int = 0):
    """Float64 NumPy-random variables (no jax.random: its first compile is slow on CPU)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

    def fill(s):
        fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 10
        return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(fan_in), s.shape))

    return jax.tree_util.tree_map(fill, shapes)


def random_input(shape, seed: int = 1) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


@pytest.fixture(scope="module")
def cnn():
    model = SmallCNN()
    x = random_input((2, H, W, C_IN))
    return model, random_variables(model, x), x


@pytest.fixture(scope="module")
def linear():
    model = LinearModel()
    x = random_input((2, 6, 4, 3), seed=5)
    variables = random_variables(model, x)
    weight = np.asarray(variables["params"]["Dense_0"]["kernel"])[:, 2].reshape(6, 4, 3)
    return model, variables, x, weight


@pytest.fixture(scope="module")
def explained(cnn):
    return jlrp.explain(cnn[0], composites.EpsilonPlus())


# attributors are compiled once per instance: tests share these to save compilations
@pytest.fixture(scope="module")
def lrp(explained):
    return Gradient(explained)


@pytest.fixture(scope="module")
def gradient(cnn):
    return Gradient(cnn[0])


def vjp_reference(fn, x, target):
    y, pullback = jax.vjp(fn, x)
    return pullback(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype))[0]


# ------------------------------------------------------------------------------------ Gradient


def test_gradient_explained_equals_attribute(cnn, explained, lrp):
    _, variables, x = cnn
    out, rel = lrp(variables, x, target=1)
    ref_out, ref_rel = jlrp.attribute(explained, variables, x, target=1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-13)
    np.testing.assert_allclose(rel, ref_rel, rtol=1e-13, atol=1e-15)
    # composite= at construction explains the model itself
    _, rel2 = Gradient(cnn[0], composite=composites.EpsilonPlus())(variables, x, target=1)
    np.testing.assert_allclose(rel2, ref_rel, rtol=1e-13, atol=1e-15)


def test_gradient_plain_linen_is_the_gradient(cnn, gradient):
    model, variables, x = cnn
    out, rel = gradient(variables, x, target=2)
    ref = vjp_reference(lambda i: model.apply(variables, i), x, 2)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-13)
    np.testing.assert_allclose(rel, ref, rtol=1e-13, atol=1e-15)


def test_gradient_targets(cnn, gradient):
    model, variables, x = cnn
    attr = gradient
    out, rel_none = attr(variables, x)
    _, rel_argmax = attr(variables, x, target=np.asarray(jnp.argmax(out, -1)))
    np.testing.assert_allclose(rel_none, rel_argmax, rtol=1e-13)
    one_hot = lambda y: jax.nn.one_hot(1, y.shape[-1], dtype=y.dtype) * jnp.ones_like(y)
    plain = jax.vjp(lambda i: model.apply(variables, i), x)[1](jnp.zeros((2, 3)).at[:, 1].set(1.0))[0]
    np.testing.assert_allclose(attr(variables, x, target=one_hot)[1], plain, rtol=1e-13)
    with pytest.raises(TargetError):
        attr(variables, x, target=5)
    with pytest.raises(InputDtypeError):
        attr(variables, x.astype(jnp.int32), target=1)


def test_attribute_accepts_callable_target(cnn, explained):
    _, variables, x = cnn
    rel = jlrp.attribute(explained, variables, x, target=lambda y: y)[1]
    assert rel.shape == x.shape and np.isfinite(np.asarray(rel)).all()


# ------------------------------------------------------------------------------------ SmoothGrad


def test_smoothgrad_one_iteration_is_the_gradient(cnn, explained, lrp):
    _, variables, x = cnn
    out, rel = SmoothGrad(explained, noise_level=1.0, n_iter=1)(variables, x, target=1)
    ref_out, ref = lrp(variables, x, target=1)
    np.testing.assert_allclose(out, ref_out, rtol=1e-13)
    np.testing.assert_allclose(rel, ref, rtol=1e-13, atol=1e-15)


def test_smoothgrad_noise_scale_per_sample_and_rng():
    """Identity model, target = the output: relevance = x + mean(noise); n_iter=2 exposes one noise draw."""
    model = Flatten()
    x = jnp.stack([jnp.linspace(-1.0, 1.0, 40000), jnp.linspace(0.0, 10.0, 40000)]).reshape(2, 200, 200, 1)
    identity = lambda y: y
    attr = SmoothGrad(model, noise_level=0.2, n_iter=2)
    out, rel = attr({}, x, target=identity, rng=jax.random.PRNGKey(3))
    noise = np.asarray(2 * (rel - x)).reshape(2, -1)
    sigma = 0.2 * np.array([2.0, 10.0])
    np.testing.assert_allclose(noise.std(axis=1), sigma, rtol=0.02)
    np.testing.assert_allclose(noise.mean(axis=1), 0.0, atol=0.02 * sigma.max())
    np.testing.assert_allclose(out, np.asarray(x).reshape(2, -1))  # output of the clean input
    # reproducible by default, different for another key, int seeds accepted
    a = attr({}, x, target=identity)[1]
    np.testing.assert_array_equal(a, attr({}, x, target=identity, rng=0)[1])
    assert not np.allclose(a, rel)


def test_smoothgrad_none_is_the_clean_prediction(linear):
    model, variables, x, _ = linear
    attr = SmoothGrad(model, noise_level=0.5, n_iter=2)
    out, rel = attr(variables, x)
    np.testing.assert_allclose(rel, attr(variables, x, target=np.asarray(jnp.argmax(out, -1)))[1], rtol=1e-13)


# ------------------------------------------------------------------------------------ IntegratedGradients


def test_integrated_gradients_linear_model():
    model = LinearModel()
    x = random_input((2, 4, 4, 2), seed=2)
    variables = random_variables(model, x)
    weight = np.asarray(variables["params"]["Dense_0"]["kernel"])[:, 1].reshape(4, 4, 2)
    n = 6
    attr = IntegratedGradients(model, n_iter=n)
    # constant one-hot cotangent: the textbook IG, exactly x * w_c (completeness without bias)
    one_hot = lambda y: jnp.zeros_like(y).at[:, 1].set(1.0)
    out, rel = attr(variables, x, target=one_hot)
    np.testing.assert_allclose(rel, np.asarray(x) * weight, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(rel).sum((1, 2, 3)), np.asarray(out)[:, 1], rtol=1e-12)
    # jlrp's int target: cotangent f_c(alpha x) = alpha f_c(x), mean(alpha) = (n + 1) / (2 n)
    _, rel_int = attr(variables, x, target=1)
    expected = np.asarray(x) * weight * np.asarray(out)[:, 1, None, None, None] * (n + 1) / (2 * n)
    np.testing.assert_allclose(rel_int, expected, rtol=1e-12)
    # a baseline: (x - b) * w_c
    b = 0.5 * jnp.ones_like(x)
    _, rel_b = IntegratedGradients(model, baseline_fn=lambda i: 0.5 * jnp.ones_like(i), n_iter=3)(
        variables, x, target=one_hot
    )
    np.testing.assert_allclose(rel_b, np.asarray(x - b) * weight, rtol=1e-12)


# ------------------------------------------------------------------------------------ Occlusion


def test_occlusion_non_overlapping_windows(linear):
    model, variables, x, weight = linear
    contrib = np.asarray(x) * weight  # f_c(occluded) = sum of the kept x * w_c
    blocks = contrib.reshape(2, 3, 2, 2, 2, 3).sum(axis=(2, 4, 5))  # 2x2 windows, all channels
    expected = np.repeat(np.repeat(blocks, 2, axis=1), 2, axis=2)[..., None] * np.ones(3)
    out, rel = Occlusion(model, window=2, stride=2)(variables, x, target=2)
    np.testing.assert_allclose(rel, expected, rtol=1e-12)
    np.testing.assert_allclose(out, model.apply(variables, x), rtol=1e-13)
    # occluding the window instead: the score of everything else
    inverted = Occlusion(model, window=2, stride=2, occlusion_fn=partial(occlude_independent, invert=True))
    total = contrib.sum(axis=(1, 2, 3))[:, None, None, None]
    np.testing.assert_allclose(inverted(variables, x, target=2)[1], total - expected, rtol=1e-12)
    # tuple windows over the leading non-batch axes; (2, 2, 1): every channel apart
    np.testing.assert_allclose(
        Occlusion(model, window=(2, 2), stride=2)(variables, x, target=2)[1], expected, rtol=1e-12
    )
    per_channel = np.repeat(np.repeat(contrib.reshape(2, 3, 2, 2, 2, 3).sum(axis=(2, 4)), 2, 1), 2, 2)
    _, rel_c = Occlusion(model, window=(2, 2, 1), stride=(2, 2, 1))(variables, x, target=2)
    np.testing.assert_allclose(rel_c, per_channel, rtol=1e-12)


def roll_reference(x, contrib, window, stride):
    """Brute force: roll a corner block over H and W (wrapping), sum the kept contributions per window."""
    result = np.zeros_like(x)
    n, h, w, c = x.shape
    base = np.zeros((h, w), bool)
    base[: min(window[0], h), : min(window[1], w)] = True
    for i in range(0, h, stride[0]):
        for j in range(0, w, stride[1]):
            mask = np.roll(base, (i, j), axis=(0, 1))[None, :, :, None]
            score = (contrib * mask).sum(axis=(1, 2, 3))
            result += mask * score[:, None, None, None]
    return result


@pytest.mark.parametrize("window,stride", [(3, 2), ((4, 3), (3, 1)), (10, 4)])
def test_occlusion_overlapping_and_wrapping(linear, window, stride):
    model, variables, x, weight = linear
    as_pair = lambda v: v if isinstance(v, tuple) else (v, v)
    ref = roll_reference(np.asarray(x), np.asarray(x) * weight, as_pair(window), as_pair(stride))
    _, rel = Occlusion(model, window=window, stride=stride)(variables, x, target=2)
    np.testing.assert_allclose(rel, ref, rtol=1e-12)


def test_occlusion_argument_errors(linear):
    model, variables, x, _ = linear
    with pytest.raises(TypeError):
        Occlusion(model, window=2.5)
    with pytest.raises(TypeError):
        Occlusion(model, stride=(2, 0))
    with pytest.raises(ValueError):
        Occlusion(model, window=(1, 1, 1, 1))(variables, x, target=0)
    with pytest.raises(ValueError):
        SmoothGrad(model, n_iter=0)
    with pytest.raises(ValueError):
        IntegratedGradients(model, chunk_size=0)
    with pytest.raises(TypeError):
        Gradient(object())


# ------------------------------------------------------------------------------------ invariances


@pytest.mark.parametrize(
    "make",
    [
        lambda m, k: SmoothGrad(m, noise_level=0.3, n_iter=5, chunk_size=k),
        lambda m, k: IntegratedGradients(m, n_iter=5, chunk_size=k),
        lambda m, k: Occlusion(m, window=3, stride=2, chunk_size=k),
    ],
    ids=["smoothgrad", "integrated_gradients", "occlusion"],
)
def test_chunk_size_does_not_change_results(cnn, make):
    """5 iterations (16 occlusion windows) in padded chunks of 2 under lax.scan, or all at once."""
    model, variables, x = cnn
    chunked = make(model, 2)(variables, x, target=1)[1]
    at_once = make(model, 50)(variables, x, target=1)[1]
    np.testing.assert_allclose(chunked, at_once, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    "make",
    [partial(IntegratedGradients, n_iter=3), partial(Occlusion, window=4, stride=4)],
    ids=["integrated_gradients", "occlusion"],
)
def test_batch_equals_per_sample(cnn, make):
    model, variables, x = cnn
    attr = make(model)
    _, rel = attr(variables, x, target=np.array([0, 2]))
    np.testing.assert_allclose(rel[1:], attr(variables, x[1:], target=2)[1], rtol=1e-12, atol=1e-14)


def test_no_retrace_on_second_call(cnn):
    _, variables, x = cnn
    counting = CountingCNN()
    for attr in (
        Gradient(counting),
        SmoothGrad(counting, n_iter=2),
        IntegratedGradients(counting, n_iter=2),
        Occlusion(counting, window=4),
    ):
        attr(variables, x, target=0)
        traces = TRACES["n"]
        assert traces > 0
        attr(variables, x + 1.0, target=2)  # new values, another class: the same compilation
        assert TRACES["n"] == traces, type(attr).__name__
        assert attr._jitted._cache_size() == 1


def test_float32_preserved(cnn):
    model, variables, x = cnn
    v32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables)
    for attr in (SmoothGrad(model, n_iter=2),):
        out, rel = attr(v32, x.astype(jnp.float32), target=0)
        assert rel.dtype == jnp.float32 and rel.shape == x.shape


# ------------------------------------------------------------------------------------ NNX


class NNXCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(C_IN, 4, (3, 3), padding=1, rngs=rngs)
        self.head = nnx.Conv(4, N_CLASSES, (H, W), padding="VALID", rngs=rngs)

    def __call__(self, x):
        x = self.head(nnx.relu(self.conv(x)))
        return x.reshape(x.shape[0], -1)


def nnx_from_linen(variables) -> NNXCNN:
    model = nnx.eval_shape(lambda: NNXCNN(nnx.Rngs(0)))  # abstract: no random initialisation
    p = variables["params"]
    for name, key in (("conv", "Conv_0"), ("head", "Conv_1")):
        getattr(model, name).kernel.set_value(p[key]["kernel"])
        getattr(model, name).bias.set_value(p[key]["bias"])
    return model


def test_plain_nnx_matches_linen(cnn, gradient):
    model, variables, x = cnn
    nnx_model = nnx_from_linen(variables)
    out, rel = Gradient(nnx_model)(x, target=2)
    ref_out, ref = gradient(variables, x, target=2)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12)
    np.testing.assert_allclose(rel, ref, rtol=1e-12, atol=1e-14)
    occlusion = partial(Occlusion, window=4)
    np.testing.assert_allclose(
        occlusion(nnx_model)(x, target=1)[1], occlusion(model)(variables, x, target=1)[1], rtol=1e-12
    )


def test_explained_nnx_matches_linen(cnn, explained, lrp):
    try:
        importlib.import_module("jlrp.nnx")
    except ImportError as err:
        pytest.skip(f"jlrp.nnx is not available yet: {err}")
    _, variables, x = cnn
    nnx_explained = jlrp.explain(nnx_from_linen(variables), composites.EpsilonPlus())
    _, rel = Gradient(nnx_explained)(x, target=1)
    np.testing.assert_allclose(rel, lrp(variables, x, target=1)[1], rtol=1e-10, atol=1e-13)
    integrated = partial(IntegratedGradients, n_iter=3)
    _, rel = integrated(nnx_explained)(x, target=1)
    np.testing.assert_allclose(rel, integrated(explained)(variables, x, target=1)[1], rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------ zennit parity


@pytest.fixture(scope="module")
def torch_pair(cnn):
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    _, variables, x = cnn
    p = variables["params"]
    convs = [torch.nn.Conv2d(C_IN, 4, 3, padding=1).double(), torch.nn.Conv2d(4, N_CLASSES, (H, W)).double()]
    with torch.no_grad():
        for conv, key in zip(convs, ("Conv_0", "Conv_1")):
            conv.weight.copy_(torch.from_numpy(np.asarray(p[key]["kernel"]).transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(p[key]["bias"])))
    model = torch.nn.Sequential(convs[0], torch.nn.ReLU(), convs[1], torch.nn.Flatten())
    x_t = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
    return torch, model, x_t


def to_nhwc(t) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def zennit_run(torch, zattr, x_t, target):
    def start(y):
        return y * torch.nn.functional.one_hot(torch.tensor(target), y.shape[-1]).to(y.dtype)

    out, rel = zattr(x_t, start)
    return out.detach().numpy(), to_nhwc(rel)


@pytest.mark.crosscheck
@pytest.mark.parametrize("with_composite", [False, True], ids=["plain", "epsilon_plus"])
def test_zennit_gradient_and_integrated_gradients(cnn, torch_pair, with_composite):
    import zennit.attribution as za
    import zennit.composites as zc

    torch, tmodel, x_t = torch_pair
    model, variables, x = cnn
    m = jlrp.explain(model, composites.EpsilonPlus()) if with_composite else model
    target = [1, 2]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # zennit's IG alphas come from torch.linspace in the default dtype
    try:
        cases = [
            (za.Gradient, {}, Gradient(m)),
            (za.IntegratedGradients, {"n_iter": 5}, IntegratedGradients(m, n_iter=5)),
        ]
        for zcls, kw, attr in cases:
            comp = zc.EpsilonPlus() if with_composite else None
            ref_out, ref = zennit_run(torch, zcls(tmodel, comp, **kw), x_t, target)
            out, rel = attr(variables, x, target=np.array(target))
            assert rel_err(out, ref_out) < 1e-12
            assert rel_err(rel, ref) < 1e-8, zcls.__name__
    finally:
        torch.set_default_dtype(old)


@pytest.mark.crosscheck
def test_zennit_smoothgrad(cnn, torch_pair, monkeypatch):
    import zennit.attribution as za

    torch, tmodel, x_t = torch_pair
    model, variables, x = cnn
    target = [0, 2]
    # the same noise: feed zennit jlrp's documented standard-normal draws through torch.randn_like; this
    # checks sigma, the noise-free last iteration and the mean at once (stronger than noise-free runs)
    key, n_iter = jax.random.PRNGKey(7), 4
    size = int(np.prod(x.shape))
    z = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (size,), x.dtype)))(
        jnp.arange(n_iter - 1)
    )
    draws = iter(torch.from_numpy(np.asarray(zi).reshape(x.shape).transpose(0, 3, 1, 2).copy()) for zi in z)
    monkeypatch.setattr(torch, "randn_like", lambda t: next(draws))
    _, ref = zennit_run(torch, za.SmoothGrad(tmodel, noise_level=0.3, n_iter=n_iter), x_t, target)
    assert next(draws, None) is None  # zennit drew n_iter - 1 times
    _, rel = SmoothGrad(model, noise_level=0.3, n_iter=n_iter, chunk_size=3)(
        variables, x, target=np.array(target), rng=key
    )
    assert rel_err(rel, ref) < 1e-8


@pytest.mark.crosscheck
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"window": (4, 4), "stride": (2, 2)},
        {"window": (3, 5), "stride": (3, 3)},
        {"window": (4, 4), "stride": (4, 4), "invert": True},
    ],
    ids=["default", "overlap", "wrap", "inverted"],
)
def test_zennit_occlusion(cnn, torch_pair, kw):
    import zennit.attribution as za

    torch, tmodel, x_t = torch_pair
    model, variables, x = cnn
    kw = dict(kw)
    invert = kw.pop("invert", False)
    zfn = partial(za.occlude_independent, fill_fn=torch.zeros_like, invert=invert)
    ref_out, ref = zennit_run(torch, za.Occlusion(tmodel, occlusion_fn=zfn, **kw), x_t, [2, 0])
    attr = Occlusion(model, occlusion_fn=partial(occlude_independent, invert=invert), **kw)
    out, rel = attr(variables, x, target=np.array([2, 0]))
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(rel, ref) < 1e-8
