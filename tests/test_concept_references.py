"""Reference samples (CRP relevance/activation maximisation): brute force, resume, receptive-field boxes, CLI.

The brute-force reference computes every sample's channel relevance and activation with one big
``concepts.attribute`` call and ranks them with numpy's stable argsort; the receptive-field test compares
the boxes with the analytic receptive field of a convolution stack without pooling (positive weights and
inputs, so the support of a unit's heatmap is its whole receptive field).
"""

from __future__ import annotations

import csv
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageOps

import jlrp
from jlrp import composites, concepts, rules
from jlrp.cli import main
from jlrp.cli.models import ZOO, ZooModel
from jlrp.errors import UsageError


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="c1")(x))
        x = nn.relu(nn.Conv(5, (3, 3), name="c2")(x))
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def net():
    model = Net()
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 6, 6, 2)))
    return jlrp.explain(model, composites.EpsilonPlusFlat()), variables


@pytest.fixture(scope="module")
def samples():
    x = np.array(jax.random.normal(jax.random.PRNGKey(0), (11, 6, 6, 2)), np.float64)
    x[8] = x[2]  # a tie across batches: the smaller id comes first
    return x


def batches_of(x, size, ids=None):
    return [
        x[i : i + size] if ids is None else (x[i : i + size], ids[i : i + size])
        for i in range(0, len(x), size)
    ]


K = 6


@pytest.fixture(scope="module")
def channel_scores(net, samples):
    """Every sample's channel relevance (summed over positions) and activation (max) from one big call,
    reduced with numpy loops in float64: ``{key: (rel (N, C), act (N, C))}``."""
    explained, variables = net
    res = concepts.attribute(explained, variables, jnp.asarray(samples), capture=["c1", "c2"])
    out = {}
    for key in ("c1", "c2"):
        relevance = np.asarray(res.relevances[key], np.float64)
        activation = np.asarray(res.activations[key], np.float64)
        n, _, _, channels = relevance.shape
        rel, act = np.zeros((n, channels)), np.zeros((n, channels))
        for i in range(n):
            for c in range(channels):
                rel[i, c] = relevance[i, :, :, c].sum()
                act[i, c] = activation[i, :, :, c].max()
        out[key] = (rel, act)
    return out


def ranked(values, k):
    """numpy's stable argsort of the negated values per channel: ties keep the smaller sample index first."""
    order = np.stack([np.argsort(-values[:, c], kind="stable")[:k] for c in range(values.shape[1])])
    return order, np.take_along_axis(values.T, order, axis=1)


@pytest.fixture(scope="module")
def full_refs(net, samples):
    explained, variables = net
    return concepts.references(explained, variables, batches_of(samples, 4), layers="c*", k=K, progress=False)


def test_reference_samples_agree_with_brute_force(full_refs, channel_scores):
    refs = full_refs
    assert list(refs.layers) == ["c1", "c2"] and refs.n_samples == 11 and refs.complete
    for key, layer in refs.layers.items():
        rel, act = channel_scores[key]
        for prefix, values in (("rel", rel), ("act", act)):
            ids, top = ranked(values, K)
            np.testing.assert_array_equal(getattr(layer, f"{prefix}_ids"), ids, err_msg=f"{key} {prefix}")
            np.testing.assert_allclose(getattr(layer, f"{prefix}_values"), top, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.relevance_sum, rel.sum(axis=0), rtol=1e-10, atol=1e-12)
    # the duplicated sample ties with its original: id 2 comes right before id 8
    tied = [getattr(layer, name) for layer in refs.layers.values() for name in ("rel_ids", "act_ids")]
    rows = [list(r) for ids in tied for r in ids if 2 in r and 8 in r]
    assert rows and all(r.index(2) + 1 == r.index(8) for r in rows)


