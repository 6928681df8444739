"""jlrp.concepts (CRP): captured relevance against independent float64 references, conditional heatmaps
by hand, conservation by layer, the sum tests with and without ``exclude_parallel``, vmap == loop, NNX ==
linen, attention heads, errors, and the attribution graph.

References never come from the taps: numpy LRP formulas, or the part of the model above a layer cut out
as its own model and explained from that layer's output (plain ``jax.vjp`` of an explained model).
Everything is float64 (tests/conftest.py) and tiny; fixtures are module-scoped so that each distinct
``concepts.attribute`` configuration compiles once.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import jlrp
import jlrp.models as jm
from jlrp import composites, concepts, rules, types
from jlrp.canonizers import MergeBatchNorm
from jlrp.errors import UsageError

EVERYTHING = ["**", "**/@*"]
CC = concepts.ChannelConcept()


def close(a, b, tol: float, scale=None) -> None:
    """``max |a - b| <= tol * max(1, max |b|)`` (or ``tol * scale``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    ref = max(1.0, float(np.max(np.abs(b)))) if scale is None else scale
    err = float(np.max(np.abs(a - b)))
    assert err <= tol * ref, f"max error {err:.3g} > {tol:.1g} * {ref:.3g}"


def one_hot_masks(n: int, zero: bool = False) -> np.ndarray:
    """``(n, n)`` one-hot channel masks, with an all-zero mask appended when ``zero``."""
    masks = np.eye(n)
    return np.concatenate([masks, np.zeros((1, n))]) if zero else masks


def eps_stab(z: np.ndarray, eps: float) -> np.ndarray:
    """zennit's stabiliser: ``z + eps`` where ``z >= 0``, ``z - eps`` elsewhere."""
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def linen_to_nnx(nnx_model: nnx.Module, variables: dict) -> nnx.Module:
    """Put linen's variables (every collection) at the same paths of an abstract NNX model."""
    flat = {}
    for collection in variables.values():
        flat.update({tuple(map(str, p)): v for p, v in traverse_util.flatten_dict(collection).items()})
    seen = set()
    for path, node in nnx.iter_graph(nnx_model):
        if isinstance(node, nnx.Variable) and not isinstance(node, nnx.RngState):
            key = tuple(map(str, path))
            assert key in flat, f"NNX variable {key} has no linen counterpart"
            node.set_value(jnp.asarray(flat[key]))
            seen.add(key)
    assert seen == set(flat), set(flat) - seen
    return nnx_model


# ------------------------------------------------------------------------------- hand-checkable net


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(4, use_bias=False, name="hidden")(x))
        return nn.Dense(2, use_bias=False, name="out")(h)


W1 = np.array([[1.0, -1.0, 0.5, 2.0], [0.5, 1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]])
W2 = np.array([[1.0, -1.0], [2.0, 0.5], [1.0, 1.0], [-1.0, 2.0]])
X_HAND = np.array([[1.0, 2.0, 1.0], [0.5, -1.0, 2.0], [-0.3, 0.7, 1.1]])


def lrp0_hidden_conditional(x: np.ndarray, R_out: np.ndarray) -> np.ndarray:
    """``(4, N, 3)`` LRP-0 heatmaps conditioned on each hidden neuron j, by the formula
    ``R_i|j = x_i w_ij / z_j * R_j`` with ``R_j = h_j sum_c w_jc R_c / y_c``, as numpy loops."""
    out = np.zeros((4, *x.shape))
    for n in range(x.shape[0]):
        z = x[n] @ W1
        h = np.maximum(z, 0)
        y = h @ W2
        for j in range(4):
            R_j = sum(h[j] * W2[j, c] / y[c] * R_out[n, c] for c in range(2) if R_out[n, c] != 0)
            for i in range(3):
                out[j, n, i] = x[n, i] * W1[i, j] / z[j] * R_j if h[j] > 0 else 0.0
    return out


@pytest.fixture(scope="module")
def hand():
    variables = {"params": {"hidden": {"kernel": jnp.asarray(W1)}, "out": {"kernel": jnp.asarray(W2)}}}
    explained = jlrp.explain(TwoLayer(), {nn.Dense: rules.Epsilon(0.0)})
    res = concepts.attribute(
        explained,
        variables,
        jnp.asarray(X_HAND),
        target=0,
        capture=["**", "@*"],
        conditions={"hidden": one_hot_masks(4)},
    )
    return explained, variables, res


def test_hand_two_layer_conditional_heatmaps(hand):
    _, _, res = hand
    # first sample by hand: z = (3, 2, -0.5, 3), h = (3, 2, 0, 3), y = (4, 4); R_j = h_j w_j0 = (3, 4, 0, -3)
    expected_first = np.array([[1.0, 1.0, 1.0], [-2.0, 4.0, 2.0], [0.0, 0.0, 0.0], [-2.0, -2.0, 1.0]])
    close(res.heatmap[:, 0], expected_first, 1e-12)
    close(res.relevances["hidden"][0, 0], [3.0, 4.0, 0.0, -3.0], 1e-12)
    y = np.maximum(X_HAND @ W1, 0) @ W2
    R_out = np.zeros_like(y)
    R_out[:, 0] = y[:, 0]
    close(res.heatmap, lrp0_hidden_conditional(X_HAND, R_out), 1e-12)
    close(res.output, y, 1e-12)


