"""LRP cost against the plain gradient in one process: time ratios, compiled memory and convolution counts.

For VGG16 and ResNet50 (``jlrp.models``, random Flax weights: the cost does not depend on the values)
at one input size and batch, this compiles the plain input gradient (a jitted ``jax.vjp`` of
``model.apply``, cotangent ``output * one_hot``) and :func:`jlrp.attribute` with each composite, then

- times them **round-robin in one process** (``--repeats`` rounds after one compiling call each) and
  reports the median and the ratio ``LRP / gradient`` of the medians, so a busy shared machine slows
  all methods alike (the load average at start and end is recorded);
- reads XLA's buffer plan of each compiled program (``Compiled.memory_analysis()``): temporary +
  argument + output bytes, and the ratio to the gradient's;
- counts the convolutions (and dots) in the compiled HLO (``Compiled.as_text()``).

    python benchmarks/speed.py                                    # 224 x 224, batch 8, both models
    python benchmarks/speed.py --models resnet50 --composites EpsilonPlusFlat --repeats 5
    python benchmarks/speed.py --quick                            # 32 x 32, batch 2, 2 rounds: smoke

The table goes to stdout; ``--json FILE`` keeps every timing, the machine and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (machine description)

MODELS = ("vgg16", "resnet50")
COMPOSITES = ("EpsilonPlusFlat", "EpsilonGammaBox", "EpsilonAlpha2Beta1")
#: issue 15's CPU targets (224 x 224, batch 8): LRP time / gradient time
TARGETS = {
    ("resnet50", "EpsilonPlusFlat"): 1.3,
    ("resnet50", "EpsilonGammaBox"): 2.0,
    ("vgg16", "EpsilonGammaBox"): 1.5,
}
MEMORY_TARGET = 1.2
LOW, HIGH = -3.0, 3.0


def hlo_counts(text: str) -> dict[str, int]:
    """How many convolutions and dots a compiled HLO text holds (fused computations included)."""
    return {
        "convolutions": len(re.findall(r"\bconvolution\(", text)),
        "dots": len(re.findall(r"\bdot\(", text)),
    }


def memory_mib(compiled: Any) -> dict[str, float]:
    """XLA's buffer plan of a compiled program, MiB: temporary, argument, output and their total."""
    stats = compiled.memory_analysis()
    temp = stats.temp_size_in_bytes / 2**20
    arg = stats.argument_size_in_bytes / 2**20
    out = stats.output_size_in_bytes / 2**20
    alias = getattr(stats, "alias_size_in_bytes", 0) / 2**20
    return {"temp": temp, "argument": arg, "output": out, "total": temp + arg + out - alias}


