"""Regenerate docs/concepts.png: CRP conditional heatmaps of the top concepts of one EfficientNet-Lite0 layer.

The ImageNet-pretrained EfficientNet-Lite0 (:func:`jlrp.models.load_efficientnet_lite0`, offline)
classifies one of scikit-image's bundled photos; composite EpsilonPlusFlat explains the predicted class.
The channels of ``--layer`` are ranked by their relevance for that prediction
(``ChannelConcept().top_k`` on the captured relevance, ``abs_norm``: shares of the layer's total
``|R|``), and the conditional heatmap of each of the top ``--top`` channels is computed in one call
(``concepts.attribute(..., conditions={layer: masks})``). The figure shows the photo, the plain
heatmap and the conditional heatmaps (zennit's ``coldnhot``, each symmetric around 0 on its own
scale), with each channel's share. With ``--references DIR`` (the output folder of ``jlrp concepts``
for the same layer and channels) the row under them shows each channel's most relevant reference
sample over that folder of photos, cropped to its receptive field (the box of its unit's conditional
heatmap); without, the row stays empty.

    python docs/make_concepts_figure.py                       # docs/concepts.png (about 1 min on 2 cores)
    python docs/make_concepts_figure.py --photo chelsea --layer blocks_14 --top 8 --out /tmp/c.png

docs/concepts.png was made with the reference samples of ten scikit-image photos (the PNGs of
``skimage.data``'s astronaut, cat, chelsea, coffee, colorwheel, hubble_deep_field,
immunohistochemistry, logo, retina and rocket in one folder)::

    jlrp concepts --model efficientnet_lite0 --inputs PHOTOS --layers blocks_10 \
        --channels 102,70,96,48,103,11 --top-k 3 --by relevance --out refs
    python docs/make_concepts_figure.py --references refs
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CELL = 160
GAP = 6
CMAP = "coldnhot"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python docs/make_concepts_figure.py",
        description="CRP conditional heatmaps of the top channels of one EfficientNet-Lite0 layer for a photo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--photo", default="coffee", help="a scikit-image photo (jlrp.demos.photos.load_photo)"
    )
    parser.add_argument("--layer", default="blocks_10", help="the layer whose channels are the concepts")
    parser.add_argument("--top", type=int, default=6, help="how many top channels")
    parser.add_argument("--out", default=str(ROOT / "docs" / "concepts.png"), help="the PNG to write")
    parser.add_argument(
        "--references", default=None, help="a `jlrp concepts` output folder for the same layer and channels"
    )
    return parser.parse_args(argv)


def compute(photo: str, layer: str, top: int) -> dict:
    """The prediction, the plain heatmap and the conditional heatmaps of the top channels."""
    import jax
    import jax.numpy as jnp

    import jlrp
    from jlrp import composites, concepts, models
    from jlrp.demos.photos import load_photo
    from jlrp.image import resize_crop

    model, variables = models.load_efficientnet_lite0()
    image = load_photo(photo)
    x = jnp.asarray(models.efficientnet_lite0_preprocess(image)[None])
    explained = jlrp.explain(model, composites.EpsilonPlusFlat())
    logits = jax.jit(model.apply)(variables, x)
    target = int(jnp.argmax(logits[0]))
    probability = float(jax.nn.softmax(logits[0])[target])

    res = concepts.attribute(explained, variables, x, target=target, capture=[layer])
    cc = concepts.ChannelConcept()
    shares, ids = cc.top_k(res.relevances[layer], top, abs_norm=True)  # (1, top) each
    cond = concepts.attribute(
        explained, variables, x, target=target, conditions={layer: cc.masks(ids[0], res.relevances[layer])}
    )
    return {
        "photo_name": photo,
        "photo": np.asarray(resize_crop(image, 256, 224)[0]),
        "class": models.imagenet_classes()[target],
        "probability": probability,
        "plain": np.asarray(res.heatmap[0]).sum(-1),
        "ids": np.asarray(ids[0]),
        "shares": np.asarray(shares[0]),
        "conditional": np.asarray(cond.heatmap[:, 0]).sum(-1),  # (top, H, W)
        "layer": layer,
        "channels": cc.size(res.relevances[layer]),
    }


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _reference_crops(folder: str, layer: str, channels, exclude: str) -> dict:
    """``{channel: (crop, file name)}``: each channel's most relevant reference in a ``jlrp concepts``
    output folder other than the explained photo ``exclude``, cut from the photo as the model saw it
    (ImageNet resize 256 + centre crop 224) to the reference's receptive-field box."""
    import csv

    from PIL import Image

    from jlrp.concepts import ReferenceSamples
    from jlrp.image import resize_crop

    folder = Path(folder)
    samples = ReferenceSamples.load(folder / "references.npz")
    refs = samples.layers[layer]
    with open(folder / "files.csv", newline="") as handle:
        files = {int(row["id"]): row["file"] for row in csv.DictReader(handle)}
    inputs = Path(__import__("json").loads((folder / "run.json").read_text())["inputs"])
    crops = {}
    for row, channel in enumerate(refs.channels):
        if int(channel) not in {int(c) for c in channels}:
            continue
        slots = [j for j, i in enumerate(refs.rel_ids[row]) if i >= 0 and Path(files[int(i)]).stem != exclude]
        if not slots:
            continue
        name = files[int(refs.rel_ids[row, slots[0]])]
        picture, _ = resize_crop(Image.open(inputs / name).convert("RGB"), 256, 224)
        y0, x0, y1, x1 = (int(v) for v in refs.rel_boxes[row, slots[0]])
        crops[int(channel)] = (picture.crop((x0, y0, x1, y1)), Path(name).stem)
    return crops


