"""Never silently wrong: every op on the relevance path is classified (issue "Never silently wrong").

Each model below is a small reproduction of a kind of public Flax code. The property checked is
conservation with bias-free Epsilon in float64: every rule on the path then conserves relevance, so
the sum of the input relevance must equal the explained score. Models get zero biases (and zero
BatchNorm/LayerNorm shifts), which is what "bias-free" means; each test says so.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import composites, rules
from jlrp.errors import CoverageError, JlrpWarning

EPS = 1e-12


def bias_free_epsilon() -> composites.Composite:
    """Epsilon on every linear layer, Norm on every linear op, Pass on activations; tiny stabilisers."""
    return composites.EpsilonPlus(
        epsilon=EPS, stabilizer=EPS, layer_map=((jlrp.types.Convolution, rules.Epsilon(EPS)),)
    )


def zero_shifts(variables):
    """Zero every bias/shift (Dense/Conv biases, norm biases, BatchNorm means): the bias-free setting."""

    def zero(path, a):
        key = jax.tree_util.keystr(path)
        return jnp.zeros_like(a) if ("bias" in key or "'mean'" in key) else jnp.asarray(a, jnp.float64)

    return jax.tree_util.tree_map_with_path(zero, variables)


def init(model, x, seed=0, **kwargs):
    variables = model.init(jax.random.PRNGKey(seed), x, **kwargs)
    return zero_shifts(variables)


def conservation(model, variables, x, target=0, composite=None, **kwargs):
    """``sum(relevance) / score`` for the class ``target`` of the first sample, and the warnings."""
    explained = jlrp.explain(model, composite or bias_free_epsilon())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, vjp = jax.vjp(lambda a: explained(variables, a, **kwargs), x)
        (relevance,) = vjp(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype))
    score = float(jnp.sum(y[..., target]))
    return float(jnp.sum(relevance)) / score, [str(w.message) for w in caught if w.category is JlrpWarning]


def assert_conserves(model, x, **kwargs):
    variables = init(model, x)
    ratio, warned = conservation(model, variables, x, **kwargs)
    assert warned == []
    assert ratio == pytest.approx(1.0, abs=1e-6)
    report = jlrp.audit(jlrp.explain(model, bias_free_epsilon()), variables, x)
    assert report.uncovered == ()
    return report


# ----------------------------------------------------------------------------------------------
# the table, row by row


class _Act(nn.Module):
    act: object

    @nn.compact
    def __call__(self, x):
        ones = nn.initializers.ones
        h = nn.Dense(1, use_bias=False, kernel_init=ones)(x)
        return nn.Dense(1, use_bias=False, kernel_init=ones)(self.act(h))


@pytest.mark.parametrize(
    "act, x, expected",
    [
        (nn.tanh, 1.0, np.tanh(1.0)),  # was 0.320: tanh kept its gradient
        (nn.elu, -1.0, np.exp(-1.0) - 1.0),  # was -0.233
        (
            nn.gelu,
            1.0,
            1.0 / (1.0 + np.exp(-1.5957691216057308 * (1 + 0.044715))),
        ),  # tanh form: x*sigmoid(...)/x
        (nn.silu, 2.0, 2.0 / (1.0 + np.exp(-2.0))),
        (nn.softplus, 0.5, np.log1p(np.exp(0.5))),
        (nn.hard_swish, 1.0, 1.0 * min(max(1.0 + 3.0, 0.0), 6.0) / 6.0),
    ],
)
def test_activations_pass_relevance_like_zennit(act, x, expected):
    """zennit's base map puts Pass on every activation: the relevance of ``x`` is the output itself."""
    model = _Act(act)
    x = jnp.array([[x]], jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=EPS))
    y, vjp = jax.vjp(lambda a: explained(variables, a), x)
    (relevance,) = vjp(y)
    if act is nn.gelu:
        expected = float(y[0, 0])  # gelu's tanh form, whatever its constants: R = output
        assert y[0, 0] == pytest.approx(0.8411919906082768, rel=1e-12)
    assert float(relevance[0, 0]) == pytest.approx(expected, rel=1e-9)
    ops = [r for r in jlrp.audit(explained, variables, x).rows if r[0].startswith("@")]
    assert [(p, k) for p, k, *_ in ops] == [("@activation_0", "Activation")], ops  # one unit, Pass