def test_hand_two_layer_conditions_on_two_layers(hand):
    """CRP's multi-layer condition: output neuron c and hidden neuron j at once (target: every output,
    R_c = y_c): ``R_i|j,c = x_i w_ij / z_j * h_j w_jc``, with and without ``exclude_parallel``."""
    explained, variables, _ = hand
    pairs = [(c, j) for c in range(2) for j in range(4)]
    masks_out = np.stack([np.eye(2)[c] for c, _ in pairs])
    masks_hidden = np.stack([np.eye(4)[j] for _, j in pairs])
    x = X_HAND
    z = x @ W1
    h = np.maximum(z, 0)
    expected = np.zeros((len(pairs), *x.shape))
    for k, (c, j) in enumerate(pairs):
        for n in range(x.shape[0]):
            if h[n, j] > 0:
                expected[k, n] = x[n] * W1[:, j] / z[n, j] * h[n, j] * W2[j, c]
    for exclusive in (False, True):
        res = concepts.attribute(
            explained,
            variables,
            jnp.asarray(x),
            target=np.ones((3, 2)),
            conditions={"out": masks_out, "hidden": masks_hidden},
            exclude_parallel=exclusive,
        )
        close(res.heatmap, expected, 1e-12)


# ------------------------------------------------------------------------ MLP: numpy Epsilon chain


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(5, name="d0")(x))
        x = nn.relu(nn.Dense(4, name="d1")(x))
        return nn.Dense(3, name="d2")(x)


MLP_EPS = 0.25
MLP_TARGET = np.array([0, 2, 1, 2])


def random_variables(model: nn.Module, x, seed: int, bias: bool = True) -> dict:
    """float64 variables: kernels N(0, 1/fan_in); biases U(-0.3, 0.3) (0 if not ``bias``); BatchNorm
    scale and var U(0.5, 1.5), its mean and bias 0 unless ``bias``."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(path[-1].key)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, s.shape)
        if len(s.shape) > 1:
            return rng.normal(0.0, 1.0 / np.sqrt(np.prod(s.shape[:-1])), s.shape)
        return rng.uniform(-0.3, 0.3, s.shape) if bias else np.zeros(s.shape)

    return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(fill(p, s)), shapes)


def numpy_mlp_relevances(variables: dict, x: np.ndarray, target: np.ndarray, eps: float) -> dict:
    """Relevance at every layer output of :class:`MLP` under Epsilon (ReLU: relevance passes)."""
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    a, zs, acts = x, [], [x]
    for name in ("d0", "d1", "d2"):
        zs.append(a @ p[name]["kernel"] + p[name]["bias"])
        a = np.maximum(zs[-1], 0) if name != "d2" else zs[-1]
        acts.append(a)
    R = zs[-1] * np.eye(3)[target]
    out = {"d2": R}
    for k, name in ((2, "d2"), (1, "d1"), (0, "d0")):
        R = acts[k] * ((R / eps_stab(zs[k], eps)) @ p[name]["kernel"].T)
        if k:
            out[f"@relu_{k - 1}"] = R
            out[f"d{k - 1}"] = R
    out["input"] = R
    return out


@pytest.fixture(scope="module")
def mlp():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3)))
    model = MLP()
    variables = random_variables(model, x, seed=33)
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(MLP_EPS)})
    return explained, variables, x


def test_mlp_captured_relevance_equals_numpy_epsilon_chain(mlp):
    explained, variables, x = mlp
    res = concepts.attribute(explained, variables, x, target=MLP_TARGET, capture=["**", "@*"])
    ref = numpy_mlp_relevances(variables, np.asarray(x), MLP_TARGET, MLP_EPS)
    assert set(res.relevances) == set(ref) - {"input"}
    for key, R in res.relevances.items():
        close(R, ref[key], 1e-12)
    close(res.heatmap, ref["input"], 1e-12)
    p = variables["params"]
    close(res.activations["d0"], x @ p["d0"]["kernel"] + p["d0"]["bias"], 1e-12)
    close(res.activations["@relu_0"], np.maximum(res.activations["d0"], 0), 0.0)


# ------------------------------------------------------------------------ CNN: cut models as references


def _cnn_upper(x):
    """The part of :class:`CNN` above its average pool (called inside a compact module)."""
    x = nn.relu(nn.Conv(5, (3, 3), name="conv_b")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv_a")(x))
        return _cnn_upper(nn.avg_pool(x, (2, 2), strides=(2, 2)))


class TopFromConvA(nn.Module):
    """:class:`CNN` cut above ``conv_a``: its input is ``conv_a``'s output."""

    @nn.compact
    def __call__(self, a):
        return _cnn_upper(nn.avg_pool(nn.relu(a), (2, 2), strides=(2, 2)))


class TopFromPool(nn.Module):
    """:class:`CNN` cut above the average pool."""

    @nn.compact
    def __call__(self, a):
        return _cnn_upper(a)


class TopFromConvB(nn.Module):
    """:class:`CNN` cut above ``conv_b``."""

    @nn.compact
    def __call__(self, a):
        a = nn.max_pool(nn.relu(a), (2, 2), strides=(2, 2))
        return nn.Dense(3, name="fc")(a.reshape(a.shape[0], -1))


