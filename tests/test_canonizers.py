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


# ------------------------------------------------------------------------------ issue 16 row 1


class CopiedBatchNorm(nn.Module):
    """A model author's own BatchNorm (inference only), not a subclass of nn.BatchNorm."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), x.dtype).value
        var = self.variable("batch_stats", "var", jnp.ones, (c,), x.dtype).value
        scale = self.param("scale", nn.initializers.ones, (c,), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), x.dtype)
        return (x - mean) / jnp.sqrt(var + self.epsilon) * scale + bias


class TrainingFlagBatchNorm(nn.BatchNorm):
    """A subclass with its own ``training`` flag instead of ``use_running_average``."""

    def __call__(self, x, training: bool = False):
        return super().__call__(x, use_running_average=not training)


class ConvThen(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, **kwargs):
        return nn.Dense(2)(
            nn.relu(self.norm(name="bn")(nn.Conv(4, (3, 3), name="conv")(x), **kwargs)).mean((1, 2))
        )


class NNXCopiedBatchNorm(nnx.Module):
    def __init__(self, c: int, epsilon: float = 1e-5):
        self.mean, self.var = nnx.BatchStat(jnp.zeros(c)), nnx.BatchStat(jnp.ones(c))
        self.scale, self.bias = nnx.Param(jnp.ones(c)), nnx.Param(jnp.zeros(c))
        self.epsilon = epsilon

    def __call__(self, x):
        return (x - self.mean[...]) / jnp.sqrt(self.var[...] + self.epsilon) * self.scale[...] + self.bias[
            ...
        ]


class NNXConvThen(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
        self.bn = NNXCopiedBatchNorm(4)
        self.head = nnx.Linear(4, 2, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.head(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_registered_copy_of_batchnorm_is_merged_linen():
    model = ConvThen(CopiedBatchNorm)
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3), F64)
    variables = _linen_variables(model, x)
    variables["params"]["bn"] = _randomise_stats(variables["params"]["bn"], 4)
    composite = composites.EpsilonPlus(canonizers=[MergeBatchNorm(batchnorm_types=(CopiedBatchNorm,))])
    explained = jlrp.explain(model, composite)
    y, records = explained.trace(variables, x)
    np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-10)
    assert _notes(records) == {"conv": "BatchNorm 'bn' merged in", "bn": "merged into 'conv'"}


def test_registered_copy_of_batchnorm_is_merged_nnx():
    model = _nnx_randomised(NNXConvThen())
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3), F64)
    composite = composites.EpsilonPlus(canonizers=[MergeBatchNorm(batchnorm_types=(NNXCopiedBatchNorm,))])
    y, records = jlrp.explain(model, composite).trace(x)
    np.testing.assert_allclose(y, model(x), rtol=1e-10)
    assert _notes(records) == {"conv": "BatchNorm 'bn' merged in", "bn": "merged into 'conv'"}


def test_subclass_with_own_training_flag_reads_that_flag():
    model = ConvThen(TrainingFlagBatchNorm)
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3), F64)
    variables = _linen_variables(model, x)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    y, records = explained.trace(variables, x, training=False)
    np.testing.assert_allclose(y, model.apply(variables, x, training=False), rtol=1e-10)
    assert _notes(records) == {"conv": "BatchNorm 'bn' merged in", "bn": "merged into 'conv'"}
    with pytest.raises(jlrp.errors.ModeError, match="'bn' runs in training mode"):
        explained(variables, x, training=True)


# ------------------------------------------------------------------------------ NNX train mode


class NNXDropout(nnx.Module):
    def __init__(self):
        self.linear = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.dropout(self.linear(x))


def test_nnx_model_in_train_mode_raises_mode_error():
    model = NNXDropout()
    x = jnp.ones((1, 3))
    with pytest.raises(
        jlrp.errors.ModeError, match=r"Dropout 'dropout' runs in training mode.*model.eval\(\)"
    ):
        jlrp.explain(model, composites.EpsilonPlus())(x)
    model.eval()
    np.testing.assert_allclose(jlrp.explain(model, composites.EpsilonPlus())(x), model(x))


# ------------------------------------------------------------------------------ BN before a layer


class BatchNormThen(nn.Module):
    layer: str

    @nn.compact
    def __call__(self, x):
        h = nn.BatchNorm(use_running_average=True, name="bn")(x)
        if self.layer == "dense":
            return nn.Dense(3, name="layer")(h)
        padding = "SAME" if self.layer == "conv_same" else "VALID"
        groups = 2 if self.layer == "conv_grouped" else 1
        h = nn.Conv(4, (3, 3), padding=padding, feature_group_count=groups, name="layer")(h)
        return nn.Dense(2, name="head")(h.mean((1, 2)))


@pytest.mark.parametrize("layer", ["dense", "conv_valid", "conv_grouped", "conv_same"])
def test_batchnorm_merged_into_following_layer_where_exact(layer):
    model = BatchNormThen(layer)
    x = jax.random.normal(jax.random.key(2), (2, 4) if layer == "dense" else (2, 5, 5, 4), F64)
    variables = _linen_variables(model, x)
    variables["params"]["bn"] = _randomise_stats(variables["params"]["bn"], 4)
    explained = jlrp.explain(model, composites.EpsilonPlus())
    y, records = explained.trace(variables, x)
    np.testing.assert_allclose(y, model.apply(variables, x), rtol=1e-10)
    if layer == "conv_same":
        assert _notes(records)["bn"].startswith(
            "not merged: the convolution after it pads its input with zeros"
        )
    else:
        assert _notes(records) == {
            "bn": "merged into the following 'layer'",
            "layer": "BatchNorm 'bn' merged in",
        }


def test_merge_batchnorm_with_partitioned_variables():
    """``nn.with_partitioning`` boxes the kernel (``flax.core.meta.Partitioned``); the canonizer and the
    rules see the array, and the relevance equals that of the unboxed variables."""
    from flax.core import meta

    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None, None, "model"))
            x = nn.BatchNorm(use_running_average=True)(nn.Conv(4, (3, 3), kernel_init=init)(x))
            return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 3))
    model = ConvBN()
    boxed = model.init(jax.random.PRNGKey(1), x)
    assert isinstance(boxed["params"]["Conv_0"]["kernel"], meta.Partitioned)
    explained = jlrp.explain(model, composites.EpsilonPlusFlat(canonizers=[jlrp.canonizers.MergeBatchNorm()]))
    _, relevance = jlrp.attribute(explained, boxed, x, target=1)
    _, expected = jlrp.attribute(explained, meta.unbox(boxed), x, target=1)
    np.testing.assert_allclose(relevance, expected, rtol=1e-6, atol=1e-7)