def test_gelu_inner_add_is_not_a_residual():
    report = jlrp.audit(jlrp.explain(_Act(nn.gelu), "epsilon_plus"), *_act_setup(_Act(nn.gelu)))
    text = str(report)
    assert "@add" not in text and "Pass()" in text


def _act_setup(model):
    x = jnp.ones((1, 1), jnp.float64)
    return model.init(jax.random.PRNGKey(0), x), x


def test_layernorm_holds_the_std_constant():
    """``[1, 2] -> LayerNorm -> Dense([1, 0])``: logit -1, relevance sums to -1 (was 0)."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.LayerNorm(epsilon=0.0)(x)
            return nn.Dense(1, use_bias=False, kernel_init=lambda *_: jnp.array([[1.0], [0.0]]))(h)

    model = M()
    x = jnp.array([[1.0, 2.0]], jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=EPS, stabilizer=EPS))
    y, vjp = jax.vjp(lambda a: explained(variables, a), x)
    (relevance,) = vjp(y)
    assert float(y[0, 0]) == pytest.approx(-1.0)
    assert float(relevance.sum()) == pytest.approx(-1.0, abs=1e-9)
    # the float64 reference of the rule: Epsilon on the layer with 1/std frozen at its value
    # R_j = x_j * sum_i J_ij R_i / y_i with J = (I - 1/N) / std
    xv = np.array([1.0, 2.0])
    std = xv.std()
    out = (xv - xv.mean()) / std
    r_out = np.array([-1.0, 0.0])  # Dense([1, 0]) with Epsilon: R = out * w / y * y
    jac = (np.eye(2) - 0.5) / std
    reference = xv * (jac.T @ np.divide(r_out, out))
    np.testing.assert_allclose(relevance[0], reference, rtol=1e-9, atol=1e-12)


def test_broadcasting_add_of_two_activations():
    """``h + h.mean(1, keepdims=True)``: Norm over the broadcast operands (was a bare ValueError)."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4, use_bias=False)(x)
            h = h + h.mean(1, keepdims=True)
            return nn.Dense(3, use_bias=False)(h.reshape(h.shape[0], -1))

    report = assert_conserves(M(), jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4), jnp.float64))
    assert "@add_0" in str(report) and ("@mean_0" in str(report) or "@sum_0" in str(report))


# ----------------------------------------------------------------------------------------------
# control flow: rules inside nn.remat, nn.scan, jax.checkpoint and lax.scan


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(4, use_bias=False)(nn.relu(nn.Dense(4, use_bias=False)(x)))


class _RematStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(3):
            x = nn.remat(_Block)()(x)
        return nn.Dense(2, use_bias=False)(x)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return _Block()(x), None


class _ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan()(x, None)
        return nn.Dense(2, use_bias=False)(x)


class _LaxScanStack(nn.Module):
    """Stacked weights applied with ``jax.lax.scan`` and ``jax.checkpoint`` (no modules inside)."""

    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", nn.initializers.normal(0.5), (3, 4, 4))
        w2 = self.param("w2", nn.initializers.normal(0.5), (3, 4, 4))

        @jax.checkpoint
        def step(h, ws):
            a, b = ws
            return h + jnp.tanh(h @ a) @ b, None

        x, _ = jax.lax.scan(step, x, (w1, w2))
        return nn.Dense(2, use_bias=False)(x)


@pytest.mark.parametrize(
    "model", [_RematStack(), _ScanStack(), _LaxScanStack()], ids=["remat", "scan", "lax_scan"]
)
def test_rules_apply_inside_remat_and_scan(model):
    """Residual adds inside remat/scan bodies get Norm (sum of relevance / score was -18 ... 104)."""
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4), jnp.float64)
    report = assert_conserves(model, x)
    assert "@add_0" in str(report) and "Norm" in str(report)


