"""Layer variants (issue 16 rows 1, 2, 5; issue 11 item 4): layers recognised by what they compute.

- a third-party convolution/dense module (not a Flax subclass) gets the Convolution/Dense rules and
  BatchNorm merging, exactly like the equivalent Flax layer;
- a layer that transforms its kernel in its call (weight standardisation) gets rules that act on the
  kernel it applies, and BatchNorm merges into it;
- a BatchNorm stacked by ``nnx.scan`` over ``nnx.vmap``-created blocks is left unmerged, with a note.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites, rules
from jlrp import types as jt

F64 = jnp.float64
DN = ("NHWC", "HWIO", "NHWC")


def _relevance(explained, *args):
    """Relevance of the last positional argument, with the output as starting relevance."""
    *head, x = args
    y, vjp = jax.vjp(lambda x: explained(*head, x), x)
    return vjp(y)[0]


def _records(explained, *args):
    return {r.path: r for r in explained.trace(*args)[1]}


def _standardise(kernel):
    mean = kernel.mean(axis=(0, 1, 2))
    var = kernel.var(axis=(0, 1, 2))
    return (kernel - mean) / jnp.sqrt(var + 1e-5)


def _x(shape=(2, 6, 6, 3), seed=3):
    return jax.random.normal(jax.random.key(seed), shape, F64)


RULE_MAP = {jt.Convolution: rules.ZPlus(), jt.Dense: rules.Epsilon(), jt.AvgPool: rules.Norm()}


# ------------------------------------------------------------------------------ linen


class ThirdPartyConv(nn.Module):
    """An efficientnet-jax style ``Conv2d``: own kernel and bias, 'SAME' padding by hand, lax conv."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), F64)
        bias = self.param("bias", nn.initializers.normal(0.5), (self.features,), F64)
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=DN)
        return y + bias


class ThirdPartyDense(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), F64)
        return x @ kernel


