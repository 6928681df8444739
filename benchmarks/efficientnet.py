"""EfficientNet-Lite0 (pretrained, 224x224): LRP time over gradient time, jlrp against zennit, one run.

Times, on the same CPU and the same batch (``--batch`` photos from scikit-image, preprocessed with
:func:`jlrp.models.efficientnet_lite0_preprocess`, each explained for its predicted class):

- ``gradient``: a jitted ``jax.vjp`` input gradient of the linen model, cotangent ``output * one_hot``;
- ``EpsilonPlusFlat`` and ``EpsilonGammaBox(-127/128, 1)`` with :func:`jlrp.attribute`;
- torch's gradient and zennit's same composites (``SequentialMergeBatchNorm``) on the torch twin of
  ``tests/_effnet_twin.py`` with the same weights, ``torch.set_num_threads`` = the CPUs JAX may use.

The timing protocol is ``benchmarks/bench.py``'s (:func:`bench._measure`: a first call, then
round-robin timed rounds, the median reported). Unlike ``bench.py`` both frameworks run in this one
process, torch first; the model is small (4.7M parameters), so memory does not interfere.

At 224x224 the stem pads asymmetrically (TensorFlow's SAME), which torch's ``Conv2d`` cannot, so
the twin pads with ``F.pad`` before it. The first-layer rules then differ at the border: jlrp's
ZBox and Flat treat the padding as zeros (constants), zennit's, which see ``F.pad``'s output as the
layer input, as pixels (inside the box / ones). The ``rel. diff`` of both composites shows that, not a
timing problem; ``tests/test_efficientnet_parity.py`` checks parity at a size where the padding agrees.

    python benchmarks/efficientnet.py                 # batch 8, 224x224
    python benchmarks/efficientnet.py --batch 2 --repeats 2   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "tests")]

import bench  # noqa: E402  (timing protocol and machine description)

bench.emit = lambda *args, **kwargs: None  # no worker protocol here: nothing listens
LOW, HIGH = -127.0 / 128.0, 1.0  # the Lite input range
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python benchmarks/efficientnet.py",
        description="EfficientNet-Lite0 at 224x224: jlrp's EpsilonPlusFlat and EpsilonGammaBox against a "
        "plain jax.vjp gradient and against zennit, in one run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method after the first")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed calls per method at least")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per framework")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        help="CPUs for JAX and torch alike",
    )
    parser.add_argument("--no-zennit", action="store_true", help="time jlrp and the gradient only")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results-efficientnet.json", help="JSON results"
    )
    args = parser.parse_args(argv)
    args.min_repeats = min(args.min_repeats, args.repeats)
    return args


def photos(batch: int) -> Any:
    """``batch`` preprocessed scikit-image photos (cycled), ``(batch, 224, 224, 3)`` float32."""
    import numpy as np
    import skimage.data

    import jlrp.models as jm

    images = [
        jm.efficientnet_lite0_preprocess(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])())
        for i in range(batch)
    ]
    return np.stack(images)


def jax_methods(model: Any, variables: Any) -> dict[str, Any]:
    import jax

    import jlrp
    from jlrp import composites

    @jax.jit
    def gradient(x: Any, targets: Any) -> Any:
        output, pullback = jax.vjp(lambda inp: model.apply(variables, inp), x)
        return pullback(output * jax.nn.one_hot(targets, output.shape[-1], dtype=output.dtype))[0]

    methods = {"gradient": lambda x, t: gradient(x, t).block_until_ready()}
    for name, composite in (
        ("EpsilonPlusFlat", composites.EpsilonPlusFlat()),
        ("EpsilonGammaBox", composites.EpsilonGammaBox(LOW, HIGH)),
    ):
        explained = jlrp.explain(model, composite)
        methods[name] = lambda x, t, e=explained: jlrp.attribute(e, variables, x, target=t)[
            1
        ].block_until_ready()
    return methods


def torch_methods(state_dict: dict[str, Any], zennit: bool) -> dict[str, Any]:
    import copy

    import torch
    from _effnet_twin import TorchEfficientNetLite0

    twin = TorchEfficientNetLite0().eval()
    twin.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()})

    def make(net: Any) -> Any:
        def run(x: Any, onehot: Any) -> Any:
            inp = x.detach().requires_grad_(True)
            output = net(inp)
            return torch.autograd.grad(output, inp, (output * onehot).detach())[0]

        return run

    methods = {"gradient": make(twin)}
    if not zennit:
        return methods
    from zennit import composites as zc
    from zennit.canonizers import SequentialMergeBatchNorm

    for name, composite in (
        ("EpsilonPlusFlat", lambda: zc.EpsilonPlusFlat(canonizers=[SequentialMergeBatchNorm()])),
        (
            "EpsilonGammaBox",
            lambda: zc.EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()]),
        ),
    ):
        net = copy.deepcopy(twin)
        composite().register(net)
        methods[name] = make(net)
    return methods


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a markdown table, write the JSON."""
    args = parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import jax
    import numpy as np
    import torch

    import jlrp.models as jm

    torch.set_num_threads(args.threads)
    spec = {
        "model": "efficientnet_lite0",
        "size": 224,
        "batch": args.batch,
        "repeats": args.repeats,
        "min_repeats": args.min_repeats,
        "budget": args.budget,
    }
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": bench.machine_info(),
        "threads": args.threads,
        "load_average_start": bench.load_average(),
    }
    x = photos(args.batch)
    model, variables = jm.load_efficientnet_lite0()
    targets = np.asarray(jax.jit(model.apply)(variables, x)).argmax(-1)
    results, relevance = [], {}

    have_zennit = not args.no_zennit
    methods = torch_methods(jm.read_pth(jm.efficientnet_lite0_weights()), have_zennit)
    inputs = (
        torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        torch.nn.functional.one_hot(torch.from_numpy(targets), 1000).float(),
    )
    stats = bench._measure({**spec, "framework": "torch"}, list(methods.items()), inputs)
    for method in methods:
        results.append(
            bench._result(spec, "torch" if method == "gradient" else "zennit", method, stats[method])
        )
        relevance[method] = stats[method]["output"].numpy().transpose(0, 2, 3, 1)

    methods = jax_methods(model, variables)
    inputs = (jax.device_put(x), jax.device_put(targets))
    stats = bench._measure({**spec, "framework": "jax"}, list(methods.items()), inputs)
    for method in methods:
        result = bench._result(spec, "jax" if method == "gradient" else "jlrp", method, stats[method])
        if method != "gradient" and method in relevance:
            ours, theirs = np.asarray(stats[method]["output"]), relevance[method]
            scale = np.abs(theirs).reshape(args.batch, -1).max(1)
            result["max_rel_diff_vs_zennit"] = float(
                (np.abs(ours - theirs).reshape(args.batch, -1).max(1) / scale).max()
            )
        results.append(result)
    meta["load_average_end"] = bench.load_average()

    index = {(r["framework"], r["method"]): r for r in results}
    grad_jax, grad_torch = index[("jax", "gradient")]["median_s"], index[("torch", "gradient")]["median_s"]
    lines = [
        "| method | JAX ms | × JAX gradient | compile s | torch ms | × torch gradient | zennit / jlrp | rel. diff |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method in ("gradient", "EpsilonPlusFlat", "EpsilonGammaBox"):
        ours = index[("jax" if method == "gradient" else "jlrp", method)]
        theirs = index.get(("torch" if method == "gradient" else "zennit", method))
        cells = [
            method,
            f"{1e3 * ours['median_s']:.0f}",
            f"{ours['median_s'] / grad_jax:.2f}",
            f"{ours['compile_s']:.1f}",
            "–" if theirs is None else f"{1e3 * theirs['median_s']:.0f}",
            "–" if theirs is None else f"{theirs['median_s'] / grad_torch:.2f}",
            "–" if theirs is None else f"{theirs['median_s'] / ours['median_s']:.2f}",
            f"{ours['max_rel_diff_vs_zennit']:.1e}" if "max_rel_diff_vs_zennit" in ours else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"EfficientNet-Lite0, 224x224, batch {args.batch}, float32, {args.threads} threads")
    print(table)
    print(f"load average {meta['load_average_start']} -> {meta['load_average_end']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