CNN_COMPOSITE = composites.EpsilonPlus(epsilon=0.1)
CNN_TARGET = np.array([0, 2, 1])


@pytest.fixture(scope="module")
def cnn():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 8, 8, 2)))
    model = CNN()
    variables = random_variables(model, x, seed=6)
    explained = jlrp.explain(model, CNN_COMPOSITE)
    plain = concepts.attribute(explained, variables, x, target=CNN_TARGET, capture=["**", "@*"])
    return model, explained, variables, x, plain


def cut_relevance(top: nn.Module, variables: dict, a: jax.Array, target: np.ndarray) -> jax.Array:
    """The relevance of ``a`` when the model part ``top`` is explained on its own from ``a``."""
    explained = jlrp.explain(top, CNN_COMPOSITE)
    params = {"params": {k: variables["params"][k] for k in ("conv_b", "fc")}}

    @jax.jit
    def relevance(params, a):
        y, pullback = jax.vjp(lambda a: explained(params, a), a)
        return pullback(y * jax.nn.one_hot(target, 3, dtype=y.dtype))[0]

    return relevance(params, a)


def test_cnn_captured_relevance_equals_cut_models(cnn):
    model, explained, variables, x, plain = cnn
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    inter = {k: v["__call__"][0] for k, v in state["intermediates"].items() if k != "__call__"}
    pooled = nn.avg_pool(nn.relu(inter["conv_a"]), (2, 2), strides=(2, 2))
    assert list(concepts.tap_points(explained, variables, x, capture=["**", "@*"])) == [
        "conv_a",
        "@relu_0",
        "@avg_pool_0",
        "conv_b",
        "@relu_1",
        "fc",
    ]
    assert (
        set(plain.relevances)
        == set(plain.activations)
        == {"conv_a", "@relu_0", "@avg_pool_0"}
        | {
            "conv_b",
            "@relu_1",
            "fc",
        }
    )
    for key in ("conv_a", "conv_b", "fc"):
        close(plain.activations[key], inter[key], 0.0)
    close(plain.activations["@relu_0"], nn.relu(inter["conv_a"]), 0.0)
    close(plain.activations["@avg_pool_0"], pooled, 1e-15)
    close(plain.relevances["fc"], inter["fc"] * np.eye(3)[CNN_TARGET], 1e-15)
    cuts = {
        "conv_a": cut_relevance(TopFromConvA(), variables, inter["conv_a"], CNN_TARGET),
        "@avg_pool_0": cut_relevance(TopFromPool(), variables, pooled, CNN_TARGET),
        "conv_b": cut_relevance(TopFromConvB(), variables, inter["conv_b"], CNN_TARGET),
    }
    for key, ref in cuts.items():
        assert float(jnp.max(jnp.abs(ref))) > 1e-3, key
        close(plain.relevances[key], ref, 1e-12)


CNN_CAPTURE = ["conv_a", "@avg_pool_0", "conv_b"]
# condition sets on (conv_b, conv_a): each conv_b channel alone (conv_a all ones: no filter), every pair
# (b, a), and each conv_a channel alone
PAIRS = [(b, a) for b in range(5) for a in range(4)]
CNN_UPPER = np.concatenate([np.eye(5), np.stack([np.eye(5)[b] for b, _ in PAIRS]), np.ones((4, 5))])
CNN_LOWER = np.concatenate([np.ones((5, 4)), np.stack([np.eye(4)[a] for _, a in PAIRS]), np.eye(4)])


def cnn_conditioned(cnn, sets: slice | np.ndarray, exclusive: bool, **kw) -> concepts.ConceptAttribution:
    _, explained, variables, x, _ = cnn
    conditions = {"conv_b": CNN_UPPER[sets]}
    if not exclusive:
        conditions["conv_a"] = CNN_LOWER[sets]
    return concepts.attribute(
        explained,
        variables,
        x,
        target=CNN_TARGET,
        capture=CNN_CAPTURE,
        conditions=conditions,
        exclude_parallel=exclusive,
        **kw,
    )


@pytest.fixture(scope="module")
def cnn_channels(cnn):
    """Non-exclusive: every set of ``CNN_UPPER``/``CNN_LOWER``; exclusive: each conv_b channel."""
    return {False: cnn_conditioned(cnn, slice(None), False), True: cnn_conditioned(cnn, slice(0, 5), True)}


def test_cnn_channel_heatmaps_sum_to_the_plain_heatmap(cnn, cnn_channels):
    plain = cnn[-1]
    for res in cnn_channels.values():
        assert res.heatmap.shape[1:] == (3, 8, 8, 2)
        close(res.heatmap[:5].sum(0), plain.heatmap, 1e-10)
        close(res.relevances["conv_a"][:5].sum(0), plain.relevances["conv_a"], 1e-10)
        # the relevance at the conditioned output itself is the one arriving there (before its mask)
        close(
            res.relevances["conv_b"][:5], np.broadcast_to(plain.relevances["conv_b"], (5, 3, 4, 4, 5)), 1e-12
        )
    # no parallel path: both modes agree
    close(cnn_channels[True].heatmap, cnn_channels[False].heatmap[:5], 1e-12)


