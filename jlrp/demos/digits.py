"""``jlrp demo digits``: train a small CNN on scikit-learn's handwritten digits, explain it, and evaluate the explanations.

Everything runs offline on the CPU in about a minute, and is seeded (the same command gives the same
numbers):

1. load ``sklearn.datasets.load_digits`` (1797 greyscale 8x8 images, bundled with scikit-learn), scale
   them to [0, 1] and split off a seeded held-out set;
2. train :class:`DigitsCNN` (Flax linen) with optax's Adam;
3. explain ``n_explain`` held-out images for the predicted class with LRP composites
   (EpsilonPlusFlat, EpsilonGammaBox, EpsilonAlpha2Beta1), gradient methods (Gradient, SmoothGrad,
   IntegratedGradients) and a seeded random attribution;
4. evaluate them with pixel flipping (:func:`jlrp.metrics.pixel_flipping`, baseline 0 = background ink
   removed): MoRF AUC (lower is better), LeRF AUC (higher is better), AOPC of the MoRF curve (higher is
   better), and the conservation error of :func:`jlrp.metrics.conservation` (mean relative
   :math:`|\\sum_i R_i - f_c(x)| / |f_c(x)|`);
5. write ``heatmaps.png`` (inputs, then one row per method), ``metrics.csv``, ``curves.csv`` (the mean
   MoRF and LeRF curves), and the trained model (``model.msgpack``) with the explained images
   (``inputs.npy``), ready for ``jlrp explain --model jlrp.demos.digits:DigitsCNN``.

The gradient methods use the textbook cotangent (a one-hot of the explained class, so Gradient is
:math:`\\partial f_c / \\partial x`); the LRP composites start from :math:`f_c(x)` (DESIGN.md section 1).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import linen as nn

from jlrp._files import atomic_path

__all__ = ["DigitsCNN", "DemoResult", "MethodScores", "load_data", "train", "run_demo", "format_table"]

IMAGE_SCALE = 4  # heatmap cells are drawn 4x larger than the 8x8 inputs


class DigitsCNN(nn.Module):
    """A small CNN for 8x8x1 digit images: two 3x3 convolutions, a max-pool and two dense layers.

    Attributes:
        num_classes: number of output logits.
    """

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(self.num_classes)(x)


@dataclasses.dataclass(frozen=True)
class MethodScores:
    """The demo's numbers for one attribution method (means over the explained images).

    Attributes:
        method: the method's name.
        morf_auc: mean area under the normalised MoRF curve (lower is better).
        lerf_auc: mean area under the normalised LeRF curve (higher is better).
        aopc: mean area over the MoRF perturbation curve (higher is better).
        conservation_error: mean relative conservation error, ``None`` for the random baseline.
        morf_curve: mean normalised MoRF curve.
        lerf_curve: mean normalised LeRF curve.
    """

    method: str
    morf_auc: float
    lerf_auc: float
    aopc: float
    conservation_error: float | None
    morf_curve: tuple[float, ...]
    lerf_curve: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What :func:`run_demo` produced.

    Attributes:
        scores: one :class:`MethodScores` per method, in table order.
        accuracy: held-out accuracy of the trained model.
        out: the output folder.
        files: the files written.
        seconds: wall time of the run.
    """

    scores: tuple[MethodScores, ...]
    accuracy: float
    out: Path
    files: tuple[Path, ...]
    seconds: float


def load_data(seed: int = 0, n_test: int = 360) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 NHWC images in [0, 1], split by a seeded permutation.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images ``(N, 8, 8, 1)`` float32, labels int32.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - exercised by users without the extra
        raise ImportError('the demo needs scikit-learn: pip install "jlrp[demo]"') from err
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train_idx = perm[:n_test], perm[n_test:]
    return x[train_idx], y[train_idx], x[test], y[test]


