"""Multi-device and memory-bounded attribution: time ``jlrp.attribute`` over 1, 2, 4, ... devices.

For each device count ``k`` the same batch is explained with ``devices=k`` (data parallel: the batch
sharded over a 1-D mesh, the parameters replicated) and with ``devices=k, batch_size=b`` (each device
works through its shard in chunks of ``b``). Reported per row: the median time of ``--repeats`` calls
after a first (compiling) call, images/s, the speed-up over one device, XLA's planned temporary memory
of the compiled program, and the largest difference from the single-device relevance, relative to its
largest magnitude.

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before JAX
starts) and share the machine's cores, so the speed-up shows the cost of sharding, not a gain; on a
machine with several accelerators run it with ``--platform gpu`` (or ``tpu``).

    python benchmarks/scaling.py                      # CPU, 1 2 4 8 simulated devices
    python benchmarks/scaling.py --platform gpu --devices 1 2 4 8 --batch 256
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/scaling.py",
        description="Time jlrp.attribute sharded over 1, 2, 4, ... devices, with and without batch_size "
        "chunks, and check that every result equals the single-device relevance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--platform", default="cpu", help="JAX platform whose devices are used")
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4, 8], help="device counts")
    parser.add_argument(
        "--model", default="resnet18", choices=("resnet18", "vgg11"), help="jlrp.models model"
    )
    parser.add_argument("--resolution", type=int, default=64, help="input height = width")
    parser.add_argument("--batch", type=int, default=32, help="samples per call")
    parser.add_argument("--chunk", type=int, default=4, help="batch_size of the memory-bounded rows")
    parser.add_argument(
        "--composite",
        default="epsilon_plus_flat",
        help="a registered composite name (jlrp.composites.COMPOSITES)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    return parser.parse_args(argv)


def _temp_mib(explained: Any, variables: Any, x: Any, labels: Any, **options: Any) -> float | None:
    """XLA's planned temporary memory of the program ``jlrp.attribute`` runs for these options."""
    import jax

    import jlrp

    try:
        lowered = jax.jit(lambda v, a, t: jlrp.attribute(explained, v, a, target=t, **options)).lower(
            variables, x, labels
        )
        return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - an optional statistic
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scaling benchmark and print its table."""
    args = parse_args(argv)
    if args.platform == "cpu":  # simulated devices: must be set before JAX starts
        flag = f"--xla_force_host_platform_device_count={max(args.devices)}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    import jax
    import numpy as np

    import jlrp
    import jlrp.models as jm

    available = jax.devices(args.platform)
    counts = [k for k in args.devices if k <= len(available)]
    if not counts:
        print(f"no device count fits the {len(available)} {args.platform} devices", file=sys.stderr)
        return 1
    device = available[0]
    model = getattr(jm, args.model)(num_classes=1000)
    shape = (args.batch, args.resolution, args.resolution, 3)
    with jax.default_device(device):
        x = jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-2.0, maxval=2.0)
        labels = jax.numpy.arange(args.batch) % 1000
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    explained = jlrp.explain(model, jlrp.composites.get(args.composite))

    def run(**options: Any) -> Any:
        return jlrp.attribute(explained, variables, x, target=labels, **options)[1].block_until_ready()

    reference = np.asarray(run(devices=available[:1]))
    scale = float(np.abs(reference).max())
    rows = []
    base = None
    for k in counts:
        for chunk in (None, args.chunk):
            options: dict[str, Any] = {"devices": available[:k]}
            if chunk is not None:
                options["batch_size"] = chunk
            start = time.perf_counter()
            relevance = run(**options)
            first = time.perf_counter() - start
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(**options)
                times.append(time.perf_counter() - start)
            median = float(np.median(times))
            if k == counts[0] and chunk is None:
                base = median
            diff = float(np.abs(np.asarray(relevance) - reference).max()) / scale
            rows.append(
                (k, chunk, median, first, _temp_mib(explained, variables, x, labels, **options), diff)
            )
    print(
        f"\n{args.model} {args.resolution}x{args.resolution}, batch {args.batch}, {args.composite}, "
        f"{args.platform} ({available[0].device_kind}), jax {jax.__version__}\n"
    )
    print(
        "| devices | batch_size | ms | img/s | speed-up | compile s | XLA temp MiB | max rel. diff vs 1 device |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k, chunk, median, first, temp, diff in rows:
        print(
            f"| {k} | {chunk or 'whole'} | {median * 1e3:.1f} | {args.batch / median:.1f} | "
            f"{base / median:.2f} | {max(first - median, 0):.1f} | "
            f"{'–' if temp is None else f'{temp:.0f}'} | {diff:.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
