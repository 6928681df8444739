"""``jlrp explain``: relevance for a zoo model or the user's own model, on a folder of files or an array.

The steps, each whole-run check before any work (exit status 2 with one line): composite and its
arguments, model name, inputs (folder or array; per-file problems are listed, not fatal), colour map,
model and variables, target. Then the inputs are explained one shard of ``--batch-size`` at a time
(a tqdm progress bar), shards already complete in ``--out`` are skipped (resume), and the index and
summary are written from the shards (see :mod:`jlrp.cli.outputs`).

Split over processes (``--num-processes N --process-id K``, or ``--distributed``): process ``K`` explains
the shards ``s`` with ``s mod N == K`` and writes only their files; process 0 then waits until every
shard is complete and writes the index and summary. A shard's contents do not depend on ``N``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from jlrp._files import remove_stale_temporaries

from . import outputs
from .args import CLIError, key_values, short
from .images import FileProblem, Inputs, Preprocess, load_inputs
from .models import LoadedModel, class_names, load_model, zoo_entry

__all__ = [
    "ATTRIBUTORS",
    "DEFAULT_COMPOSITE",
    "cmd_explain",
    "make_composite",
    "make_attributor",
    "load_targets",
]

ATTRIBUTORS = ("gradient", "smoothgrad", "integrated_gradients", "occlusion")
DEFAULT_COMPOSITE = "epsilon_plus_flat"
#: composites whose ZBox needs the input range (``low``, ``high``)
_BOX_COMPOSITES = ("epsilon_gamma_box",)


def make_composite(name: str, args: dict[str, Any], input_range: tuple[Any, Any] | None = None) -> Any:
    """The named composite with ``args``, or ``None`` for ``'none'`` (plain gradients).

    Args:
        name: a key of :data:`jlrp.composites.COMPOSITES`, or ``'none'``.
        args: the composite's keyword arguments (``--composite-arg``).
        input_range: ``(low, high)`` of the preprocessed inputs, used for a box composite's missing
            ``low``/``high`` (known for image folders and zoo models).

    Raises:
        CLIError: an unknown name, unknown or missing arguments.
    """
    from jlrp import composites

    if name == "none":
        if args:
            raise CLIError("--composite-arg needs a --composite (it is 'none')")
        return None
    if name not in composites.COMPOSITES:
        raise CLIError(
            f"unknown composite {name!r}; choose one of {', '.join(composites.COMPOSITES)} or none "
            f"(e.g. --composite {DEFAULT_COMPOSITE})"
        )
    cls = composites.COMPOSITES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise CLIError(
            f"composite {name!r} takes no argument {unknown[0]!r}; its arguments are {', '.join(fields)}"
        )
    if name in _BOX_COMPOSITES and input_range is not None:
        args = {"low": np.float32(0) + input_range[0], "high": np.float32(0) + input_range[1], **args}
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in args
    ]
    if required:
        example = " ".join(f"--composite-arg {r}=..." for r in required)
        hint = (
            " (the lowest and highest input value, e.g. low=0 high=1 for images in [0, 1])"
            if "low" in required
            else ""
        )
        raise CLIError(f"composite {name!r} needs {example}{hint}")
    try:
        return cls(**args)
    except Exception as err:
        raise CLIError(f"composite {name!r} rejects these arguments: {short(err)}") from err


def make_attributor(name: str, model: Any, composite: Any, args: dict[str, Any]) -> Any:
    """The attributor ``name`` over the explained (or, without a composite, plain) model.

    Raises:
        CLIError: an argument the attributor does not take or rejects.
    """
    import jlrp
    from jlrp import attribution

    classes = {
        "gradient": attribution.Gradient,
        "smoothgrad": attribution.SmoothGrad,
        "integrated_gradients": attribution.IntegratedGradients,
        "occlusion": attribution.Occlusion,
    }
    cls = classes[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"model", "composite"}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise CLIError(
            f"attributor {name!r} takes no argument {unknown[0]!r}; its arguments are {', '.join(sorted(fields)) or 'none'}"
        )
    target = model if composite is None else jlrp.explain(model, composite)
    try:
        return cls(target, **args)
    except Exception as err:
        raise CLIError(f"attributor {name!r} rejects these arguments: {short(err)}") from err


def load_targets(text: str, n: int, n_classes: int) -> tuple[str, Any]:
    """``('pred', None)``, ``('int', c)`` or ``('array', classes)`` from the ``--target`` argument.

    Raises:
        CLIError: a class outside the model's classes, a missing or ill-shaped ``.npy`` file.
    """
    if text == "pred":
        return "pred", None
    if re.fullmatch(r"[+-]?\d+", text):
        value = int(text)
        if not 0 <= value < n_classes:
            raise CLIError(f"--target {value} is outside the model's classes 0..{n_classes - 1}")
        return "int", value
    path = Path(text)
    if path.suffix != ".npy":
        raise CLIError(
            f"--target must be 'pred', a class index or an .npy file of class indices, got {text!r}"
        )
    if not path.is_file():
        raise CLIError(
            f"--target file {text!r} does not exist; pass an .npy file with one class index per input"
        )
    try:
        classes = np.load(path, allow_pickle=False)
    except Exception as err:
        raise CLIError(f"cannot read --target {text!r} ({short(err)})") from err
    if not np.issubdtype(classes.dtype, np.integer) or classes.shape != (n,):
        raise CLIError(
            f"--target {text!r} must hold {n} integer class indices (one per input), got {classes.dtype} "
            f"array of shape {classes.shape}"
        )
    if ((classes < 0) | (classes >= n_classes)).any():
        raise CLIError(f"--target {text!r} has classes outside 0..{n_classes - 1}")
    return "array", classes.astype(np.int32)


def _settings(args: argparse.Namespace, inputs: Inputs, composite_args: dict, attributor_args: dict) -> dict:
    def plain(v: Any) -> Any:
        return v.tolist() if isinstance(v, np.ndarray) else v

    target = args.target
    if target.endswith(".npy"):
        target = f"{target} sha1:{hashlib.sha1(Path(target).read_bytes()).hexdigest()[:12]}"
    return {
        "model": args.model,
        "variables": str(args.variables) if args.variables else None,
        "inputs": str(Path(args.inputs).resolve()),
        "n_inputs": len(inputs),
        "input_shape": list(inputs.sample_shape),
        "preprocess": inputs.preprocess.kind,
        "composite": args.composite,
        "composite_args": {k: plain(v) for k, v in sorted(composite_args.items())},
        "attributor": args.attributor,
        "attributor_args": {k: plain(v) for k, v in sorted(attributor_args.items())},
        "target": target,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "cmap": args.cmap,
        "level": args.level,
        "overlay": args.overlay,
    }


def _compute(attributor: Any, variables: Any, x: Any, target: Any, rng: Any, smooth: bool) -> tuple[Any, Any]:
    kwargs = {"rng": rng} if smooth else {}
    if variables is None:
        return attributor(x, target=target, **kwargs)
    return attributor(variables, x, target=target, **kwargs)


def _photo(sample_x: np.ndarray, display: np.ndarray | None) -> np.ndarray | None:
    """The picture under an overlay: the file as the model saw it, or an image-like array min-max scaled."""
    if display is not None:
        return display
    if sample_x.ndim == 3 and sample_x.shape[-1] in (1, 3):
        low, high = float(sample_x.min()), float(sample_x.max())
        scaled = (sample_x - low) / (high - low) if high > low else np.zeros_like(sample_x)
        scaled = (scaled * 255).astype(np.uint8)
        return scaled[..., 0] if scaled.shape[-1] == 1 else scaled
    return None


def _preprocess(args: argparse.Namespace, zoo: Any) -> Preprocess:
    kind = args.preprocess or ("imagenet" if zoo is not None and Path(args.inputs).is_dir() else "none")
    if kind == "none":
        if args.crop is not None:
            raise CLIError("--crop applies with --preprocess imagenet")
        return Preprocess("none", channels=args.channels)
    if args.channels is not None:
        raise CLIError("--channels applies with --preprocess none (imagenet inputs are RGB)")
    if zoo is not None:
        if args.crop is not None and args.crop != zoo.crop:
            raise CLIError(f"--model {args.model} takes {zoo.crop}x{zoo.crop} inputs; leave out --crop")
        crop = zoo.crop
    else:
        crop = args.crop or 224
    if crop < 1:
        raise CLIError(f"--crop must be >= 1, got {crop}")
    resize = round(crop * 256 / 224)
    return Preprocess("imagenet", crop=crop, resize=resize, normalise=zoo.preprocess if zoo else None)


def load_run(args: argparse.Namespace, preprocess: Preprocess) -> tuple[Inputs, Path, LoadedModel]:
    """What ``jlrp explain`` and ``jlrp concepts`` load before they start: the inputs, the output folder
    (checked: not a file; ``--cmap`` checked too) and the model.

    Raises:
        CLIError: an unknown colour map, an output path that is a file (and what loading raises).
    """
    inputs = load_inputs(args.inputs, preprocess)
    from jlrp.image import get_cmap

    try:
        get_cmap(args.cmap)
    except Exception as err:
        raise CLIError(f"--cmap {args.cmap!r} is not a colour map ({short(err)}); e.g. --cmap bwr") from err
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {args.out!r} is a file; pass a folder")
    variables_path = Path(args.variables) if args.variables else None
    return inputs, out, load_model(args.model, variables_path, inputs.sample_shape)


def cmd_explain(args: argparse.Namespace) -> int:
    """Run ``jlrp explain`` (see :func:`jlrp.cli.parser.build_parser` for the arguments)."""
    from tqdm.auto import tqdm

    def warn(message: str) -> None:
        tqdm.write(f"jlrp explain: {message}", file=sys.stderr)

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    processes, process = _processes(args)
    composite_args = key_values(args.composite_arg, "--composite-arg")
    attributor_args = key_values(args.attributor_arg, "--attributor-arg")
    if args.composite is None:
        args.composite = "none" if args.attributor == "occlusion" else DEFAULT_COMPOSITE
    zoo = zoo_entry(args.model)
    preprocess = _preprocess(args, zoo)
    from_folder = Path(args.inputs).is_dir()
    input_range = None
    if from_folder:
        own = zoo is not None and preprocess.normalise is not None and zoo.input_range is not None
        input_range = zoo.input_range if own else preprocess.input_range
    notes = []  # printed once the run is known to go ahead
    if args.attributor == "occlusion" and args.composite != "none":
        notes.append("note: occlusion uses no gradients, so --composite has no effect")
    if args.composite in _BOX_COMPOSITES and input_range is not None:
        if not {"low", "high"} <= set(composite_args):
            notes.append(
                f"note: {args.composite} takes low/high from the input range of --preprocess {preprocess.kind}"
            )
    composite = make_composite(args.composite, composite_args, input_range)
    inputs, out, loaded = load_run(args, preprocess)
    names = class_names(args.classes, loaded.zoo, loaded.n_classes)
    target_kind, target_value = load_targets(args.target, len(inputs), loaded.n_classes)
    attributor = make_attributor(
        args.attributor, loaded.model, composite if args.attributor != "occlusion" else None, attributor_args
    )

    for note in notes:
        warn(note)
    for _, reason in inputs.skipped:
        warn(f"skipping {reason}")
    heat_dir = out / "heatmaps"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --out {args.out!r} ({short(err)})") from err
    image_like = len(inputs.sample_shape) in (2, 3)
    n, batch = len(inputs), args.batch_size
    n_shards = -(-n // batch)
    plans = []
    for shard in range(n_shards):
        indices = np.arange(shard * batch, min((shard + 1) * batch, n))
        pngs = [
            heat_dir / outputs.heatmap_name(int(i), inputs.names[i], inputs.files is not None)
            if image_like
            else None
            for i in indices
        ]
        plans.append((shard, indices, pngs))
    # shard s belongs to process s mod N: the shards (and their contents) do not depend on N
    mine = [p for p in plans if p[0] % processes == process]
    if args.overwrite:
        own = None if processes == 1 else [(outputs.shard_path(out, p[0]), p[2]) for p in mine]
        outputs.clear_outputs(out, own, summary=process == 0)
    if image_like:
        heat_dir.mkdir(exist_ok=True)
    if processes == 1:
        remove_stale_temporaries(out, heat_dir)
    else:  # other processes, maybe on other hosts, may be writing theirs right now
        owned = {outputs.shard_path(out, p[0]).name for p in mine}
        owned |= {png.name for p in mine for png in p[2] if png is not None}
        if process == 0:
            owned |= {"index.csv", "summary.csv", "summary.json", "run.json"}
        remove_stale_temporaries(out, heat_dir, only=owned)
    settings = _settings(args, inputs, composite_args, attributor_args)
    outputs.check_manifest(out, settings, args.overwrite)

    import jax
    import jax.numpy as jnp

    todo = [p for p in mine if not _complete(out, inputs, p)]
    done = len(mine) - len(todo)
    if done:
        warn(f"resuming: {done} of {len(mine)} shards are complete in {out} (--overwrite to recompute)")
    smooth = args.attributor == "smoothgrad"
    total = sum(len(p[1]) for p in mine)
    initial = total - sum(len(p[1]) for p in todo)
    bar = tqdm(total=total, initial=initial, desc="explaining", unit="file", disable=args.no_progress)
    try:
        for shard, indices, pngs in todo:
            samples, notes, ok = [], [], np.zeros(len(indices), bool)
            for j, i in enumerate(indices):
                try:
                    sample = inputs.load(int(i))
                except FileProblem as err:
                    warn(f"skipping {err}")
                    samples.append(None)
                    notes.append(str(err).removeprefix(f"{inputs.names[i]}: "))
                    continue
                samples.append(sample)
                notes.append("; ".join(sample.notes))
                ok[j] = True
                for note in sample.notes:
                    warn(f"{inputs.names[i]}: {note}")
            m = len(indices)
            output = np.full((m, loaded.n_classes), np.nan, np.float32)
            relevance = np.full((m, *inputs.sample_shape), np.nan, np.float32)
            if ok.any():
                filler = next(s.x for s in samples if s is not None)
                x = np.stack([s.x if s is not None else filler for s in samples])
                pad = batch - m if n_shards > 1 else 0  # one compiled shape for every shard
                if pad:
                    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
                if target_kind == "pred":
                    target = None
                elif target_kind == "int":
                    target = target_value
                else:
                    target = target_value[indices]
                    target = np.concatenate([target, np.repeat(target[-1:], pad)]) if pad else target
                rng = jax.random.fold_in(jax.random.PRNGKey(args.seed), shard)
                out_b, rel_b = _compute(attributor, loaded.variables, jnp.asarray(x), target, rng, smooth)
                output[ok] = np.asarray(out_b)[:m][ok]
                relevance[ok] = np.asarray(rel_b)[:m][ok]
            if target_kind == "pred":
                used = np.where(ok, np.nan_to_num(output, nan=-np.inf).argmax(axis=-1), -1)
            elif target_kind == "int":
                used = np.full(m, target_value)
            else:
                used = target_value[indices].copy()
            used = np.where(ok, used, -1).astype(np.int32)
            score = np.where(
                ok, np.take_along_axis(output, np.maximum(used, 0)[:, None], axis=-1)[:, 0], np.nan
            )
            arrays = {
                "relevance": relevance,
                "output": output,
                "target": used,
                "index": indices.astype(np.int64),
                "score": score.astype(np.float32),
                "relevance_sum": relevance.reshape(m, -1).sum(axis=1),
                "ok": ok,
                "source": np.asarray([inputs.names[i] for i in indices], dtype=str),
                "note": np.asarray(notes, dtype=str),
            }
            heatmaps = []
            for j, png in enumerate(pngs):
                if png is None or not ok[j]:
                    continue
                photo = _photo(samples[j].x, samples[j].display) if args.overlay else None
                image = outputs.render_heatmap(relevance[j], args.cmap, args.level, photo)
                if image is not None:
                    heatmaps.append((png, image))
            outputs.save_shard(outputs.shard_path(out, shard), arrays, heatmaps)
            bar.update(m)
    finally:
        bar.close()
    if process != 0:
        print(
            f"process {process} of {processes}: explained its {len(mine)} of {n_shards} shards in {out}; "
            "process 0 writes the summary"
        )
        return 0
    _wait_for_shards(out, inputs, [p for p in plans if p[0] % processes != 0], args.wait_timeout, warn)
    return _finish(out, inputs, plans, names, settings)


def _processes(args: argparse.Namespace) -> tuple[int, int]:
    """``(N, K)``: how many processes split the inputs and which one this is.

    ``--distributed`` asks ``jax.distributed.initialize`` (which reads the cluster's environment: SLURM,
    Open MPI, Kubernetes, Cloud TPU, or ``JAX_COORDINATOR_ADDRESS``; ``--num-processes`` and
    ``--process-id`` fill in what the environment lacks); otherwise the two options, default ``(1, 0)``.

    Raises:
        CLIError: only one of the two options, values out of range, or a failed initialisation.
    """
    n, k = args.num_processes, args.process_id
    if args.distributed:
        import jax

        try:
            jax.distributed.initialize(num_processes=n, process_id=k)
        except Exception as err:
            raise CLIError(
                f"--distributed: jax.distributed.initialize() failed ({short(err)}); run under a cluster JAX "
                "detects (SLURM, Open MPI, ...) or set JAX_COORDINATOR_ADDRESS=host:port with --num-processes "
                "and --process-id, or leave out --distributed and pass --num-processes N --process-id K"
            ) from err
        return jax.process_count(), jax.process_index()
    if n is None and k is None:
        return 1, 0
    if n is None or k is None:
        raise CLIError("--num-processes and --process-id go together, e.g. --num-processes 4 --process-id 0")
    if n < 1 or not 0 <= k < n:
        raise CLIError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {k}")
    return n, k


def _complete(out: Path, inputs: Inputs, plan: tuple) -> bool:
    shard, indices, pngs = plan
    return outputs.shard_complete(
        outputs.shard_path(out, shard), indices, [inputs.names[i] for i in indices], pngs
    )


def _wait_for_shards(out: Path, inputs: Inputs, plans: list, timeout: float | None, warn: Any) -> None:
    """Process 0 of a split run: wait until the other processes' shards are complete in ``out``.

    Raises:
        CLIError: shards still missing after ``timeout`` seconds (``None``: wait as long as it takes).
    """
    pending = [p for p in plans if not _complete(out, inputs, p)]
    if not pending:
        return
    warn(f"waiting for {len(pending)} shards of the other processes before writing the summary")
    start = time.monotonic()
    while pending:
        if timeout is not None and time.monotonic() - start > timeout:
            raise CLIError(
                f"{len(pending)} shards of the other processes are still missing after {timeout:g} s "
                f"(first: {outputs.shard_path(out, pending[0][0]).name}); no summary written - rerun this "
                "command (process 0) once they are done"
            )
        time.sleep(0.5)
        pending = [p for p in pending if not _complete(out, inputs, p)]


def _finish(out: Path, inputs: Inputs, plans: list, names: list[str] | None, settings: dict) -> int:
    """Write ``index.csv``, ``summary.csv`` and ``summary.json`` from the shards; print the result."""
    index_rows, summary_rows = [], []
    for shard, indices, pngs in plans:
        path = outputs.shard_path(out, shard)
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in outputs.SHARD_ARRAYS if k != "relevance"}
        for j, i in enumerate(indices):
            ok = bool(arrays["ok"][j])
            heatmap = str(pngs[j].relative_to(out)) if ok and pngs[j] is not None else ""
            logits = arrays["output"][j].astype(np.float64)
            predicted = int(np.argmax(logits)) if ok else None
            probability = (
                float(np.exp(logits[predicted] - np.logaddexp.reduce(logits))) if ok else float("nan")
            )
            if ok:
                index_rows.append(
                    {
                        "index": int(i),
                        "source": inputs.names[i],
                        "shard": path.name,
                        "target": int(arrays["target"][j]),
                        "score": float(arrays["score"][j]),
                        "relevance_sum": float(arrays["relevance_sum"][j]),
                        "heatmap": heatmap,
                    }
                )
            summary_rows.append(
                {
                    "file": inputs.names[i],
                    "status": "ok" if ok else "skipped",
                    "predicted": predicted,
                    "class_name": names[predicted] if ok and names else None,
                    "probability": probability,
                    "target": int(arrays["target"][j]) if ok else None,
                    "score": float(arrays["score"][j]) if ok else float("nan"),
                    "relevance_sum": float(arrays["relevance_sum"][j]) if ok else float("nan"),
                    "heatmap": heatmap,
                    "note": str(arrays["note"][j]),
                }
            )
    for name, reason in inputs.skipped:
        summary_rows.append(
            {"file": name, "status": "skipped", "note": reason.removeprefix(f"{name}: ")}
            | {k: None for k in ("predicted", "class_name", "target", "heatmap")}
            | {k: float("nan") for k in ("probability", "score", "relevance_sum")}
        )
    if inputs.files is not None:
        summary_rows.sort(key=lambda r: r["file"])
    index_path = out / "index.csv"
    outputs.write_index(index_path, index_rows)
    csv_path, _ = outputs.write_summary(out, summary_rows, settings)
    n_skipped = sum(r["status"] != "ok" for r in summary_rows)
    skipped = f"; skipped {n_skipped} files (listed in {csv_path.name})" if n_skipped else ""
    print(f"explained {len(index_rows)} inputs in {len(plans)} shards{skipped} -> {index_path}, {csv_path}")
    return 0
