"""EfficientNet-Lite0 (:mod:`jlrp.models.efficientnet`): architecture, pretrained weights, photos,
preprocessing and class names.

The ``crosscheck`` test compares the logits with an independent torch implementation of the
published block table (``tests/_effnet_twin.py``) holding the same weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

import jlrp
import jlrp.models as jm
from jlrp import composites
from jlrp.errors import InputError, StateDictError, UnknownNameError, UsageError

skimage_data = pytest.importorskip("skimage.data")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = (967, 968)  # espresso, cup


@pytest.fixture(scope="module")
def state_dict():
    return jm.read_pth(jm.efficientnet_lite0_weights())


@pytest.fixture(scope="module")
def pretrained():
    return jm.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def photos():
    return np.stack(
        [
            jm.efficientnet_lite0_preprocess(skimage_data.chelsea()),
            jm.efficientnet_lite0_preprocess(skimage_data.coffee()),
        ]
    )


# ------------------------------------------------------------------------------------ architecture


def test_variables_match_the_state_dict_one_to_one(state_dict):
    """Every variable has a key of the right size and every parameter key is used (no leftovers)."""
    model = jm.efficientnet_lite0()
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    flat = traverse_util.flatten_dict(dict(tree))
    keys = {jm.efficientnet_key(path): int(np.prod(leaf.shape)) for path, leaf in flat.items()}
    assert keys == {k: v.size for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    n_params = sum(int(np.prod(leaf.shape)) for path, leaf in flat.items() if path[0] == "params")
    assert n_params == 4_652_008  # EfficientNet-Lite0's published 4.7M


def test_model_is_written_with_plain_flax_layers():
    model = jm.efficientnet_lite0(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    calls = []

    def record(next_fun, args, kwargs, context):
        calls.append((context.module.path, type(context.module).__name__, context.module))
        return next_fun(*args, **kwargs)

    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)
    by_path = {"/".join(p): m for p, _, m in calls}
    depthwise = by_path["blocks_4/depthwise_conv"]
    assert (
        isinstance(depthwise, nn.Conv)
        and depthwise.feature_group_count == 240
        and depthwise.padding == "SAME"
    )
    assert depthwise.kernel_size == (5, 5) and depthwise.strides == (1, 1)
    assert isinstance(by_path["bn0"], nn.BatchNorm) and by_path["bn0"].epsilon == 1e-3
    assert "blocks_0/expand_conv" not in by_path and "blocks_1/expand_conv" in by_path
    assert sum(name.count("/") == 0 and name.startswith("blocks_") for name in by_path) == 16


def test_tf_same_padding_is_asymmetric_at_stride_two():
    """The stem (3x3, stride 2) on 8 pixels pads (0, 1) as TensorFlow does, not (1, 1)."""
    model = jm.EfficientNetLite(blocks=(jm.efficientnet.BlockArgs(1, 3, 1, 32, 16, 1),), head_features=8)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 8, 8, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"]))(
        variables, x
    )
    stem = state["intermediates"]["conv_stem"]["__call__"][0]
    kernel = variables["params"]["conv_stem"]["kernel"]
    for pads, equal in ((((0, 1), (0, 1)), True), (((1, 1), (1, 1)), False)):
        reference = jax.lax.conv_general_dilated(
            x, kernel, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        assert reference.shape == stem.shape
        assert np.allclose(stem, reference, atol=1e-6) == equal


def test_converter_reports_missing_and_unexpected_keys(state_dict):
    broken = dict(state_dict)
    del broken["_blocks.3._depthwise_conv.weight"]
    broken["_blocks.3._se_reduce.weight"] = np.zeros((4, 144, 1, 1))
    with pytest.raises(StateDictError) as info:
        jm.from_efficientnet_lite(broken)
    message = str(info.value)
    assert "_blocks.3._depthwise_conv.weight" in message and "torch shape (144, 1, 5, 5)" in message
    assert "unexpected keys (1): _blocks.3._se_reduce.weight" in message
    wrong = dict(state_dict, **{"_fc.bias": np.zeros(7)})
    with pytest.raises(StateDictError, match=r"_fc.bias: got \(7,\), expected \(1000,\)"):
        jm.from_efficientnet_lite(wrong)


def test_efficientnet_key():
    assert (
        jm.efficientnet_key(("params", "blocks_12", "depthwise_conv", "kernel"))
        == "_blocks.12._depthwise_conv.weight"
    )
    assert jm.efficientnet_key(("batch_stats", "bn1", "var")) == "_bn1.running_var"
    assert jm.efficientnet_key(("params", "fc", "bias")) == "_fc.bias"


def test_loader_errors(tmp_path):
    with pytest.raises(UnknownNameError, match="'keras'"):
        jm.load_efficientnet_lite0("keras")
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a pth")
    with pytest.raises(StateDictError, match="weights.pth"):
        jm.load_efficientnet_lite0(path=bad)


# ------------------------------------------------------------------------------------ pretrained


def test_photos_get_the_obvious_classes(pretrained, photos):
    model, variables = pretrained
    probabilities = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, photos)))
    names = jm.imagenet_classes()
    cat, coffee = probabilities.argmax(-1)
    assert cat in CAT_CLASSES, f"cat photo -> {names[cat]} ({probabilities[0, cat]:.2f})"
    assert probabilities[0, list(CAT_CLASSES)].sum() > 0.8
    assert coffee in COFFEE_CLASSES, f"coffee photo -> {names[coffee]} ({probabilities[1, coffee]:.2f})"
    assert probabilities[1, coffee] > 0.9


def test_nnx_equals_linen(pretrained):
    model, variables = jm.load_efficientnet_lite0(dtype=jnp.float64)
    nnx_model, none = jm.load_efficientnet_lite0("nnx", dtype=jnp.float64)
    assert none is None and isinstance(nnx_model, jm.nnx.EfficientNetLite)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 17, 17, 3)))
    expected = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(nnx_model, x), expected, rtol=1e-12, atol=1e-12)
    assert nnx.state(nnx_model, nnx.Param)["blocks_3"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)


def test_audit_covers_every_op(pretrained):
    model, variables = pretrained
    x = jnp.zeros((1, 32, 32, 3))
    report = jlrp.audit(jlrp.explain(model, composites.EpsilonGammaBox(-1.0, 1.0)), variables, x)
    assert report.uncovered == (), str(report)


@pytest.mark.crosscheck
def test_logits_equal_torch_twin(state_dict, pretrained, photos):
    torch = pytest.importorskip("torch")
    pytest.importorskip("zennit")
    from _effnet_twin import TorchEfficientNetLite0

    twin = TorchEfficientNetLite0().eval()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})
    with torch.no_grad():
        reference = twin(torch.from_numpy(photos.transpose(0, 3, 1, 2).copy())).numpy()
    model, variables = pretrained
    logits = np.asarray(jax.jit(model.apply)(variables, photos))
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


# ------------------------------------------------------------------------------------ preprocessing


def test_preprocess_square_256_is_a_centre_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = jm.efficientnet_lite0_preprocess(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, (image[16:240, 16:240].astype(np.float32) - 127) / 128)
    wide = rng.integers(0, 256, (256, 512, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        jm.efficientnet_lite0_preprocess(wide), (wide[16:240, 144:368] - 127.0) / 128
    )


def test_preprocess_resizes_the_shorter_side_bicubic():
    image = np.random.default_rng(1).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    resized = np.asarray(
        Image.fromarray(image).resize((384, 256), Image.Resampling.BICUBIC), dtype=np.float32
    )
    np.testing.assert_array_equal(
        jm.efficientnet_lite0_preprocess(image), (resized[16:240, 80:304] - 127) / 128
    )


def test_preprocess_modes_sizes_and_paths(tmp_path):
    grey = np.full((300, 300), 200, np.uint8)
    out = jm.efficientnet_lite0_preprocess(grey)
    np.testing.assert_allclose(out, (200 - 127) / 128)
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[..., 0] = 255
    small = jm.efficientnet_lite0_preprocess(rgba)  # upscaled, alpha dropped
    assert small.shape == (224, 224, 3)
    np.testing.assert_allclose(small[..., 0], 1.0)
    np.testing.assert_allclose(small[..., 1:], -127 / 128)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(jm.efficientnet_lite0_preprocess(tmp_path / "grey.png"), out)
    np.testing.assert_array_equal(jm.efficientnet_lite0_preprocess(Image.fromarray(grey).convert("P")), out)


def test_preprocess_bad_input():
    with pytest.raises(InputError, match="got dtype float64"):
        jm.efficientnet_lite0_preprocess(np.zeros((300, 300, 3)))
    with pytest.raises(InputError, match=r"got \(300, 300, 2\)"):
        jm.efficientnet_lite0_preprocess(np.zeros((300, 300, 2), np.uint8))
    with pytest.raises(InputError, match="empty"):
        jm.efficientnet_lite0_preprocess(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(UsageError, match="crop <= resize"):
        jm.efficientnet_lite0_preprocess(np.zeros((5, 5, 3), np.uint8), crop=300)


def test_preprocess_corrupt_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    text = tmp_path / "notes.png"
    text.write_text("hello")
    for path in (broken, text, tmp_path / "missing.png"):
        with pytest.raises(InputError) as info:
            jm.efficientnet_lite0_preprocess(path)
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_imagenet_classes():
    names = jm.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (
        names[0] == "tench"
        and names[285] == "Egyptian cat"
        and names[967] == "espresso"
        and names[999] == "toilet tissue"
    )
    names.append("x")
    assert len(jm.imagenet_classes()) == 1000  # a fresh list each call
