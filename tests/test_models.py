"""Tests of the model zoo (:mod:`jlrp.models`) and the plain-op modules (:mod:`jlrp.layers`).

The ``crosscheck`` tests compare against torchvision (float64, random weights and randomised
BatchNorm statistics) and are skipped when torch/torchvision are missing.
"""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import jlrp.models as jm
from jlrp import layers
from jlrp.models import StateDictError, from_torchvision, load_torchvision_nnx, torch_key

ARCHS = ["vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "resnet18", "resnet50"]
SMALL_VGG = {"cfg": (8, "M", 16, "M"), "batch_norm": True, "num_classes": 10, "hidden_features": 64}


def rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def linen_shapes(model: nn.Module, size: int = 32) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat ``{path: shape}`` of a linen model's variables, without computing anything."""
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}


def fake_state_dict(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    """A random torchvision-layout state dict (float64 NumPy) for ``model``, BN statistics included."""
    rng = np.random.default_rng(seed)
    sd = {}
    for path, shape in linen_shapes(model).items():
        key = torch_key(path)
        if len(shape) > 2:
            shape = (shape[-1], shape[-2], *shape[:-2])
        elif len(shape) == 2:
            shape = shape[::-1]
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        if path[-1] in ("scale", "var"):
            sd[key] = rng.uniform(0.5, 1.5, shape)
        else:
            sd[key] = rng.normal(0.0, 1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.1, shape)
    return sd


# ------------------------------------------------------------------------------------ layers


def adaptive_reference(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Loop implementation of torch's AdaptiveAvgPool2d formula on NHWC input."""
    n, h, w, c = x.shape
    y = np.zeros((n, *out, c), x.dtype)
    for i in range(out[0]):
        h0, h1 = (i * h) // out[0], -((-(i + 1) * h) // out[0])
        for j in range(out[1]):
            w0, w1 = (j * w) // out[1], -((-(j + 1) * w) // out[1])
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize(
    "hw,out", [((7, 7), (7, 7)), ((14, 21), (7, 7)), ((5, 9), (3, 4)), ((1, 1), (7, 7)), ((2, 3), (7, 5))]
)
def test_adaptive_avg_pool_matches_torch_formula(hw, out):
    x = np.random.default_rng(0).normal(size=(2, *hw, 3))
    ref = adaptive_reference(x, out)
    y_linen = layers.AdaptiveAvgPool(out).apply({}, jnp.asarray(x))
    y_nnx = layers.NNXAdaptiveAvgPool(out)(jnp.asarray(x))
    np.testing.assert_allclose(y_linen, ref, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(y_nnx, ref, rtol=1e-13, atol=1e-14)


def test_adaptive_avg_pool_identity_and_int_size():
    x = jnp.ones((1, 7, 7, 2))
    assert layers.adaptive_avg_pool(x, (7, 7)) is x
    assert layers.adaptive_avg_pool(jnp.ones((1, 9, 4, 2)), 3).shape == (1, 3, 3, 2)
    with pytest.raises(ValueError, match="output_size"):
        layers.adaptive_avg_pool(x, (7, 7, 7))


def test_sum_and_avg_pool_modules():
    rng = np.random.default_rng(1)
    x, h = jnp.asarray(rng.normal(size=(2, 6, 6, 3))), jnp.asarray(rng.normal(size=(2, 6, 6, 3)))
    stacked = jnp.stack([x, h], axis=-1)
    np.testing.assert_array_equal(layers.Sum().apply({}, stacked), x + h)
    np.testing.assert_array_equal(layers.NNXSum()(stacked), x + h)
    np.testing.assert_array_equal(layers.NNXSum(axis=0)(jnp.stack([x, h])), x + h)
    for kwargs in [
        {"window_shape": (2, 2), "strides": (2, 2)},
        {"window_shape": (3, 3), "strides": (1, 1), "padding": ((1, 1), (1, 1)), "count_include_pad": False},
        {"window_shape": (3, 3), "padding": "SAME"},
    ]:
        ref = nn.avg_pool(x, **kwargs)
        np.testing.assert_array_equal(layers.AvgPool(**kwargs).apply({}, x), ref)
        np.testing.assert_array_equal(layers.NNXAvgPool(**kwargs)(x), ref)
    assert isinstance(layers.NNXSum(), nnx.Module)
    assert isinstance(layers.AvgPool((2, 2)), nn.Module)


# ------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_linen_and_nnx(arch):
    model = jm.LINEN_MODELS[arch](num_classes=10)
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    out = jax.eval_shape(lambda v: model.apply(v, x), variables)
    assert out.shape == (2, 10)
    assert set(variables) == ({"params", "batch_stats"} if ("bn" in arch or "resnet" in arch) else {"params"})

    def nnx_forward():
        m = jm.NNX_MODELS[arch](num_classes=10, rngs=nnx.Rngs(0))
        return m(x)

    assert jax.eval_shape(nnx_forward).shape == (2, 10)


def test_vgg_64_and_224_inputs_and_names():
    model = jm.vgg11_bn(num_classes=10)
    for size in (64, 224):
        x = jnp.zeros((1, size, size, 3))
        v = jax.eval_shape(lambda x=x: model.init(jax.random.key(0), x))
        assert jax.eval_shape(lambda v, x=x: model.apply(v, x), v).shape == (1, 10)
    names = set(v["params"])
    assert {"features_0", "features_1", "features_4", "features_26", "classifier_0", "classifier_6"} <= names
    assert v["params"]["classifier_0"]["kernel"].shape == (25088, 4096)


def test_resnet_names_mirror_torchvision():
    shapes = linen_shapes(jm.resnet50(num_classes=10))
    keys = {torch_key(p) for p in shapes}
    assert "layer1.0.downsample.0.weight" in keys
    assert "layer4.2.bn3.running_var" in keys
    assert ("params", "layer1_0", "downsample_conv", "kernel") in shapes
    assert shapes[("params", "conv1", "kernel")] == (7, 7, 3, 64)
    r18 = {torch_key(p) for p in linen_shapes(jm.resnet18())}
    assert "layer1.0.downsample.0.weight" not in r18 and "layer2.0.downsample.1.weight" in r18


def test_train_mode_linen_nnx_agree():
    """Batch statistics and running-average updates agree between linen and NNX."""
    linen_model = jm.VGG(**SMALL_VGG, dropout_rate=0.0)
    sd = fake_state_dict(linen_model)
    variables = from_torchvision(sd, linen_model, dtype=np.float64)
    nnx_model = nnx.eval_shape(lambda: jm.nnx.VGG(**SMALL_VGG, dropout_rate=0.0, rngs=nnx.Rngs(0)))
    load_torchvision_nnx(nnx_model, sd, dtype=np.float64)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 32, 32, 3)))
    train_apply = jax.jit(partial(linen_model.apply, train=True, mutable=["batch_stats"]))
    y_linen, updates = train_apply(variables, x, rngs={"dropout": jax.random.key(0)})
    y_nnx = nnx_model(x, train=True)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        nnx_model.features_1.var.get_value(), updates["batch_stats"]["features_1"]["var"]
    )
    # ``train=None`` follows the module mode, which is evaluation after construction.
    y_eval = linen_model.apply(variables, x)
    assert rel_err(nnx_model(x, train=False), y_eval) > 1e-6  # running stats were updated
    nnx_model.eval()
    np.testing.assert_array_equal(nnx_model(x), nnx_model(x, train=False))