def test_two_conditioned_layers_are_linear_in_each_mask(cnn, cnn_channels):
    """conv_b (upper) and conv_a (lower) at once: summing the upper channel for a fixed lower one gives
    the lower channel alone; all pairs give the plain heatmap."""
    plain = cnn[-1]
    heatmap = cnn_channels[False].heatmap
    by_pair = heatmap[5:25].reshape(5, 4, *plain.heatmap.shape)
    close(by_pair.sum(0), heatmap[25:], 1e-10)
    close(by_pair.sum((0, 1)), plain.heatmap, 1e-10)
    assert float(jnp.max(jnp.abs(by_pair[0, 0] - by_pair[1, 0]))) > 1e-4  # the pairs do differ
    assert float(jnp.max(jnp.abs(by_pair[0, 0] - by_pair[0, 1]))) > 1e-4


def test_vmap_over_masks_equals_a_loop_with_another_k(cnn, cnn_channels):
    """K = 29 condition sets in one call equal one call per set (K = 1: a second trace)."""
    stacked = cnn_channels[False]
    for k in (0, 4, 11, 27):
        single = cnn_conditioned(cnn, slice(k, k + 1), False)
        close(single.heatmap[0], stacked.heatmap[k], 1e-13)
        for key in CNN_CAPTURE:
            close(single.relevances[key][0], stacked.relevances[key][k], 1e-13)
        close(single.activations["conv_b"], stacked.activations["conv_b"], 0.0)


def test_batch_size_chunks_equal_all_at_once(cnn_channels, cnn):
    chunked = cnn_conditioned(cnn, slice(0, 5), True, batch_size=2)
    whole = cnn_channels[True]
    close(chunked.heatmap, whole.heatmap, 1e-13)
    for key in CNN_CAPTURE:
        close(chunked.relevances[key], whole.relevances[key], 1e-13)


def test_channel_concept_helpers():
    rng = np.random.default_rng(7)
    R = rng.normal(size=(2, 3, 3, 6))
    scores = CC.attribute(jnp.asarray(R))
    close(scores, R.sum((1, 2)), 1e-13)
    close(
        CC.attribute(jnp.asarray(R), abs_norm=True),
        R.sum((1, 2)) / np.abs(R.sum((1, 2))).sum(-1, keepdims=True),
        1e-9,
    )
    values, ids = CC.top_k(jnp.asarray(R), 2)
    order = np.argsort(-R.sum((1, 2)), axis=-1)[:, :2]
    np.testing.assert_array_equal(ids, order)
    close(values, np.take_along_axis(R.sum((1, 2)), order, -1), 1e-13)
    close(CC.masks([4, 1], (2, 3, 3, 6)), np.eye(6)[[4, 1]], 0.0)
    mid = concepts.ChannelConcept(axis=1)
    assert mid.masks([2], (2, 5, 7)).shape == (1, 5, 1)
    close(mid.attribute(jnp.asarray(R), batch_axes=1), R.sum((2, 3)), 1e-13)
    close(CC.attribute(jnp.asarray(R[None]), batch_axes=2), R.sum((1, 2))[None], 1e-13)
    heads = concepts.HeadConcept(3)
    close(heads.masks(None, (2, 4, 6)), np.repeat(np.eye(3), 2, axis=1), 0.0)
    close(heads.attribute(jnp.asarray(R)), R.reshape(2, 3, 3, 3, 2).sum((1, 2, 4)), 1e-13)
    with pytest.raises(UsageError):
        CC.masks([6], (2, 3, 3, 6))
    with pytest.raises(UsageError):
        concepts.HeadConcept(4).masks(None, (2, 4, 6))


# ------------------------------------------------------------------- residual net: linen and NNX twins


class TinyResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, name="stem")(x))
        x = jm.linen.BasicBlock(4, name="block1")(x)
        x = jm.linen.BasicBlock(6, strides=2, downsample=True, name="block2")(x)
        return nn.Dense(3, use_bias=False, name="fc")(jnp.mean(x, axis=(1, 2)))


class NNXTinyResNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        kw = {"param_dtype": jnp.float64, "rngs": rngs}
        self.stem = nnx.Conv(3, 4, (3, 3), use_bias=False, **kw)
        self.block1 = jm.nnx.BasicBlock(4, 4, **kw)
        self.block2 = jm.nnx.BasicBlock(4, 6, 2, True, **kw)
        self.fc = nnx.Linear(6, 3, use_bias=False, **kw)

    def __call__(self, x):
        x = nnx.relu(self.stem(x))
        x = self.block2(self.block1(x))
        return self.fc(jnp.mean(x, axis=(1, 2)))


def conservative_composite() -> composites.Composite:
    """Bias-free LRP: Epsilon(1e-12) on every layer with a kernel, Norm(1e-12) on adds, means, pools,
    relevance passing activations, BatchNorm merged into its convolution."""
    return composites.LayerMapComposite(
        composites.layer_map_base(1e-12) + ((types.Linear, rules.Epsilon(1e-12)),),
        canonizers=(MergeBatchNorm(),),
    )


