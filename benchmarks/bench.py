"""Benchmark jlrp against a plain JAX gradient and against zennit, in one run on one machine.

For every model (a small CNN, VGG16, ResNet50: torchvision architectures with the same random weights
in torch and, via :func:`jlrp.models.from_torchvision`, in Flax) and batch size, this times

- ``gradient``: a jitted ``jax.vjp`` input gradient of the plain model, cotangent ``output * one_hot``;
- ``jlrp``: :func:`jlrp.attribute` with ``EpsilonPlusFlat``, ``EpsilonGammaBox(-3, 3)`` and
  ``EpsilonAlpha2Beta1`` (jit-compiled by jlrp itself);
- ``torch``: the same gradient in torch, and ``zennit`` with the same composites and zennit's own
  canonizers (float32; torch on the CPU with ``torch.set_num_threads`` = the CPUs JAX uses, or on CUDA with
  ``--torch-device cuda``).

Protocol: every (model, batch size, framework) runs in its own worker subprocess, torch then JAX for
each batch size, so one framework's memory (weights, allocator caches) never weighs on the other's and
batch 32 of VGG16 at 224x224 fits in 24 GB. The torch worker writes the weights (seeded) for the JAX
worker and its relevance for the comparison. The CPUs a worker may use are fixed with
``sched_setaffinity`` before JAX or torch start (``--threads``; default: all), and
``torch.set_num_threads`` gets the same number, so XLA's thread pool and torch's intra-op threads
have the same size. Every method is called once (the *first call*: tracing and compilation for JAX),
then the worker's methods are timed round-robin (so slow drifts of the machine's load hit the gradient
and the composites alike) until ``--repeats`` rounds are done, or at least ``--min-repeats`` rounds
once ``--budget`` seconds have passed. Reported: the median of the timed calls, images/s, the ratios
jlrp/gradient and zennit/jlrp, the compile time (first call minus the median), and memory:

- ``peak MiB`` (the table): the memory one call allocates at its peak on top of its inputs and the
  weights, measured without the C allocator in the way. JAX: the temporary buffer plus the output that
  XLA's buffer assignment plans for the compiled program (``Compiled.memory_analysis()``). torch: the
  running sum of the torch profiler's allocation/free events during one extra, untimed call (so zennit's
  per-call modified weights count, as jlrp's do; its canonizers' merged weights are made once at
  registration and do not).
- ``rss_delta_mib`` (JSON only): peak resident memory of the worker during the first timed call minus
  its resident memory just before (Linux: the peak is reset by writing ``5`` to
  ``/proc/self/clear_refs`` and read from ``VmHWM``; elsewhere the increase of ``ru_maxrss``). A lower
  bound: memory that the C allocator kept from earlier calls and hands out again is not counted, which
  hides most of torch's many medium-sized tensors but not XLA's one large temporary buffer.

Every composite's relevance is also compared between jlrp and zennit (maximum over samples of
``max|R_jlrp - R_zennit| / max|R_zennit|``), so the timings are known to compute the same thing.

Run ``python benchmarks/bench.py --help``; ``--quick`` is a two-minute smoke run on a small CPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARK = "@@bench "
MODELS = ("small_cnn", "vgg16", "resnet50")
COMPOSITES = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")
LOW, HIGH = -3.0, 3.0
SMALL_CNN_SIZE = 32
TARGETS = {"EpsilonPlusFlat": 1.6, "EpsilonGammaBox": 2.5}  # jlrp / gradient at batch 8 on VGG16, ResNet50


# --------------------------------------------------------------------------------------------------
# machine and memory helpers (no heavy imports)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, RAM, OS and library versions, without importing the libraries."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "torchvision", "zennit"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": ram_gib,
        "platform": platform.platform(),
        "versions": versions,
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory of this process during a block, minus the resident memory before it."""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM"
        except OSError:
            self.method = "ru_maxrss"

    def __enter__(self) -> PeakMemory:
        import resource

        if self.method == "VmHWM":
            Path("/proc/self/clear_refs").write_text("5")
            self.before = _status_kib("VmRSS") or 0
        else:
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc: Any) -> None:
        import resource

        if self.method == "VmHWM":
            peak = _status_kib("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.delta_mib = max(peak - self.before, 0) / 1024


# --------------------------------------------------------------------------------------------------
# worker: one model, both frameworks


def emit(kind: str, **payload: Any) -> None:
    """Send one message to the main process."""
    print(MARK + json.dumps({"type": kind, **payload}), flush=True)


def _torch_models(name: str, size: int, seed: int) -> tuple[Any, int]:
    """The torch model with random weights (BatchNorm statistics randomised too) and its class count."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    if name == "small_cnn":
        classes = 10
        model = torch.nn.Sequential()
        model.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        model.flatten = torch.nn.Flatten()
        model.classifier = torch.nn.Sequential(
            torch.nn.Linear(64 * (size // 4) ** 2, 256), torch.nn.ReLU(), torch.nn.Linear(256, classes)
        )
    else:
        classes = 1000
        model = getattr(torchvision.models, name)(weights=None, num_classes=classes)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            elif isinstance(module, torch.nn.ReLU):
                module.inplace = False
    return model.eval(), classes


def _small_cnn_linen(classes: int) -> Any:
    import flax.linen as nn

    class SmallCNN(nn.Module):
        """The torch small CNN in linen, with torch's submodule names."""

        num_classes: int = 10

        @nn.compact
        def __call__(self, x: Any, train: bool = False) -> Any:
            x = nn.relu(nn.Conv(32, (3, 3), padding=1, name="features_0")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(64, (3, 3), padding=1, name="features_3")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Dense(256, name="classifier_0")(x.reshape((x.shape[0], -1))))
            return nn.Dense(self.num_classes, name="classifier_2")(x)

    return SmallCNN(num_classes=classes)


def _jax_model(name: str, size: int, classes: int, state_dict: Any, seed: int) -> tuple[Any, Any]:
    """The linen model and its variables (converted from torch, or random when torch is missing)."""
    import jax
    import jax.numpy as jnp

    import jlrp.models as jm

    model = _small_cnn_linen(classes) if name == "small_cnn" else getattr(jm, name)(num_classes=classes)
    if state_dict is None:
        init = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), jnp.zeros((1, size, size, 3))))
        return model, init()
    flatten = {"classifier_0": (size // 4, size // 4, 64)} if name == "small_cnn" else None
    arch = model if name == "small_cnn" else name
    return model, jm.from_torchvision(
        state_dict, arch, flatten_shapes=flatten, input_shape=(1, size, size, 3)
    )


def _jax_methods(model: Any, variables: Any) -> dict[str, Callable[[Any, Any], Any]]:
    """``{method: f(x, targets) -> relevance}`` for the JAX side (results are ready when returned)."""
    import jax

    import jlrp
    from jlrp import composites

    @jax.jit
    def gradient(variables: Any, x: Any, targets: Any) -> Any:
        output, pullback = jax.vjp(lambda inp: model.apply(variables, inp), x)
        return pullback(output * jax.nn.one_hot(targets, output.shape[-1], dtype=output.dtype))[0]

    presets = {
        "EpsilonPlusFlat": composites.EpsilonPlusFlat(),
        "EpsilonGammaBox": composites.EpsilonGammaBox(LOW, HIGH),
        "EpsilonAlpha2Beta1": composites.EpsilonAlpha2Beta1(),
    }
    methods: dict[str, Callable[[Any, Any], Any]] = {
        "gradient": lambda x, t: gradient(variables, x, t).block_until_ready()
    }
    methods["gradient"].jitted = gradient  # type: ignore[attr-defined]
    for name, composite in presets.items():
        explained = jlrp.explain(model, composite)

        def run(x: Any, t: Any, explained: Any = explained) -> Any:
            return jlrp.attribute(explained, variables, x, target=t)[1].block_until_ready()

        run.explained = explained  # type: ignore[attr-defined]
        methods[name] = run
    return methods


def _xla_memory_mib(
    method: Callable[..., Any], variables: Any, x: Any, targets: Any, output_shape: tuple[int, ...]
) -> tuple[float | None, float | None]:
    """XLA's planned temporary buffer and output of the program a JAX method ran, in MiB.

    From ``Compiled.memory_analysis()`` of the program (already compiled: a cache hit).

    For jlrp this re-lowers jlrp's private jitted body with the arguments :func:`jlrp.attribute` passes
    (a cache hit after the first call); if that ever changes, the value is reported as missing.
    """
    try:
        if hasattr(method, "jitted"):
            lowered = method.jitted.lower(variables, x, targets)
        else:
            from jlrp import attribution

            fn, params, inp, rest = attribution.pure_function(method.explained, (variables, x))
            target = attribution.as_target(targets, output_shape)
            lowered = attribution._attribute.lower(
                params,
                inp,
                rest,
                target,
                fn=fn,
                kwargs=(),
                output=None,
                batch_size=None,
                mesh=None,
                batched=False,
            )
        start = time.perf_counter()
        stats = lowered.compile().memory_analysis()
        if time.perf_counter() - start > 2.0:  # not a cache hit: the numbers are still right
            emit("note", text="XLA memory analysis recompiled")
        return stats.temp_size_in_bytes / 2**20, stats.output_size_in_bytes / 2**20
    except Exception as error:  # noqa: BLE001 - an optional statistic
        emit("note", text=f"XLA memory analysis unavailable: {error!r}"[:300])
        return None, None


def _torch_peak_mib(method: Callable[..., Any], *inputs: Any) -> float | None:
    """Peak of the bytes torch allocates during one (extra, untimed) call, from its memory profiler.

    The running sum of the profiler's allocation and free events, in time order: the tensors that call
    creates (activations, saved tensors, modified weights, the result), independent of what the C
    allocator keeps for reuse. On CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the
    bytes allocated before it.
    """
    import torch

    if inputs[0].is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = method(*inputs)
        del out
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = method(*inputs)
            del out
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
    except Exception as error:  # noqa: BLE001 - an optional statistic
        emit("note", text=f"torch memory profile unavailable: {error!r}"[:300])
        return None
    peak = running = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak / 2**20


def _torch_methods(model: Any, name: str) -> dict[str, Callable[[Any, Any], Any]]:
    """``{method: f(x, onehot) -> relevance}`` for torch and zennit, one model copy per composite."""
    import copy

    import torch

    methods: dict[str, Callable[[Any, Any], Any]] = {}
    cuda = next(model.parameters()).is_cuda

    def make(net: Any) -> Callable[[Any, Any], Any]:
        def run(x: Any, onehot: Any) -> Any:
            inp = x.detach().requires_grad_(True)
            output = net(inp)
            (relevance,) = torch.autograd.grad(output, inp, (output * onehot).detach())
            if cuda:  # the result is ready when returned, as on the JAX side
                torch.cuda.synchronize()
            return relevance

        return run

    methods["gradient"] = make(model)
    try:
        from zennit import composites as zc
        from zennit import torchvision as zt
    except ImportError:
        return methods
    canonizers = {"vgg16": lambda: [zt.VGGCanonizer()], "resnet50": lambda: [zt.ResNetCanonizer()]}
    make_canonizers = canonizers.get(name, lambda: [])
    presets = {
        "EpsilonPlusFlat": lambda: zc.EpsilonPlusFlat(canonizers=make_canonizers()),
        "EpsilonGammaBox": lambda: zc.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=make_canonizers()),
        "EpsilonAlpha2Beta1": lambda: zc.EpsilonAlpha2Beta1(canonizers=make_canonizers()),
    }
    try:  # some torch versions (2.11) reject the eps=0 that zennit's merged BatchNorms get
        torch.nn.functional.batch_norm(torch.ones(1, 1), torch.zeros(1), torch.ones(1), eps=0.0)
        tiny_eps = 0.0
    except ValueError:
        tiny_eps = torch.finfo(torch.float32).tiny  # 1 + tiny == 1 in float32: the same numbers
    for method, composite in presets.items():
        net = copy.deepcopy(model)
        composite().register(net)  # stays registered for the whole run: one model copy per composite
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d) and module.eps == 0.0:
                module.eps = tiny_eps
        methods[method] = make(net)
    return methods