def train(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
    progress: bool = True,
) -> tuple[Any, Any]:
    """Train :class:`DigitsCNN` with Adam and softmax cross-entropy.

    Returns:
        ``(model, variables)``.
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    model = _model()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + x.shape[1:], jnp.float32))
    optimizer, step = _train_step(learning_rate)
    opt_state = optimizer.init(variables)

    rng = np.random.default_rng(seed)
    n_batches = len(x) // batch_size  # drop the ragged last batch: one compiled shape
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress, leave=False)
    for _ in bar:
        perm = rng.permutation(len(x))
        losses = []
        for b in range(n_batches):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            variables, opt_state, loss = step(variables, opt_state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
            losses.append(loss)
        bar.set_postfix(loss=f"{float(np.mean(jax.device_get(losses))):.3f}")
    return model, variables


# The model, the training step, the attributors and the one-hot targets are memoised, so a second demo
# run in the same process (a notebook, the tests) reuses their compilations. They hold no run state.


@functools.lru_cache(maxsize=1)
def _model() -> DigitsCNN:
    return DigitsCNN()


@functools.lru_cache(maxsize=4)
def _train_step(learning_rate: float) -> tuple[Any, Callable[..., Any]]:
    """Adam and the jit-compiled training step ``(variables, opt_state, x, y) -> (variables, opt_state, loss)``."""
    import jax
    import optax

    model = _model()
    optimizer = optax.adam(learning_rate)

    @jax.jit
    def step(variables, opt_state, xb, yb):
        def loss_fn(v):
            logits = model.apply(v, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = optimizer.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    return optimizer, step


@functools.lru_cache(maxsize=1)
def _methods() -> tuple[tuple[str, Any, str], ...]:
    """``(name, attributor or None for random, kind)``; kind 'lrp' (start f_c) or 'grad' (one-hot start)."""
    import jlrp
    from jlrp import composites
    from jlrp.attribution import Gradient, IntegratedGradients, SmoothGrad

    lrp = [
        ("EpsilonPlusFlat", composites.EpsilonPlusFlat()),
        ("EpsilonGammaBox", composites.EpsilonGammaBox(low=0.0, high=1.0)),
        ("EpsilonAlpha2Beta1", composites.EpsilonAlpha2Beta1()),
    ]
    model = _model()
    methods: list[tuple[str, Any, str]] = [(name, Gradient(jlrp.explain(model, c)), "lrp") for name, c in lrp]
    methods += [
        ("Gradient", Gradient(model), "grad"),
        ("SmoothGrad", SmoothGrad(model, noise_level=0.1, n_iter=16), "grad"),
        ("IntegratedGradients", IntegratedGradients(model, n_iter=16), "grad"),
        ("Random", None, "random"),
    ]
    return tuple(methods)


def _pick_shown(classes: np.ndarray, n_show: int) -> np.ndarray:
    """Indices of up to ``n_show`` images for the grid: one per predicted class first, then the rest in order."""
    _, first = np.unique(classes, return_index=True)
    first = np.sort(first)
    rest = np.setdiff1d(np.arange(len(classes)), first)
    return np.concatenate([first, rest])[:n_show]


def _heatmap_grid(inputs: np.ndarray, maps: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Rows: the inputs (grey), then each method's heatmap (bwr, symmetric per image), labelled."""
    from PIL import Image, ImageDraw, ImageFont

    from jlrp.image import imgify

    def row(batch: np.ndarray, cmap: str, symmetric: bool) -> np.ndarray:
        image = imgify(batch, cmap=cmap, symmetric=symmetric, grid=(1, len(batch))).convert("RGB")
        array = np.asarray(image)
        return array.repeat(IMAGE_SCALE, axis=0).repeat(IMAGE_SCALE, axis=1)

    rows = [("input", row(inputs[..., 0], "gray", False))]
    rows += [(name, row(h, "bwr", True)) for name, h in maps]
    label_width, gap = 150, 4
    height = sum(r.shape[0] for _, r in rows) + gap * (len(rows) + 1)
    width = label_width + rows[0][1].shape[1] + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    top = gap
    for name, array in rows:
        canvas.paste(Image.fromarray(array), (label_width, top))
        draw.text((4, top + array.shape[0] // 2 - 6), name, fill="black", font=font)
        top += array.shape[0] + gap
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


def format_table(scores: tuple[MethodScores, ...] | list[MethodScores]) -> str:
    """The metrics as a small aligned text table."""
    header = ("method", "MoRF AUC", "LeRF AUC", "AOPC", "conservation err")
    body = [
        (
            s.method,
            f"{s.morf_auc:.4f}",
            f"{s.lerf_auc:.4f}",
            f"{s.aopc:.4f}",
            "-" if s.conservation_error is None else f"{s.conservation_error:.2e}",
        )
        for s in scores
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, body)])