RESNET_TARGET = np.array([1, 0])
BRANCH = "block2/conv2"  # inside block2's residual branch (6 channels)
CUT = "block1/@add_0"  # block1's residual add: all relevance passes it (4 channels)


@pytest.fixture(scope="module")
def resnet():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 8, 8, 3)))
    model = TinyResNet()
    variables = random_variables(model, x, seed=9, bias=False)  # BatchNorm mean and shift 0: bias-free
    explained = jlrp.explain(model, conservative_composite())
    plain = concepts.attribute(explained, variables, x, target=RESNET_TARGET, capture=EVERYTHING)
    return explained, variables, x, plain


@pytest.fixture(scope="module")
def nnx_resnet(resnet):
    _, variables, x, _ = resnet
    model = linen_to_nnx(nnx.eval_shape(lambda: NNXTinyResNet(nnx.Rngs(0))), variables)
    explained = jlrp.explain(model, conservative_composite())
    plain = concepts.attribute(explained, x, target=RESNET_TARGET, capture=EVERYTHING)
    return explained, plain


def check_conservation(relevances: dict, score: np.ndarray, blocks: dict[str, tuple[tuple, tuple]]) -> None:
    """Every captured output outside a residual block's parallel paths carries the score; in each block
    ``(branch taps, shortcut taps)`` the taps of one path carry one and the same share, and
    branch + shortcut = score where the shortcut has taps."""

    def total(key):
        return np.asarray(relevances[key]).reshape(len(score), -1).sum(1)

    parallel = {key for paths in blocks.values() for keys in paths for key in keys}
    for key in relevances:
        if key not in parallel:
            close(total(key), score, 1e-6, scale=1.0)
    for branch, shortcut in blocks.values():
        for keys in (branch, shortcut):
            for key in keys[1:]:
                close(total(key), total(keys[0]), 1e-6, scale=1.0)
        if shortcut:
            close(total(branch[0]) + total(shortcut[0]), score, 1e-6, scale=1.0)


RESNET_BLOCKS = {
    "block1": (tuple(f"block1/{name}" for name in ("conv1", "bn1", "@relu_0", "conv2", "bn2")), ()),
    "block2": (
        tuple(f"block2/{name}" for name in ("conv1", "bn1", "@relu_0", "conv2", "bn2")),
        ("block2/downsample_conv", "block2/downsample_bn"),
    ),
}


def test_conservation_by_layer_residual_net_linen_and_nnx(resnet, nnx_resnet):
    explained, variables, x, plain = resnet
    points = concepts.tap_points(explained, variables, x, capture=EVERYTHING)
    assert set(plain.relevances) == set(points) and len(points) == 22
    score = np.asarray(plain.output)[np.arange(2), RESNET_TARGET]
    shares = {
        k: np.asarray(plain.relevances[k]).reshape(2, -1).sum(1) for k in ("block1/conv1", "block2/conv1")
    }
    assert all(np.all(np.abs(s) > 1e-4) and np.all(np.abs(s - score) > 1e-4) for s in shares.values())
    for res in (plain, nnx_resnet[1]):
        check_conservation(res.relevances, score, RESNET_BLOCKS)
        close(res.heatmap.reshape(2, -1).sum(1), score, 1e-6, scale=1.0)


def test_nnx_capture_equals_linen(resnet, nnx_resnet):
    plain = resnet[-1]
    nnx_plain = nnx_resnet[1]
    assert set(nnx_plain.relevances) == set(plain.relevances)
    close(nnx_plain.output, plain.output, 1e-12)
    close(nnx_plain.heatmap, plain.heatmap, 1e-10)
    for key in plain.relevances:
        close(nnx_plain.relevances[key], plain.relevances[key], 1e-10)
        close(nnx_plain.activations[key], plain.activations[key], 1e-12)


@pytest.fixture(scope="module")
def resnet_conditioned(resnet):
    """Every channel and an all-zero mask, at the residual add of block1 (a cut) and at a convolution
    inside block2's branch, with and without exclude_parallel: ``{(path, exclusive): (heatmaps,
    relevances at the stem)}``. Non-exclusive, both layers go in one call (an all-ones mask filters
    nothing); exclusive, a second conditioned layer would change the stages, so one call each."""
    explained, variables, x, _ = resnet

    def call(conditions, exclusive):
        res = concepts.attribute(
            explained,
            variables,
            x,
            target=RESNET_TARGET,
            capture=["stem"],
            conditions=conditions,
            exclude_parallel=exclusive,
        )
        return res.heatmap, res.relevances["stem"]

    cut, branch = one_hot_masks(4, zero=True), one_hot_masks(6, zero=True)
    out = {(CUT, True): call({CUT: cut}, True), (BRANCH, True): call({BRANCH: branch}, True)}
    both = {
        CUT: np.concatenate([cut, np.ones((7, 4))]),
        BRANCH: np.concatenate([np.ones((5, 6)), branch]),
    }
    heatmap, stem = call(both, False)
    out[CUT, False] = heatmap[:5], stem[:5]
    out[BRANCH, False] = heatmap[5:], stem[5:]
    return out