def test_real_init_and_dropout():
    """Random initialisation runs in both front ends; dropout is active only in training mode."""
    cfg = (4, "M")
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 8, 8, 3)), jnp.float32)
    model = jm.VGG(cfg, batch_norm=True, num_classes=3, hidden_features=32)
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["features_0"]["kernel"].dtype == jnp.float32
    y = model.apply(variables, x)
    y_train, _ = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
    )
    assert y.shape == y_train.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y)))
    assert rel_err(y_train, y) > 1e-3
    nnx_model = jm.nnx.VGG(cfg, batch_norm=True, num_classes=3, hidden_features=32, rngs=nnx.Rngs(0))
    y_nnx = nnx_model(x)
    assert y_nnx.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y_nnx)))
    np.testing.assert_array_equal(nnx_model(x), y_nnx)  # evaluation mode: deterministic
    nnx_model.train()
    assert rel_err(nnx_model(x), y_nnx) > 1e-3


@pytest.mark.parametrize("arch", ["resnet18", "small_vgg"])
def test_linen_and_nnx_identical_outputs(arch):
    if arch == "small_vgg":
        linen_model = jm.VGG(**SMALL_VGG)
        nnx_model = nnx.eval_shape(lambda: jm.nnx.VGG(**SMALL_VGG, rngs=nnx.Rngs(0)))
    else:
        linen_model = jm.resnet18(num_classes=10)
        nnx_model = nnx.eval_shape(lambda: jm.nnx.resnet18(num_classes=10, rngs=nnx.Rngs(0)))
    sd = fake_state_dict(linen_model)
    variables = from_torchvision(sd, linen_model, dtype=np.float64)
    load_torchvision_nnx(nnx_model, sd, dtype=np.float64)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)))
    y_linen = jax.jit(linen_model.apply)(variables, x)
    y_nnx = nnx.jit(lambda m, x: m(x))(nnx_model, x)
    assert y_linen.dtype == y_nnx.dtype == jnp.float64
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------ converter


@pytest.fixture(scope="module")
def small_vgg_sd():
    model = jm.VGG(**SMALL_VGG)
    return model, fake_state_dict(model)


