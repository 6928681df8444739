"""``jlrp concepts``: reference samples of the channels of chosen layers (CRP) over a folder of photos.

Builds :func:`jlrp.concepts.references` for a zoo model or the user's model on a folder of images, then
writes one PNG grid per channel, ``index.html`` and a table of the channels with the most relevance over
the set. ``jlrp concepts --view DIR`` prints that table again. The model, variables, image loading,
preprocessing and per-file error handling are those of ``jlrp explain`` (:mod:`jlrp.cli.models`,
:mod:`jlrp.cli.images`); the state file ``references.npz`` makes an interrupted run resumable.
"""

from __future__ import annotations

import argparse
import csv
import html
import shutil
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from jlrp._files import atomic_path, remove_stale_temporaries
from jlrp.errors import OutOfRangeError

from . import outputs
from .args import CLIError, key_values, short
from .explain import _BOX_COMPOSITES, DEFAULT_COMPOSITE, _preprocess, load_run, make_composite
from .images import FileProblem, Inputs
from .models import zoo_entry

__all__ = ["cmd_concepts", "parse_channels", "STATE_FILE", "FILES_CSV"]

STATE_FILE = "references.npz"
#: the side of the stored heatmap cells (the grids resize them to --cell, so --cell can change on a rerun)
HEATMAP_SIZE = 64
FILES_CSV = "files.csv"


def parse_channels(text: str | None) -> list[int] | None:
    """``'0-15,20'`` -> ``[0, ..., 15, 20]``; ``None`` -> ``None`` (every channel).

    Raises:
        CLIError: anything but comma-separated non-negative ints and ranges ``a-b`` with ``a <= b``.
    """
    if text is None:
        return None
    ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        try:
            a = int(low)
            b = int(high) if sep else a
        except ValueError:
            raise CLIError(f"--channels takes ids and ranges like 0-15,20, got {text!r}") from None
        if a < 0 or b < a:
            raise CLIError(f"--channels range {part!r} is empty or negative; write low-high, e.g. 0-15")
        ids.extend(range(a, b + 1))
    return list(dict.fromkeys(ids))