def build(name: str, size: int, batch: int, composites: Sequence[str]) -> tuple[dict[str, Any], dict]:
    """``({method: (call, compiled)}, info)``: a zero-argument call per method and its compiled program."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jlrp
    import jlrp.models as jm
    from jlrp import attribution
    from jlrp import composites as jc

    model = getattr(jm, name)(num_classes=1000)
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))()
    rng = np.random.default_rng([0, batch])
    x = jnp.asarray(rng.uniform(LOW, HIGH, (batch, size, size, 3)).astype(np.float32))
    targets = jnp.arange(batch) % 1000

    @jax.jit
    def gradient(variables: Any, x: Any, targets: Any) -> Any:
        output, pullback = jax.vjp(lambda inp: model.apply(variables, inp), x)
        return pullback(output * jax.nn.one_hot(targets, output.shape[-1], dtype=output.dtype))[0]

    methods: dict[str, Any] = {
        "gradient": (
            lambda: gradient(variables, x, targets),
            lambda: gradient.lower(variables, x, targets).compile(),
        )
    }
    presets = {
        "EpsilonPlusFlat": lambda: jc.EpsilonPlusFlat(),
        "EpsilonGammaBox": lambda: jc.EpsilonGammaBox(LOW, HIGH),
        "EpsilonAlpha2Beta1": lambda: jc.EpsilonAlpha2Beta1(),
    }
    for composite in composites:
        explained = jlrp.explain(model, presets[composite]())

        def lower(explained: Any = explained) -> Any:
            # jlrp.attribute's own jitted body with the arguments it passes (a cache hit after the call)
            fn, params, inp, rest = attribution.pure_function(explained, (variables, x))
            target = attribution.as_target(targets, (batch, 1000))
            return attribution._attribute.lower(
                params, inp, rest, target, fn=fn, kwargs=(), output=None,
                batch_size=None, mesh=None, batched=False,
            ).compile()  # fmt: skip

        methods[composite] = (
            lambda explained=explained: jlrp.attribute(explained, variables, x, target=targets)[1],
            lower,
        )
    return methods, {"devices": [str(d) for d in jax.devices()]}


def measure(
    methods: dict[str, tuple[Callable[[], Any], Callable[[], Any]]], repeats: int
) -> dict[str, dict[str, Any]]:
    """First (compiling) call of each method, then ``repeats`` round-robin rounds; memory and HLO counts."""
    import jax

    stats: dict[str, dict[str, Any]] = {}
    for method, (call, lower) in methods.items():
        start = time.perf_counter()
        jax.block_until_ready(call())
        first = time.perf_counter() - start
        compiled = lower()
        stats[method] = {"first_s": first, "times_s": [], "memory_mib": memory_mib(compiled)}
        stats[method].update(hlo_counts(compiled.as_text()))
    for _ in range(repeats):
        for method, (call, _) in methods.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            stats[method]["times_s"].append(time.perf_counter() - start)
    for entry in stats.values():
        entry["median_s"] = statistics.median(entry["times_s"]) if entry["times_s"] else float("nan")
    return stats


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of :func:`main`'s rows."""
    lines = [
        "| model | method | median ms | × gradient | target | memory MiB (temp + arg + out) | × gradient "
        "| convolutions | first call s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        target = TARGETS.get((r["model"], r["method"]))
        lines.append(
            f"| {r['model']} | {r['method']} | {1e3 * r['median_s']:.0f} | {r['time_ratio']:.2f} | "
            f"{f'≤ {target:.1f}' if target else ''} | {r['memory_mib']['total']:.0f} | "
            f"{r['memory_ratio']:.2f} | {r['convolutions']} | {r['first_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--composites", nargs="+", choices=COMPOSITES, default=list(COMPOSITES))
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed round-robin rounds (0: only memory and HLO counts)"
    )
    parser.add_argument("--platform", default=None, help="JAX platform (cpu, gpu); default: JAX's choice")
    parser.add_argument(
        "--precision", choices=("default", "highest"), default="default",
        help="highest: full float32 matrix units (no TF32 / bfloat16 passes on accelerators)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="32 x 32, batch 2, 2 rounds (a smoke run)")
    parser.add_argument("--json", default=None, help="write every timing and the machine here")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.repeats = 32, 2, 2
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    if args.precision == "highest":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    start = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": os.getloadavg()}
    rows = []
    info: dict[str, Any] = {}
    for name in args.models:
        methods, info = build(name, args.size, args.batch, args.composites)
        stats = measure(methods, args.repeats)
        grad = stats["gradient"]
        for method, entry in stats.items():
            rows.append(
                {
                    "model": name,
                    "method": method,
                    **entry,
                    "time_ratio": entry["median_s"] / grad["median_s"],
                    "memory_ratio": entry["memory_mib"]["total"] / grad["memory_mib"]["total"],
                }
            )
        print(f"{name} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    report = {
        "command": " ".join([os.path.basename(sys.argv[0]), *(argv if argv is not None else sys.argv[1:])]),
        "size": args.size,
        "batch": args.batch,
        "precision": args.precision,
        "repeats": args.repeats,
        "start": start,
        "end": {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": os.getloadavg()},
        "machine": {**bench.machine_info(), **info},
        "rows": rows,
    }
    print(
        f"{args.size}x{args.size}, batch {args.batch}, {args.repeats} round-robin rounds, precision "
        f"{args.precision}; load {start['load'][0]:.2f} -> {report['end']['load'][0]:.2f}; "
        f"{report['machine']['cpu']}; devices {report['machine'].get('devices')}"
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