def test_cond_branches_are_interpreted():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x, flag):
            h = nn.Dense(4, use_bias=False)(x)
            h = jax.lax.cond(flag, lambda a: a + nn.relu(a) * 0.5, lambda a: a, h)
            return nn.Dense(2, use_bias=False)(h)

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3), jnp.float64)
    model = M()
    variables = init(model, x, flag=True)
    ratio, warned = conservation(model, variables, x, flag=jnp.array(True))
    assert warned == [] and ratio == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# architectures from public Flax code, in small


class _MlpBlock(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.dim)(x)))


class _Mixer(nn.Module):
    """MLP-Mixer (google-research/vision_transformer): token mixing over a transposed axis."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (2, 2), strides=(2, 2))(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        for _ in range(2):
            y = nn.LayerNorm()(x)
            y = jnp.swapaxes(y, 1, 2)
            y = _MlpBlock(6)(y)
            x = x + jnp.swapaxes(y, 1, 2)
            x = x + _MlpBlock(16)(nn.LayerNorm()(x))
        x = nn.LayerNorm()(x)
        return nn.Dense(5)(x.mean(axis=1))


class _ConvWrapper(nn.Module):
    """A third-party conv module (not an nn.Conv subclass) with same-padding logic, as in efficientnet-jax."""

    features: int
    kernel: int = 3
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        w = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features),
        )
        pad = (self.kernel - 1) // 2
        return jax.lax.conv_general_dilated(
            x,
            w,
            (1, 1),
            [(pad, pad), (pad, pad)],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )


class _MobileBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = _ConvWrapper(8, 1)(x)
        h = nn.BatchNorm(use_running_average=True)(h)
        h = nn.relu6(h)
        h = _ConvWrapper(8, 3, groups=8)(h)  # depthwise
        h = nn.silu(nn.BatchNorm(use_running_average=True)(h))
        h = _ConvWrapper(x.shape[-1], 1)(h)
        return x + nn.BatchNorm(use_running_average=True)(h)


class _MobileNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(_ConvWrapper(4, 3)(x))
        x = _MobileBlock()(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class _StdConv(nn.Module):
    """A weight-standardised conv written as its own module (BiT, big_vision)."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        w = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + 1e-10)
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _BiT(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _StdConv(8)(x)
        h = nn.relu(nn.GroupNorm(num_groups=4)(x))
        h = _StdConv(8)(h)
        x = x + nn.relu(nn.GroupNorm(num_groups=4)(h))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class _DenseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3))(x)
        for _ in range(2):
            h = nn.relu(nn.BatchNorm(use_running_average=True)(x))
            h = nn.Conv(4, (3, 3))(h)
            x = jnp.concatenate([x, h], axis=-1)
        x = nn.avg_pool(x, (2, 2), (2, 2))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


class _RMSNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6)(x)
        h = h + nn.Dense(6)(nn.tanh(nn.RMSNorm()(h)))
        h = h + nn.Dense(6)(nn.elu(h))
        h = h / jnp.linalg.norm(h, axis=-1, keepdims=True)  # L2 normalisation as a function
        return nn.Dense(3)(nn.silu(h))


@pytest.mark.parametrize(
    "model, shape",
    [
        (_Mixer(), (2, 8, 8, 3)),
        (_MobileNet(), (2, 6, 6, 3)),
        (_BiT(), (2, 6, 6, 3)),
        (_DenseNet(), (2, 6, 6, 3)),
        (_RMSNormMLP(), (2, 5)),
    ],
    ids=["mlp_mixer", "mobilenet", "bit_groupnorm_stdconv", "densenet", "rmsnorm_mlp"],
)
def test_public_architectures_conserve(model, shape):
    """Bias-free Epsilon conserves relevance (Mixer was 646, DenseNet 13, BiT all zeros, MobileNet ~1e-9)."""
    x = jax.random.normal(jax.random.PRNGKey(7), shape, jnp.float64)
    assert_conserves(model, x)


# ----------------------------------------------------------------------------------------------
# what stays uncovered is reported