class StdConv(nn.Conv):
    """big_vision's BiT convolution: the kernel is standardised whenever it is read."""

    def param(self, name, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        return _standardise(value) if name == "kernel" else value


class Net(nn.Module):
    """conv -> [BN] -> relu -> conv -> relu -> mean -> dense, with a choice of conv and dense classes."""

    conv: str = "flax"
    dense: str = "flax"
    bn: bool = False

    @nn.compact
    def __call__(self, x):
        make = {
            "flax": lambda f: nn.Conv(f, (3, 3), padding=1, param_dtype=F64),
            "third": lambda f: ThirdPartyConv(f),
            "std": lambda f: StdConv(f, (3, 3), padding=1, param_dtype=F64),
        }[self.conv]
        x = make(4)(x)
        if self.bn:
            x = nn.BatchNorm(use_running_average=True, param_dtype=F64)(x)
        x = nn.relu(make(5)(nn.relu(x)))
        x = jnp.mean(x, axis=(1, 2))
        if self.dense == "flax":
            return nn.Dense(3, use_bias=False, param_dtype=F64)(x)
        return ThirdPartyDense(3)(x)


def _with_stats(variables, seed=7):
    if "batch_stats" not in variables:
        return variables
    key1, key2, key3 = jax.random.split(jax.random.key(seed), 3)
    stats = variables["batch_stats"]["BatchNorm_0"]
    params = dict(variables["params"])
    params["BatchNorm_0"] = {
        "scale": jax.random.uniform(key3, stats["mean"].shape, F64, 0.5, 2.0),
        "bias": jax.random.normal(key1, stats["mean"].shape, F64),
    }
    new = {
        "mean": jax.random.normal(key2, stats["mean"].shape, F64),
        "var": jax.random.uniform(key3, stats["var"].shape, F64, 0.2, 2.0),
    }
    return {"params": params, "batch_stats": {"BatchNorm_0": new}}


def _twin_variables(variables, standardise=False):
    """The same weights under the Flax-layer twin (kernels standardised for the StdConv model)."""
    params = dict(variables["params"])
    for name in ("ThirdPartyConv_0", "ThirdPartyConv_1", "StdConv_0", "StdConv_1"):
        if name in params:
            layer = dict(params.pop(name))
            if standardise:
                layer["kernel"] = _standardise(layer["kernel"])
            params["Conv_" + name[-1]] = layer
    if "ThirdPartyDense_0" in params:
        params["Dense_0"] = params.pop("ThirdPartyDense_0")
    return {**variables, "params": params}


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize(
    "composite",
    [RULE_MAP, composites.EpsilonGammaBox(-3.0, 3.0), composites.EpsilonPlus(), composites.EpsilonPlusFlat()],
    ids=["rule_map", "gamma_box", "plus", "plus_flat"],
)
def test_linen_third_party_layers_get_conv_and_dense_rules(composite, bn):
    x = _x()
    model = Net("third", "third", bn)
    variables = _with_stats(model.init(jax.random.key(0), x))
    twin = Net("flax", "flax", bn)
    twin_variables = _twin_variables(variables)
    np.testing.assert_allclose(model.apply(variables, x), twin.apply(twin_variables, x), rtol=1e-12)
    ours = jlrp.explain(model, composite)
    ref = jlrp.explain(twin, composite)
    np.testing.assert_allclose(
        _relevance(ours, variables, x), _relevance(ref, twin_variables, x), rtol=1e-10, atol=1e-10
    )
    records = _records(ours, variables, x)
    twin_records = _records(ref, twin_variables, x)
    assert records["ThirdPartyConv_1"].rule == twin_records["Conv_1"].rule is not None
    assert "recognised by its computation as a convolution" in records["ThirdPartyConv_1"].note
    assert records["ThirdPartyDense_0"].rule == twin_records["Dense_0"].rule
    if bn and composite is not RULE_MAP:  # the presets merge BatchNorms (a plain rule map does not)
        assert records["BatchNorm_0"].note == "merged into 'ThirdPartyConv_0'"


def test_linen_audit_lists_recognised_conv_with_its_rule():
    x = _x()
    model = Net("third", "flax")
    variables = model.init(jax.random.key(0), x)
    report = jlrp.audit(jlrp.explain(model, composites.EpsilonPlus()), variables, x)
    rows = {row[0]: row for row in report.rows}
    assert rows["ThirdPartyConv_1"][2] == repr(rules.ZPlus())
    assert "recognised by its computation as a convolution" in rows["ThirdPartyConv_1"][4]
    assert "ThirdPartyConv_1" in str(report)


@pytest.mark.parametrize("rule", [rules.ZPlus(), rules.Flat(), rules.Epsilon()], ids=repr)
def test_linen_rules_act_on_the_standardised_kernel(rule):
    x = _x()
    model = Net("std")
    variables = model.init(jax.random.key(0), x)
    twin = Net("flax")
    twin_variables = _twin_variables(variables, standardise=True)
    np.testing.assert_allclose(model.apply(variables, x), twin.apply(twin_variables, x), rtol=1e-10)
    composite = {jt.Convolution: rule, jt.Dense: rules.Epsilon()}
    ours = _relevance(jlrp.explain(model, composite), variables, x)
    ref = _relevance(jlrp.explain(twin, composite), twin_variables, x)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-10)
    note = _records(jlrp.explain(model, composite), variables, x)["StdConv_0"].note
    assert "effective kernel" in note


def test_linen_batchnorm_merges_into_standardised_conv():
    x = _x()
    model = Net("std", bn=True)
    variables = _with_stats(model.init(jax.random.key(0), x))
    twin = Net("flax", bn=True)
    twin_variables = _twin_variables(variables, standardise=True)
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    assert _records(explained, variables, x)["BatchNorm_0"].note == "merged into 'StdConv_0'"
    ref = _relevance(jlrp.explain(twin, composites.EpsilonPlusFlat()), twin_variables, x)
    np.testing.assert_allclose(_relevance(explained, variables, x), ref, rtol=1e-10, atol=1e-10)


class ConvThenAct(nn.Module):
    """Owns a kernel but applies an activation inside: not a plain contraction, so not recognised."""

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 2), F64)
        return nn.relu(jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN))


