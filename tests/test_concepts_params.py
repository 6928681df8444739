"""Parameter relevance through ``jlrp.concepts.attribute(..., params=...)``: the taps put zero probes on a
ruled module's parameters, and the rule's parameter relevance comes back as their cotangent."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import concepts, rules
from jlrp.errors import UsageError

jax.config.update("jax_enable_x64", True)


class MLP(nn.Module):
    bias: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, use_bias=self.bias, name="hidden")(x))
        return nn.Dense(3, use_bias=self.bias, name="top")(h)


@pytest.fixture(scope="module")
def mlp():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 6), jnp.float64)
    model = MLP(bias=True)
    variables = model.init(jax.random.PRNGKey(1), x)
    keys = iter(jax.random.split(jax.random.PRNGKey(7), 2))
    variables = jax.tree_util.tree_map_with_path(  # non-zero biases: no output is exactly zero
        lambda path, v: (
            0.1 * jax.random.normal(next(keys), v.shape, v.dtype) if path[-1].key == "bias" else v
        ),
        variables,
    )
    return model, jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables), x


def _lrp0_reference(variables, x, target):
    """LRP-0 by hand in numpy, per connection: returns the kernel and bias relevance of both layers."""
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    x = np.asarray(x)
    w1, b1, w2, b2 = p["hidden"]["kernel"], p["hidden"]["bias"], p["top"]["kernel"], p["top"]["bias"]
    z1 = x @ w1 + b1
    h = np.maximum(z1, 0)
    z2 = h @ w2 + b2
    r2 = np.zeros_like(z2)
    r2[:, target] = z2[:, target]
    c2 = r2 / z2
    rk2 = np.einsum("nj,jk,nk->jk", h, w2, c2)
    rb2 = np.einsum("k,nk->k", b2, c2)
    rh = np.einsum("nj,jk,nk->nj", h, w2, c2)
    c1 = rh / z1  # ReLU passes relevance on unchanged
    rk1 = np.einsum("ni,ij,nj->ij", x, w1, c1)
    rb1 = np.einsum("j,nj->j", b1, c1)
    return {"hidden": (rk1, rb1), "top": (rk2, rb2)}


def test_parameter_relevance_equals_lrp0_by_hand(mlp):
    model, variables, x = mlp
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(0.0)})
    res = concepts.attribute(explained, variables, x, target=2, params=["hidden", "top"])
    expected = _lrp0_reference(variables, x, 2)
    for layer, (kernel, bias) in expected.items():
        np.testing.assert_allclose(res.params[layer]["kernel"], kernel, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(res.params[layer]["bias"], bias, rtol=1e-10, atol=1e-12)
    # what the layers' parameters keep and pass on adds up to the explained score
    score = float(jnp.sum(res.output[:, 2]))
    top = res.params["top"]
    assert float(jnp.sum(top["kernel"]) + jnp.sum(top["bias"])) == pytest.approx(score, rel=1e-10)


def test_bias_free_kernel_relevance_is_conserved_per_layer_and_under_conditions():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 6), jnp.float64)
    model = MLP(bias=False)
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), model.init(jax.random.PRNGKey(3), x))
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon(0.0)})
    res = concepts.attribute(explained, variables, x, target=0, params=["*"])
    score = float(jnp.sum(res.output[:, 0]))
    for layer in ("hidden", "top"):
        assert float(jnp.sum(res.params[layer]["kernel"])) == pytest.approx(score, rel=1e-9)
    # conditioned on each hidden neuron: the top layer's parameters see the whole relevance (they lie
    # above the condition), the hidden layer's only that neuron's column, and the columns add up
    masks = concepts.ChannelConcept().masks(None, (3, 5))
    cond = concepts.attribute(explained, variables, x, target=0, params=["*"], conditions={"hidden": masks})
    hidden = np.asarray(cond.params["hidden"]["kernel"])  # (5 conditions, 6, 5)
    for k in range(5):
        others = np.delete(hidden[k], k, axis=1)
        assert np.abs(others).max() == 0.0
        assert hidden[k][:, k].sum() == pytest.approx(float(jnp.sum(cond.heatmap[k])), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(hidden.sum(0), res.params["hidden"]["kernel"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(cond.params["top"]["kernel"][0], res.params["top"]["kernel"], rtol=1e-12)


def test_merged_batchnorm_gives_the_relevance_of_the_effective_kernel():
    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), use_bias=False, name="conv")(x)
            x = nn.BatchNorm(use_running_average=True, name="bn")(x)
            return nn.Dense(2, use_bias=False, name="head")(jnp.mean(nn.relu(x), axis=(1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(4), (2, 5, 5, 3), jnp.float64)
    model = ConvBN()
    variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), model.init(jax.random.PRNGKey(5), x))
    stats = variables["batch_stats"]["bn"]
    variables = {
        "params": {
            **variables["params"],
            "bn": {"scale": jnp.linspace(0.5, 2.0, 4), "bias": jnp.zeros(4)},
        },
        "batch_stats": {"bn": {"mean": jnp.zeros(4), "var": stats["var"] * 3.0}},
    }
    explained = jlrp.explain(
        model,
        jlrp.composites.LayerMapComposite(
            [(jlrp.types.Linear, rules.Epsilon(0.0)), (jlrp.ops.Mean, rules.Norm(0.0))],
            canonizers=[jlrp.canonizers.MergeBatchNorm()],
        ),
    )
    res = concepts.attribute(explained, variables, x, target=1, params=["conv"])
    kernel = res.params["conv"]["kernel"]
    assert kernel.shape == (3, 3, 3, 4)
    # the BatchNorm's bias (zero shift here after merging: -mean*scale/std + bias = 0) keeps nothing, so
    # the merged kernel's relevance adds up to the heatmap
    assert float(jnp.sum(kernel)) == pytest.approx(float(jnp.sum(res.heatmap)), rel=1e-9)


def test_nnx_parameter_relevance_equals_linen():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 6), jnp.float64)

    class NNXMLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(6, 5, rngs=rngs, param_dtype=jnp.float64)
            self.top = nnx.Linear(5, 3, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.top(nnx.relu(self.hidden(x)))

    nnx_model = NNXMLP(nnx.Rngs(0))
    variables = {
        "params": {
            "hidden": {"kernel": nnx_model.hidden.kernel[...], "bias": nnx_model.hidden.bias[...]},
            "top": {"kernel": nnx_model.top.kernel[...], "bias": nnx_model.top.bias[...]},
        }
    }
    linen = concepts.attribute(
        jlrp.explain(MLP(bias=True), {nn.Dense: rules.Epsilon(0.0)}), variables, x, target=1, params="*"
    )
    ours = concepts.attribute(
        jlrp.explain(nnx_model, {nnx.Linear: rules.Epsilon(0.0)}), x, target=1, params="*"
    )
    for layer in ("hidden", "top"):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(ours.params[layer][name], linen.params[layer][name], rtol=1e-10)


def test_params_of_a_module_without_rule_or_parameter_relevance_raise(mlp):
    model, variables, x = mlp
    only_top = jlrp.explain(model, {"top": rules.Epsilon(0.0)})
    with pytest.raises(UsageError, match="hidden"):
        concepts.attribute(only_top, variables, x, target=0, params=["hidden"])
    with pytest.raises(UsageError, match="paths are"):
        concepts.attribute(only_top, variables, x, target=0, params=["nothing_*"])