def test_given_ids_channels_and_fewer_samples_than_k(net, samples, channel_scores):
    explained, variables = net
    ids = 1000 - np.arange(11)  # decreasing: of the tied samples 2 and 8, id 992 (seen later) ranks first
    refs = concepts.references(
        explained,
        variables,
        batches_of(samples, 4, ids),
        layers="c*",
        k=K,
        channels={"c2": [4, 1]},
        boxes=False,
        progress=False,
    )
    layer = refs.layers["c2"]
    np.testing.assert_array_equal(layer.channels, [4, 1])
    np.testing.assert_array_equal(refs.layers["c1"].channels, [0, 1, 2, 3])
    tied = 0
    for key, layer in refs.layers.items():
        rel, act = channel_scores[key]
        for prefix, values in (("rel", rel), ("act", act)):
            for row, c in enumerate(layer.channels):
                order = np.lexsort((ids, -values[:, c]))[:K]  # by value, ties by the given id
                np.testing.assert_array_equal(getattr(layer, f"{prefix}_ids")[row], ids[order])
                tied += 2 in order and 8 in order
    assert tied

    few = concepts.references(
        explained,
        variables,
        [(samples[:3], ids[:3])],
        layers="c*",
        k=5,
        batch_size=4,
        boxes=False,
        progress=False,
    )
    layer = few.layers["c2"]
    expected, _ = ranked(channel_scores["c2"][0][:3], 3)
    np.testing.assert_array_equal(layer.rel_ids[:, :3], ids[expected])
    assert (layer.rel_ids[:, 3:] == -1).all() and np.isnan(layer.rel_values[:, 3:]).all()


def test_nnx_model_takes_the_data_in_place_of_x():
    from flax import nnx

    class NnxNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(jnp.mean(nnx.relu(self.conv(x)), axis=(1, 2)))

    explained = jlrp.explain(NnxNet(nnx.Rngs(0)), composites.EpsilonPlusFlat())
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (5, 5, 5, 2)))
    refs = concepts.references(explained, x, layers="conv", k=2, batch_size=3, boxes=False, progress=False)
    relevance = np.asarray(concepts.attribute(explained, jnp.asarray(x), capture="conv").relevances["conv"])
    ids, _ = ranked(relevance.sum(axis=(1, 2)), 2)
    np.testing.assert_array_equal(refs.layers["conv"].rel_ids, ids)


class Interrupting:
    """A Sequence of batches that raises KeyboardInterrupt at chosen (batch, n-th access) pairs."""

    def __init__(self, batches, fail_at=()):
        self.batches, self.fail_at, self.accesses = batches, set(fail_at), []

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, b):
        self.accesses.append(b)
        if (b, self.accesses.count(b)) in self.fail_at:
            raise KeyboardInterrupt
        return self.batches[b]


def _arrays(refs):
    names = ("rel_ids", "rel_values", "rel_boxes", "act_ids", "act_values", "act_boxes", "relevance_sum")
    arrays = {(key, name): getattr(layer, name) for key, layer in refs.layers.items() for name in names}
    return arrays | {("", "n"): refs.n_samples}


def test_resume_after_interruptions_gives_the_uninterrupted_result(net, samples, full_refs, tmp_path):
    explained, variables = net
    data = batches_of(samples, 4)
    kw = dict(layers="c*", k=K, progress=False)
    state = tmp_path / "state.npz"
    first = Interrupting(data, fail_at=[(2, 1)])  # stop after 2 batches
    with pytest.raises(KeyboardInterrupt):
        concepts.references(explained, variables, first, state=state, **kw)
    saved = concepts.ReferenceSamples.load(state)
    assert saved.batches == 2 and not saved.streamed and saved.n_samples == 8

    second = Interrupting(data, fail_at=[(1, 1)])  # stop again in the box pass (when it reads batch 1)
    with pytest.raises(KeyboardInterrupt):
        concepts.references(explained, variables, second, state=state, **kw)
    assert second.accesses[:2] == [2, 0]  # batches 0 and 1 are not read again while streaming
    saved = concepts.ReferenceSamples.load(state)
    done = np.concatenate([layer.rel_boxes[..., 0].ravel() >= 0 for layer in saved.layers.values()])
    assert saved.streamed and done.any() and not done.all()

    resumed = concepts.references(explained, variables, Interrupting(data), state=state, **kw)
    expected, got = _arrays(full_refs), _arrays(resumed)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=str(name))
    for key, layer in full_refs.layers.items():
        np.testing.assert_allclose(
            resumed.layers[key].act_heatmaps, layer.act_heatmaps, rtol=1e-6, atol=1e-12
        )

    again = Interrupting(data)  # finished: returned from the state without reading anything
    concepts.references(explained, variables, again, state=state, **kw)
    assert again.accesses == []
    with pytest.raises(UsageError, match="other arguments"):
        concepts.references(explained, variables, data, state=state, **{**kw, "k": 2})