def draw(result: dict, path: Path, references: str | None = None) -> None:
    """Photo | plain heatmap | conditional heatmaps; a reserved row for reference samples below them."""
    from PIL import Image, ImageDraw

    from jlrp.image import imgify

    top = len(result["ids"])
    columns = 2 + top
    header, caption = 40, 20
    width = columns * CELL + (columns + 1) * GAP
    height = header + 2 * (CELL + caption + GAP) + GAP + caption
    canvas = Image.new("RGB", (width, height), "white")
    pen = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    title = (
        f"EfficientNet-Lite0: {result['class']} ({result['probability']:.0%}); EpsilonPlusFlat; "
        f"top {top} of {result['channels']} channels of {result['layer']} by relevance share"
    )
    pen.text((GAP, 4), title, fill="black", font=font)
    left = [GAP + c * (CELL + GAP) for c in range(columns)]
    row = header
    cells = [Image.fromarray(result["photo"]), imgify(result["plain"], symmetric=True, cmap=CMAP)]
    cells += [imgify(h, symmetric=True, cmap=CMAP) for h in result["conditional"]]
    labels = ["photo", "heatmap"] + [f"ch {c}: {s:+.0%}" for c, s in zip(result["ids"], result["shares"])]
    for x0, cell, label in zip(left, cells, labels):
        canvas.paste(cell.convert("RGB").resize((CELL, CELL), Image.Resampling.BILINEAR), (x0, row))
        pen.text((x0 + 2, row + CELL + 3), label, fill="black", font=small)
    row += CELL + caption + GAP
    crops = (
        _reference_crops(references, result["layer"], result["ids"], result["photo_name"])
        if references
        else {}
    )
    pen.text((left[0] + 2, row + CELL // 2 - 8), "reference samples", fill="gray", font=small)
    pen.text((left[0] + 2, row + CELL // 2 + 8), "(best other photo by", fill="gray", font=small)
    pen.text((left[0] + 2, row + CELL // 2 + 24), "relevance, unit's box)", fill="gray", font=small)
    for x0, channel in zip(left[2:], result["ids"]):
        found = crops.get(int(channel))
        if found is None:
            pen.rectangle((x0, row, x0 + CELL - 1, row + CELL - 1), outline="lightgray")
            continue
        crop, name = found
        canvas.paste(crop.convert("RGB").resize((CELL, CELL), Image.Resampling.BILINEAR), (x0, row))
        pen.text((x0 + 2, row + CELL + 3), name, fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = compute(args.photo, args.layer, args.top)
    draw(result, Path(args.out), args.references)
    shares = ", ".join(f"{c} ({s:+.1%})" for c, s in zip(result["ids"], result["shares"]))
    print(
        f"{args.photo}: {result['class']} ({result['probability']:.1%}); top channels of {args.layer}: {shares}"
    )
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