def run_demo(
    out: str | os.PathLike = "jlrp-demo",
    *,
    seed: int = 0,
    epochs: int = 10,
    n_explain: int = 64,
    n_show: int = 8,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Train, explain, evaluate and write the demo's files (see the module documentation).

    Args:
        out: output folder (created).
        seed: seeds the data split, the initialisation, the batches, SmoothGrad's noise and the random
            baseline.
        epochs: training epochs.
        n_explain: held-out images explained and evaluated.
        n_show: images shown in ``heatmaps.png`` (one per predicted class first).
        progress: show tqdm progress bars (on stderr).
        log: where the progress messages and the table go.

    Returns:
        A :class:`DemoResult`.
    """
    import jax
    import jax.numpy as jnp
    from flax import serialization
    from tqdm.auto import tqdm

    from jlrp import metrics, targets
    from jlrp.errors import UsageError

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_data(seed)
    if not 1 <= n_explain <= len(x_test):
        raise UsageError(f"--n-explain must lie in 1..{len(x_test)}, got {n_explain}")
    model, variables = train(x_train, y_train, seed=seed, epochs=epochs, progress=progress)
    logits = jax.jit(model.apply)(variables, jnp.asarray(x_test))
    accuracy = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == y_test))
    log(f"digits CNN: {len(x_train)} training images, {epochs} epochs, held-out accuracy {accuracy:.3f}")

    x = jnp.asarray(x_test[:n_explain])
    output = model.apply(variables, x)
    pred = jnp.argmax(output, axis=-1).astype(jnp.int32)
    fn = model.apply
    n_pixels = int(np.prod(x.shape[1:3]))
    show = _pick_shown(np.asarray(pred), n_show)
    scores: list[MethodScores] = []
    maps: list[tuple[str, np.ndarray]] = []
    methods = _methods()
    for name, attributor, kind in tqdm(
        methods, desc="explaining", unit="method", disable=not progress, leave=False
    ):
        if kind == "random":
            relevance = metrics.random_attribution(x, seed)
        elif kind == "lrp":
            _, relevance = attributor(variables, x, target=pred)
        else:
            kwargs = {"rng": seed} if name == "SmoothGrad" else {}
            target = targets.one_hot(pred)
            _, relevance = attributor(variables, x, target=target, **kwargs)
        common = dict(params=variables, baseline=0.0)
        morf = metrics.pixel_flipping(fn, x, relevance, pred, order="morf", **common)
        lerf = metrics.pixel_flipping(fn, x, relevance, pred, order="lerf", **common)
        cons = None if kind == "random" else metrics.conservation(relevance, output, pred)
        scores.append(
            MethodScores(
                method=name,
                morf_auc=float(jnp.nanmean(morf.auc)),
                lerf_auc=float(jnp.nanmean(lerf.auc)),
                aopc=float(jnp.nanmean(morf.aopc)),
                conservation_error=None if cons is None else float(jnp.mean(cons.relative_error)),
                morf_curve=tuple(float(v) for v in jnp.nanmean(morf.curve, axis=0)),
                lerf_curve=tuple(float(v) for v in jnp.nanmean(lerf.curve, axis=0)),
            )
        )
        maps.append((name, np.asarray(relevance)[show, ..., 0]))

    files = []
    grid_path = out / "heatmaps.png"
    _heatmap_grid(np.asarray(x)[show], maps, grid_path)
    files.append(grid_path)
    csv_path = out / "metrics.csv"
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "morf_auc", "lerf_auc", "aopc", "conservation_error"])
        for s in scores:
            cons_cell = "" if s.conservation_error is None else f"{s.conservation_error:.6g}"
            writer.writerow([s.method, f"{s.morf_auc:.6f}", f"{s.lerf_auc:.6f}", f"{s.aopc:.6f}", cons_cell])
    files.append(csv_path)
    curves_path = out / "curves.csv"
    with atomic_path(curves_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        fractions = np.asarray(metrics.step_counts(n_pixels, n_pixels)) / n_pixels
        writer.writerow(["method", "order", *(f"{v:.4f}" for v in fractions)])
        for s in scores:
            writer.writerow([s.method, "morf", *(f"{v:.6f}" for v in s.morf_curve)])
            writer.writerow([s.method, "lerf", *(f"{v:.6f}" for v in s.lerf_curve)])
    files.append(curves_path)
    model_path = out / "model.msgpack"
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(serialization.to_bytes(jax.device_get(variables)))
    inputs_path = out / "inputs.npy"
    with atomic_path(inputs_path) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(x))
    files += [model_path, inputs_path]

    log("")
    log(
        f"pixel flipping on {n_explain} held-out images ({n_pixels} pixels, baseline 0, score: logit of the predicted class)"
    )
    log(
        "MoRF AUC: lower is better; LeRF AUC and AOPC: higher is better; conservation err: |sum R - f_c(x)| / |f_c(x)|"
    )
    log(format_table(scores))
    seconds = time.perf_counter() - started
    log("")
    log(f"wrote {', '.join(str(p) for p in files)} in {seconds:.1f} s")
    log(
        f"explain the same images from the command line: jlrp explain --model jlrp.demos.digits:DigitsCNN "
        f"--variables {model_path} --inputs {inputs_path} --composite epsilon_gamma_box "
        f"--composite-arg low=0 --composite-arg high=1 --out {out / 'explain'}"
    )
    return DemoResult(tuple(scores), accuracy, out, tuple(files), seconds)
