"""Tensor-parallel attribution: ``jlrp.attribute(..., mesh=mesh)`` with the weights split over 'model'.

A ViT of ``jlrp.models`` (random weights) runs on a ``data x model`` mesh with its kernels split
Megatron-style over 'model' (q/k/v and the first MLP Dense over their output features, the attention
output and second MLP Dense over their input) and the batch over 'data'. Reported per composite, all
measured in one run on the same devices: the median time of ``--repeats`` calls after a compiling one,
the same for the plain gradient (of the unexplained model's target score, same placement) and their ratio;
the parameters' bytes per device (split vs replicated); from the compiled HLO the number of all-gathers
and of those whose result is as large as a split weight (a full weight gathered: expected 0); the
largest difference from the single-device relevance relative to its largest magnitude, next to the
single-device float32 relevance's own difference from a float64 run (the float32 rounding floor).

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here before JAX
starts) and share the cores: the timings show the cost of partitioning, not a gain.

    python benchmarks/sharded.py                           # CPU, 8 simulated devices, 2x4 mesh, ViT
    python benchmarks/sharded.py --mesh 1 8 --hidden 512
    python benchmarks/sharded.py --platform gpu --mesh 1 4 # a machine with 4 GPUs
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/sharded.py",
        description="Time jlrp.attribute with tensor-parallel weights against the plain gradient, check "
        "the compiled program gathers no full weight, and compare with the single-device relevance.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--platform", default="cpu", help="JAX platform whose devices are used")
    parser.add_argument("--mesh", nargs=2, type=int, default=[2, 4], metavar=("DATA", "MODEL"))
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (heads: hidden / 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data, model_axis = args.mesh
    if args.platform == "cpu":
        flag = f"--xla_force_host_platform_device_count={data * model_axis}"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    from flax import traverse_util
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import jlrp
    import jlrp.models as jm
    from jlrp import composites

    devices = jax.devices(args.platform)[: data * model_axis]
    if len(devices) < data * model_axis:
        print(f"need {data * model_axis} {args.platform} devices, found {len(devices)}", file=sys.stderr)
        return 2
    mesh = jax.make_mesh(
        (data, model_axis), ("data", "model"), devices=devices, axis_types=(AxisType.Auto,) * 2
    )
    heads = max(args.hidden // 64, 1)
    rng = np.random.default_rng(0)
    config = jm.ViTConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
        intermediate_size=4 * args.hidden, image_size=64, patch_size=8, num_labels=8 * model_axis,
    )  # fmt: skip
    model = jm.linen.ViT(config)
    x = rng.normal(size=(args.batch, 64, 64, 3)).astype(np.float32)

    shapes = traverse_util.flatten_dict(jax.eval_shape(model.init, jax.random.key(0), x))

    def spec(path, shape):
        if path[-1] != "kernel":
            return P()
        if len(shape) == 3:
            return P("model", None, None) if path[-2] == "out" else P(None, "model", None)
        if len(shape) == 2 and path[-2] == "output":
            return P("model", None)
        return P(*(None,) * (len(shape) - 1), "model") if shape[-1] % model_axis == 0 else P()

    def value(path, shape):  # kernels ~ N(0, 1/fan_in), LayerNorm scales ~ 1, the rest ~ N(0, 0.1^2)
        if path[-1] == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
        return rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.1, shape)

    host = traverse_util.unflatten_dict({p: value(p, s.shape).astype(s.dtype) for p, s in shapes.items()})
    placed = jax.device_put(
        host,
        traverse_util.unflatten_dict({p: NamedSharding(mesh, spec(p, s.shape)) for p, s in shapes.items()}),
    )
    split = {a.size for a in jax.tree.leaves(placed) if not a.sharding.is_fully_replicated}
    per_device = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(placed))
    replicated = sum(a.nbytes for a in jax.tree.leaves(placed))
    labels = np.arange(args.batch) % 8

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def gradient(params, x):
        target = jax.nn.one_hot(labels, config.num_labels)
        return jax.grad(lambda x: (model.apply(params, x) * target).sum())(x)

    x_placed = jax.device_put(x, NamedSharding(mesh, P("data")))
    t_grad = timed(jax.jit(gradient), placed, x_placed)
    rows = []
    for comp in (composites.AttnLRP(), composites.CPLRP()):
        explained = jlrp.explain(model, comp)
        call = jax.jit(lambda p, x, e=explained: jlrp.attribute(e, p, x, target=labels, mesh=mesh))
        compiled = call.lower(placed, x_placed).compile()
        gathers = []
        for line in compiled.as_text().splitlines():
            m = "all-gather" in line and re.search(r"= (.*?) all-gather(?:-start)?\(", line)
            if m:
                found = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
                gathers += [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in found]
        t = timed(compiled, placed, x_placed)
        _, rel = compiled(placed, x_placed)
        _, single = jlrp.attribute(explained, host, x, target=labels)
        rows.append((comp, explained, t, gathers, np.asarray(rel), np.asarray(single)))
    jax.config.update("jax_enable_x64", True)  # the float64 runs last, after every timing
    host64 = jax.tree.map(lambda a: np.asarray(a, np.float64), host)

    def rel_diff(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    print(f"# sharded attribution: ViT, hidden {args.hidden}, {args.layers} layers, batch {args.batch}, "
          f"mesh data={data} x model={model_axis} on {devices[0].device_kind} ({args.platform})")  # fmt: skip
    print(
        f"parameters per device: {per_device / 2**20:.2f} MiB split, {replicated / 2**20:.2f} MiB replicated"
    )
    print(f"plain gradient (same placement): {t_grad * 1e3:.1f} ms\n")
    print(
        "| composite | jlrp ms | / gradient | all-gathers | full-weight gathers | vs 1 device | 1 device f32 vs f64 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for comp, explained, t, gathers, rel, single in rows:
        _, truth = jlrp.attribute(explained, host64, x.astype(np.float64), target=labels)
        full = len([g for g in gathers if g in split])
        print(
            f"| {type(comp).__name__} | {t * 1e3:.1f} | {t / t_grad:.2f} | {len(gathers)} | {full} "
            f"| {rel_diff(rel, single):.1e} | {rel_diff(single, np.asarray(truth)):.1e} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
