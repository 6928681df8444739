"""ImageNet-1k class names and the EfficientNet-Lite input preprocessing.

The class names ship with jlrp (``jlrp/models/data/imagenet_classes.txt``, generated from
torchvision's ImageNet category list, BSD 3-Clause licence). Preprocessing needs Pillow
(``pip install pillow``, the ``image`` extra).
"""

from __future__ import annotations

import functools
import os
from importlib import resources
from typing import Any

import numpy as np

from jlrp.errors import InputError, UsageError

__all__ = ["imagenet_classes", "efficientnet_lite0_preprocess"]


@functools.cache
def _classes() -> tuple[str, ...]:
    text = resources.files("jlrp.models").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line and not line.startswith("#"))


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k (ILSVRC 2012) class names, in the order of the models' logits.

    Returns:
        A new list of 1000 names; ``imagenet_classes()[285] == 'Egyptian cat'``.
    """
    return list(_classes())


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("image preprocessing needs Pillow: pip install pillow (or jlrp[image])") from None
    return Image


def _to_pil(image: Any, Image: Any) -> Any:
    if isinstance(image, str | os.PathLike):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except FileNotFoundError:
            raise InputError(f"{os.fspath(image)}: no such image file") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"{os.fspath(image)}: not a readable image ({e})") from None
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise InputError(
            f"expected a PIL image or a uint8 array of shape (H, W, 3), got dtype {array.dtype}; "
            f"for floats in [0, 1] pass (x * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InputError(
            f"expected an image array of shape (H, W, 3) (or (H, W) grey, (H, W, 4) RGBA), got {array.shape}"
        )
    return Image.fromarray(array)


def efficientnet_lite0_preprocess(image: Any, *, resize: int = 256, crop: int = 224) -> np.ndarray:
    """Turn a photo into EfficientNet-Lite0 input: resize, centre crop, Lite scaling.

    The shorter side is resized to ``resize`` pixels (bicubic, aspect ratio kept, the longer side
    ``int(long * resize / short)`` as in torchvision's ``Resize``), then the central
    ``crop x crop`` window is cut (top-left corner ``round((H - crop) / 2)``, as torchvision's
    ``CenterCrop``), then RGB values ``x`` in [0, 1] are mapped to ``(255 * x - 127) / 128``,
    i.e. ``(v - 127) / 128`` for 8-bit values ``v`` (the Lite models' input range, about [-1, 1]).

    Grayscale, palette and RGBA images are converted to RGB (alpha is dropped, not composited).
    An image smaller than the crop is upscaled like any other (its shorter side becomes
    ``resize``), so every image gives a full crop.

    Args:
        image: a PIL image (any mode), a ``uint8`` array of shape ``(H, W, 3)`` (also ``(H, W)``,
            ``(H, W, 1)`` grey or ``(H, W, 4)`` RGBA), or the path of an image file.
        resize: length of the shorter side after resizing, pixels.
        crop: side of the square centre crop, pixels (``crop <= resize``).

    Returns:
        ``(crop, crop, 3)`` float32 array, ``HWC`` (add the batch axis for the model).

    Raises:
        InputError: one line for an unusable image: not uint8, a wrong shape, an empty image, or
            (for a path) a missing or unreadable file (naming the file).
        UsageError: ``crop > resize`` or sizes below 1, or Pillow is not installed.
    """
    if not (isinstance(resize, int) and isinstance(crop, int) and 1 <= crop <= resize):
        raise UsageError(f"need integers 1 <= crop <= resize, got crop={crop!r}, resize={resize!r}")
    Image = _pil()
    pil = _to_pil(image, Image)
    width, height = pil.size
    if width == 0 or height == 0:
        raise InputError(f"the image is empty ({width}x{height} pixels)")
    if pil.mode != "RGB":
        pil = pil.convert("RGB")
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(long * resize / short)
    size = (resize, new_long) if width <= height else (new_long, resize)
    pil = pil.resize(size, Image.Resampling.BICUBIC)
    top = int(round((size[1] - crop) / 2.0))
    left = int(round((size[0] - crop) / 2.0))
    pixels = np.asarray(pil.crop((left, top, left + crop, top + crop)), dtype=np.float32)
    return (pixels - 127.0) / 128.0