class _FolderBatches:
    """The folder's images as batches ``(x, ids)`` by number (a Sequence; files are read on access).

    Unreadable files are left out of their batch (reported once through ``warn``, kept in ``problems``).
    """

    def __init__(self, inputs: Inputs, batch_size: int, warn: Any) -> None:
        self.inputs, self.batch_size, self.warn = inputs, batch_size, warn
        self.problems: dict[int, str] = {}
        self.notes: dict[int, str] = {}

    def __len__(self) -> int:
        return -(-len(self.inputs) // self.batch_size)

    def load(self, i: int) -> Any:
        try:
            sample = self.inputs.load(i)
        except FileProblem as err:
            if i not in self.problems:
                self.warn(f"skipping {err}")
            self.problems[i] = str(err).removeprefix(f"{self.inputs.names[i]}: ")
            return None
        if i not in self.notes:
            for note in sample.notes:
                self.warn(f"{self.inputs.names[i]}: {note}")
        self.notes[i] = "; ".join(sample.notes)
        return sample

    def __getitem__(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= b < len(self):
            raise OutOfRangeError(f"batch {b} of {len(self)}")
        start = b * self.batch_size
        xs, ids = [], []
        for i in range(start, min(start + self.batch_size, len(self.inputs))):
            sample = self.load(i)
            if sample is not None:
                xs.append(sample.x)
                ids.append(i)
        if not xs:
            return np.zeros((0, *self.inputs.sample_shape), np.float32), np.zeros(0, np.int64)
        return np.stack(xs), np.asarray(ids, np.int64)

    def pictures(self, ids: np.ndarray) -> list[np.ndarray]:
        """The files as the model saw them (uint8, the model input's geometry), for the grids."""
        out = []
        for i in ids:
            sample = self.load(int(i))
            if sample is None:  # it was readable on the first pass
                raise CLIError(f"{self.inputs.names[int(i)]} became unreadable during the run; rerun")
            picture = sample.display if sample.display is not None else sample.x
            out.append(np.asarray(picture, np.uint8))
        return out


def _settings(args: argparse.Namespace, inputs: Inputs, composite_args: dict, layers: list[str]) -> dict:
    return {
        "command": "concepts",
        "model": args.model,
        "variables": str(args.variables) if args.variables else None,
        "inputs": str(Path(args.inputs).resolve()),
        "n_inputs": len(inputs),
        "input_shape": list(inputs.sample_shape),
        "preprocess": inputs.preprocess.kind,
        "composite": args.composite,
        "composite_args": {
            k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in sorted(composite_args.items())
        },
        "layers": layers,
        "channels": args.channels,
        "top_k": args.top_k,
        "target": args.target,
        "batch_size": args.batch_size,
    }


def _clear(out: Path) -> None:
    """Delete what an earlier ``jlrp concepts`` wrote in ``out`` (``--overwrite``), nothing else."""
    from jlrp.concepts import ReferenceSamples, layer_dirname

    state = out / STATE_FILE
    if state.is_file():
        try:
            keys = list(ReferenceSamples.load(state).layers)
        except Exception:
            keys = []
        for key in keys:
            if (out / layer_dirname(key)).is_dir():
                shutil.rmtree(out / layer_dirname(key))
    for name in (STATE_FILE, FILES_CSV, "index.html", "run.json"):
        if (out / name).is_file():
            (out / name).unlink()


def cmd_concepts(args: argparse.Namespace) -> int:
    """Run ``jlrp concepts`` (see :func:`jlrp.cli.parser.build_parser` for the arguments)."""
    if args.view is not None:
        return _view(Path(args.view), args.top)
    from tqdm.auto import tqdm

    def warn(message: str) -> None:
        tqdm.write(f"jlrp concepts: {message}", file=sys.stderr)

    missing = [flag for flag, value in (("--model", args.model), ("--inputs", args.inputs)) if value is None]
    if missing or not args.layers:
        need = missing + ([] if args.layers else ["--layers"])
        raise CLIError(f"{' and '.join(need)} required (or --view DIR to show a finished run)")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1, got {args.top_k}")
    if args.cell < 8:
        raise CLIError(f"--cell must be >= 8 pixels, got {args.cell}")
    layers = [p.strip() for text in args.layers for p in text.split(",") if p.strip()]
    channels = parse_channels(args.channels)
    rankings = ("relevance", "activation") if args.by == "both" else (args.by,)
    composite_args = key_values(args.composite_arg, "--composite-arg")
    args.composite = args.composite or DEFAULT_COMPOSITE
    if args.composite == "none":
        raise CLIError("jlrp concepts needs an LRP composite; choose one, e.g. --composite epsilon_plus_flat")
    zoo = zoo_entry(args.model)
    if not Path(args.inputs).is_dir():
        raise CLIError(
            f"--inputs {args.inputs!r} is not a folder; jlrp concepts reads a folder of PNG/JPEG images"
        )
    preprocess = _preprocess(argparse.Namespace(**{**vars(args), "channels": None}), zoo)
    own = zoo is not None and preprocess.normalise is not None and zoo.input_range is not None
    input_range = zoo.input_range if own else preprocess.input_range
    if args.composite in _BOX_COMPOSITES and not {"low", "high"} <= set(composite_args):
        warn(f"note: {args.composite} takes low/high from the input range of --preprocess {preprocess.kind}")
    composite = make_composite(args.composite, composite_args, input_range)
    inputs, out, loaded = load_run(args, preprocess)
    if args.target == "pred":
        target = None
    else:
        try:
            target = int(args.target)
        except ValueError:
            raise CLIError(f"--target must be 'pred' or a class index, got {args.target!r}") from None
        if not 0 <= target < loaded.n_classes:
            raise CLIError(f"--target {target} is outside the model's classes 0..{loaded.n_classes - 1}")

    import jlrp
    from jlrp import concepts

    explained = jlrp.explain(loaded.model, composite)
    model_args = () if loaded.variables is None else (loaded.variables,)
    _check_layers(explained, model_args, inputs.sample_shape, layers, channels)

    for _, reason in inputs.skipped:
        warn(f"skipping {reason}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --out {args.out!r} ({short(err)})") from err
    if args.overwrite:
        _clear(out)
    remove_stale_temporaries(out)
    outputs.check_manifest(out, _settings(args, inputs, composite_args, layers), args.overwrite)
    state = out / STATE_FILE
    if state.is_file():
        warn(f"resuming from {state} (--overwrite to recompute)")

    batches = _FolderBatches(inputs, args.batch_size, warn)
    refs = concepts.references(
        explained,
        *model_args,
        batches,
        layers=layers,
        k=args.top_k,
        channels=channels,
        target=target,
        state=state,
        heatmap_size=HEATMAP_SIZE,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    concepts.save_grids(
        refs,
        out,
        batches.pictures,
        rankings=rankings,
        overlay=not args.no_overlay,
        size=args.cell,
        cmap=args.cmap,
        progress=not args.no_progress,
    )
    for i in range(len(inputs)):  # files a resumed run did not read again
        if i not in batches.problems and i not in batches.notes:
            batches.load(i)
    problems = dict(batches.problems)
    rows = [
        (i, name, "skipped" if i in problems else "ok", problems.get(i, batches.notes.get(i, "")))
        for i, name in enumerate(inputs.names)
    ]
    skipped_scan = [(name, reason.removeprefix(f"{name}: ")) for name, reason in inputs.skipped]
    _write_files(out, rows, skipped_scan)
    listed = skipped_scan + [(inputs.names[i], r) for i, r in sorted(problems.items())]
    _write_html(out, refs, inputs.names, rankings, listed)
    print(_table(refs, inputs.names, args.top))
    n_skipped = len(skipped_scan) + len(problems)
    skipped = f"; skipped {n_skipped} files (listed in {FILES_CSV})" if n_skipped else ""
    print(
        f"reference samples of {sum(len(layer.channels) for layer in refs.layers.values())} channels in "
        f"{len(refs.layers)} layers from {refs.n_samples} images{skipped} -> {out / 'index.html'}"
    )
    return 0


def _check_layers(
    explained: Any, model_args: tuple, sample_shape: tuple, layers: list[str], channels: list[int] | None
) -> None:
    """Whole-run checks before any work: ``--layers`` select outputs, ``--channels`` exist in each.

    Raises:
        CLIError: no output matches (the message lists the layer paths), or a channel is out of range.
    """
    from jlrp import concepts

    x = np.zeros((1, *sample_shape), np.float32)
    found = concepts.tap_points(explained, *model_args, x, capture=layers)
    if not found:
        every = concepts.tap_points(explained, *model_args, x, capture=["**", "**/@*"])
        paths = ", ".join(dict.fromkeys(p.path for p in every.values() if p.path))
        raise CLIError(f"--layers {','.join(layers)} select no layer output; the model's paths are: {paths}")
    for key, point in found.items():
        if len(point.shape) < 2:
            raise CLIError(
                f"layer {key} has one value per image (shape {point.shape}); choose a layer with channels"
            )
        if channels is not None and max(channels) >= point.shape[-1]:
            raise CLIError(
                f"--channels {max(channels)} is out of range: layer {key} has {point.shape[-1]} channels "
                f"(0-{point.shape[-1] - 1})"
            )


def _write_files(out: Path, rows: list[tuple[int, str, str, str]], skipped: list[tuple[str, str]]) -> None:
    """``files.csv``: one row per file of the folder (id, file, status, note)."""
    with atomic_path(out / FILES_CSV) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("id", "file", "status", "note"))
        for row in rows:
            writer.writerow(row)
        for name, reason in skipped:
            writer.writerow(("", name, "skipped", reason))


def _read_names(out: Path) -> dict[int, str]:
    path = out / FILES_CSV
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {int(r["id"]): r["file"] for r in csv.DictReader(f) if r["id"]}


def _table(refs: Any, names: Any, top: int) -> str:
    """Per layer, the ``top`` channels with the largest relevance summed over the data set."""

    def name(i: int) -> str:
        if i < 0:
            return "-"
        return names[i] if isinstance(names, list) else names.get(i, str(i))

    lines = []
    for key, layer in refs.layers.items():
        total = np.abs(layer.relevance_sum).sum()
        lines.append(
            f"layer {key} ({len(layer.channels)} channels, {refs.n_samples} images): channels by relevance over the set"
        )
        lines.append(f"  {'channel':>7}  {'mean R':>11}  {'share':>6}  top references (by relevance)")
        for c in layer.top_channels(top):
            row = int(np.nonzero(layer.channels == c)[0][0])
            mean = layer.relevance_sum[row] / max(refs.n_samples, 1)
            share = layer.relevance_sum[row] / total if total > 0 else 0.0
            best = ", ".join(name(int(i)) for i in layer.rel_ids[row][:3] if i >= 0)
            lines.append(f"  {int(c):>7}  {mean:>11.4g}  {share:>6.1%}  {best}")
    return "\n".join(lines)


def _write_html(
    out: Path,
    refs: Any,
    names: list[str],
    rankings: tuple[str, ...],
    skipped: list[tuple[str, str]],
) -> None:
    """``index.html``: per layer, every channel (by relevance over the set) with its grid."""
    from jlrp.concepts import layer_dirname

    rows_text = " / ".join(f"{r} (crops, then heatmaps)" for r in rankings)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>jlrp concepts</title>",
        "<style>body{font-family:sans-serif} td{padding:4px 8px;vertical-align:middle} "
        "th{text-align:left}</style>",
        f"<h1>Reference samples</h1><p>{refs.n_samples} images, top {refs.k} per channel; grid rows: "
        f"{html.escape(rows_text)}. Channels ordered by their relevance summed over the images.</p>",
    ]
    for key, layer in refs.layers.items():
        folder = urllib.parse.quote(layer_dirname(key))
        total = np.abs(layer.relevance_sum).sum()
        parts.append(
            f"<h2>{html.escape(key)}</h2><table><tr><th>channel</th><th>mean R</th><th>share</th>"
            "<th>references</th></tr>"
        )
        for c in layer.top_channels():
            row = int(np.nonzero(layer.channels == c)[0][0])
            mean = layer.relevance_sum[row] / max(refs.n_samples, 1)
            share = layer.relevance_sum[row] / total if total > 0 else 0.0
            files = ", ".join(html.escape(names[int(i)]) for i in layer.rel_ids[row] if i >= 0)
            parts.append(
                f"<tr><td>{int(c)}</td><td>{mean:.4g}</td><td>{share:.1%}</td><td>"
                f"<img src='{folder}/{int(c)}.png' title='{files}'></td></tr>"
            )
        parts.append("</table>")
    if skipped:
        parts.append("<h2>Skipped files</h2><ul>")
        parts += [f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, r in skipped]
        parts.append("</ul>")
    with atomic_path(out / "index.html") as tmp:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")


def _view(out: Path, top: int) -> int:
    """``jlrp concepts --view DIR``: print the table of a run."""
    from jlrp.concepts import ReferenceSamples

    state = out / STATE_FILE
    if not state.is_file():
        raise CLIError(
            f"--view {str(out)!r} holds no {STATE_FILE}; build it first with jlrp concepts --model ..."
        )
    refs = ReferenceSamples.load(state)
    print(_table(refs, _read_names(out), top))
    if not refs.complete:
        print(f"(incomplete: {refs.batches} batches so far; rerun the build command to finish)")
    elif (out / "index.html").is_file():
        print(f"grids: {out / 'index.html'}")
    return 0
