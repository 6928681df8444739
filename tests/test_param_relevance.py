"""Parameter relevance (``Rule.relevance_with_params``) against slow, obvious float64 references.

The reference writes every rule as connection shares, entry by entry in numpy (loops over the batch
``n``, inputs ``i`` and outputs ``j``): ``C[n, i, j] = weight * contrib(x_ni, w_ij) / stab(den_nj) * R_nj``
with ``den_nj = sum_i contrib(x_ni, w_ij) + bias_term(b_j)``, and the bias's share
``B[n, j] = weight * bias_term(b_j) / stab(den_nj) * R_nj``. The input relevance is ``sum_j C``, the
kernel relevance ``sum_n C`` (CRP, Achtibat et al. 2023; Yeom et al. 2021) and the bias relevance
``sum_n B``. Convolutions are viewed as dense (Toeplitz) matrices built from ``jax.jacobian`` of the
layer with one-hot kernels, which also map each Toeplitz entry back to the kernel entry it copies.

The rules run eagerly (the input's values pick the sign rules' path, as under apply_rule's proof of
non-negativity); one case runs under ``jax.jit`` with the proof, the way apply_rule traces it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rules import neg, pos, stab

from jlrp import core, rules
from jlrp.errors import RuleError

jax.config.update("jax_enable_x64", True)


# --------------------------------------------------------------------------------------------
# the reference


def _terms(rule, low, high):
    """The rule as groups ``(weight, route, contrib(x, w, i), bias_term(b), epsilon)``; ``route(z, R)``
    is the output relevance the group divides (Gamma splits it by the sign of the output)."""
    everywhere = lambda z, R: R  # noqa: E731
    no_bias = lambda b: 0.0  # noqa: E731
    zero = bool(rule.zero_params) if hasattr(rule, "zero_params") else False
    if isinstance(rule, (rules.Epsilon, rules.Norm)):
        eps = rule.epsilon if isinstance(rule, rules.Epsilon) else rule.stabilizer
        return [(1.0, everywhere, lambda x, w, i: x * w, no_bias if zero else (lambda b: b), eps)]
    eps = rule.stabilizer
    if isinstance(rule, (rules.ZPlus, rules.AlphaBeta)):
        alpha, beta = (1.0, 0.0) if isinstance(rule, rules.ZPlus) else (rule.alpha, rule.beta)
        groups = [
            (
                alpha,
                everywhere,
                lambda x, w, i: pos(x) * pos(w) + neg(x) * neg(w),
                no_bias if zero else pos,
                eps,
            )
        ]
        if beta:
            groups.append(
                (
                    -beta,
                    everywhere,
                    lambda x, w, i: pos(x) * neg(w) + neg(x) * pos(w),
                    no_bias if zero else neg,
                    eps,
                )
            )
        return groups
    if isinstance(rule, rules.Gamma):
        g = rule.gamma
        return [
            (
                1.0,
                lambda z, R: R if z > 0 else 0.0,
                lambda x, w, i: pos(x) * (w + g * pos(w)) + neg(x) * (w + g * neg(w)),
                no_bias if zero else (lambda b: b + g * pos(b)),
                eps,
            ),
            (
                1.0,
                lambda z, R: 0.0 if z > 0 else R,
                lambda x, w, i: pos(x) * (w + g * neg(w)) + neg(x) * (w + g * pos(w)),
                no_bias if zero else (lambda b: b + g * neg(b)),
                eps,
            ),
        ]
    if isinstance(rule, rules.ZBox):
        return [(1.0, everywhere, lambda x, w, i: x * w - low[i] * pos(w) - high[i] * neg(w), no_bias, eps)]
    if isinstance(rule, rules.WSquare):
        return [(1.0, everywhere, lambda x, w, i: w**2, no_bias if zero else (lambda b: b**2), eps)]
    if isinstance(rule, rules.Flat):
        return [(1.0, everywhere, lambda x, w, i: 1.0, no_bias, eps)]
    raise AssertionError(rule)


def shares_reference(rule, W, b, x, z, R, low=None, high=None):
    """Connection shares ``C`` (batch x in x out) and bias shares ``B`` (batch x out) of a dense layer ``x @ W + b``
    (``z`` its output, routing Gamma), written with explicit loops."""
    n_batch, n_in = x.shape
    n_out = W.shape[1]
    C, B = np.zeros((n_batch, n_in, n_out)), np.zeros((n_batch, n_out))
    for weight, route, contrib, bias_term, eps in _terms(rule, low, high):
        for n in range(n_batch):
            for j in range(n_out):
                den = bias_term(b[j])
                for i in range(n_in):
                    den += contrib(x[n, i], W[i, j], i)
                den = stab(den, eps)
                r = route(z[n, j], R[n, j])
                B[n, j] += weight * bias_term(b[j]) / den * r
                for i in range(n_in):
                    C[n, i, j] += weight * contrib(x[n, i], W[i, j], i) / den * r
    return C, B


def _close(got, expected, rtol=1e-10, what=""):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-300)
    assert np.abs(got - expected).max() <= rtol * scale, (what, np.abs(got - expected).max(), scale)


#: the layers (one input shape each, shared by all tests so that eager ops compile once)
LAYERS = {
    "dense": (lambda bias: nn.Dense(5, use_bias=bias), (3, 7)),
    "conv2d_s2_same": (
        lambda bias: nn.Conv(3, (3, 3), strides=2, padding="SAME", use_bias=bias),
        (2, 5, 5, 2),
    ),
    "depthwise": (
        lambda bias: nn.Conv(4, (3, 3), padding="SAME", feature_group_count=2, use_bias=bias),
        (2, 4, 4, 2),
    ),
    "convT2d": (lambda bias: nn.ConvTranspose(2, (3, 3), strides=(2, 2), use_bias=bias), (1, 3, 3, 2)),
}


def _case(name, seed=0, bias=True, non_negative=False):
    """``(layer, params, x, R)`` in float64: normal inputs (absolute values, an exact zero too, with
    ``non_negative``), kernel and bias, and an arbitrary output relevance."""
    make, shape = LAYERS[name]
    layer = make(bias)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape)
    if non_negative:
        x = np.abs(x)
        x.flat[0] = 0.0
    abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    params = {k: rng.normal(size=v.shape) / (2.0 if k == "kernel" else 1.0) for k, v in abstract.items()}
    if non_negative and bias:  # outputs of both signs (for Gamma's two groups)
        params["bias"] = params["bias"] - np.median(layer.apply({"params": params}, x))
    R = rng.normal(size=jax.eval_shape(layer.apply, {"params": params}, x).shape)
    return layer, params, jnp.asarray(x), jnp.asarray(R)


def _run(rule, layer, params, x, R, non_negative=False, jit=False):
    """``(rule.relevance_with_params(...), output)``, optionally under jit with the input known to be
    non-negative, as apply_rule traces a layer after a ReLU (the sign rules' fast path)."""
    layer_fn = lambda p, a: layer.apply({"params": p}, a)  # noqa: E731
    output = layer_fn(params, x)

    def call(p, a, r):
        return rule.relevance_with_params(layer_fn, p, a, layer_fn(p, a), r)

    with core.context_value(core._KNOWN_NON_NEGATIVE, non_negative):
        return (jax.jit(call) if jit else call)(params, x, R), output


# --------------------------------------------------------------------------------------------
# Dense: every rule

LOW, HIGH = (
    np.array([-2.0, -1.0, -3.0, -1.5, -2.5, -0.5, -1.0]),
    np.array([3.0, 1.0, 2.0, 2.5, 1.5, 0.5, 4.0]),
)

DENSE_RULES = [
    rules.Epsilon(),
    rules.Epsilon(epsilon=0.1),
    rules.Epsilon(epsilon=0.5, zero_params="bias"),
    rules.ZPlus(),
    rules.ZPlus(stabilizer=0.01, zero_params="bias"),
    rules.AlphaBeta(2.0, 1.0),
    rules.AlphaBeta(1.0, 0.0),
    rules.AlphaBeta(3.0, 2.0, zero_params="bias"),
    rules.Gamma(),
    rules.Gamma(gamma=1.0, zero_params="bias"),
    rules.ZBox(-2.0, 3.0),
    rules.ZBox(LOW, HIGH, stabilizer=1e-3),
    rules.WSquare(),
    rules.WSquare(zero_params="bias"),
    rules.Flat(),
    rules.Norm(stabilizer=0.01),
]

SIGN_RULES = [
    rules.ZPlus(),
    rules.AlphaBeta(2.0, 1.0),
    rules.AlphaBeta(1.0, 0.0),
    rules.Gamma(0.25),
    rules.Gamma(1.0),
]


def _check_dense(rule, layer, params, x, R, **run):
    (rx, rp), z = _run(rule, layer, params, x, R, **run)
    low = np.broadcast_to(np.asarray(getattr(rule, "low", 0.0)), x.shape[-1:])
    high = np.broadcast_to(np.asarray(getattr(rule, "high", 0.0)), x.shape[-1:])
    W, b = np.asarray(params["kernel"]), np.asarray(params["bias"])
    C, B = shares_reference(rule, W, b, np.asarray(x), np.asarray(z), np.asarray(R), low, high)
    assert set(rp) == {"kernel", "bias"}
    _close(rx, C.sum(2), what=f"{rule} R_x")
    _close(rp["kernel"], C.sum(0), what=f"{rule} R_kernel")
    if getattr(rule, "zero_params", None) or isinstance(rule, (rules.ZBox, rules.Flat)):
        np.testing.assert_array_equal(rp["bias"], 0.0)  # zeroed, cancelled (ZBox) or zero (Flat)
    else:
        _close(rp["bias"], B.sum(0), what=f"{rule} R_bias")


@pytest.mark.parametrize("seed", [0])
@pytest.mark.parametrize("rule", DENSE_RULES, ids=repr)
def test_dense_matches_reference(rule, seed):
    _check_dense(rule, *_case("dense", seed))


@pytest.mark.parametrize("rule", SIGN_RULES, ids=repr)
def test_dense_non_negative_inputs_fast_path(rule):
    """Eagerly (the values decide) and under jit with the input known to be >= 0 (as apply_rule does),
    the sign rules take their positive-only path (Gamma: its 3-pass regrouping)."""
    layer, params, x, R = _case("dense", 2, non_negative=True)
    z = layer.apply({"params": params}, x)
    assert (z > 0).any() and (z < 0).any()
    for run in [{}, {"jit": True, "non_negative": True}]:
        _check_dense(rule, layer, params, x, R, **run)


# --------------------------------------------------------------------------------------------
# convolutions: the dense reference on the Toeplitz matrix

CONV_RULES = [rules.Epsilon(), rules.ZPlus(), rules.Gamma(0.25), rules.Gamma(0.5, zero_params="bias")]


@functools.cache
def _kernel_maps(name):
    """``maps[k, i, o] = 1`` where output ``o`` of layer ``name`` reads input ``i`` through kernel entry
    ``k``: the Jacobians of the layer w.r.t. one sample's input, with one-hot kernels and zero bias."""
    layer, params, x, _ = _case(name)
    shape, kernel = x.shape[1:], params["kernel"]

    def jacobian(k):
        p = {"kernel": k.reshape(kernel.shape), "bias": jnp.zeros_like(params["bias"])}
        f = lambda v: layer.apply({"params": p}, v.reshape(shape)[None])[0].ravel()  # noqa: E731
        return jax.jacobian(f)(jnp.zeros(int(np.prod(shape)))).T

    maps = np.asarray(jax.jit(jax.vmap(jacobian))(jnp.eye(kernel.size)))
    assert set(np.unique(maps)) <= {0.0, 1.0} and maps.sum(0).max() == 1.0  # each connection: one entry
    return maps


@pytest.mark.parametrize("non_negative", [False, True])
@pytest.mark.parametrize("name", ["conv2d_s2_same", "depthwise"])
def test_conv_matches_toeplitz_reference(name, non_negative):
    layer, params, x, R = _case(name, 5, non_negative=non_negative)
    z = layer.apply({"params": params}, x)
    maps = _kernel_maps(name)
    W = np.einsum("k,kio->io", np.asarray(params["kernel"]).ravel(), maps)  # inputs x outputs
    channels = z.shape[-1]
    b = np.asarray(params["bias"])[np.arange(maps.shape[2]) % channels]  # NHWC: channel last
    flat = lambda a: np.asarray(a).reshape(a.shape[0], -1)  # noqa: E731
    # the dense view is the layer
    np.testing.assert_allclose(flat(x) @ W + b, flat(z), rtol=1e-12, atol=1e-12)
    for rule in CONV_RULES:
        (rx, rp), _ = _run(rule, layer, params, x, R)
        C, B = shares_reference(rule, W, b, flat(x), flat(z), flat(R))
        _close(flat(rx), C.sum(2), what=f"{rule} R_x")
        kernel_ref = np.einsum("kio,io->k", maps, C.sum(0)).reshape(params["kernel"].shape)
        _close(rp["kernel"], kernel_ref, what=f"{rule} R_kernel")
        bias_ref = np.bincount(np.arange(b.size) % channels, weights=B.sum(0), minlength=channels)
        if rule.zero_params:
            np.testing.assert_array_equal(rp["bias"], 0.0)
        else:
            _close(rp["bias"], bias_ref, what=f"{rule} R_bias")


# --------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("name", list(LAYERS))
def test_lrp0_kernel_relevance_is_input_relevance_and_conserves_with_bias(name):
    layer, params, x, R = _case(name, 11, bias=False)
    (rx, rp), _ = _run(rules.Epsilon(epsilon=0.0), layer, params, x, R)
    assert set(rp) == {"kernel"} and rp["kernel"].shape == params["kernel"].shape
    _close(jnp.sum(rp["kernel"]), jnp.sum(rx), what="bias-free: sum R_kernel == sum R_x")
    _close(jnp.sum(rx), jnp.sum(R), rtol=1e-9, what="bias-free LRP-0 conserves")

    layer, params, x, R = _case(name, 11, bias=True)
    (rx, rp), _ = _run(rules.Epsilon(epsilon=0.0), layer, params, x, R)
    assert abs(float(jnp.sum(rp["bias"]))) > 1e-3  # the bias does absorb relevance here
    _close(jnp.sum(rp["kernel"]) + jnp.sum(rp["bias"]), jnp.sum(R), rtol=1e-9, what="LRP-0 with bias")
    _close(jnp.sum(rp["kernel"]), jnp.sum(rx), what="with bias: sum R_kernel == sum R_x")


#: one rule per code path (fast and generic Epsilon, sign split, Gamma's paths, the BasicRule ones)
PATH_RULES = [
    rules.Epsilon(),
    rules.Epsilon(epsilon=0.5, zero_params="bias"),
    rules.ZPlus(),
    rules.AlphaBeta(2.0, 1.0),
    rules.Gamma(),
    rules.Gamma(gamma=1.0, zero_params="bias"),
    rules.ZBox(-2.0, 3.0),
    rules.WSquare(),
    rules.Flat(),
    rules.Norm(),
]


@pytest.mark.parametrize("name", ["conv2d_s2_same", "convT2d"])
def test_every_rule_gives_its_input_relevance_to_the_kernel(name):
    """Both sides sum the same connection shares (over outputs, resp. over batch and positions)."""
    layer, params, x, R = _case(name, 12)
    for rule in PATH_RULES:
        (rx, rp), _ = _run(rule, layer, params, x, R)
        _close(jnp.sum(rp["kernel"]), jnp.sum(rx), rtol=1e-9, what=str(rule))


# --------------------------------------------------------------------------------------------
# the API around it


def test_rules_without_parameters_raise():
    x = jnp.ones((2, 3))
    for rule in [rules.Pass(), rules.ReLUBetaSmooth(), rules.Softmax()]:
        with pytest.raises(RuleError, match=r"defines no parameter relevance.*Epsilon.*ZPlus"):
            rule.relevance_with_params(lambda p, a: jax.nn.relu(a), {}, x, x, x)


def _spy(flags):
    """Identity on the parameters whose backward records that parameters were differentiated."""

    @jax.custom_vjp
    def spy(p):
        return p

    def bwd(_, g):
        flags.append(True)
        return (g,)

    spy.defvjp(lambda p: (p, None), bwd)
    return spy


@pytest.mark.parametrize("rule", PATH_RULES, ids=repr)
def test_backward_does_no_parameter_work(rule):
    """``backward`` differentiates w.r.t. the input only; ``relevance_with_params`` gives the same R_x."""
    layer, params, x, R = _case("dense", 3)
    flags = []
    spy = _spy(flags)
    layer_fn = lambda p, a: layer.apply({"params": spy(p)}, a)  # noqa: E731
    for xs in [x, jnp.abs(x)]:
        z = layer_fn(params, xs)
        relevance = rule.backward(layer_fn, params, xs, z, R)
        assert not flags, rule
        rx, rp = rule.relevance_with_params(layer_fn, params, xs, z, R)
        assert flags, rule
        flags.clear()
        _close(rx, relevance, rtol=1e-12, what=str(rule))


def test_param_relevance_keeps_shapes_and_dtypes():
    layer, params, x, R = _case("dense")
    params, x, R = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), (params, x, R))
    for rule in [rules.Epsilon(), rules.ZBox(-3.0, 3.0)]:
        (rx, rp), _ = _run(rule, layer, params, x, R)
        assert rx.dtype == jnp.float32
        got = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), rp)
        assert got == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params), rule
    # a parameter-free op under Norm: an empty parameter relevance
    pool = lambda p, a: a[:, :6].reshape(3, 3, 2).mean(-1)  # noqa: E731
    y = pool({}, x)
    rx, rp = rules.Norm().relevance_with_params(pool, {}, x, y, y)
    assert rp == {} and rx.shape == x.shape


def test_a_rule_that_overrides_backward_has_no_parameter_relevance():
    @core.rule_dataclass
    class Halved(core.BasicRule):
        def gradient_mapper(self, relevance, outputs, output):
            return [relevance / outputs[0]]

        def backward(self, layer_fn, params, x, output, relevance):
            return 0.5 * super().backward(layer_fn, params, x, output, relevance)

    params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
    x = jnp.ones((1, 3))
    layer = lambda p, a: a @ p["kernel"] + p["bias"]  # noqa: E731
    with pytest.raises(RuleError, match="overrides backward"):
        Halved().relevance_with_params(layer, params, x, layer(params, x), jnp.ones((1, 2)))