def test_converter_layouts_and_dtype(small_vgg_sd):
    model, sd = small_vgg_sd
    v32 = from_torchvision(sd, model)
    v64 = from_torchvision(sd, model, dtype=np.float64)
    assert v32["params"]["features_0"]["kernel"].dtype == jnp.float32
    assert v64["params"]["features_0"]["kernel"].dtype == jnp.float64
    np.testing.assert_array_equal(
        v64["params"]["features_0"]["kernel"], sd["features.0.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(v64["params"]["classifier_3"]["kernel"], sd["classifier.3.weight"].T)
    np.testing.assert_array_equal(v64["params"]["features_1"]["scale"], sd["features.1.weight"])
    np.testing.assert_array_equal(v64["batch_stats"]["features_5"]["var"], sd["features.5.running_var"])
    # classifier_0: NHWC flatten index (h, w, c) <- torch's NCHW flatten index (c, h, w)
    w0, k0 = sd["classifier.0.weight"], np.asarray(v64["params"]["classifier_0"]["kernel"])
    h, w, c, o = 3, 5, 11, 7
    assert k0[(h * 7 + w) * 16 + c, o] == w0[o, c * 49 + h * 7 + w]


class FakeTensor:
    """Duck-typed torch tensor: the converter needs only ``detach().cpu().numpy()``."""

    def __init__(self, value):
        self.value = np.asarray(value)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.value


def test_to_numpy_accepts_tensor_like_objects(small_vgg_sd):
    model, sd = small_vgg_sd
    np.testing.assert_array_equal(jm.to_numpy(FakeTensor([1.0, 2.0])), [1.0, 2.0])
    variables = from_torchvision({k: FakeTensor(v) for k, v in sd.items()}, model, dtype=np.float64)
    np.testing.assert_array_equal(variables["params"]["classifier_6"]["bias"], sd["classifier.6.bias"])


def test_converter_float64_requires_x64(small_vgg_sd):
    model, sd = small_vgg_sd
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        from_torchvision(sd, model, dtype=np.float64)


def test_converter_reports_bad_keys(small_vgg_sd):
    model, sd = small_vgg_sd
    bad = dict(sd)
    del bad["features.1.running_mean"]
    bad["classifier.6.weight"] = np.zeros((11, 64))
    bad["features.9.weight"] = np.zeros(3)
    bad["features.1.num_batches_tracked"] = np.array(3)  # ignored
    with pytest.raises(StateDictError) as info:
        from_torchvision(bad, model)
    msg = str(info.value)
    assert "missing" in msg and "features.1.running_mean" in msg
    assert "mis-shaped" in msg and "classifier.6.weight" in msg and "(11, 64)" in msg and "(10, 64)" in msg
    assert "unexpected" in msg and "features.9.weight" in msg
    assert "num_batches_tracked" not in msg
    nnx_model = nnx.eval_shape(lambda: jm.nnx.VGG(**SMALL_VGG, rngs=nnx.Rngs(0)))
    with pytest.raises(StateDictError, match="features.1.running_mean"):
        load_torchvision_nnx(nnx_model, bad)
    assert isinstance(nnx_model.features_0.kernel.get_value(), jax.ShapeDtypeStruct)  # untouched
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    with pytest.raises(StateDictError, match="DataParallel"):
        from_torchvision(prefixed, model)
    with pytest.raises(KeyError, match="unknown architecture"):
        from_torchvision(sd, "vgg12")


def test_no_torch_import():
    code = "import sys, jlrp.layers, jlrp.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------ torchvision parity

CROSS = {"vgg11_bn": 64, "vgg16": 32, "resnet18": 32, "resnet50": 32}


@pytest.fixture(scope="module", params=list(CROSS))
def torchvision_case(request):
    """(arch, torchvision state dict, NHWC input, torch logits); float64, random BN statistics."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    arch = request.param
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        size = CROSS[arch]
        x = np.random.default_rng(4).normal(size=(2, 3, size, size))
        y = model(torch.from_numpy(x)).numpy()
    return arch, model.state_dict(), x.transpose(0, 2, 3, 1), y


@pytest.mark.crosscheck
def test_torchvision_parity(torchvision_case):
    arch, sd, x, y_torch = torchvision_case
    x = jnp.asarray(x)
    variables = from_torchvision(sd, arch, dtype=np.float64)
    y_linen = jm.LINEN_MODELS[arch](num_classes=10).apply(variables, x)
    del variables
    assert y_linen.dtype == jnp.float64 and y_linen.shape == (2, 10)
    assert rel_err(y_linen, y_torch) < 1e-8
    if arch == "vgg16":  # the NNX VGG path is covered by vgg11_bn; skip the slowest conversion
        return
    nnx_model = nnx.eval_shape(lambda: jm.NNX_MODELS[arch](num_classes=10, rngs=nnx.Rngs(0)))
    load_torchvision_nnx(nnx_model, sd, dtype=np.float64)
    y_nnx = nnx_model(x)
    assert y_nnx.dtype == jnp.float64
    assert rel_err(y_nnx, y_torch) < 1e-8
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-12, atol=1e-12 * np.abs(y_torch).max())


@pytest.mark.crosscheck
def test_adaptive_avg_pool_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(5).normal(size=(2, 3, 10, 13))
    for out in [(7, 7), (3, 5), (10, 13), (20, 4)]:
        ref = torch.nn.AdaptiveAvgPool2d(out)(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        y = layers.adaptive_avg_pool(jnp.asarray(x.transpose(0, 2, 3, 1)), out)
        np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-14)