class _Quotient(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(nn.Dense(4)(x) / (2.0 + nn.sigmoid(nn.Dense(4)(x))))


def test_uncovered_quotient_warns_once_and_strict_raises():
    model = _Quotient()
    x = jnp.ones((1, 3), jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, "epsilon_plus")
    with pytest.warns(JlrpWarning, match=r"@div_0 \(div: a quotient of two activations"):
        explained(variables, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", JlrpWarning)
        explained(variables, x)  # one warning per explained model
    with pytest.raises(CoverageError, match="@div_0"):
        jlrp.explain(model, "epsilon_plus", strict=True)(variables, x)
    assert "UNCOVERED" in str(jlrp.audit(explained, variables, x))


def test_gating_is_a_product_with_the_uniform_rule():
    """``h * sigmoid(g)`` of two activations was reported uncovered; now it is ``ops.Multiply``."""

    class Gated(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dense(4)(x) * nn.sigmoid(nn.Dense(4)(x)))

    model = Gated()
    x = jnp.ones((1, 3), jnp.float64)
    report = jlrp.audit(jlrp.explain(model, "epsilon_plus"), init(model, x), x)
    assert report.uncovered == ()
    assert ("@multiply_0", "Multiply", "Uniform()") in {(p, k, str(r)) for p, k, r, *_ in report.rows}


def test_final_softmax_is_named():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.softmax(nn.Dense(3)(x))

    model = M()
    x = jnp.ones((1, 3), jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, "epsilon_plus")
    with pytest.warns(JlrpWarning, match="LRP explains logits"):
        explained(variables, x)
    report = jlrp.audit(explained, variables, x)
    assert any("LRP explains logits" in n for n in report.notes)
    assert not any("@sub" in u for u in report.uncovered)  # softmax's x - stop_gradient(max) is no gap


# ----------------------------------------------------------------------------------------------
# several inputs and integer inputs


class _TwoInputs(nn.Module):
    @nn.compact
    def __call__(self, inputs):
        x1, x2 = inputs
        ones = nn.initializers.ones
        a = nn.Dense(2, use_bias=False, kernel_init=ones)(x1)
        b = nn.Dense(2, use_bias=False, kernel_init=ones)(x2)
        return nn.Dense(1, use_bias=False, kernel_init=ones)(
            nn.Dense(2, use_bias=False, kernel_init=ones)(a + b)
        )


def test_two_input_streams_merge_with_norm():
    """A tuple input: relevance for every leaf; the merge ``a + b`` splits it (4 and 4, not 8 and 8)."""
    model = _TwoInputs()
    x = (jnp.ones((1, 1), jnp.float64), jnp.ones((1, 1), jnp.float64))
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=EPS, stabilizer=EPS))
    out, (r1, r2) = jlrp.attribute(explained, variables, x, target=0)
    assert float(out[0, 0]) == 8.0
    assert float(r1[0, 0]) == pytest.approx(4.0) and float(r2[0, 0]) == pytest.approx(4.0)


class _Tokens(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(10, 4)(ids)
        h = h + self.param("pos", nn.initializers.normal(), (ids.shape[1], 4))
        h = nn.Dense(4)(nn.gelu(nn.LayerNorm()(h)))
        return nn.Dense(3)(h.mean(1))


def test_token_ids_get_relevance_at_the_embedding_output():
    """Integer ids feeding ``nn.Embed``: relevance per token = the embedding output's, summed over features."""
    model = _Tokens()
    ids = jnp.array([[1, 2, 3], [4, 5, 6]])
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if "pos" in jax.tree_util.keystr(p) else a, init(model, ids)
    )
    explained = jlrp.explain(model, bias_free_epsilon())
    out, relevance = jlrp.attribute(explained, variables, ids, target=1)
    assert relevance.shape == ids.shape and jnp.issubdtype(relevance.dtype, jnp.floating)
    np.testing.assert_allclose(relevance.sum(1), out[:, 1], rtol=1e-6)
    # the same numbers as explaining the looked-up vectors directly
    vectors = variables["params"]["Embed_0"]["embedding"][ids]

    class FromVectors(nn.Module):
        @nn.compact
        def __call__(self, h):
            h = nn.Dense(4)(nn.gelu(nn.LayerNorm()(h)))
            return nn.Dense(3)(h.mean(1))

    params = {k: v for k, v in variables["params"].items() if k not in ("Embed_0", "pos")}
    renamed = {
        "params": {
            "LayerNorm_0": params["LayerNorm_0"],
            "Dense_0": params["Dense_0"],
            "Dense_1": params["Dense_1"],
        }
    }
    _, reference = jlrp.attribute(
        jlrp.explain(FromVectors(), bias_free_epsilon()), renamed, vectors, target=1
    )
    np.testing.assert_allclose(relevance, reference.sum(-1), rtol=1e-9, atol=1e-12)


