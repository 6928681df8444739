"""Reference-sample pass speed (CRP relevance/activation maximisation) for EfficientNet-Lite0 at 224x224.

One run on this machine, the pretrained EfficientNet-Lite0 (``jlrp.models.load_efficientnet_lite0``),
EpsilonPlusFlat, ``--images`` photos made from scikit-image's six bundled photos (chelsea, coffee,
astronaut, rocket, motorcycle, hubble_deep_field), each also mirrored and cropped at other offsets
(deterministic), preprocessed with :func:`jlrp.models.efficientnet_lite0_preprocess`. Reported:

- ``plain LRP``: :func:`jlrp.attribute` on the same batches (input heatmaps only), images per second;
- ``reference pass``: :func:`jlrp.concepts.references` with ``boxes=False``: one
  :func:`jlrp.concepts.attribute` call per batch capturing ``--layers`` plus the host-side running
  top-k of every channel (relevance and activation), images per second;
- ``receptive fields``: the box pass for ``--box-channels`` channels of each layer (``--top-k``
  references by relevance and by activation each), single-unit conditional heatmaps per second.

The first call of each (compilation) is timed separately; the rates come from the calls after it (the
first batch is run once before timing). Times are wall clock on a shared machine: compare the rates of
one run only.

    python benchmarks/references_bench.py                       # 32 images, blocks_5 and blocks_10
    python benchmarks/references_bench.py --images 16 --box-channels 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "hubble_deep_field")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/references_bench.py",
        description="Reference-sample pass of jlrp.concepts.references on EfficientNet-Lite0 at 224x224.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=32, help="images in the data set")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--layers", default="blocks_5,blocks_10", help="comma-separated layer paths")
    parser.add_argument("--top-k", type=int, default=8, help="references per channel")
    parser.add_argument("--box-channels", type=int, default=4, help="channels per layer in the box pass")
    parser.add_argument("--units-per-pass", type=int, default=4, help="condition masks per row (box pass)")
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results-references.json", help="JSON results"
    )
    return parser.parse_args(argv)


def photos(n: int) -> Any:
    """``n`` preprocessed photos ``(n, 224, 224, 3)``: the six photos, mirrored, then other crops."""
    import numpy as np
    from PIL import ImageOps

    import jlrp.models as jm
    from jlrp.demos.photos import load_photo

    base = [load_photo(name) for name in PHOTOS]
    out = []
    for i in range(n):
        image = base[i % len(base)]
        variant = i // len(base)
        if variant % 2:
            image = ImageOps.mirror(image)
        if variant >= 2:  # a crop shifted off the centre, a different view of the same photo
            w, h = image.size
            shift = 0.1 * (variant // 2)
            image = image.crop((int(w * shift), int(h * shift), w, h))
        out.append(jm.efficientnet_lite0_preprocess(image))
    return np.stack(out).astype(np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    import jlrp
    from jlrp import composites, concepts
    from jlrp.models import load_efficientnet_lite0

    layers = [p.strip() for p in args.layers.split(",") if p.strip()]
    model, variables = load_efficientnet_lite0("linen")
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    x = photos(args.images)
    batches = [x[i : i + args.batch] for i in range(0, len(x), args.batch)]
    timed = batches[1:] or batches
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
        },
        "settings": vars(args) | {"output": str(args.output)},
    }

    # plain LRP: input heatmaps of the same batches
    start = time.perf_counter()
    jax.block_until_ready(jlrp.attribute(explained, variables, batches[0]))
    compile_plain = time.perf_counter() - start
    start = time.perf_counter()
    for batch in timed:
        jax.block_until_ready(jlrp.attribute(explained, variables, batch))
    plain = sum(len(b) for b in timed) / (time.perf_counter() - start)

    # the reference pass without boxes: first batch alone (compilation), then the rest
    start = time.perf_counter()
    concepts.references(
        explained, variables, batches[:1], layers=layers, k=args.top_k, boxes=False, progress=False
    )
    compile_refs = time.perf_counter() - start
    start = time.perf_counter()
    refs = concepts.references(
        explained,
        variables,
        timed,
        layers=layers,
        k=args.top_k,
        boxes=False,
        progress=False,
        batch_size=args.batch,
    )
    stream = sum(len(b) for b in timed) / (time.perf_counter() - start)
    channels = {key: layer.top_channels(args.box_channels).tolist() for key, layer in refs.layers.items()}

    # the box pass for a few channels. Warm-up on one batch and one channel compiles the box programs (their
    # shapes do not depend on the channels); the timed run streams every batch again (its time estimated
    # from the rate above and subtracted) and computes the boxes.
    first = {key: channels[key][:1] for key in channels}
    start = time.perf_counter()
    concepts.references(
        explained,
        variables,
        batches[:1],
        layers=layers,
        k=1,
        channels=first,
        progress=False,
        batch_size=args.batch,
        units_per_pass=args.units_per_pass,
    )
    compile_boxes = time.perf_counter() - start
    start = time.perf_counter()
    boxed = concepts.references(
        explained,
        variables,
        batches,
        layers=layers,
        k=args.top_k,
        channels=channels,
        units_per_pass=args.units_per_pass,
        progress=True,
    )
    box_time = time.perf_counter() - start - len(x) / stream
    units = sum(2 * layer.rel_ids.size for layer in boxed.layers.values())
    sizes = {
        key: [int(v) for v in np.median(layer.rel_boxes[..., 2:] - layer.rel_boxes[..., :2], axis=(0, 1))]
        for key, layer in boxed.layers.items()
    }

    results["results"] = {
        "plain_lrp_images_per_s": plain,
        "plain_lrp_first_call_s": compile_plain,
        "reference_pass_images_per_s": stream,
        "reference_pass_first_batch_s": compile_refs,
        "reference_pass_over_plain": plain / stream,
        "box_units": units,
        "box_pass_s": box_time,
        "box_units_per_s": units / box_time,
        "box_warm_up_s": compile_boxes,
        "median_box_size": sizes,
        "channels_per_layer": {key: len(layer.channels) for key, layer in refs.layers.items()},
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    r = results["results"]
    print(
        f"EfficientNet-Lite0 224x224, {args.images} images, batch {args.batch}, layers {layers}, k={args.top_k}"
    )
    print(
        f"  plain LRP (EpsilonPlusFlat): {r['plain_lrp_images_per_s']:.2f} images/s (first call {compile_plain:.1f} s)"
    )
    print(
        f"  reference pass (all {sum(r['channels_per_layer'].values())} channels, relevance + activation top-k): "
        f"{stream:.2f} images/s, {r['reference_pass_over_plain']:.2f}x the plain LRP time (first batch "
        f"{compile_refs:.1f} s)"
    )
    print(
        f"  receptive-field boxes: {units} units in {box_time:.1f} s ({r['box_units_per_s']:.2f} units/s; "
        f"warm-up {compile_boxes:.1f} s); median box (h, w) {sizes}"
    )
    print(f"  load average {results['machine']['load_average']}; results -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
