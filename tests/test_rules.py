"""Every rule against a slow, obvious float64 reference.

The reference views a layer as a dense matrix: ``W = jacobian(layer)(x)`` (an ``in x out`` matrix)
and ``b = layer(x) - x @ W``; each rule's formula is then written with explicit connection
contributions ``c_ij`` and sums, independently of jlrp's implementation (which never builds the
matrix). Layers: Dense, Conv 1-D/2-D/3-D (with stride and padding) and a transposed convolution,
with and without bias, over several seeds and hyper-parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import rules
from jlrp.core import Stabilizer, stabilize


def stab(z, eps):
    """Reference stabiliser: z + eps * sign(z), sign(0) = +1."""
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def pos(a):
    return np.maximum(a, 0)


def neg(a):
    return np.minimum(a, 0)


def lrp(contrib, denom, relevance):
    """R_i = sum_j contrib_ij / denom_j * R_j."""
    return (contrib / denom[None, :] * relevance[None, :]).sum(1)


def reference(rule, W, b, x, z, R, W_ones):
    """The relevance of the input by each rule's textbook formula (1-D flattened arrays)."""
    xc = x[:, None]
    if isinstance(rule, rules.Epsilon):
        b = 0 * b if rule.zero_params else b
        c = xc * W
        return lrp(c, stab(c.sum(0) + b, rule.epsilon), R)
    if isinstance(rule, rules.Norm):
        c = xc * W
        return lrp(c, stab(c.sum(0) + b, rule.stabilizer), R)
    bp, bn = (0 * b, 0 * b) if rule.zero_params else (pos(b), neg(b))
    if isinstance(rule, (rules.ZPlus, rules.AlphaBeta)):
        alpha, beta = (1.0, 0.0) if isinstance(rule, rules.ZPlus) else (rule.alpha, rule.beta)
        p = pos(xc) * pos(W) + neg(xc) * neg(W)
        n = pos(xc) * neg(W) + neg(xc) * pos(W)
        out = alpha * lrp(p, stab(p.sum(0) + bp, rule.stabilizer), R)
        if beta:
            out = out - beta * lrp(n, stab(n.sum(0) + bn, rule.stabilizer), R)
        return out
    if isinstance(rule, rules.Gamma):
        g = rule.gamma
        b0 = 0 * b if rule.zero_params else b
        u = pos(xc) * (W + g * pos(W)) + neg(xc) * (W + g * neg(W))
        d = pos(xc) * (W + g * neg(W)) + neg(xc) * (W + g * pos(W))
        up = lrp(u, stab(u.sum(0) + b0 + g * bp, rule.stabilizer), np.where(z > 0, R, 0))
        down = lrp(d, stab(d.sum(0) + b0 + g * bn, rule.stabilizer), np.where(z > 0, 0, R))
        return up + down
    if isinstance(rule, rules.ZBox):
        low = np.broadcast_to(np.asarray(rule.low), x.shape)[:, None]
        high = np.broadcast_to(np.asarray(rule.high), x.shape)[:, None]
        c = xc * W - low * pos(W) - high * neg(W)
        return lrp(c, stab(c.sum(0), rule.stabilizer), R)
    if isinstance(rule, rules.WSquare):
        b2 = 0 * b if rule.zero_params else b**2
        c = W**2
        return lrp(c, stab(c.sum(0) + b2, rule.stabilizer), R)
    if isinstance(rule, rules.Flat):
        c = W_ones
        return lrp(c, stab(c.sum(0), rule.stabilizer), R)
    raise AssertionError(rule)


LAYERS = {
    "dense": (lambda bias: nn.Dense(5, use_bias=bias), (2, 7)),
    "conv1d": (lambda bias: nn.Conv(3, (3,), strides=2, padding="SAME", use_bias=bias), (2, 9, 2)),
    "conv2d": (lambda bias: nn.Conv(3, (3, 3), padding=((1, 0), (0, 1)), use_bias=bias), (2, 5, 5, 2)),
    "conv3d": (lambda bias: nn.Conv(2, (2, 2, 2), strides=(1, 2, 1), use_bias=bias), (1, 4, 4, 3, 2)),
    "convT2d": (lambda bias: nn.ConvTranspose(2, (3, 3), strides=(2, 2), use_bias=bias), (1, 3, 3, 2)),
}