def test_integer_input_without_embedding_raises_with_advice():
    class Cast(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x.astype(jnp.float32))

    ids = jnp.array([[1, 2]])
    model = Cast()
    variables = model.init(jax.random.PRNGKey(0), ids)
    with pytest.raises(jlrp.errors.InputDtypeError, match="feeds no embedding lookup.*cast it first"):
        jlrp.attribute(jlrp.explain(model, "epsilon_plus"), variables, ids)
    # the advice works
    jlrp.attribute(jlrp.explain(model, "epsilon_plus"), variables, ids.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------
# the conservation audit


def test_conservation_audit_holds_on_a_covered_model():
    model = _Mixer()
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 3), jnp.float64)
    variables = init(model, x)
    report = jlrp.audit(jlrp.explain(model, bias_free_epsilon()), variables, x, conservation=True, target=2)
    found = report.conservation
    assert found.flagged == () and found.ratio == pytest.approx(1.0, abs=1e-9)
    assert {r.path for r in found.rows} >= {
        "Conv_0",
        "@add_0",
        "LayerNorm_0/@sub_0",
        "_MlpBlock_0/@activation_0",
    }
    assert all(r.relevance_in == pytest.approx(r.relevance_out, abs=1e-9) for r in found.rows)
    assert "conservation holds" in str(report)


def test_conservation_audit_flags_gaps_and_non_conserving_rules():
    model = _Quotient()
    x = jnp.ones((1, 3), jnp.float64)
    variables = init(model, x)
    found = jlrp.audit(jlrp.explain(model, bias_free_epsilon()), variables, x, conservation=True).conservation
    assert found.flagged == ("<between layers>",)
    assert abs(found.unaccounted) > 1e-3 and "@div_0" in found.suspects[0]
    assert "FLAG: relevance created or lost between rule calls" in str(found)

    class Negative(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(4, use_bias=False, kernel_init=nn.initializers.ones)(x))
            last = lambda *_: jnp.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])  # noqa: E731
            return nn.Dense(2, use_bias=False, kernel_init=last)(h)

    model = Negative()
    x = jnp.ones((1, 3), jnp.float64)
    variables = model.init(jax.random.PRNGKey(5), x)
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(EPS), jlrp.types.ReLU: rules.ReLUDeconvNet()})
    found = conservation_of(explained, variables, x)
    # DeconvNet's ReLU keeps only the positive relevance: R = [6, -3, 3, -3] (sum 3, the score) -> 9
    assert [r.path for r in found.rows if r.flagged] == ["@relu_0"]
    relu = next(r for r in found.rows if r.path == "@relu_0")
    assert relu.relevance_out == pytest.approx(3.0) and relu.relevance_in == pytest.approx(9.0)
    assert not found.between_flagged


def conservation_of(explained, variables, x):
    from jlrp.conservation import conservation_audit

    return conservation_audit(explained, variables, x, target=0)