def test_linen_module_with_more_than_a_contraction_is_not_recognised():
    x = _x()
    model = ConvThenAct()
    variables = model.init(jax.random.key(0), x)
    records = _records(jlrp.explain(model, composites.EpsilonPlus()), variables, x)
    assert records[""].rule is None and "recognised" not in records[""].note


# ------------------------------------------------------------------------------ NNX


class NNXThirdPartyConv(nnx.Module):
    def __init__(self, cin, cout, rngs):
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 3, cin, cout), F64))
        self.bias = nnx.Param(jax.random.normal(rngs.params(), (cout,), F64))

    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        y = jax.lax.conv_general_dilated(x, self.kernel[...], (1, 1), "VALID", dimension_numbers=DN)
        return y + self.bias[...]


class NNXStdConv(nnx.Conv):
    """A weight-standardised NNX convolution (the kernel is standardised in the call)."""

    def __call__(self, x):
        kernel = _standardise(self.kernel[...])
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN)
        return y + self.bias[...]


class NNXNet(nnx.Module):
    def __init__(self, conv, rngs, bn=False):
        make = {
            "flax": lambda i, o: nnx.Conv(i, o, (3, 3), padding="SAME", param_dtype=F64, rngs=rngs),
            "third": lambda i, o: NNXThirdPartyConv(i, o, rngs),
            "std": lambda i, o: NNXStdConv(i, o, (3, 3), padding="SAME", param_dtype=F64, rngs=rngs),
        }[conv]
        self.conv0 = make(3, 4)
        self.bn = nnx.BatchNorm(4, param_dtype=F64, rngs=rngs) if bn else None
        self.conv1 = make(4, 5)
        self.dense = nnx.Linear(5, 3, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        x = self.conv0(x)
        if self.bn is not None:
            x = self.bn(x)
        x = nnx.relu(self.conv1(nnx.relu(x)))
        return self.dense(jnp.mean(x, axis=(1, 2)))


def _f64_stats(*models):
    """BatchNorm statistics in float64 (NNX creates them in float32 whatever the param dtype)."""
    for model in models:
        stats = nnx.state(model, nnx.BatchStat)
        nnx.update(model, jax.tree_util.tree_map(lambda a: a.astype(F64), stats))


def _nnx_pair(conv, bn=False):
    model = NNXNet(conv, nnx.Rngs(0), bn)
    twin = NNXNet("flax", nnx.Rngs(1), bn)
    _f64_stats(model, twin)
    if bn:
        k = jax.random.split(jax.random.key(5), 4)
        model.bn.mean[...] = jax.random.normal(k[0], (4,), F64)
        model.bn.var[...] = jax.random.uniform(k[1], (4,), F64, 0.2, 2.0)
        model.bn.scale[...] = jax.random.uniform(k[2], (4,), F64, 0.5, 2.0)
        model.bn.bias[...] = jax.random.normal(k[3], (4,), F64)
        nnx.update(twin.bn, nnx.state(model.bn))
    for name in ("conv0", "conv1"):
        src, dst = getattr(model, name), getattr(twin, name)
        kernel = src.kernel[...]
        dst.kernel[...] = _standardise(kernel) if conv == "std" else kernel
        dst.bias[...] = src.bias[...]
    twin.dense.kernel[...] = model.dense.kernel[...]
    model.eval()
    twin.eval()
    return model, twin


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("conv", ["third", "std"])
@pytest.mark.parametrize(
    "composite",
    [RULE_MAP, composites.EpsilonGammaBox(-3.0, 3.0), composites.EpsilonPlusFlat()],
    ids=["rule_map", "gamma_box", "plus_flat"],
)
def test_nnx_variants_equal_flax_twin(composite, conv, bn):
    model, twin = _nnx_pair(conv, bn)
    x = _x()
    np.testing.assert_allclose(model(x), twin(x), rtol=1e-10)
    ours = jlrp.explain(model, composite)
    ref = jlrp.explain(twin, composite)
    np.testing.assert_allclose(_relevance(ours, x), _relevance(ref, x), rtol=1e-10, atol=1e-10)
    records = _records(ours, x)
    assert records["conv1"].rule == _records(ref, x)["conv1"].rule is not None
    if bn and composite is not RULE_MAP:
        assert records["bn"].note == "merged into 'conv0'"


@pytest.mark.parametrize("rule", [rules.ZPlus(), rules.Flat(), rules.Epsilon()], ids=repr)
def test_nnx_rules_act_on_the_standardised_kernel(rule):
    model, twin = _nnx_pair("std")
    x = _x()
    composite = {jt.Convolution: rule, jt.Dense: rules.Epsilon()}
    explained = jlrp.explain(model, composite)
    ours = _relevance(explained, x)
    np.testing.assert_allclose(ours, _relevance(jlrp.explain(twin, composite), x), rtol=1e-10, atol=1e-10)
    assert "effective kernel" in _records(explained, x)["conv0"].note


# ------------------------------------------------------------------------------ nnx.scan over layers


class Block(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 4, use_bias=False, param_dtype=F64, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_bias=False, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.bn(self.linear(x)))


class Scanned(nnx.Module):
    """The Flax NNX "scan over layers" example: blocks created by nnx.vmap, run by nnx.scan."""

    def __init__(self, layers, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def forward(x, block):
            return block(x)

        return forward(x, self.blocks)


class Unrolled(nnx.Module):
    def __init__(self, layers, rngs):
        self.blocks = nnx.List([Block(rngs) for _ in range(layers)]) if hasattr(nnx, "List") else None
        if self.blocks is None:
            self.blocks = [Block(rngs) for _ in range(layers)]

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _scan_pair(layers=3):
    model = Scanned(layers, nnx.Rngs(0))
    _f64_stats(model)
    k = jax.random.split(jax.random.key(2), 3)
    # bias-free BatchNorm (zero mean, no shift): a per-channel scale, so Epsilon conserves relevance
    model.blocks.bn.var[...] = jax.random.uniform(k[0], (layers, 4), F64, 0.2, 2.0)
    model.blocks.bn.scale[...] = jax.random.uniform(k[1], (layers, 4), F64, 0.5, 2.0)
    twin = Unrolled(layers, nnx.Rngs(1))
    _f64_stats(twin)
    for i, block in enumerate(twin.blocks):
        block.linear.kernel[...] = model.blocks.linear.kernel[...][i]
        block.bn.var[...] = model.blocks.bn.var[...][i]
        block.bn.scale[...] = model.blocks.bn.scale[...][i]
        block.bn.mean[...] = model.blocks.bn.mean[...][i]
    model.eval()
    twin.eval()
    return model, twin


@pytest.mark.parametrize(
    "name", sorted(set(composites.COMPOSITES) - {"guided_backprop", "deconvnet", "beta_smooth"})
)
def test_nnx_scan_over_vmapped_blocks_with_batchnorm(name):
    model, twin = _scan_pair()
    x = jax.random.uniform(jax.random.key(4), (2, 4), F64, 0.1, 1.0)
    np.testing.assert_allclose(model(x), twin(x), rtol=1e-12)
    kwargs = {"low": -3.0, "high": 3.0} if name == "epsilon_gamma_box" else {}
    explained = jlrp.explain(model, composites.get(name, **kwargs))
    relevance = _relevance(explained, x)
    assert np.all(np.isfinite(relevance))
    note = _records(explained, x)["blocks/bn"].note
    assert "statistics are stacked" in note and "nnx.scan" in note
    report = jlrp.audit(explained, x)
    assert any("statistics are stacked" in n for n in report.notes)
    if name == "epsilon_plus":  # Epsilon on every Linear: compare with the unrolled twin, and conservation
        # (a tiny epsilon: the twin merges its BatchNorms, so its stabiliser acts on z * s, not on z)
        tiny = composites.EpsilonPlus(epsilon=1e-15, stabilizer=1e-15)
        relevance = _relevance(jlrp.explain(model, tiny), x)
        ref = _relevance(jlrp.explain(twin, tiny), x)
        assert _records(jlrp.explain(twin, tiny), x)["blocks/0/bn"].note == "merged into 'blocks/0/linear'"
        np.testing.assert_allclose(relevance, ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(relevance.sum(), twin(x).sum(), rtol=1e-5)
