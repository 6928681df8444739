"""What ``jlrp explain`` writes, and how an interrupted run resumes.

Files in ``--out``:

- ``relevance-NNNNN.npz``: one shard per ``--batch-size`` inputs with the arrays :data:`SHARD_ARRAYS`
  (``ok`` is False for a file that could not be explained; its numbers are NaN and ``note`` says why).
- ``heatmaps/<index>_<name>.png``: relevance summed over channels, zennit's colour map (``--cmap``),
  or with ``--overlay`` blended over the photo as the model saw it.
- ``index.csv``: one row per explained input (index, source, shard, target, score, relevance_sum, heatmap).
- ``summary.csv`` and ``summary.json``: one row per file, skipped ones included (:data:`SUMMARY_FIELDS`).
- ``run.json``: the settings; a rerun with other settings is refused unless ``--overwrite``.

Every file is written under a temporary name in its folder and renamed into place
(:func:`jlrp._files.atomic_path`), the shard's ``.npz`` last, so a shard that exists is complete and an
interrupted run resumes at the first missing shard. Processes that split a run write disjoint files:
their own shards and heatmaps, the index and summary only process 0 (``run.json``, the same for all,
each of them).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlrp._files import atomic_path

from .args import CLIError

__all__ = [
    "SHARD_ARRAYS",
    "SUMMARY_FIELDS",
    "shard_path",
    "shard_complete",
    "save_shard",
    "check_manifest",
    "clear_outputs",
    "heatmap_name",
    "render_heatmap",
    "write_index",
    "write_summary",
]

#: the arrays of every shard file
SHARD_ARRAYS = ("relevance", "output", "target", "index", "score", "relevance_sum", "ok", "source", "note")
#: the columns of ``summary.csv`` (and the keys of each entry of ``summary.json['files']``)
SUMMARY_FIELDS = (
    "file",
    "status",
    "predicted",
    "class_name",
    "probability",
    "target",
    "score",
    "relevance_sum",
    "heatmap",
    "note",
)


def shard_path(out: Path, shard: int) -> Path:
    """``out/relevance-NNNNN.npz``."""
    return out / f"relevance-{shard:05d}.npz"


def heatmap_name(index: int, source: str, from_folder: bool) -> str:
    """``000003_cat.png`` for folder inputs, ``000003.png`` for array inputs."""
    return f"{index:06d}_{Path(source).stem}.png" if from_folder else f"{index:06d}.png"


def shard_complete(
    path: Path, indices: np.ndarray, sources: Sequence[str], pngs: Sequence[Path | None]
) -> bool:
    """Whether a shard holds every array for exactly these inputs and the PNGs of its explained inputs exist."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            if not set(SHARD_ARRAYS) <= set(data.files):
                return False
            if not (np.array_equal(data["index"], indices) and list(data["source"]) == list(sources)):
                return False
            ok = data["ok"]
    except Exception:
        return False
    return all(p is None or not done or p.is_file() for p, done in zip(pngs, ok))


def render_heatmap(relevance: np.ndarray, cmap: str, level: float, photo: np.ndarray | None = None) -> Any:
    """A Pillow image of one input's relevance (summed over channels; symmetric colour scale).

    With ``photo`` (uint8 ``(H, W)`` or ``(H, W, 3)``), the heatmap is blended over a greyscale copy of
    the photo with opacity :math:`|R| / \\max |R|` per pixel, so irrelevant regions show the photo.

    Returns:
        ``PIL.Image.Image``, or ``None`` when the relevance is no image (not 2-D or 3-D).
    """
    from PIL import Image

    from jlrp.image import imgify

    heat = relevance.sum(axis=-1) if relevance.ndim == 3 else relevance
    if heat.ndim != 2:
        return None
    image = imgify(heat, symmetric=True, cmap=cmap, level=level)
    if photo is None:
        return image
    base = Image.fromarray(np.asarray(photo, np.uint8)).convert("L").convert("RGB")
    peak = float(np.abs(heat).max())
    alpha = np.abs(heat) / peak if peak > 0 else np.zeros_like(heat)
    mask = Image.fromarray((alpha * 255).astype(np.uint8), mode="L")
    return Image.composite(image.convert("RGB"), base, mask)


def save_shard(path: Path, arrays: dict[str, np.ndarray], heatmaps: Sequence[tuple[Path, Any]]) -> None:
    """Write a shard: the PNGs first (Pillow images), the ``.npz`` (the shard's completion mark) last."""
    for png, image in heatmaps:
        with atomic_path(png) as tmp:
            image.save(tmp, format="PNG")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def check_manifest(out: Path, settings: dict, overwrite: bool) -> None:
    """Write ``run.json``, or check that an earlier run in ``out`` had the same settings.

    Raises:
        CLIError: ``out`` holds a run with other settings and ``overwrite`` is False.
    """
    manifest = out / "run.json"
    if manifest.is_file() and not overwrite:
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            diff = [k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k]]
            raise CLIError(
                f"--out {str(out)!r} holds results of a run with other settings ({', '.join(diff[:3]) or 'unreadable run.json'}); "
                "pass a new --out folder, or --overwrite to replace them"
            )
        return
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def clear_outputs(
    out: Path, shards: Sequence[tuple[Path, Sequence[Path | None]]] | None = None, summary: bool = True
) -> None:
    """Delete what an earlier ``jlrp explain`` wrote in ``out`` (``--overwrite``), nothing else.

    Args:
        out: the ``--out`` folder.
        shards: ``None``: every shard and heatmap; else only these ``(shard file, heatmap files)`` (one
            process of a split run deletes only its own, never files another process may be writing).
        summary: also delete ``index.csv``, the summary and ``run.json``.
    """
    if summary:
        for name in ("index.csv", "summary.csv", "summary.json", "run.json"):
            (out / name).unlink(missing_ok=True)
    if shards is not None:
        for shard, pngs in shards:
            for path in (shard, *pngs):
                if path is not None:
                    path.unlink(missing_ok=True)
        return
    for path in out.glob("relevance-*.npz"):
        path.unlink()
    if (out / "heatmaps").is_dir():
        shutil.rmtree(out / "heatmaps")


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_index(path: Path, rows: list[dict[str, Any]]) -> None:
    """``index.csv``: one row per explained input."""
    fields = ("index", "source", "shard", "target", "score", "relevance_sum", "heatmap")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([_cell(row[k]) for k in fields])


def write_summary(out: Path, rows: list[dict[str, Any]], settings: dict) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.json`` (with the settings and counts per status)."""
    csv_path, json_path = out / "summary.csv", out / "summary.json"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_FIELDS)
        for row in rows:
            writer.writerow([_cell(row.get(k)) for k in SUMMARY_FIELDS])
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1

    def plain(value: Any) -> Any:
        return None if isinstance(value, float) and np.isnan(value) else value

    document = {
        "settings": settings,
        "counts": counts,
        "files": [{k: plain(row.get(k)) for k in SUMMARY_FIELDS} for row in rows],
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return csv_path, json_path
