"""``jlrp explain`` on folders of real-world files: zoo models, preprocessing, bad files, summary, resume,
orbax/msgpack checkpoints, and whole-run problems that stop before any work.

A tiny linen CNN is registered as a zoo model (no EfficientNet here: speed); the photos are made with
Pillow in the test, including a corrupt file, a truncated JPEG, a text file, greyscale, RGBA and a photo
smaller than the crop.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from PIL import Image

import jlrp
from jlrp.cli import main, outputs
from jlrp.cli.models import ZOO, ZooModel

CROP = 16
CLASSES = ["apple", "banana", "cherry"]


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def tiny_variables(seed=0):
    return Tiny().init(jax.random.PRNGKey(seed), jnp.zeros((1, CROP, CROP, 3)))


def reference_preprocess(image):
    """torchvision's Resize(18) + CenterCrop(16) + Normalize(ImageNet) written out for the test."""
    image = image.convert("RGB")
    w, h = image.size
    s = 18 / min(w, h)
    size = (max(CROP, round(w * s)), max(CROP, round(h * s)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - CROP) // 2, (size[1] - CROP) // 2
    x = np.asarray(image.crop((left, top, left + CROP, top + CROP)), np.float32) / 255
    return (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


@pytest.fixture
def tiny_zoo(monkeypatch):
    variables = tiny_variables()
    entry = ZooModel(
        build=lambda n: Tiny(),
        load=lambda: (Tiny(), variables),
        classes=lambda: CLASSES,
        crop=CROP,
        description="test model",
    )
    monkeypatch.setitem(ZOO, "tiny_zoo", entry)
    return variables


def photo(seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    photo(0).save(root / "a_good.jpg", quality=95)
    photo(1, mode="L").save(root / "b_grey.png")
    photo(2, mode="RGBA").save(root / "c_rgba.png")
    photo(3, size=(10, 12)).save(root / "d_small.png")
    (root / "e_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    buffer = io.BytesIO()
    photo(4, size=(64, 64)).save(buffer, format="JPEG")
    (root / "f_truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "g_notes.txt").write_text("not an image")
    np.save(root / "h_array.npy", np.asarray(photo(5)))
    return root


def run(folder, out, *extra, model="tiny_zoo"):
    return main(
        ["explain", "--model", model, "--inputs", str(folder), "--out", str(out), "--no-progress", *extra]
    )


def summary(out):
    return {r["file"]: r for r in csv.DictReader(open(out / "summary.csv"))}


def test_folder_with_bad_files_explains_the_rest_and_lists_them(tiny_zoo, folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(folder, out, "--overlay", "--batch-size", "3") == 0
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    for name in ("e_corrupt.png", "f_truncated.jpg", "g_notes.txt"):
        lines = [line for line in err if name in line]
        assert len(lines) == 1 and lines[0].startswith("jlrp explain: skipping"), (name, err)
    assert "Traceback" not in captured.err
    assert "explained 5 inputs" in captured.out and "skipped 3 files" in captured.out
    rows = summary(out)
    assert sorted(rows) == sorted(p.name for p in folder.iterdir())
    status = {name: r["status"] for name, r in rows.items()}
    assert status == {
        "a_good.jpg": "ok",
        "b_grey.png": "ok",
        "c_rgba.png": "ok",
        "d_small.png": "ok",
        "e_corrupt.png": "skipped",
        "f_truncated.jpg": "skipped",
        "g_notes.txt": "skipped",
        "h_array.npy": "ok",
    }
    assert "greyscale" in rows["b_grey.png"]["note"] and "converted to RGB" in rows["b_grey.png"]["note"]
    assert "RGBA" in rows["c_rgba.png"]["note"] and "alpha" in rows["c_rgba.png"]["note"]
    assert "upscaled from 10x12" in rows["d_small.png"]["note"]
    assert "truncated" in rows["f_truncated.jpg"]["note"]
    assert rows["a_good.jpg"]["note"] == ""

    # the explained numbers equal jlrp.attribute on an independent preprocessing
    x = reference_preprocess(Image.open(folder / "a_good.jpg"))[None].astype(np.float32)
    output, relevance = jlrp.attribute(jlrp.explain(Tiny(), "epsilon_plus_flat"), tiny_zoo, jnp.asarray(x))
    good = rows["a_good.jpg"]
    predicted = int(np.argmax(output[0]))
    assert int(good["predicted"]) == predicted and good["class_name"] == CLASSES[predicted]
    np.testing.assert_allclose(float(good["relevance_sum"]), float(relevance.sum()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(good["score"]), float(output[0, predicted]), rtol=1e-5)
    p = np.exp(output[0] - jax.nn.logsumexp(output[0]))[predicted]
    np.testing.assert_allclose(float(good["probability"]), float(p), rtol=1e-4)
    for row in rows.values():
        if row["status"] == "ok":
            with Image.open(out / row["heatmap"]) as image:
                assert image.size == (CROP, CROP) and image.mode == "RGB"  # overlay: RGB
        else:
            assert row["heatmap"] == "" and row["relevance_sum"] == ""
    document = json.loads((out / "summary.json").read_text())
    assert document["counts"] == {"ok": 5, "skipped": 3}
    assert {f["file"]: f["status"] for f in document["files"]} == status
    assert len(list(csv.DictReader(open(out / "index.csv")))) == 5
    assert not list(out.rglob(".*"))


def test_rerun_skips_done_files_and_overwrite_recomputes(tiny_zoo, folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert run(folder, out, "--batch-size", "2") == 0
    first = (out / "summary.csv").read_text()
    written = []
    original = outputs.save_shard

    def counting(path, *args, **kwargs):
        written.append(path.name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_shard", counting)
    assert run(folder, out, "--batch-size", "2") == 0
    assert written == [] and (out / "summary.csv").read_text() == first
    assert "3 of 3 shards are complete" in capsys.readouterr().err
    # a heatmap deleted by hand: its shard is recomputed, nothing else
    row = summary(out)["c_rgba.png"]
    (out / row["heatmap"]).unlink()
    assert run(folder, out, "--batch-size", "2") == 0
    assert len(written) == 1 and (out / row["heatmap"]).is_file()
    # other settings are refused, --overwrite recomputes everything
    written.clear()
    assert run(folder, out, "--batch-size", "2", "--composite", "epsilon_plus") == 2
    assert "--overwrite" in capsys.readouterr().err and written == []
    assert run(folder, out, "--batch-size", "2", "--composite", "epsilon_plus", "--overwrite") == 0
    assert len(written) == 3


def test_preprocess_none_skips_images_of_another_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(
        ZOO, "tiny_none", ZooModel(build=lambda n: Tiny(), load=lambda: (Tiny(), tiny_variables()), crop=CROP)
    )
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        photo(i, size=(CROP, CROP)).save(root / f"p{i}.png")
    photo(9, size=(20, 20)).save(root / "z_big.png")
    out = tmp_path / "out"
    assert run(root, out, "--preprocess", "none", model="tiny_none") == 0
    err = capsys.readouterr().err
    assert "z_big.png: 20x20 pixels" in err
    rows = summary(out)
    assert rows["z_big.png"]["status"] == "skipped" and rows["p1.png"]["status"] == "ok"
    assert rows["p1.png"]["class_name"] == ""  # no class names for this model


def test_orbax_and_msgpack_checkpoints_of_a_user_model(tmp_path):
    import orbax.checkpoint as ocp

    from jlrp.demos.digits import DigitsCNN

    model = DigitsCNN()
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    variables = jax.tree_util.tree_map(np.asarray, model.init(jax.random.PRNGKey(3), jnp.asarray(x[:1])))
    np.save(tmp_path / "x.npy", x)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((tmp_path / "ckpt").resolve(), variables)
    checkpointer.wait_until_finished()
    manager = ocp.CheckpointManager((tmp_path / "runs").resolve())
    manager.save(7, args=ocp.args.StandardSave(variables))
    manager.wait_until_finished()
    (tmp_path / "vars.msgpack").write_bytes(serialization.to_bytes(variables))
    _, expected = jlrp.attribute(jlrp.explain(model, "epsilon_plus_flat"), variables, jnp.asarray(x))
    for name in ("ckpt", "runs", "vars.msgpack"):
        out = tmp_path / f"out-{name}"
        args = ["explain", "--model", "jlrp.demos.digits:DigitsCNN", "--variables", str(tmp_path / name)]
        assert main([*args, "--inputs", str(tmp_path / "x.npy"), "--out", str(out), "--no-progress"]) == 0
        with np.load(out / "relevance-00000.npz") as data:
            np.testing.assert_allclose(data["relevance"], expected, rtol=1e-5, atol=1e-7)


def evil_pth(path):
    """A .pth (zip of a pickle) whose pickle calls os.system: a state dict never needs that."""

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": Evil()}, protocol=2))


def _whole_run_cases(tmp_path, folder):
    bad_msgpack = tmp_path / "bad.msgpack"
    bad_msgpack.write_bytes(b"\x00not msgpack at all")
    wrong = tmp_path / "wrong.msgpack"
    other = nn.Dense(3)
    wrong.write_bytes(serialization.to_bytes(other.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))))
    wrong_shapes = tmp_path / "wrong_shapes.msgpack"
    variables = jax.tree_util.tree_map(np.asarray, tiny_variables())
    variables["params"]["Dense_0"]["kernel"] = np.zeros((7, 3), np.float32)
    wrong_shapes.write_bytes(serialization.to_bytes(variables))
    evil = tmp_path / "evil.pth"
    evil_pth(evil)
    return {
        "unknown model": (["--model", "resnet9000"], "unknown model 'resnet9000'"),
        "missing folder": (["--inputs", str(tmp_path / "nope")], "does not exist"),
        "unknown composite": (["--composite", "magic"], "unknown composite 'magic'"),
        "unreadable checkpoint": (["--variables", str(bad_msgpack)], "bad.msgpack"),
        "checkpoint of another model": (["--variables", str(wrong)], "wrong.msgpack"),
        "checkpoint shapes do not fit": (["--variables", str(wrong_shapes)], "wrong_shapes.msgpack"),
        "pth with unexpected pickle content": (["--variables", str(evil)], "evil.pth"),
        "missing checkpoint": (["--variables", str(tmp_path / "none.msgpack")], "does not exist"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown model",
        "missing folder",
        "unknown composite",
        "unreadable checkpoint",
        "checkpoint of another model",
        "checkpoint shapes do not fit",
        "pth with unexpected pickle content",
        "missing checkpoint",
    ],
)
def test_whole_run_problems_exit_2_before_any_work(tiny_zoo, folder, tmp_path, capsys, monkeypatch, case):
    # a zoo entry that reads .pth state dicts, so the pickle check is what stops the run
    monkeypatch.setitem(
        ZOO,
        "tiny_zoo",
        ZooModel(
            build=lambda n: Tiny(),
            load=lambda: (Tiny(), tiny_zoo),
            crop=CROP,
            from_state_dict=lambda model, sd: pytest.fail("a refused pickle must not reach the converter"),
        ),
    )
    args, fragment = _whole_run_cases(tmp_path, folder)[case]
    out = tmp_path / "out"
    base = {"--model": "tiny_zoo", "--inputs": str(folder), "--out": str(out)}
    for key, value in zip(args[::2], args[1::2]):
        base[key] = value
    argv = ["explain", "--no-progress", *[item for pair in base.items() for item in pair]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jlrp explain: error:") and fragment in lines[0], err
    assert not out.exists()  # nothing was written


def test_python_dash_m_jlrp_runs_the_command_line():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "jlrp", "explain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--preprocess" in proc.stdout and "resume" in proc.stdout


def test_efficientnet_lite0_zoo_entry_uses_the_models_api(tmp_path):
    models = pytest.importorskip("jlrp.models")
    if not hasattr(models, "load_efficientnet_lite0"):
        pytest.skip("EfficientNet-Lite0 is not in jlrp.models yet")
    entry = ZOO["efficientnet_lite0"]
    image = photo(7, size=(300, 260))
    np.testing.assert_array_equal(entry.preprocess(image), models.efficientnet_lite0_preprocess(image))
    assert entry.classes() == models.imagenet_classes() and len(entry.classes()) == 1000
    low, high = entry.input_range
    x = models.efficientnet_lite0_preprocess(Image.new("RGB", (224, 224), (0, 255, 0)))
    np.testing.assert_allclose([x.min(), x.max()], [low, high], rtol=1e-6)