def test_residual_net_sum_at_a_cut_equals_plain_in_both_modes(resnet, resnet_conditioned):
    plain = resnet[-1]
    for exclusive in (False, True):
        heatmap, stem = resnet_conditioned[CUT, exclusive]
        close(heatmap[:4].sum(0), plain.heatmap, 1e-10)
        close(stem[:4].sum(0), plain.relevances["stem"], 1e-10)
        close(heatmap[4], np.zeros(plain.heatmap.shape), 0.0)


def test_residual_net_sum_inside_a_branch_with_and_without_exclude_parallel(resnet, resnet_conditioned):
    plain = resnet[-1]
    exclusive = resnet_conditioned[BRANCH, True][0]
    filtered = resnet_conditioned[BRANCH, False][0]
    bypass = filtered[6]  # the all-zero mask: only what flows around the branch
    assert float(jnp.max(jnp.abs(bypass))) > 1e-3
    close(exclusive[6], np.zeros(bypass.shape), 0.0)
    close(exclusive[:6].sum(0) + bypass, plain.heatmap, 1e-10)
    close(filtered[:6].sum(0), plain.heatmap + 5 * bypass, 1e-10)
    # a channel's exclusive heatmap is its non-exclusive one without the bypass
    close(exclusive[:6], filtered[:6] - bypass, 1e-10)


def test_exclusive_chain_through_two_layers(resnet, resnet_conditioned):
    """exclude_parallel with block2's conv1 (upper, in the branch) and the stem (lower, a cut): summing the
    upper channels gives all of conv1 for that stem channel, and all pairs give what passes the branch."""
    explained, variables, x, plain = resnet
    pairs = [(u, s) for u in range(6) for s in range(4)]
    upper = np.concatenate([np.stack([np.eye(6)[u] for u, _ in pairs]), np.ones((4, 6))])
    lower = np.concatenate([np.stack([np.eye(4)[s] for _, s in pairs]), np.eye(4)])
    res = concepts.attribute(
        explained,
        variables,
        x,
        target=RESNET_TARGET,
        conditions={"block2/conv1": upper, "stem": lower},
        exclude_parallel=True,
    )
    by_pair = res.heatmap[:24].reshape(6, 4, *x.shape)
    close(by_pair.sum(0), res.heatmap[24:], 1e-10)
    through_branch = plain.heatmap - resnet_conditioned[BRANCH, False][0][6]
    close(by_pair.sum((0, 1)), through_branch, 1e-10)


def test_nnx_conditions_equal_linen(resnet, resnet_conditioned, nnx_resnet):
    _, _, x, _ = resnet
    explained = nnx_resnet[0]
    res = concepts.attribute(
        explained,
        x,
        target=RESNET_TARGET,
        capture=["stem"],
        conditions={BRANCH: one_hot_masks(6, zero=True)},
        exclude_parallel=True,
    )
    heatmap, stem = resnet_conditioned[BRANCH, True]
    close(res.heatmap, heatmap, 1e-10)
    close(res.relevances["stem"], stem, 1e-10)


# ------------------------------------------------------------------------------- VGG: linen and NNX


VGG_CFG = (4, "M", 6, "M")


def test_conservation_by_layer_vgg():
    """Every module and op output of a small bias-free VGG carries the score (NNX: the residual net)."""
    x = jnp.asarray(np.random.default_rng(10).normal(size=(2, 28, 28, 3)))
    model = jm.linen.VGG(VGG_CFG, num_classes=3, hidden_features=8)
    variables = random_variables(model, x, seed=11, bias=False)
    explained = jlrp.explain(model, conservative_composite())
    target = np.array([2, 1])
    res = concepts.attribute(explained, variables, x, target=target, capture=["**", "@*"])
    score = np.asarray(res.output)[np.arange(2), target]
    assert len(res.relevances) == 12, sorted(res.relevances)  # 8 modules (dropouts too), 4 ReLUs
    check_conservation(res.relevances, score, {})
    close(res.heatmap.reshape(2, -1).sum(1), score, 1e-6, scale=1.0)


# --------------------------------------------------------------------------------- attention heads

BERT = jm.BertConfig(
    vocab_size=30,
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=12,
    max_position_embeddings=8,
)
IDS = np.array([[2, 7, 11, 3, 9], [2, 5, 8, 3, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.int32)
HEADS = "layer_0/attention/@matmul_1"  # the probabilities times the values: one block per head


def normal_variables(model: nn.Module, *inputs, seed: int) -> dict:
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0.0, 0.4, s.shape)), shapes)