class Positive(nn.Module):
    @nn.compact
    def __call__(self, x):
        positive = nn.initializers.uniform(1.0)
        x = nn.relu(nn.Conv(3, (3, 3), use_bias=False, kernel_init=positive, name="c1")(x))
        x = nn.relu(nn.Conv(4, (3, 3), use_bias=False, kernel_init=positive, name="c2")(x))
        return nn.Dense(2, use_bias=False, kernel_init=positive, name="fc")(x.reshape(len(x), -1))


def test_boxes_are_the_analytic_receptive_fields_of_a_conv_stack():
    size = 9
    model = Positive()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 1)))
    variables = jax.tree_util.tree_map(lambda w: w + 0.05, variables)  # strictly positive weights
    explained = jlrp.explain(model, {nn.Conv: rules.Epsilon(), nn.Dense: rules.Epsilon()})
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.0, (8, size, size, 1))
    for n, (i, j) in enumerate([(0, 0), (4, 4), (8, 3), (2, 8)]):  # bright spots move the argmax around
        x[n, i, j] = 20.0
    refs = concepts.references(
        explained, variables, batches_of(x, 4), layers="c2", k=4, heatmap_size=None, progress=False
    )
    layer = refs.layers["c2"]
    clipped = interior = 0
    for prefix in ("rel", "act"):
        pos, boxes = getattr(layer, f"{prefix}_pos"), getattr(layer, f"{prefix}_boxes")
        for (i, j), box in zip(pos.reshape(-1, 2), boxes.reshape(-1, 4)):
            # two 3x3 convolutions ("SAME"): the 5x5 window around (i, j), clipped at the borders
            expected = [max(0, i - 2), max(0, j - 2), min(size, i + 3), min(size, j + 3)]
            assert box.tolist() == expected, (prefix, i, j)
            clipped += expected != [i - 2, j - 2, i + 3, j + 3]
            interior += expected == [i - 2, j - 2, i + 3, j + 3]
    assert clipped and interior


def test_box_of_a_heatmap_support():
    from jlrp.concepts._references import _box

    heat = np.zeros((5, 7))
    heat[1, 2], heat[3, 5], heat[4, 0] = 1.0, 0.5, 1e-7  # the last one is below 1e-6 of the peak
    assert _box(heat, 1e-6).tolist() == [1, 2, 4, 6]
    assert _box(heat, 0.0).tolist() == [1, 0, 5, 6]
    assert _box(np.zeros((5, 7)), 1e-6).tolist() == [0, 0, 5, 7]  # no relevance: the whole input


def test_grids_of_crops_and_heatmaps(full_refs, samples, tmp_path):
    layer = full_refs.layers["c1"]
    pictures = (np.clip(samples[..., :1].repeat(3, -1) * 60 + 128, 0, 255)).astype(np.uint8)
    written = concepts.save_grids(
        full_refs, tmp_path, pictures, rankings=("relevance", "activation"), size=12
    )
    assert sorted(written["c1"]) == layer.channels.tolist() and (tmp_path / "c2" / "4.png").is_file()
    grid = np.asarray(Image.open(written["c1"][0]))
    assert grid.shape == (4 * 16, K * 16, 3)  # 2 rankings x (crops, heatmaps) rows, k columns, 2 px borders
    assert np.abs(layer.rel_heatmaps).max() > 0
    # the first cell is the first reference's box of its picture, scaled into the cell
    y0, x0, y1, x1 = layer.rel_boxes[0, 0]
    crop = Image.fromarray(pictures[layer.rel_ids[0, 0], y0:y1, x0:x1])
    expected = np.asarray(ImageOps.pad(crop, (12, 12), method=Image.Resampling.BICUBIC, color=(128,) * 3))
    np.testing.assert_array_equal(grid[2:14, 2:14], expected)
    # the heatmap row (stored at 64 x 64, drawn at 12 x 12) shows relevance where the crop has it
    assert not np.array_equal(
        grid[18:30, 2:14], np.asarray(ImageOps.grayscale(Image.fromarray(expected)).convert("RGB"))
    )


# --------------------------------------------------------------------------------------------------
# the command line

CROP = 12


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), name="conv")(x))
        return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture
