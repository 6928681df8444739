"""Fresh Python interpreters for device tests (the pattern of ``tests/test_parallel.py``).

``XLA_FLAGS`` (simulated CPU devices) and ``jax.distributed`` must be set up before JAX starts, so
tests that need several devices or several JAX processes run their code in a subprocess with this
checkout first on ``PYTHONPATH``. Every run is bounded in time: a process that outlives its deadline
is killed (with the others of its group) and its output kept for the failure message.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a subprocess: CPU only, ``devices`` simulated CPU devices, this checkout importable."""
    env = dict(os.environ)
    if devices is not None:
        flag = f"--xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def run_python(
    command: Sequence[str], *, devices: int | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """``python *command`` (e.g. ``["-c", code]`` or ``[script, arg]``) with ``devices`` CPU devices.

    Raises:
        subprocess.TimeoutExpired: after ``timeout`` seconds (the process is killed).
    """
    return subprocess.run(
        [sys.executable, *command],
        env=python_env(devices),
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_group(
    commands: Sequence[Sequence[str]],
    *,
    devices: int | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    envs: Sequence[dict[str, str]] | None = None,
) -> list[tuple[int | None, str]]:
    """Run ``python *command`` for every command at once (one process each) and wait for all.

    Output goes to files (not pipes, which a chatty process could fill and block on). If any process
    is still running after ``timeout`` seconds, all are killed; their return code is then ``None``.

    Returns:
        ``(returncode, stdout + stderr)`` per command, in order.
    """
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp) / f"{k}.log" for k in range(len(commands))]
        procs = []
        for k, (command, log) in enumerate(zip(commands, logs)):
            env = python_env(devices, **(envs[k] if envs else {}))
            with open(log, "w") as f:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *command],
                        env=env,
                        cwd=cwd or ROOT,
                        stdout=f,
                        stderr=subprocess.STDOUT,
                    )
                )
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
        if None in codes:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            codes = [proc.returncode if code is not None else None for proc, code in zip(procs, codes)]
        return [(code, log.read_text()) for code, log in zip(codes, logs)]