RULES = [
    rules.Epsilon(),
    rules.Epsilon(epsilon=0.1),
    rules.Epsilon(epsilon=1.0, zero_params="bias"),
    rules.ZPlus(),
    rules.ZPlus(stabilizer=0.01, zero_params="bias"),
    rules.AlphaBeta(1.0, 0.0),
    rules.AlphaBeta(2.0, 1.0),
    rules.AlphaBeta(3.0, 2.0, zero_params=["bias"]),
    rules.Gamma(),
    rules.Gamma(gamma=1.0),
    rules.Gamma(gamma=0.5, zero_params="bias"),
    rules.ZBox(-2.0, 3.0),
    rules.ZBox(-1.5, 2.5, stabilizer=1e-3),
    rules.WSquare(),
    rules.WSquare(zero_params="bias"),
    rules.Flat(),
]


def _layer_case(name, bias, seed):
    make, shape = LAYERS[name]
    layer = make(bias)
    kx, kp, kb, kr = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, shape, dtype=jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), layer.init(kp, x)["params"])
    if bias:  # non-zero biases of both signs
        params = {**params, "bias": jax.random.normal(kb, params["bias"].shape, dtype=jnp.float64)}
    return layer, {"params": params}, x, kr


def _dense_view(layer, variables, x):
    """W (in x out) and b of the layer around one sample, by jax.jacobian."""

    def f(xs):
        return layer.apply(variables, xs[None])[0].ravel()

    x0 = x[0]
    J = np.asarray(jax.jacobian(lambda v: f(v.reshape(x0.shape)))(x0.ravel()))  # out x in
    z = np.asarray(f(x0))
    b = z - J @ np.asarray(x0).ravel()
    ones = jax.tree_util.tree_map(jnp.ones_like, variables)
    J1 = np.asarray(
        jax.jacobian(lambda v: layer.apply(ones, v.reshape(x0.shape)[None])[0].ravel())(x0.ravel())
    )
    return J.T, b, z, (J1 != 0).astype(np.float64).T


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_rule_matches_reference(layer_name, bias, seed):
    layer, variables, x, kr = _layer_case(layer_name, bias, seed)
    W, b, z, W1 = _dense_view(layer, variables, x)
    out_shape = layer.apply(variables, x).shape
    R = jax.random.normal(kr, out_shape, dtype=jnp.float64)
    for rule in RULES:
        explained = jlrp.explain(layer, {type(layer): rule})
        y, pullback = jax.vjp(lambda v: explained(variables, v), x)
        (relevance,) = pullback(R)
        np.testing.assert_allclose(y, layer.apply(variables, x), rtol=1e-12, atol=1e-12)
        expected = reference(rule, W, b, np.asarray(x[0]).ravel(), z, np.asarray(R[0]).ravel(), W1)
        got = np.asarray(relevance[0]).ravel()
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-10 * max(scale, 1.0), (rule, layer_name)


def test_zbox_per_channel_and_per_sample_bounds():
    layer, variables, x, kr = _layer_case("conv2d", True, 3)
    R = jax.random.normal(kr, layer.apply(variables, x).shape, dtype=jnp.float64)
    low_c, high_c = np.array([-1.0, -2.0]), np.array([2.0, 1.5])
    per_sample_low = (
        np.broadcast_to(np.asarray(x.min() - 1.0), x.shape) + 0.1 * np.arange(x.shape[0])[:, None, None, None]
    )
    for low, high in [(low_c, high_c), (per_sample_low, per_sample_low + 5.0)]:
        explained = jlrp.explain(layer, {nn.Conv: rules.ZBox(low, high)})
        _, pullback = jax.vjp(lambda v: explained(variables, v), x)
        (relevance,) = pullback(R)
        for n in range(x.shape[0]):
            W, b, z, W1 = _dense_view(layer, variables, x[n : n + 1])
            sample_rule = rules.ZBox(
                np.broadcast_to(low, x.shape)[n].ravel(), np.broadcast_to(high, x.shape)[n].ravel()
            )
            expected = reference(sample_rule, W, b, np.asarray(x[n]).ravel(), z, np.asarray(R[n]).ravel(), W1)
            np.testing.assert_allclose(np.asarray(relevance[n]).ravel(), expected, rtol=1e-9, atol=1e-12)


