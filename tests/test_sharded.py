"""Tensor-parallel attribution: parameters split over a 2x4 mesh, ``jlrp.attribute(..., mesh=mesh)``.

One subprocess with 8 simulated CPU devices runs every case of ``tests/_sharded_script.py`` (linen ViT
with AttnLRP and linen BERT with CP-LRP, their variables boxed as ``nn.with_partitioning`` makes them
and placed by the annotations; NNX BERT with AttnLRP whose annotated host parameters ``attribute``
places itself; a linen ResNet with its convolution kernels split over output channels; a small model
with its own ``with_sharding_constraint`` and a ``jax.jit`` with ``out_shardings`` inside). Checked
here: the relevance equals the single-device one within 1e-6 relative to its largest magnitude
(float32), stays sharded over the batch axis, and the compiled program gathers no split parameter in
full (XLA keeps the weights split and moves activations, Megatron-style); the HLO check itself is
shown to catch a gathered kernel.
"""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
from _spawn import ROOT, run_python
from jax.sharding import AxisType

import jlrp
from jlrp import composites

TOLERANCE = 1e-6
BATCH_SHARDED = "P('data',)"


@pytest.fixture(scope="module")
def results():
    done = run_python([str(ROOT / "tests" / "_sharded_script.py")], devices=8, timeout=300)
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            entry = json.loads(line.removeprefix("RESULT "))
            found[entry.pop("case")] = entry
    assert done.returncode == 0 and "total" in found, done.stdout[-3000:] + done.stderr[-6000:]
    return found


def test_hlo_check_sees_a_gathered_kernel(results):
    # a (16, 32) kernel split over 'model' and then replicated: its all-gather has 512 elements
    assert results["control"]["full_param_gathers"] == [512]


@pytest.mark.parametrize("case", ["vit-linen-AttnLRP", "bert-linen-CPLRP"])
def test_transformer_split_over_model_axis(results, case):
    r = results[case]
    assert r["rel"] < TOLERANCE and r["out"] < TOLERANCE, r
    assert r["spec"] == BATCH_SHARDED
    assert r["sharded_params"] >= 7  # q, k, v, out, intermediate, output (+ patch embedding / pooler)
    assert r["full_param_gathers"] == [], r


def test_nnx_annotations_place_host_parameters(results):
    r = results["bert-nnx-AttnLRP"]
    assert r["rel"] < TOLERANCE and r["out"] < TOLERANCE, r
    assert r["spec"] == BATCH_SHARDED
    expected = {
        "['layer_0']['attention']['query']['kernel']": "P(None, 'model', None)",
        "['layer_0']['attention']['key']['kernel']": "P(None, 'model', None)",
        "['layer_0']['attention']['value']['kernel']": "P(None, 'model', None)",
        "['layer_0']['attention']['out']['kernel']": "P('model', None, None)",
        "['layer_0']['intermediate']['kernel']": "P(None, 'model')",
        "['layer_0']['output']['kernel']": "P('model', None)",
        "['pooler']['kernel']": "P(None, 'model')",
    }
    placed = {path.removesuffix(".value"): spec for path, spec in r["placed_specs"].items()}
    assert placed == expected


def test_resnet_conv_kernels_split_over_output_channels(results):
    r = results["resnet-linen-EpsilonPlusFlat"]
    assert r["spec"] == BATCH_SHARDED
    assert r["sharded_params"] == 13  # 12 convolutions (64 to 512 channels) and the 8-class fc
    assert r["full_param_gathers"] == [], r
    if r["rel"] >= TOLERANCE:
        # float32 rounding of a 512-channel ResNet is itself about 1e-6: then the sharded result must be
        # as close to the float64 truth as the single-device float32 result is
        noise = results["resnet-float32-vs-float64"]
        assert r["rel"] <= 3 * noise["single"] and noise["sharded"] <= 2 * noise["single"], (r, noise)


def test_shardings_inside_the_model_survive_and_chunks_stay_per_device(results):
    r = results["jit-shardings"]
    assert len(r["in_model"]) == 4 and r["missing"] == [], r  # two kernels, a constraint, a jit
    assert r["rel"] < TOLERANCE and r["chunked"] < TOLERANCE, r
    assert r["chunked_spec"] == BATCH_SHARDED


def test_parameters_on_other_devices_are_refused(results):
    message = results["errors"]["other_devices"] or ""
    assert "['params']['kernel'] lies on 4 devices that are not the mesh's 8" in message, message


# ------------------------------------------------------------------------------------ in this process


@pytest.fixture(scope="module")
def small():
    model = nn.Dense(3)
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    return jlrp.explain(model, composites.EpsilonPlus()), model.init(jax.random.key(0), x), x


def test_one_device_mesh_equals_plain_call(small):
    explained, variables, x = small
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    _, expected = jlrp.attribute(explained, variables, x, target=np.arange(5) % 3)
    out, got = jlrp.attribute(explained, variables, x, target=np.arange(5) % 3, mesh=mesh, batch_size=2)
    assert got.shape == x.shape and out.shape == (5, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"mesh": "mesh", "devices": 1}, ValueError, "not both"),
        ({"batch_axis": "data"}, ValueError, "pass a mesh too"),
        ({"mesh": "mesh", "batch_axis": "model"}, ValueError, "axes ('data',)"),
        ({"mesh": object()}, TypeError, "jax.sharding.Mesh"),
    ],
)
def test_mesh_options_are_checked(small, options, error, message):
    explained, variables, x = small
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
    options = {k: mesh if v == "mesh" else v for k, v in options.items()}
    with pytest.raises(error, match=re.escape(message)):
        jlrp.attribute(explained, variables, x, **options)
