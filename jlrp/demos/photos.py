"""``jlrp demo``: a pretrained EfficientNet-Lite0 explains real photos, and the explanations are scored.

Everything runs offline on the CPU (about 1.5 minutes on two cores after install) and is seeded:

1. the photos bundled with scikit-image (:data:`PHOTOS`: a cat, a cup of coffee, a rocket;
   ``'astronaut'``, ``'motorcycle'`` and ``'hubble_deep_field'`` on request) are preprocessed as the model expects (:func:`jlrp.models.efficientnet_lite0_preprocess`:
   shorter side 256, centre crop 224, Lite scaling ``(255 x - 127) / 128``);
2. the model predicts a class (softmax probability) for each;
3. the predicted class is explained with the LRP composites EpsilonGammaBox (box = the input range),
   EpsilonPlusFlat and EpsilonAlpha2Beta1 (relevance starts from the logit :math:`f_c(x)`), with
   Gradient, SmoothGrad and IntegratedGradients (the textbook one-hot start, so Gradient is
   :math:`\\partial f_c / \\partial x`), and with a seeded random attribution as the baseline;
4. each method is scored by region perturbation (:func:`jlrp.metrics.region_perturbation`; Samek et
   al. 2017): ``patch`` x ``patch`` regions, ranked by summed relevance, are replaced by the baseline 0
   (mid-grey in the Lite scaling) in ``n_steps`` steps, most relevant first (MoRF AUC: lower is better,
   AOPC: higher is better) or least relevant first (LeRF AUC: higher is better), on the logit of the
   predicted class, normalised by the curve's ends; means over the photos;
5. written to ``out``: ``figure.png`` (each photo with its predicted class and probability, then its
   heatmaps, zennit's ``coldnhot`` colour map, symmetric per map), ``perturbation.md`` and
   ``perturbation.csv`` (the table), ``relevance.npz`` (every method's relevance ``(P, 224, 224, 3)``, the
   inputs, logits, predicted classes and names).

:func:`run_photo_demo` takes any :class:`PhotoModel`, so tests run it on a tiny stand-in.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jlrp._files import atomic_path
from jlrp.errors import UsageError
from jlrp.image import resize_crop

__all__ = [
    "PHOTOS",
    "PhotoModel",
    "PhotoScores",
    "PhotoDemoResult",
    "load_photo",
    "efficientnet_lite0",
    "run_photo_demo",
]

#: scikit-image's bundled photos used by default (no download)
PHOTOS = ("chelsea", "coffee", "rocket")  # three: the demo stays under 2 minutes on 2 CPU cores
CMAP = "coldnhot"
CELL = 224


@dataclasses.dataclass(frozen=True)
class PhotoModel:
    """A classifier for the demo.

    Attributes:
        name: shown in the log.
        model: a linen module, ``model.apply(variables, x) -> (N, n_classes)`` logits for NHWC ``x``.
        variables: its variables.
        preprocess: ``PIL RGB image -> (H, W, 3) float32`` model input.
        classes: one name per class.
        input_range: ``(low, high)`` of the preprocessed inputs (EpsilonGammaBox's box).
    """

    name: str
    model: Any
    variables: Any
    preprocess: Callable[[Any], np.ndarray]
    classes: Sequence[str]
    input_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class PhotoScores:
    """Region-perturbation scores of one method (means over the photos).

    Attributes:
        method: the method's name.
        morf_auc: area under the normalised MoRF curve (lower is better).
        lerf_auc: area under the normalised LeRF curve (higher is better).
        aopc: area over the MoRF perturbation curve (higher is better).
    """

    method: str
    morf_auc: float
    lerf_auc: float
    aopc: float


@dataclasses.dataclass(frozen=True)
class PhotoDemoResult:
    """What :func:`run_photo_demo` produced.

    Attributes:
        photos: the photo names.
        predicted: predicted class per photo.
        class_names: its name per photo.
        probability: its softmax probability per photo.
        scores: one :class:`PhotoScores` per method (the random baseline last).
        files: the files written.
        seconds: wall time of the run.
    """

    photos: tuple[str, ...]
    predicted: tuple[int, ...]
    class_names: tuple[str, ...]
    probability: tuple[float, ...]
    scores: tuple[PhotoScores, ...]
    files: tuple[Path, ...]
    seconds: float


def load_photo(name: str) -> Any:
    """One of scikit-image's bundled photos as a Pillow RGB image (``'motorcycle'``: the stereo pair's left).

    Raises:
        UsageError: an unknown name, or scikit-image is not installed.
    """
    from PIL import Image

    try:
        from skimage import data
    except ImportError as err:
        raise UsageError('the demo needs scikit-image: pip install "jlrp[demo]"') from err
    if name == "motorcycle":
        array = data.stereo_motorcycle()[0]
    elif name in (
        "chelsea",
        "coffee",
        "astronaut",
        "rocket",
        "cat",
        "immunohistochemistry",
        "hubble_deep_field",
    ):
        array = getattr(data, name)()
    else:
        raise UsageError(f"unknown photo {name!r}; choose from {', '.join(PHOTOS)}, hubble_deep_field")
    return Image.fromarray(np.asarray(array, np.uint8)).convert("RGB")


def efficientnet_lite0() -> PhotoModel:
    """The ImageNet-pretrained EfficientNet-Lite0 of :mod:`jlrp.models` with its preprocessing and classes."""
    from jlrp import models

    model, variables = models.load_efficientnet_lite0("linen")
    return PhotoModel(
        name="EfficientNet-Lite0 (ImageNet)",
        model=model,
        variables=variables,
        preprocess=models.efficientnet_lite0_preprocess,
        classes=models.imagenet_classes(),
        input_range=(-127.0 / 128.0, 1.0),
    )


def _methods(bundle: PhotoModel, n_iter: int) -> list[tuple[str, Any, str]]:
    """``(name, attributor or None, kind)``: 'lrp' starts from f_c, 'grad' from a one-hot, 'random'."""
    import jlrp
    from jlrp import composites
    from jlrp.attribution import Gradient, IntegratedGradients, SmoothGrad

    low, high = bundle.input_range
    model = bundle.model
    lrp = [
        ("EpsilonGammaBox", composites.EpsilonGammaBox(low=low, high=high)),
        ("EpsilonPlusFlat", composites.EpsilonPlusFlat()),
        ("EpsilonAlpha2Beta1", composites.EpsilonAlpha2Beta1()),
    ]
    methods = [(name, Gradient(jlrp.explain(model, c)), "lrp") for name, c in lrp]
    methods += [
        ("Gradient", Gradient(model), "grad"),
        ("SmoothGrad", SmoothGrad(model, noise_level=0.1, n_iter=n_iter), "grad"),
        ("IntegratedGradients", IntegratedGradients(model, n_iter=n_iter), "grad"),
        ("Random", None, "random"),
    ]
    return methods


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _figure(
    photos: list[np.ndarray], labels: list[str], maps: list[tuple[str, np.ndarray]], path: Path
) -> None:
    """One row per photo: the photo with its label, then each method's heatmap (coldnhot, symmetric)."""
    from PIL import Image, ImageDraw

    from jlrp.image import imgify

    gap, header, caption = 6, 24, 22
    columns = 1 + len(maps)
    width = columns * CELL + (columns + 1) * gap
    height = header + len(photos) * (CELL + caption + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    titles = ["photo", *[name for name, _ in maps]]
    for c, title in enumerate(titles):
        draw.text((gap + c * (CELL + gap) + 4, 4), title, fill="black", font=font)
    for r, (photo, label) in enumerate(zip(photos, labels)):
        top = header + r * (CELL + caption + gap)
        cells = [Image.fromarray(photo).resize((CELL, CELL))]
        for _, heat in maps:
            image = imgify(heat[r], symmetric=True, cmap=CMAP).convert("RGB")
            cells.append(image.resize((CELL, CELL), Image.Resampling.NEAREST))
        for c, cell in enumerate(cells):
            canvas.paste(cell, (gap + c * (CELL + gap), top))
        draw.text((gap + 2, top + CELL + 3), label, fill="black", font=font)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def format_table(scores: Sequence[PhotoScores], markdown: bool = False) -> str:
    """The perturbation table, aligned text (``markdown=False``) or a Markdown table."""
    header = ("method", "MoRF AUC (lower better)", "LeRF AUC (higher better)", "AOPC (higher better)")
    body = [(s.method, f"{s.morf_auc:.4f}", f"{s.lerf_auc:.4f}", f"{s.aopc:.4f}") for s in scores]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, body)])