def test_norm_on_parameter_free_avg_pool_layer():
    from jlrp.layers import AvgPool

    pool = AvgPool((2, 2), strides=(2, 2))
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 2), dtype=jnp.float64)
    R = jax.random.normal(jax.random.PRNGKey(1), (1, 2, 2, 2), dtype=jnp.float64)
    explained = jlrp.explain(pool, {AvgPool: rules.Norm()})
    _, pullback = jax.vjp(lambda v: explained({}, v), x)
    (relevance,) = pullback(R)
    W, b, z, W1 = _dense_view(pool, {}, x)
    expected = reference(rules.Norm(), W, 0 * b, np.asarray(x[0]).ravel(), z, np.asarray(R[0]).ravel(), W1)
    np.testing.assert_allclose(np.asarray(relevance[0]).ravel(), expected, rtol=1e-10, atol=1e-12)


ELEMENTWISE_CASES = [
    (rules.Pass(), lambda x, R: R),
    (rules.ReLUDeconvNet(), lambda x, R: np.maximum(R, 0)),
    (rules.ReLUGuidedBackprop(), lambda x, R: np.maximum(R * (x > 0), 0)),
    (rules.ReLUBetaSmooth(beta_smooth=3.0), lambda x, R: R / (1 + np.exp(-3.0 * x))),
]

#: every rule class that has a float64 reference above (test_registry checks it is all of them)
REFERENCED = {type(r) for r in RULES} | {type(r) for r, _ in ELEMENTWISE_CASES} | {rules.Norm}


@pytest.mark.parametrize("rule, expected", ELEMENTWISE_CASES)
def test_elementwise_rules(rule, expected):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 6), dtype=jnp.float64)
    R = jax.random.normal(jax.random.PRNGKey(1), (3, 6), dtype=jnp.float64)
    y, pullback = jax.vjp(lambda v: rule(lambda p, a: jax.nn.relu(a), {}, v), x)
    np.testing.assert_array_equal(y, jax.nn.relu(x))
    np.testing.assert_allclose(pullback(R)[0], expected(np.asarray(x), np.asarray(R)), rtol=1e-12)


def _hand_dense():
    layer = nn.Dense(1)
    variables = {"params": {"kernel": jnp.array([[1.0], [-1.0]]), "bias": jnp.array([-1.0])}}
    return layer, variables, jnp.array([[1.0, 1.0]])


@pytest.mark.parametrize(
    "rule, expected", [(rules.AlphaBeta(1.0, 0.0), [-1.0, 0.0]), (rules.AlphaBeta(2.0, 1.0), [-2.0, 0.5])]
)
def test_design_hand_example(rule, expected):
    """DESIGN.md section 5: W=[[1,-1]], b=[-1], x=[1,1], relevance = output."""
    layer, variables, x = _hand_dense()
    explained = jlrp.explain(layer, {nn.Dense: rule})
    y, pullback = jax.vjp(lambda v: explained(variables, v), x)
    np.testing.assert_allclose(pullback(y)[0][0], expected, rtol=1e-5)
    exact = jlrp.explain(layer, {nn.Dense: rules.AlphaBeta(rule.alpha, rule.beta, stabilizer=0.0)})
    y, pullback = jax.vjp(lambda v: exact(variables, v), x)
    np.testing.assert_array_equal(pullback(y)[0][0], expected)


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (-1.0, -2.0), (2.0, 0.5), (0.5, -0.5)])
def test_alpha_beta_validation(alpha, beta):
    with pytest.raises(ValueError, match="AlphaBeta"):
        rules.AlphaBeta(alpha, beta)


