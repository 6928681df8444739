"""Canonizers: MergeBatchNorm merges only where the merged model is the same function (linen and NNX)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
import jlrp.models as jm
from jlrp import composites
from jlrp.canonizers import MergeBatchNorm

F64 = jnp.float64


def _randomise_stats(tree, seed: int = 1):
    """Random positive BatchNorm statistics/scales, so that a wrong merge shows in the output."""
    key = jax.random.key(seed)
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [leaf + jax.random.uniform(k, leaf.shape, leaf.dtype, 0.1, 0.5) for leaf, k in zip(leaves, keys)],
    )


def _linen_variables(model: nn.Module, x: jax.Array) -> dict:
    variables = jax.tree_util.tree_map(lambda a: a.astype(F64), model.init(jax.random.key(0), x))
    if "batch_stats" in variables:
        variables = {**variables, "batch_stats": _randomise_stats(variables["batch_stats"])}
    return variables


def _nnx_randomised(model: nnx.Module) -> nnx.Module:
    stats = nnx.state(model, nnx.BatchStat)
    nnx.update(model, _randomise_stats(jax.tree_util.tree_map(lambda a: a.astype(F64), stats)))
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map(lambda a: a.astype(F64), params))
    return model


def _notes(records) -> dict[str, str]:
    return {r.path: r.note for r in records if r.note}


# ------------------------------------------------------------------------------ issue 11 item 4


class SharedLinen(nn.Module):
    """``h = Dense(h); BN(h) + h``: the Dense output has a second consumer."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(1)(x)
        return nn.BatchNorm(use_running_average=True, epsilon=0.0)(h) + h


class SharedNNX(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(1, 1, rngs=nnx.Rngs(0))
        self.bn = nnx.BatchNorm(1, use_running_average=True, epsilon=0.0, rngs=nnx.Rngs(0))

    def __call__(self, x):
        h = self.dense(x)
        return self.bn(h) + h


def _shared_linen():
    model = SharedLinen()
    variables = {
        "params": {
            "Dense_0": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)},
            "BatchNorm_0": {"scale": 2 * jnp.ones(1), "bias": jnp.zeros(1)},
        },
        "batch_stats": {"BatchNorm_0": {"mean": jnp.zeros(1), "var": jnp.ones(1)}},
    }
    return model, variables


def test_shared_output_is_not_merged_linen():
    model, variables = _shared_linen()
    x = jnp.ones((1, 1))
    explained = jlrp.explain(model, composites.EpsilonPlus())
    np.testing.assert_allclose(explained(variables, x), [[3.0]])
    np.testing.assert_allclose(explained(variables, x), model.apply(variables, x))
    note = "not merged: the output of 'Dense_0' is used by more than 'BatchNorm_0'"
    assert _notes(explained.trace(variables, x)[1]) == {"BatchNorm_0": note}
    assert f"BatchNorm 'BatchNorm_0' {note}" in jlrp.audit(explained, variables, x).notes


def test_shared_output_is_not_merged_nnx():
    model = SharedNNX()
    model.dense.kernel.set_value(jnp.ones((1, 1)))
    model.bn.scale.set_value(2 * jnp.ones(1))
    x = jnp.ones((1, 1))
    explained = jlrp.explain(model, composites.EpsilonPlus())
    np.testing.assert_allclose(explained(x), [[3.0]])
    assert _notes(explained.trace(x)[1]) == {
        "bn": "not merged: the output of 'dense' is used by more than 'bn'"
    }


class CalledTwice(nn.Module):
    """The Dense is called once before the BatchNorm and once without it."""

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(3)
        return nn.BatchNorm(use_running_average=True)(dense(x)) + dense(2 * x)


class BatchNormTwice(nn.Module):
    """The BatchNorm is called after the Dense and on the raw input too."""

    @nn.compact
    def __call__(self, x):
        bn = nn.BatchNorm(use_running_average=True)
        return bn(nn.Dense(3)(x)) + bn(x)


@pytest.mark.parametrize(
    "model, note",
    [
        (CalledTwice(), "not merged: 'Dense_0' is also called without this BatchNorm"),
        (BatchNormTwice(), "not merged: its input does not always come from the same linear layer"),
    ],
    ids=["layer_called_twice", "batchnorm_called_twice"],
)
def test_other_calls_block_the_merge(model, note):
    x = jax.random.normal(jax.random.key(3), (2, 3), F64)
    variables = _linen_variables(model, x)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    np.testing.assert_allclose(explained(variables, x), model.apply(variables, x), rtol=1e-12)
    assert _notes(explained.trace(variables, x)[1]) == {"BatchNorm_0": note}


def _zoo_linen():
    yield "vgg_small", jm.VGG((8, "M", 16, "M"), batch_norm=True, num_classes=5, hidden_features=16)
    yield "resnet18", jm.resnet18(num_classes=5)
    yield "resnet_bottleneck", jm.ResNet(jm.Bottleneck, (1, 1, 1, 1), num_classes=5)


@pytest.mark.parametrize("name", ["vgg_small", "resnet18", "resnet_bottleneck", "shared"])
def test_explained_forward_equals_model_linen(name):
    if name == "shared":
        model, variables = _shared_linen()
        x = jnp.ones((1, 1))
    else:
        model = dict(_zoo_linen())[name]
        x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3), F64)
        variables = _linen_variables(model, x)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    np.testing.assert_allclose(explained(variables, x), model.apply(variables, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["vgg_small", "resnet18"])
def test_explained_forward_equals_model_nnx(name):
    rngs = nnx.Rngs(0)
    if name == "vgg_small":
        model = jm.nnx.VGG((8, "M", 16, "M"), batch_norm=True, num_classes=5, hidden_features=16, rngs=rngs)
    else:
        model = jm.nnx.resnet18(num_classes=5, rngs=rngs)
    model = _nnx_randomised(model)
    model.eval()
    x = jax.random.normal(jax.random.key(1), (1, 32, 32, 3), F64)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    y, records = explained.trace(x)
    np.testing.assert_allclose(y, model(x), rtol=1e-10, atol=1e-12)
    assert any(r.note.startswith("merged into") for r in records)


def test_merge_batchnorm_is_a_canonizer_with_an_interface():
    assert isinstance(MergeBatchNorm(), jlrp.canonizers.Canonizer)
    assert hash(MergeBatchNorm()) == hash(MergeBatchNorm())
    assert not hasattr(jlrp.canonizers, "has_merge_batchnorm")