def run_photo_demo(
    out: str | os.PathLike = "jlrp-demo",
    *,
    photos: Sequence[str] = PHOTOS,
    model: PhotoModel | Callable[[], PhotoModel] = efficientnet_lite0,
    seed: int = 0,
    patch: int = 16,
    n_steps: int = 8,
    n_iter: int = 6,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> PhotoDemoResult:
    """Explain the photos, score the explanations and write the demo's files (see the module documentation).

    Args:
        out: output folder (created).
        photos: names for :func:`load_photo`.
        model: a :class:`PhotoModel`, or a function that loads one (default: EfficientNet-Lite0).
        seed: seeds SmoothGrad's noise and the random baseline.
        patch: side of the perturbed regions in pixels.
        n_steps: perturbation steps (each evaluates the model on every photo once per order).
        n_iter: SmoothGrad's and IntegratedGradients' iterations.
        progress: show tqdm progress bars (on stderr).
        log: where the messages and the table go.

    Returns:
        A :class:`PhotoDemoResult`.

    Raises:
        UsageError: an unknown photo, ``patch`` or ``n_steps`` below 1.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from jlrp import metrics, targets

    started = time.perf_counter()
    if patch < 1 or n_steps < 1 or n_iter < 1:
        raise UsageError(f"patch, n_steps and n_iter must be >= 1, got {patch}, {n_steps}, {n_iter}")
    if not photos:
        raise UsageError("give at least one photo")
    images = [load_photo(name) for name in photos]  # unknown names fail before the model loads
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = model() if callable(model) else model
    x = jnp.asarray(np.stack([np.asarray(bundle.preprocess(image), np.float32) for image in images]))
    size = x.shape[1]
    shown = [np.asarray(resize_crop(image, round(size * 256 / 224), size)[0]) for image in images]
    logits = jax.jit(bundle.model.apply)(bundle.variables, x)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    pred = np.asarray(jnp.argmax(logits, axis=-1)).astype(np.int32)
    names = [bundle.classes[int(c)] for c in pred]
    labels = [
        f"{photo}: {name} (p = {probs[i, c]:.2f})"
        for i, (photo, name, c) in enumerate(zip(photos, names, pred))
    ]
    log(f"{bundle.name} on {len(photos)} photos of scikit-image:")
    for label in labels:
        log(f"  {label}")

    fn = bundle.model.apply
    common = dict(params=bundle.variables, patch_size=patch, n_steps=n_steps, baseline=0.0)
    relevances: dict[str, np.ndarray] = {}
    scores: list[PhotoScores] = []
    maps: list[tuple[str, np.ndarray]] = []
    target_pred = jnp.asarray(pred)
    bar = tqdm(_methods(bundle, n_iter), desc="explaining + perturbing", unit="method", disable=not progress)
    for name, attributor, kind in bar:
        bar.set_postfix_str(name)
        if kind == "random":
            relevance = metrics.random_attribution(x, seed)
        elif kind == "lrp":
            _, relevance = attributor(bundle.variables, x, target=target_pred)
        else:
            kwargs = {"rng": seed} if name == "SmoothGrad" else {}
            _, relevance = attributor(bundle.variables, x, target=targets.one_hot(target_pred), **kwargs)
        morf = metrics.region_perturbation(fn, x, relevance, target_pred, order="morf", **common)
        # LeRF of R ranks the regions exactly as MoRF of -R (the same stable sort of the region sums),
        # so both orders run one compiled program: a ~10 s compilation less on a CPU
        lerf = metrics.region_perturbation(fn, x, -relevance, target_pred, order="morf", **common)
        scores.append(
            PhotoScores(
                method=name,
                morf_auc=float(jnp.nanmean(morf.auc)),
                lerf_auc=float(jnp.nanmean(lerf.auc)),
                aopc=float(jnp.nanmean(morf.aopc)),
            )
        )
        relevances[name] = np.asarray(relevance, np.float32)
        if kind != "random":
            maps.append((name, relevances[name].sum(axis=-1)))
    bar.close()

    figure = out / "figure.png"
    _figure(shown, labels, maps, figure)
    table_csv, table_md = out / "perturbation.csv", out / "perturbation.md"
    with atomic_path(table_csv) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "morf_auc", "lerf_auc", "aopc"])
        for s in scores:
            writer.writerow([s.method, f"{s.morf_auc:.6f}", f"{s.lerf_auc:.6f}", f"{s.aopc:.6f}"])
    setting = (
        f"Region perturbation on {len(photos)} photos ({', '.join(photos)}): {patch}x{patch} regions replaced by 0 "
        f"(mid-grey) in {n_steps} steps, logit of the predicted class, curves normalised by their ends; "
        f"means over the photos. Random = seeded uniform relevance (seed {seed})."
    )
    with atomic_path(table_md) as tmp:
        tmp.write_text(f"{setting}\n\n{format_table(scores, markdown=True)}\n")
    arrays_path = out / "relevance.npz"
    with atomic_path(arrays_path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            inputs=np.asarray(x),
            logits=np.asarray(logits),
            predicted=pred,
            class_names=np.asarray(names, dtype=str),
            photos=np.asarray(list(photos), dtype=str),
            **relevances,
        )
    files = (figure, table_md, table_csv, arrays_path)
    log("")
    log(setting)
    log(format_table(scores))
    seconds = time.perf_counter() - started
    log("")
    log(f"wrote {', '.join(str(p) for p in files)} in {seconds:.1f} s")
    return PhotoDemoResult(
        tuple(photos),
        tuple(int(c) for c in pred),
        tuple(names),
        tuple(float(probs[i, c]) for i, c in enumerate(pred)),
        tuple(scores),
        files,
        seconds,
    )