def test_stabilize_semantics():
    z = jnp.array([-2.0, -1e-9, 0.0, 1e-9, 3.0])
    np.testing.assert_allclose(stabilize(z, 0.1), [-2.1, -0.1 - 1e-9, 0.1, 0.1 + 1e-9, 3.1])
    np.testing.assert_allclose(stabilize(z, 0.1, clip=True), [-2.0, -0.1, 0.1, 0.1, 3.0])
    zb = jnp.array([[3.0, -4.0], [0.0, 1.0]])
    rms = np.sqrt(np.array([12.5, 0.5]))[:, None]
    np.testing.assert_allclose(stabilize(zb, 0.1, norm_scale=True), zb + 0.1 * rms * np.where(zb >= 0, 1, -1))
    assert Stabilizer(0.1, norm_scale=True, dim=1)(zb).shape == zb.shape
    assert Stabilizer.ensure(0.5) == Stabilizer(0.5)
    with pytest.raises(TypeError):
        Stabilizer.ensure("0.5")


def test_epsilon_accepts_a_stabilizer_callable():
    layer, variables, x, kr = _layer_case("dense", True, 0)
    R = jax.random.normal(kr, (2, 5), dtype=jnp.float64)
    got = []
    for epsilon in [0.25, Stabilizer(0.25), lambda z: stabilize(z, 0.25)]:
        explained = jlrp.explain(layer, {nn.Dense: rules.Epsilon(epsilon=epsilon)})
        _, pullback = jax.vjp(lambda v: explained(variables, v), x)
        got.append(pullback(R)[0])
    np.testing.assert_allclose(got[0], got[1], rtol=1e-14)
    np.testing.assert_allclose(got[0], got[2], rtol=1e-14)


def test_rules_are_hashable_values():
    assert rules.Epsilon(0.1) == rules.Epsilon(0.1) and hash(rules.Epsilon(0.1)) == hash(rules.Epsilon(0.1))
    assert rules.Epsilon(0.1) != rules.Epsilon(0.2)
    assert rules.ZBox(np.zeros(3), 1.0) == rules.ZBox(np.zeros(3), 1.0)
    assert rules.ZBox(np.zeros(3), 1.0) != rules.ZBox(np.ones(3), 1.0)
    assert len({rules.ZPlus(), rules.ZPlus(), rules.AlphaBeta(1.0, 0.0)}) == 2
    assert rules.Epsilon(zero_params="weight").zero_params == ("kernel",)
    with pytest.raises(dataclasses_frozen_error()):
        rules.Epsilon().epsilon = 3.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


SIGN_RULES = [
    rules.ZPlus(),
    rules.AlphaBeta(2.0, 1.0),
    rules.Gamma(0.5),
    rules.Gamma(0.25),
    rules.Gamma(1.0, zero_params="bias"),
]


@pytest.mark.parametrize("layer_name", ["dense", "conv2d", "convT2d"])
@pytest.mark.parametrize("jit", [False, True])
def test_sign_rules_on_non_negative_inputs(layer_name, jit):
    """Inputs after a ReLU take the rules' positive-only branch; it must equal the full formula."""
    layer, variables, x, kr = _layer_case(layer_name, True, 4)
    x = jnp.abs(x).at[0, 0].set(0.0)  # an exact zero too: it counts as non-negative
    z = layer.apply(variables, x)  # shift the bias so that outputs of both signs occur
    variables = {"params": {**variables["params"], "bias": variables["params"]["bias"] - jnp.median(z)}}
    assert (layer.apply(variables, x)[0] > 0).any() and (layer.apply(variables, x)[0] < 0).any()
    W, b, z, W1 = _dense_view(layer, variables, x)
    R = jax.random.normal(kr, layer.apply(variables, x).shape, dtype=jnp.float64)
    for rule in SIGN_RULES:
        explained = jlrp.explain(layer, {type(layer): rule})
        relevance_of = lambda v, r: jax.vjp(lambda a: explained(variables, a), v)[1](r)[0]
        relevance = (jax.jit(relevance_of) if jit else relevance_of)(x, R)
        expected = reference(rule, W, b, np.asarray(x[0]).ravel(), z, np.asarray(R[0]).ravel(), W1)
        np.testing.assert_allclose(
            np.asarray(relevance[0]).ravel(), expected, rtol=1e-10, atol=1e-12, err_msg=str(rule)
        )