@pytest.mark.parametrize("fn", [jax.nn.softmax, jax.nn.log_softmax], ids=["softmax", "log_softmax"])
def test_softmax_inside_a_model_is_reported_not_blown_up(fn):
    """softmax's ``x - stop_gradient(max(x))`` is part of the function, not a bias: no Norm on it
    (it divided relevance by the stabiliser at the largest element: ratio 6.6e11 at 1e-12)."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, use_bias=False)(fn(nn.Dense(8, use_bias=False)(x)))

    model = M()
    x = jnp.ones((1, 4), jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    ratio, warned = conservation(model, variables, x)
    assert abs(ratio) < 10.0
    report = jlrp.audit(jlrp.explain(model, bias_free_epsilon()), variables, x)
    if fn is jax.nn.softmax:  # one unit with AttnLRP's softmax rule
        assert report.uncovered == ()
        assert [(p, k) for p, k, *_ in report.rows if p.startswith("@")] == [("@softmax_0", "Softmax")]
    else:
        assert [u.split(" ")[0] for u in report.uncovered] == [f"@{fn.__name__}_0"]
    assert not any(kind == "Affine" for _, kind, *_ in report.rows)


def test_unmerged_batchnorm_gets_epsilon_not_pass():
    """A BatchNorm that cannot be merged (DenseNet's BN -> ReLU -> conv) is an element-wise affine
    layer with the Epsilon formula: its shift keeps its share, ``R_x = x s R / (x s + b)`` (zennit's
    base map would Pass it: ``R_x = R``)."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=True, epsilon=0.0)(x)
            return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)(nn.relu(h))

    model = M()
    x = jnp.array([[1.0, 2.0]], jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    stats = {"mean": jnp.array([0.5, -1.0]), "var": jnp.array([4.0, 1.0])}
    params = {
        **variables["params"],
        "BatchNorm_0": {"scale": jnp.array([2.0, 1.0]), "bias": jnp.array([0.5, 1.0])},
    }
    variables = {"params": params, "batch_stats": {"BatchNorm_0": stats}}
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=EPS, stabilizer=EPS))
    y, vjp = jax.vjp(lambda a: explained(variables, a), x)
    (relevance,) = vjp(y)
    s = np.array([2.0 / 2.0, 1.0 / 1.0])
    h = (np.array([1.0, 2.0]) - np.array([0.5, -1.0])) * s + np.array([0.5, 1.0])  # [1.0, 4.0], both > 0
    expected = np.array([1.0, 2.0]) * s * h / h  # R_h = h (Dense of ones, Pass on ReLU); Epsilon on BN
    np.testing.assert_allclose(relevance[0], expected, rtol=1e-9)
    assert float(y[0, 0]) == pytest.approx(h.sum())
    report = jlrp.audit(explained, variables, x)
    assert any(path == "BatchNorm_0/@affine_0" and "Norm" in rule for path, _, rule, *_ in report.rows)


class _PooledHead(nn.Module):
    dense: bool

    @nn.compact
    def __call__(self, x):
        x = jnp.mean(nn.Conv(8, (3, 3))(x), axis=(1, 2))  # ConvNeXt/ViT head: pool, (Dense,) LayerNorm
        if self.dense:
            x = nn.Dense(8)(x)
        return nn.Dense(3)(nn.LayerNorm()(x))


@pytest.mark.parametrize("dense", [False, True], ids=["pool_layernorm", "pool_dense_layernorm"])
def test_layernorm_after_a_pooling_is_recognised(dense):
    """Statistics are relative to their activation: a LayerNorm of pooled features is a normalisation,
    not a product of two activations (it was reported as uncovered gating)."""
    report = assert_conserves(
        _PooledHead(dense), jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3), jnp.float64)
    )
    assert "LayerNorm_0/@normalize_0" in str(report)


def test_rule_on_a_normalisation_layer_raises():
    model = _PooledHead(False)
    x = jnp.ones((1, 6, 6, 3), jnp.float64)
    variables = model.init(jax.random.PRNGKey(0), x)
    with pytest.raises(jlrp.errors.RuleError, match="LayerNorm_0.*normalisation layer.*Remove the entry"):
        jlrp.explain(model, {nn.Conv: rules.Epsilon(), "LayerNorm_0": rules.Epsilon()})(variables, x)


def test_nnx_model_warns_once_across_attribute_calls():
    from flax import nnx

    class Quotient(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(3, 4, rngs=rngs)
            self.c = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.c(self.a(x) / (2.0 + jax.nn.sigmoid(self.b(x))))

    explained = jlrp.explain(Quotient(nnx.Rngs(0)), "epsilon_plus")
    x = jnp.ones((2, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for target in (0, 1):
            jlrp.attribute(explained, x, target=target)  # each traces a new pure view of the model
        explained(x)
    assert sum(issubclass(w.category, JlrpWarning) for w in caught) == 1