def test_bert_attention_heads_sum_to_the_plain_heatmap():
    """AttnLRP on a tiny BERT, conditioned on each head's attention output (``p v`` before the output
    projection): the heads' exclusive heatmaps plus what bypasses the attention (the residual) give the
    plain heatmap; the non-exclusive ones add the bypass once per head. The plain heatmap is the
    non-exclusive one with an all-ones mask (it filters nothing)."""
    model = jm.linen.Bert(BERT, param_dtype=jnp.float64)
    variables = normal_variables(model, IDS, MASK, seed=12)
    explained = jlrp.explain(model, composites.AttnLRP())
    point = concepts.tap_points(explained, variables, IDS, MASK, output=1, capture="**/@*")[HEADS]
    # linen's attention computes einsum('...hqk,...khd->...qhd'); the dot_general lays heads out on axis 1
    assert point.shape[:2] == (2, 2) and sorted(point.shape[2:]) == [4, 5]
    heads = concepts.ChannelConcept(axis=1).masks(None, point)
    kw = {"target": 3, "output": 1}
    exclusive = concepts.attribute(explained, variables, IDS, MASK, conditions={HEADS: heads}, **kw)
    filtered = concepts.attribute(
        explained,
        variables,
        IDS,
        MASK,
        conditions={HEADS: jnp.concatenate([heads, 0 * heads[:1], 1 + 0 * heads[:1]])},
        exclude_parallel=False,
        **kw,
    )
    bypass, plain = filtered.heatmap[2], filtered.heatmap[3]
    assert plain.shape == IDS.shape and float(jnp.max(jnp.abs(bypass - plain))) > 1e-3
    assert float(jnp.max(jnp.abs(exclusive.heatmap[0] - exclusive.heatmap[1]))) > 1e-3
    scale = float(jnp.max(jnp.abs(plain)))
    close(exclusive.heatmap.sum(0) + bypass, plain, 1e-6, scale=scale)
    close(filtered.heatmap[:2].sum(0), plain + bypass, 1e-6, scale=scale)


class ConcatHeads(nn.Module):
    """Self-attention returning the heads' outputs side by side, ``(N, T, heads * head_dim)``."""

    num_heads: int = 3
    head_dim: int = 2

    @nn.compact
    def __call__(self, x):
        shape = (self.num_heads, self.head_dim)
        q, k, v = (nn.DenseGeneral(shape, name=name)(x) for name in ("query", "key", "value"))
        out = nn.dot_product_attention(q, k, v)
        return out.reshape(*out.shape[:-2], -1)


class TinyAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(5, name="proj")(ConcatHeads(name="heads")(x))
        return nn.Dense(2, name="head")(jnp.mean(h, axis=1))


def test_head_concept_heatmaps_sum_to_the_plain_heatmap():
    """HeadConcept on an attention output laid out (N, T, heads * head_dim) that all relevance passes."""
    x = jnp.asarray(np.random.default_rng(13).normal(size=(2, 4, 5)))
    model = TinyAttention()
    variables = normal_variables(model, x, seed=14)
    explained = jlrp.explain(model, composites.AttnLRP())
    heads = concepts.HeadConcept(3)
    masks = jnp.concatenate([heads.masks(None, (2, 4, 6)), jnp.ones((1, 6))])  # each head, then all
    res = concepts.attribute(explained, variables, x, target=1, capture="heads", conditions={"heads": masks})
    _, plain = jlrp.attribute(explained, variables, x, target=1)
    close(res.heatmap[3], plain, 1e-12)
    close(res.heatmap[:3].sum(0), plain, 1e-6)
    assert float(jnp.max(jnp.abs(res.heatmap[0] - res.heatmap[2]))) > 1e-3
    # each head's share at its own layer: HeadConcept.attribute of the relevance arriving there
    per_head = heads.attribute(res.relevances["heads"][0])
    R = np.asarray(res.relevances["heads"][0]).reshape(2, 4, 3, 2)
    close(per_head, R.sum((1, 3)), 1e-13)


# -------------------------------------------------------------------------------------------- errors


class Inner(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return nn.relu(nn.Dense(3, name="dense")(x)), None


class WithRematAndScan(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.remat(Inner)(name="remat")(x)
        scan = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        x, _ = scan(name="scan")(x, None)
        return nn.Dense(2, name="head")(x)


def test_usage_errors(cnn):
    _, explained, variables, x, _ = cnn
    masks = CC.masks(None, (3, 4, 4, 5))

    def call(**kw):
        return concepts.attribute(explained, variables, x, target=CNN_TARGET, **kw)

    with pytest.raises(UsageError, match=r"conv_c.*conv_a, .*conv_b, .*fc"):
        call(capture=["conv_a", "conv_c*"])
    with pytest.raises(UsageError, match=r"conv_\*.*conv_a, .*conv_b"):
        call(conditions={"conv_*": masks})  # condition paths are exact, not globs
    with pytest.raises(UsageError, match="@avg_pool_0"):
        call(capture="@relu_9")  # op paths are listed too
    with pytest.raises(UsageError, match="conv_b"):
        call(conditions={"conv_b": np.ones((2, 4))})  # 4 channels for 5
    with pytest.raises(UsageError, match="conv_b"):
        call(conditions={"conv_b": np.ones((2, 1, 1, 1, 1, 5))})  # more axes than the output
    with pytest.raises(UsageError, match="leading axis"):
        call(conditions={"conv_b": np.float64(1.0)})
    with pytest.raises(UsageError, match="same number K"):
        call(conditions={"conv_b": masks, "conv_a": CC.masks([0, 1], (3, 8, 8, 4))})
    for bad in (0, -1, 1.5):
        with pytest.raises(UsageError, match="batch_size"):
            call(conditions={"conv_b": masks}, batch_size=bad)

    model = WithRematAndScan()
    xs = jnp.ones((2, 3))
    variables = normal_variables(model, xs, seed=15)
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon()})
    for path in ("remat/dense", "scan/dense"):
        with pytest.raises(UsageError, match=f"'{path}(#1)?' lies inside a scan, cond or checkpoint"):
            concepts.attribute(explained, variables, xs, target=0, capture=path)
        with pytest.raises(UsageError, match=f"'{path}(#1)?' lies inside a scan, cond or checkpoint"):
            concepts.attribute(explained, variables, xs, target=0, conditions={path: np.ones((1, 3))})
    res = concepts.attribute(explained, variables, xs, target=0, capture="head")  # outside: fine
    close(res.relevances["head"], res.output * np.eye(2)[0], 0.0)


