"""Concept heatmaps (CRP): every channel of one VGG16 layer against one plain heatmap, on this machine.

Times, for one image (random weights and input: timing only), composite EpsilonPlusFlat:

- ``plain``: one heatmap, :func:`jlrp.attribute`;
- ``concepts B=..``: the conditional heatmaps of all ``C`` channels of ``--layer`` in one call,
  :func:`jlrp.concepts.attribute` with ``conditions={layer: ChannelConcept().masks(None, shape)}`` and
  ``batch_size=B`` (``lax.map`` over chunks of B masks; ``all``: one ``vmap`` over every mask);
- ``loop``: a Python loop of single-mask calls (``--loop`` of them timed, extrapolated to ``C``).

Each program is compiled ahead of time (``jax.jit(...).lower(...).compile()``), so compile time is
measured on its own and never mixed into the run times. Each program is timed ``--repeats`` times,
alternating with the plain heatmap (the ratio uses the plain times taken alongside, so a shared
machine's changing load cancels out), medians reported; a first call is a warm-up unless it takes
over 5 s. The table gives the time per concept heatmap over the time of the plain heatmap.

It also reads the compiled HLO of every concepts program and counts its convolutions and dots by batch
size and by whether they sit inside the ``lax.map`` loop: the forward pass (and everything that does not
depend on the masks) must appear once, on the batch of 1, outside the loop; only the masked backward
convolutions run on the chunk of B masks.

    python benchmarks/concepts_bench.py                          # VGG16 features_21 (512 ch.), 64x64
    python benchmarks/concepts_bench.py --batch-sizes 32 64 128 all --repeats 3   # 'all': one vmap
    python benchmarks/concepts_bench.py --quick                  # smoke run: 32x32, 64 channels of features_5
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402  (machine description)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/concepts_bench.py",
        description="All channel heatmaps of one VGG16 layer (jlrp.concepts.attribute) against one plain "
        "heatmap and against a loop of single-mask calls.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--layer", default="features_21", help="conditioned layer (features_21: conv4_3)")
    parser.add_argument(
        "--channels", type=int, default=None, help="explain the first this many channels (default: all)"
    )
    parser.add_argument(
        "--batch-sizes", nargs="+", default=["32", "64", "128"], help="masks per chunk; 'all': no chunks"
    )
    parser.add_argument("--loop", type=int, default=4, help="single-mask calls timed for the loop estimate")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per program after a warm-up")
    parser.add_argument("--no-exclude-parallel", action="store_true", help="exclude_parallel=False")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32x32, features_5, 64 channels")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.layer, args.channels, args.batch_sizes = 32, "features_5", 64, ["16", "64"]
        args.loop, args.repeats = 2, 1
    return args


def _computations(hlo: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: its instruction lines}."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            comps[current] = []
        elif current is not None and line.startswith(" "):
            comps[current].append(line.strip())
    return comps


def op_census(hlo: str) -> dict[str, dict[str, dict[str, int]]]:
    """Convolutions and dots of a compiled HLO module, counted by output batch size (first dimension),
    inside or outside ``while`` loops (``lax.map``'s chunks).

    Returns ``{'outside loops' | 'inside loops': {'convolution' | 'dot': {batch: count}}}``.
    """
    comps = _computations(hlo)
    calls = {
        name: set(
            re.findall(
                r"(?:calls|body|condition|to_apply|branch_computations)=\{?%([\w.\-]+)", " ".join(lines)
            )
        )
        for name, lines in comps.items()
    }
    bodies = {
        b for lines in comps.values() for b in re.findall(r"while\(.*body=%([\w.\-]+)", " ".join(lines))
    }
    in_loop, todo = set(), list(bodies)
    while todo:
        name = todo.pop()
        if name in in_loop:
            continue
        in_loop.add(name)
        todo.extend(calls.get(name, ()))
    census: dict[str, dict[str, dict[str, int]]] = {
        where: {"convolution": {}, "dot": {}} for where in ("outside loops", "inside loops")
    }
    for name, lines in comps.items():
        where = "inside loops" if name in in_loop else "outside loops"
        for line in lines:
            op = re.search(r"= [a-z0-9]+\[(\d+)[,\]][^ ]* (convolution|dot)\(", line)
            if op:
                counts = census[where][op.group(2)]
                counts[op.group(1)] = counts.get(op.group(1), 0) + 1
    return census


def _paired_times(fn: Callable[[], Any], plain: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of the plain heatmap, timed alternately (the box is shared: a
    ratio of times taken minutes apart would mostly measure the other users' load). The first call
    of ``fn`` is a warm-up when it is short, a sample when it takes over 5 s."""
    import jax
    import numpy as np

    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times, plain_times = ([first] if first > 5.0 else []), []
    for _ in range(repeats):
        for f, into in ((plain, plain_times), (fn, times)):
            start = time.perf_counter()
            jax.block_until_ready(f())
            into.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.median(plain_times))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    import jlrp
    import jlrp.models as jm
    from jlrp import composites, concepts

    info = bench.machine_info()
    print(f"machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, {info['ram_gib']} GiB")
    print(f"jax {info['versions']['jax']}, flax {info['versions']['flax']}, backend {jax.default_backend()}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    model = jm.vgg16(num_classes=1000)
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, args.size, args.size, 3), jnp.float32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    target = 3
    point = concepts.tap_points(explained, variables, x, capture=args.layer)[args.layer]
    cc = concepts.ChannelConcept()
    n = cc.size(point) if args.channels is None else args.channels
    masks = cc.masks(list(range(n)), point)
    exclude_parallel = not args.no_exclude_parallel
    print(
        f"VGG16, {args.size}x{args.size}, batch 1, EpsilonPlusFlat; {n} channel heatmaps of {args.layer} "
        f"{point.shape}, exclude_parallel={exclude_parallel}"
    )

    def compile_(fn, *inputs):
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*inputs).compile()
        return compiled, time.perf_counter() - start

    rows = []

    def report(row):
        rows.append(row)
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
        print(
            f"  measured {row['method']}: compile {row['compile_s']:.1f} s, run {row['run_s']:.3f} s, "
            f"plain alongside {row['plain_s']:.3f} s (load {load})",
            flush=True,
        )

    plain, plain_compile = compile_(
        lambda v, x: jlrp.attribute(explained, v, x, target=target)[1], variables, x
    )
    run_plain = lambda: plain(variables, x)  # noqa: E731
    plain_s, _ = _paired_times(run_plain, run_plain, max(5, args.repeats))
    report(
        {
            "method": "plain heatmap",
            "heatmaps": 1,
            "compile_s": plain_compile,
            "run_s": plain_s,
            "plain_s": plain_s,
        }
    )

    def concept_fn(batch_size):
        def fn(v, x, m):
            return concepts.attribute(
                explained,
                v,
                x,
                target=target,
                conditions={args.layer: m},
                exclude_parallel=exclude_parallel,
                batch_size=batch_size,
            ).heatmap

        return fn

    census = {}
    for b in args.batch_sizes:
        batch_size = None if b == "all" else int(b)
        compiled, compile_s = compile_(concept_fn(batch_size), variables, x, masks)
        census[b] = op_census(compiled.as_text())
        run_s, near_plain = _paired_times(lambda c=compiled: c(variables, x, masks), run_plain, args.repeats)
        report(
            {
                "method": f"concepts B={b}",
                "heatmaps": n,
                "compile_s": compile_s,
                "run_s": run_s,
                "plain_s": near_plain,
            }
        )

    single, single_compile = compile_(concept_fn(None), variables, x, masks[:1])
    loop_masks = iter([masks[k % n : k % n + 1] for k in range(args.loop + 1)])
    each, near_plain = _paired_times(lambda: single(variables, x, next(loop_masks)), run_plain, args.loop)
    report(
        {
            "method": f"loop of 1-mask calls ({args.loop} timed, x{n})",
            "heatmaps": n,
            "compile_s": single_compile,
            "run_s": each * n,
            "plain_s": near_plain,
        }
    )

    print()
    print(
        "| method | compile (s) | run (s) | per concept heatmap (ms) | plain heatmap, timed alongside (ms) "
        "| per heatmap / plain heatmap |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        per = r["run_s"] / r["heatmaps"]
        r["per_heatmap_s"], r["ratio_to_plain"] = per, per / r["plain_s"]
        print(
            f"| {r['method']} | {r['compile_s']:.1f} | {r['run_s']:.3f} | {per * 1e3:.1f} | "
            f"{r['plain_s'] * 1e3:.1f} | {r['ratio_to_plain']:.3f} |"
        )
    print()
    print("convolutions and dots in the compiled concepts programs, {output batch size: count}: the forward")
    print("and all mask-independent work run once on batch 1, outside the loop; only the masked backward")
    print("runs on the chunk of B masks, inside the lax.map loop:")
    for b, c in census.items():
        out, inside = c["outside loops"], c["inside loops"]
        print(
            f"  B={b}: outside: conv {out['convolution']}, dot {out['dot']}; "
            f"inside the loop: conv {inside['convolution']}, dot {inside['dot']}"
        )
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"machine": info, "args": vars(args), "rows": rows, "census": census}, indent=2)
        )


if __name__ == "__main__":
    main()