def _die_with_parent() -> None:
    """Linux: ask the kernel to end this worker when the main process ends (however it ends)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _inputs(spec: dict[str, Any], classes: int) -> tuple[Any, Any]:
    """The batch (NHWC, float32, uniform in [LOW, HIGH]) and its targets, the same in every worker."""
    import numpy as np

    batch, size = spec["batch"], spec["size"]
    x = np.random.default_rng([spec["seed"], 2, batch]).uniform(LOW, HIGH, (batch, size, size, 3))
    return x.astype(np.float32), np.arange(batch) % classes


def _measure(
    spec: dict[str, Any], methods: Sequence[tuple[str, Callable[..., Any]]], inputs: tuple[Any, ...]
) -> dict[str, dict[str, Any]]:
    """The timing protocol for one framework: first calls, then round-robin timed rounds.

    Returns per method: ``first`` (seconds), ``times`` (timed calls), ``rss`` (MiB, round 1) and
    ``output`` (the first call's result).
    """
    memory = PeakMemory()
    stats: dict[str, dict[str, Any]] = {m: {"times": []} for m, _ in methods}
    for method, fn in methods:
        start = time.perf_counter()
        stats[method]["output"] = fn(*inputs)
        stats[method]["first"] = time.perf_counter() - start
        emit("tick", model=spec["model"], batch=spec["batch"], method=f"{spec['framework']}:{method}")
    for method, fn in methods:  # round 1 also probes the resident memory
        with memory:
            start = time.perf_counter()
            out = fn(*inputs)
            elapsed = time.perf_counter() - start
            del out
        stats[method]["times"].append(elapsed)
        stats[method]["rss"] = round(memory.delta_mib, 1)
        stats[method]["probe"] = memory.method
    rounds, started = 1, time.perf_counter()
    while rounds < spec["repeats"] and not (
        rounds >= spec["min_repeats"] and time.perf_counter() - started > spec["budget"]
    ):
        for method, fn in methods:
            start = time.perf_counter()
            out = fn(*inputs)
            stats[method]["times"].append(time.perf_counter() - start)
            del out
        rounds += 1
    return stats


def _result(spec: dict[str, Any], framework: str, method: str, stats: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    median = float(np.median(stats["times"]))
    return {
        "model": spec["model"],
        "size": spec["size"],
        "batch": spec["batch"],
        "framework": framework,
        "method": method,
        "median_s": median,
        "min_s": float(np.min(stats["times"])),
        "times_s": [round(t, 6) for t in stats["times"]],
        "images_per_s": spec["batch"] / median,
        "first_call_s": stats["first"],
        "compile_s": max(stats["first"] - median, 0.0),
        "rss_delta_mib": stats["rss"],
        "rss_probe": stats["probe"],
    }


def _torch_worker(spec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["precision"] == "highest":  # no TF32 on GPUs (the default for convolutions)
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    name, workdir = spec["model"], Path(spec["workdir"])
    model, classes = _torch_models(name, spec["size"], spec["seed"])
    weights = workdir / f"{name}-weights.npz"
    if not weights.exists():  # the JAX workers load the same weights
        np.savez(weights, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    device = torch.device(spec["torch_device"])
    model = model.to(device)
    methods = _torch_methods(model, name)
    emit(
        "info",
        torch_threads=torch.get_num_threads(),
        torch_device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        zennit=len(methods) > 1,
    )
    x, labels = _inputs(spec, classes)
    inputs = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device),
        torch.nn.functional.one_hot(torch.from_numpy(labels), classes).float().to(device),
    )
    stats = _measure(spec, list(methods.items()), inputs)
    relevance = {}
    for method, fn in methods.items():
        result = _result(spec, "torch" if method == "gradient" else "zennit", method, stats[method])
        result["peak_mib"] = _torch_peak_mib(fn, *inputs)
        result["peak_source"] = "torch profiler: peak of allocated tensor bytes"
        if method != "gradient":
            relevance[method] = stats[method]["output"].detach().cpu().numpy().transpose(0, 2, 3, 1)
        emit("result", **result)
        emit("tick", model=name, batch=spec["batch"], method=f"torch:{method}")
    np.savez(workdir / f"{name}-{spec['batch']}-relevance.npz", **relevance)


def _jax_worker(spec: dict[str, Any]) -> None:
    import jax
    import numpy as np

    if spec["precision"] == "highest":  # no TF32 / bf16 passes on accelerators
        jax.config.update("jax_default_matmul_precision", "highest")
    name, workdir = spec["model"], Path(spec["workdir"])
    classes = 10 if name == "small_cnn" else 1000
    weights = workdir / f"{name}-weights.npz"
    state_dict = dict(np.load(weights)) if weights.exists() else None
    if state_dict is None:
        emit("note", text="torch missing: random Flax weights")
    model, variables = _jax_model(name, spec["size"], classes, state_dict, spec["seed"])
    del state_dict
    methods = _jax_methods(model, variables)
    emit("info", jax_devices=[str(d) for d in jax.devices()])
    x, labels = _inputs(spec, classes)
    inputs = (jax.device_put(x), jax.device_put(labels))
    stats = _measure(spec, list(methods.items()), inputs)
    reference_file = workdir / f"{name}-{spec['batch']}-relevance.npz"
    reference = dict(np.load(reference_file)) if reference_file.exists() else {}
    for method, fn in methods.items():
        result = _result(spec, "jax" if method == "gradient" else "jlrp", method, stats[method])
        temp, output = _xla_memory_mib(fn, variables, *inputs, (spec["batch"], classes))
        result["xla_temp_mib"] = temp
        result["peak_mib"] = None if temp is None else temp + output
        result["peak_source"] = "XLA memory_analysis: temp + output"
        if method in reference:
            ours, theirs = np.asarray(stats[method]["output"]), reference[method]
            scale = np.abs(theirs).reshape(spec["batch"], -1).max(1)
            error = np.abs(ours - theirs).reshape(spec["batch"], -1).max(1) / np.maximum(scale, 1e-30)
            result["max_rel_diff_vs_zennit"] = float(error.max())
        emit("result", **result)
        emit("tick", model=name, batch=spec["batch"], method=f"jax:{method}")


def worker(spec: dict[str, Any]) -> None:
    """Run one framework's jobs (model, input size, batch size) in this process; report to the main process.

    A torch job also writes the model's weights (for the JAX jobs) and its relevance (for the
    comparison) to ``spec['workdir']``. The frameworks always run in separate processes, so neither
    one's memory (weights, allocator caches) weighs on the other.
    """
    _die_with_parent()
    if hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[: spec["threads"]])
    run = _torch_worker if spec["framework"] == "torch" else _jax_worker
    for job in spec["jobs"]:
        load_start = load_average()
        run({**spec, **job})
        emit("job", **job, load_start=load_start, load_end=load_average())
        gc.collect()


# --------------------------------------------------------------------------------------------------
# main process: run the workers, collect, tabulate


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm

        return tqdm(total=total, unit="step", dynamic_ncols=True, file=sys.stderr)
    except ImportError:  # tqdm is optional

        class Plain:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int = 1) -> None:
                self.n += k
                print(f"[{self.n}/{total}]", file=sys.stderr, flush=True)

            def set_postfix_str(self, text: str) -> None:
                pass

            def close(self) -> None:
                pass

        return Plain()


def run_worker(spec: dict[str, Any], bar: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run one worker subprocess, advancing the progress bar; return its results and its info."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results: list[dict[str, Any]] = []
    info: dict[str, Any] = {"framework": spec["framework"], "jobs": [], "notes": []}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if not line.startswith(MARK):
                    continue
                message = json.loads(line[len(MARK) :])
                kind = message.pop("type")
                if kind == "tick":
                    bar.set_postfix_str(f"{message['model']} b{message['batch']} {message['method']}")
                    bar.update(1)
                elif kind == "result":
                    results.append(message)
                elif kind == "note":
                    info["notes"].append(message["text"])
                elif kind == "job":
                    info["jobs"].append(message)
                else:
                    info.update(message)
        finally:  # interrupted (Ctrl-C, SIGTERM): do not leave the worker running
            if process.poll() is None and sys.exc_info()[0] is not None:
                process.terminate()
        code = process.wait()
        if code != 0:
            errors.seek(0)
            tail = errors.read()[-3000:]
            info["error"] = f"worker exited with {code}: {tail}"
            print(f"\n{spec['framework']} worker: {info['error']}", file=sys.stderr)
    info["wall_s"] = round(time.perf_counter() - started, 1)
    return results, info


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per model, input size, batch and method: JAX side, torch side and their ratios."""
    index = {(r["model"], r["batch"], r["framework"], r["method"]): r for r in results}
    header = (
        "| model | input | batch | method | JAX ms | JAX img/s | × gradient | compile s | JAX peak MiB "
        "| torch ms | torch img/s | torch / JAX | torch peak MiB | rel. diff |"
    )
    lines = [header, "| " + " | ".join(["---"] * (header.count("|") - 1)) + " |"]
    keys = sorted(
        {(r["model"], r["size"], r["batch"]) for r in results},
        key=lambda k: (MODELS.index(k[0]) if k[0] in MODELS else 99, k[2]),
    )
    for model, size, batch in keys:
        gradient = index.get((model, batch, "jax", "gradient"))
        for method in ("gradient", *COMPOSITES):
            ours = index.get((model, batch, "jax" if method == "gradient" else "jlrp", method))
            theirs = index.get((model, batch, "torch" if method == "gradient" else "zennit", method))
            if ours is None and theirs is None:
                continue
            label = "gradient (vjp / autograd)" if method == "gradient" else method
            ratio = ours["median_s"] / gradient["median_s"] if ours and gradient else None
            versus = theirs["median_s"] / ours["median_s"] if ours and theirs else None
            lines.append(
                "| "
                + " | ".join(
                    [
                        model,
                        f"{size}²",
                        str(batch),
                        label,
                        _fmt(ours and ours["median_s"] * 1e3),
                        _fmt(ours and ours["images_per_s"]),
                        _fmt(ratio, 2),
                        _fmt(ours and ours["compile_s"], 1),
                        _fmt(ours and ours.get("peak_mib"), 0),
                        _fmt(theirs and theirs["median_s"] * 1e3),
                        _fmt(theirs and theirs["images_per_s"]),
                        _fmt(versus, 2),
                        _fmt(theirs and theirs.get("peak_mib"), 0),
                        "–"
                        if not ours or ours.get("max_rel_diff_vs_zennit") is None
                        else f"{ours['max_rel_diff_vs_zennit']:.1e}",
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def target_summary(results: Sequence[dict[str, Any]]) -> list[str]:
    """The speed targets: LRP cost relative to the gradient at batch 8, and jlrp versus zennit."""
    index = {(r["model"], r["batch"], r["framework"], r["method"]): r for r in results}
    lines = []
    for model in ("vgg16", "resnet50"):
        gradient = index.get((model, 8, "jax", "gradient"))
        for method, target in TARGETS.items():
            ours = index.get((model, 8, "jlrp", method))
            if gradient and ours:
                ratio = ours["median_s"] / gradient["median_s"]
                verdict = "met" if ratio <= target else "missed"
                lines.append(
                    f"{model} batch 8 {method}: {ratio:.2f}× gradient (target ≤ {target}×): {verdict}"
                )
    slower = [
        f"{r['model']} b{r['batch']} {r['method']} ({index[(r['model'], r['batch'], 'zennit', r['method'])]['median_s'] / r['median_s']:.2f})"
        for r in results
        if r["framework"] == "jlrp" and (r["model"], r["batch"], "zennit", r["method"]) in index
        if index[(r["model"], r["batch"], "zennit", r["method"])]["median_s"] < r["median_s"]
    ]
    if any(r["framework"] == "zennit" for r in results):
        lines.append(
            "jlrp faster than zennit everywhere: met"
            if not slower
            else "jlrp faster than zennit everywhere: missed at " + ", ".join(slower)
        )
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description=(
            "Time LRP with jlrp against a plain jax.vjp gradient and against zennit (torch) on the "
            "same architectures and weights, in one run. Prints a markdown table and writes it, with "
            "all raw timings, to JSON and markdown files."
        ),
        epilog=(
            "Full run: python benchmarks/bench.py (VGG16 and ResNet50 at 224x224, batches 1, 8, 32; "
            "about an hour or more on a 2-core CPU). Smoke run: python benchmarks/bench.py --quick."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (under two minutes on 2 CPU cores): 32x32 inputs, batch 2, 2 timed calls; "
        "explicit options below still win",
    )
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument(
        "--batch-sizes", nargs="+", type=int, default=None, help="batch sizes [default: 1 8 32; quick: 2]"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"input height = width of VGG16 and ResNet50 [default: 224; quick: 32]; the small CNN "
        f"always takes {SMALL_CNN_SIZE}x{SMALL_CNN_SIZE}",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed calls per method after the first [default: 5; quick: 2]",
    )
    parser.add_argument(
        "--min-repeats",
        type=int,
        default=3,
        help="timed calls per method at least, even when the budget is spent",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds of timed round-robin rounds per model and batch size before stopping at --min-repeats",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        help="CPUs for JAX and torch alike (CPU affinity of the worker; torch.set_num_threads)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument(
        "--torch-device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where torch and zennit run; JAX runs on its default backend (a GPU when jax[cuda] sees "
        "one), so on a GPU machine pass cuda. With cuda one process per model and framework runs all "
        "batch sizes (GPU memory is ample; start-up and CUDA initialisation are paid once per model)",
    )
    parser.add_argument(
        "--precision",
        choices=("default", "highest"),
        default="default",
        help="float32 matrix-unit precision on GPUs: each framework's default (TF32 convolutions on "
        "recent NVIDIA GPUs) or highest (full float32 in both); no effect on CPUs",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="JSON file for the results [default: benchmarks/results.json; quick: benchmarks/results-quick.json]; "
        "the markdown table goes next to it with suffix .md",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = [2] if args.quick else [1, 8, 32]
    if args.resolution is None:
        args.resolution = 32 if args.quick else 224
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.output is None:
        args.output = ROOT / "benchmarks" / ("results-quick.json" if args.quick else "results.json")
    if min(args.batch_sizes) < 1 or args.resolution < 32 or args.threads < 1:
        parser.error("batch sizes and --threads must be positive and --resolution at least 32")
    args.min_repeats = min(args.min_repeats, args.repeats)
    return args


def write_outputs(
    output: Path, meta: dict[str, Any], results: Sequence[dict[str, Any]]
) -> tuple[str, list[str], Path]:
    """Write the JSON and the markdown table; return the table, the target summary and the markdown path."""
    table = markdown_table(results)
    summary = target_summary(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        json.dumps({"meta": meta, "results": list(results), "targets": summary}, indent=1) + "\n"
    )
    markdown = output.with_suffix(".md")
    markdown.write_text(
        f"<!-- {meta['command']} ({meta['date']}) -->\n\n"
        + table
        + "\n\n"
        + "\n".join(f"- {s}" for s in summary)
        + "\n"
    )
    return table, summary, markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one model of it)."""
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    started = time.time()
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "threads": args.threads,
        "load_average_start": load_average(),
        "settings": {
            "models": args.models,
            "batch_sizes": args.batch_sizes,
            "resolution": args.resolution,
            "small_cnn_resolution": SMALL_CNN_SIZE,
            "repeats": args.repeats,
            "min_repeats": args.min_repeats,
            "budget_s": args.budget,
            "seed": args.seed,
            "torch_device": args.torch_device,
            "precision": args.precision,
            "dtype": "float32",
        },
        "workers": [],
    }
    have_torch = importlib.util.find_spec("torch") is not None
    frameworks = ("torch", "jax") if have_torch else ("jax",)  # torch first: it writes the weights
    n_torch = (1 + len(COMPOSITES)) if importlib.util.find_spec("zennit") else 1
    per_batch = (1 + len(COMPOSITES)) + (n_torch if have_torch else 0)
    bar = _progress(total=len(args.models) * len(args.batch_sizes) * per_batch * 2)
    results: list[dict[str, Any]] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run the clean-ups
    jobs = [
        {"model": m, "size": SMALL_CNN_SIZE if m == "small_cnn" else args.resolution, "batch": b}
        for m in args.models
        for b in args.batch_sizes
    ]
    # one process per framework and job (memory); --quick: one per framework (start-up time)
    if args.quick:  # start-up time dominates
        groups = [jobs]
    elif args.torch_device == "cuda":  # GPU memory is ample: one process per model and framework
        groups = [[job for job in jobs if job["model"] == m] for m in args.models]
    else:
        groups = [[job] for job in jobs]
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="jlrp-bench-", dir=shm if shm.is_dir() else None) as workdir:
        for group in groups:
            for framework in frameworks:
                spec = {
                    "framework": framework,
                    "jobs": group,
                    "repeats": args.repeats,
                    "min_repeats": args.min_repeats,
                    "budget": args.budget,
                    "threads": args.threads,
                    "torch_device": args.torch_device,
                    "precision": args.precision,
                    "seed": args.seed,
                    "workdir": workdir,
                }
                worker_results, info = run_worker(spec, bar)
                results.extend(worker_results)
                meta["workers"].append(info)
            meta["load_average_end"] = load_average()
            meta["wall_time_s"] = round(time.time() - started, 1)
            table, summary, markdown = write_outputs(args.output, meta, results)  # as we go
    bar.close()
    print(table)
    print()
    for line in summary:
        print(line)
    print(
        f"\nload average {meta['load_average_start']} -> {meta['load_average_end']}, "
        f"{meta['wall_time_s']} s; wrote {args.output} and {markdown}"
    )
    return 1 if any("error" in w for w in meta["workers"]) else 0


if __name__ == "__main__":
    sys.exit(main())