# -------------------------------------------------------------------------------- attribution graph


def test_attribution_graph_by_hand(hand):
    """Two-layer LRP-0 net explaining both outputs (R_c = y_c): the edge out:0 -> hidden:j is
    ``sum_n h_nj w_j0``; a hidden node's own relevance is ``sum_n h_nj (w_j0 + w_j1)``."""
    explained, variables, _ = hand
    graph = concepts.attribution_graph(
        explained,
        variables,
        jnp.asarray(X_HAND),
        target=np.ones((3, 2)),
        concept=("out", 0),
        layers=["hidden"],
        k=2,
    )
    h = np.maximum(X_HAND @ W1, 0)
    edge = (h * W2[:, 0]).sum(0)
    top = np.argsort(-edge)[:2]
    assert graph.root == ("out", 0)
    assert graph.nodes[0] == concepts.GraphNode("out", 0, pytest.approx((h @ W2)[:, 0].sum(), abs=1e-12))
    assert [e.lower for e in graph.edges] == [("hidden", int(j)) for j in top]
    for e, j in zip(graph.edges, top):
        assert e.upper == ("out", 0) and e.relevance == pytest.approx(edge[j], abs=1e-12)
        assert graph.node("hidden", int(j)).relevance == pytest.approx(
            (h[:, j] * W2[j].sum()).sum(), abs=1e-12
        )
    assert graph.children("out", 0) == graph.edges
    assert f"out:0 -> hidden:{top[0]}" in graph.table()
    as_dict = graph.to_dict()
    assert as_dict["edges"][0] == {
        "upper": ["out", 0],
        "lower": ["hidden", int(top[0])],
        "relevance": graph.edges[0].relevance,
    }
    assert json.loads(json.dumps(as_dict)) == as_dict
    with pytest.raises(UsageError, match="k must be"):
        concepts.attribution_graph(
            explained, variables, X_HAND, target=0, concept=("out", 0), layers=["hidden"], k=0
        )
    with pytest.raises(UsageError, match="at least one layer"):
        concepts.attribution_graph(explained, variables, X_HAND, target=0, concept=("out", 0), layers=[])
    with pytest.raises(UsageError, match="hidden, out"):
        concepts.attribution_graph(
            explained, variables, X_HAND, target=0, concept=("out", 0), layers=["nope"]
        )


def test_attribution_graph_two_levels_equals_numpy(mlp):
    """d2 (output class 2) -> d1 -> d0 of the Epsilon MLP: every edge and node from the numpy chain
    (summed over the batch; the data have no ties among the top 2)."""
    explained, variables, x = mlp
    graph = concepts.attribution_graph(
        explained, variables, x, target=2, concept=("d2", 2), layers=["d1", "d0"], k=2
    )
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    xs = np.asarray(x)
    z0 = xs @ p["d0"]["kernel"] + p["d0"]["bias"]
    h0 = np.maximum(z0, 0)
    z1 = h0 @ p["d1"]["kernel"] + p["d1"]["bias"]
    h1 = np.maximum(z1, 0)
    z2 = h1 @ p["d2"]["kernel"] + p["d2"]["bias"]
    plain = numpy_mlp_relevances(variables, xs, np.full(4, 2), MLP_EPS)
    # R(d1_j | d2_2) and R(d0_i | d1_j): one upper neuron's relevance split by the Epsilon rule
    edge_1 = (h1 * p["d2"]["kernel"][:, 2] / eps_stab(z2[:, 2:3], MLP_EPS) * plain["d2"][:, 2:3]).sum(0)
    edge_0 = np.einsum("ni,ij,nj->ji", h0, p["d1"]["kernel"], plain["d1"] / eps_stab(z1, MLP_EPS))
    top_1 = [int(j) for j in np.argsort(-edge_1)[:2]]
    expected = [(("d2", 2), ("d1", j), edge_1[j]) for j in top_1]
    lower = []
    for j in top_1:
        for i in np.argsort(-edge_0[j])[:2]:
            expected.append((("d1", j), ("d0", int(i)), edge_0[j, i]))
            lower += [int(i)] if int(i) not in lower else []
    assert [(e.upper, e.lower) for e in graph.edges] == [(u, low) for u, low, _ in expected]
    close([e.relevance for e in graph.edges], [r for *_, r in expected], 1e-12)
    assert [(n.layer, n.concept) for n in graph.nodes] == [("d2", 2)] + [("d1", j) for j in top_1] + [
        ("d0", i) for i in lower
    ]
    close([n.relevance for n in graph.nodes[3:]], [plain["d0"][:, i].sum() for i in lower], 1e-12)
    close(graph.nodes[0].relevance, plain["d2"][:, 2].sum(), 1e-12)