def tiny_zoo(monkeypatch):
    variables = Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, CROP, CROP, 3)))
    entry = ZooModel(build=lambda n: Tiny(), load=lambda: (Tiny(), variables), crop=CROP, description="test")
    monkeypatch.setitem(ZOO, "tiny_concepts", entry)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for n in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(root / f"p{n}.png")
    (root / "q_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(100)))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    (root / "p2_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "readme.txt").write_text("not an image")
    return root


def test_cli_builds_views_and_resumes_skipping_bad_files(tiny_zoo, folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "concepts",
        "--model",
        "tiny_concepts",
        "--inputs",
        str(folder),
        "--layers",
        "conv",
        "--top-k",
        "2",
    ]
    argv += ["--batch-size", "3", "--out", str(out), "--no-progress", "--by", "both"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    for name in ("q_corrupt.png", "p2_truncated.jpg", "readme.txt"):
        lines = [line for line in captured.err.splitlines() if name in line]
        assert len(lines) == 1 and lines[0].startswith("jlrp concepts: skipping"), (name, captured.err)
    assert "skipped 3 files" in captured.out and "layer conv (3 channels, 5 images)" in captured.out
    with open(out / "files.csv", newline="") as f:
        status = {r["file"]: r["status"] for r in csv.DictReader(f)}
    assert status == {**{f"p{n}.png": "ok" for n in range(5)}, "p2_truncated.jpg": "skipped"} | {
        "q_corrupt.png": "skipped",
        "readme.txt": "skipped",
    }
    refs = concepts.ReferenceSamples.load(out / "references.npz")
    layer = refs.layers["conv"]
    names = sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg"))
    good = {names.index(f"p{n}.png") for n in range(5)}
    assert refs.complete and set(layer.rel_ids.ravel()) <= good and set(layer.act_ids.ravel()) <= good
    for c in range(3):
        assert (out / "conv" / f"{c}.png").is_file()
    assert (
        "conv/0.png" in (out / "index.html").read_text()
        and "q_corrupt.png" in (out / "index.html").read_text()
    )

    assert main(argv) == 0  # finished: resumes from the state, same table
    again = capsys.readouterr()
    assert "resuming" in again.err and again.out.splitlines()[:5] == captured.out.splitlines()[:5]
    assert main(["concepts", "--view", str(out)]) == 0
    view = capsys.readouterr().out
    assert view.splitlines()[:5] == captured.out.splitlines()[:5]

    assert main([*argv, "--top-k", "3"]) == 2  # other settings in the same folder
    assert "other settings" in capsys.readouterr().err
    other = tmp_path / "o2"
    base = [
        "concepts",
        "--model",
        "tiny_concepts",
        "--inputs",
        str(folder),
        "--out",
        str(other),
        "--no-progress",
    ]
    assert main([*base, "--layers", "nope"]) == 2
    err = capsys.readouterr().err
    assert "select no layer" in err and "conv" in err and "Traceback" not in err
    assert main([*base, "--layers", "conv", "--channels", "0-3"]) == 2
    assert "--channels 3 is out of range: layer conv has 3 channels" in capsys.readouterr().err
    assert not (other / "run.json").exists()  # both stopped before any work


def test_a_repeated_attribute_call_does_not_trace_the_model_again():
    traces = []

    class Counting(nn.Module):
        @nn.compact
        def __call__(self, x):
            traces.append(1)  # runs only while JAX traces the model
            return nn.Dense(2, name="fc")(nn.relu(nn.Dense(3, name="hidden")(x)))

    model = Counting()
    variables = model.init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    explained = jlrp.explain(model, {nn.Dense: rules.Epsilon()})
    x = jnp.ones((2, 4))
    concepts.attribute(explained, variables, x, capture="hidden")
    before = len(traces)
    for _ in range(2):  # e.g. one call per batch of a data set
        concepts.attribute(explained, variables, x + 1.0, capture="hidden")
    assert len(traces) == before


def test_concepts_help(capsys):
    assert main(["concepts", "--help"]) == 0
    text = capsys.readouterr().out
    for word in ("--layers", "--top-k", "--channels", "--view", "Resume", "files.csv", "efficientnet_lite0"):
        assert word in text
    assert main(["--help"]) == 0 and "concepts" in capsys.readouterr().out
