"""Several JAX processes: ``jax.distributed`` on 127.0.0.1 and ``jlrp explain`` split over processes.

- Library: two processes x two CPU devices join one 2x2 mesh (CPU collectives by gloo); each feeds its
  own half of the batch to ``jlrp.attribute(..., mesh=mesh)`` and to the attributors (global arrays);
  its rows equal a single-device run of the whole batch within 1e-6 (float32; the Dense kernels are
  split over the mesh's 'model' axis, so sums are reordered). See ``tests/_multiprocess_script.py``.
- Command line: two ``jlrp explain --distributed`` processes under a SLURM-like environment (what
  ``jax.distributed.initialize`` reads) share one ``--out``; their shards, heatmaps and the merged
  summary equal a single-process run's. In-process: the split runs one after the other, process 0
  waiting (and giving up) for the other's shards, resuming, and ``--overwrite`` touching only its own
  files.

Every subprocess is bounded in time and killed on a hang.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _spawn import ROOT, run_group
from flax import serialization
from PIL import Image

from jlrp.cli import main

TOLERANCE = 1e-6
TINY = textwrap.dedent(
    """
    import flax.linen as nn
    import jax.numpy as jnp


    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3))(x))
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def results(log: str) -> dict[str, dict]:
    found = {}
    for line in log.splitlines():
        if line.startswith("RESULT "):
            entry = json.loads(line.removeprefix("RESULT "))
            found[entry.pop("case")] = entry
    return found


def test_attribute_and_attributors_across_two_processes():
    port = str(free_port())
    script = str(ROOT / "tests" / "_multiprocess_script.py")
    runs = run_group([[script, "0", port], [script, "1", port]], devices=2, timeout=180)
    for code, log in runs:
        assert code == 0, log[-6000:]
    for process, (_, log) in enumerate(runs):
        found = results(log)
        assert "total" in found, log[-3000:]
        r = found["attribute"]
        assert r["shape"] == [8, 6, 6, 3] and r["spec"] == "P('data',)", r
        assert r["rel"] < TOLERANCE and r["out"] < TOLERANCE, (process, r)
        assert "must split evenly over its 2 positions" in (found["uneven"]["error"] or ""), found["uneven"]
        for name in ("Gradient", "SmoothGrad", "IntegratedGradients"):
            assert found[name]["shape"] == [8, 6, 6, 3], found[name]
            assert found[name]["rel"] < TOLERANCE, (process, name, found[name])


# ------------------------------------------------------------------------------------ command line


@pytest.fixture
def job(tmp_path):
    """A folder of 5 tiny photos, a linen model importable as ``tinynet:Tiny`` and its variables."""
    (tmp_path / "tinynet.py").write_text(TINY)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinynet_for_variables", tmp_path / "tinynet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    variables = module.Tiny().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3), jnp.float32))
    variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
    (tmp_path / "tiny.msgpack").write_bytes(serialization.to_bytes(variables))
    return tmp_path


def explain_args(out: str, *extra: str) -> list[str]:
    return [
        "explain", "--model", "tinynet:Tiny", "--variables", "tiny.msgpack", "--inputs", "photos",
        "--preprocess", "none", "--batch-size", "2", "--no-progress", "--out", out, *extra,
    ]  # fmt: skip


def assert_same_results(got, expected, shards=3):
    for name in ("summary.csv", "summary.json", "index.csv"):
        assert (got / name).read_text() == (expected / name).read_text(), name
    for shard in range(shards):
        with (
            np.load(got / f"relevance-{shard:05d}.npz") as a,
            np.load(expected / f"relevance-{shard:05d}.npz") as b,
        ):
            assert sorted(a.files) == sorted(b.files)
            for key in a.files:
                assert np.array_equal(a[key], b[key]), (shard, key)
    assert sorted(p.name for p in (got / "heatmaps").iterdir()) == sorted(
        p.name for p in (expected / "heatmaps").iterdir()
    )


def test_cli_two_distributed_processes_write_one_summary(job):
    port = str(free_port())
    slurm = [
        {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2", "SLURM_PROCID": str(k),
         "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": port}
        for k in (0, 1)
    ]  # fmt: skip
    commands = [
        ["-m", "jlrp", *explain_args("split", "--distributed", "--wait-timeout", "120")],
        ["-m", "jlrp", *explain_args("split", "--distributed")],
        ["-m", "jlrp", *explain_args("single")],
    ]
    runs = run_group(commands, cwd=job, timeout=180, envs=[slurm[0], slurm[1], {}])
    for code, log in runs:
        assert code == 0, log[-4000:]
    assert "process 1 of 2: explained its 1 of 3 shards" in runs[1][1]
    assert "explained 5 inputs in 3 shards" in runs[0][1]
    assert_same_results(job / "split", job / "single")
    summary = json.loads((job / "split" / "summary.json").read_text())
    assert [f["file"] for f in summary["files"]] == [f"p{i}.png" for i in range(5)]
    assert summary["counts"] == {"ok": 5}


def test_cli_split_waits_resumes_and_overwrites_only_its_own(job, monkeypatch, capsys):
    monkeypatch.chdir(job)
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert main(explain_args("single")) == 0
    split = job / "split"

    # process 0 alone: its shards 0 and 2, then it gives up waiting for shard 1 (no summary)
    assert (
        main(explain_args("split", "--num-processes", "2", "--process-id", "0", "--wait-timeout", "0.2")) == 2
    )
    err = capsys.readouterr().err
    assert "1 shards of the other processes are still missing" in err and "relevance-00001.npz" in err
    assert sorted(p.name for p in split.glob("relevance-*.npz")) == [
        "relevance-00000.npz",
        "relevance-00002.npz",
    ]
    assert not (split / "summary.csv").exists()
    first = (split / "relevance-00000.npz").stat().st_mtime_ns

    assert main(explain_args("split", "--num-processes", "2", "--process-id", "1")) == 0
    assert "process 1 of 2: explained its 1 of 3 shards" in capsys.readouterr().out
    assert not (split / "summary.csv").exists()

    # process 0 again: nothing to compute, the summary is written
    assert main(explain_args("split", "--num-processes", "2", "--process-id", "0")) == 0
    captured = capsys.readouterr()
    assert "resuming: 2 of 2 shards are complete" in captured.err
    assert (split / "relevance-00000.npz").stat().st_mtime_ns == first
    assert_same_results(split, job / "single")

    # --overwrite by process 1 recomputes its shard and leaves process 0's files and the summary alone
    assert main(explain_args("split", "--num-processes", "2", "--process-id", "1", "--overwrite")) == 0
    assert (split / "relevance-00000.npz").stat().st_mtime_ns == first
    assert (split / "summary.csv").exists()
    assert_same_results(split, job / "single")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--process-id", "1"], "go together"),
        (["--num-processes", "2", "--process-id", "2"], "must be in 0..1"),
        (["--distributed"], "jax.distributed.initialize() failed"),
    ],
)
def test_cli_process_options_are_checked(job, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(job)
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert main(explain_args("out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(job / "out")
