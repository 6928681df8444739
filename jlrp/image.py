"""Turn relevance (or any array) into images: normalisation, colour maps, grids of a batch, PNG files.

The functions follow zennit's :py:mod:`zennit.image` (same names, arguments and pixels), with one addition:
jlrp users hold channel-last arrays (NHWC), so every function takes both layouts.

**Which axis holds the colour channels.** An image is an array of 2 axes ``(H, W)`` (greyscale) or 3 axes.
With 3 axes, and ``channels_last=None`` (the default), a *trailing* axis of size 1 or 3 is the channel axis
(``(H, W, 1)`` or ``(H, W, 3)``); otherwise a *leading* axis of size 1 or 3 is (``(1, H, W)`` or
``(3, H, W)``); otherwise the shape is rejected. The trailing axis wins when both qualify, so ``(3, 5, 3)``
is a 3-row RGB image. This is the rule zennit uses, too. Pass ``channels_last=True`` or ``False`` to fix the
layout instead. In a batch (``grid=True``, :py:func:`gridify`) the same rule applies to each sample, i.e.
to the axes after the first: ``(N, H, W, C)`` or ``(N, C, H, W)``; ``(N, H, W)`` is a greyscale batch.

One channel is shown through a colour map (a palette image, mode ``'P'``); three channels are RGB.
Arrays of dtype ``uint8`` are taken as pixel values as they are (unless ``vmin``, ``vmax`` or
``symmetric`` is given); everything else is normalised to [0, 1] (see :py:func:`imgify`), scaled to 0 .. 255
and truncated to ``uint8``.

Inputs may be numpy or jax arrays (or anything :py:func:`numpy.asarray` takes); the work is done in numpy.
Pillow is needed only for :py:func:`imgify` and :py:func:`imsave` (``pip install "jlrp[image]"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jlrp.cmap import CMAPS, ColorMap
from jlrp.errors import UsageError, UsageTypeError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

__all__ = [
    "CMAPS",
    "get_cmap",
    "gridify",
    "heatmaps",
    "imgify",
    "imsave",
    "interval_norm_bounds",
    "palette",
    "resize_crop",
]

_LAYOUT_HINT = (
    "Images are (H, W), (H, W, C) or (C, H, W) with C = 1 (greyscale) or 3 (RGB); a trailing axis of size "
    "1 or 3 is taken as the channels, else a leading one. Pass channels_last=True/False to choose."
)


def _pil_image() -> Any:
    """Import ``PIL.Image`` lazily, with an install hint if Pillow is missing."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            'jlrp.image needs Pillow to create and save images; install it with pip install "jlrp[image]" '
            "(or pip install pillow)."
        ) from err
    return Image


def get_cmap(cmap: str | ColorMap) -> ColorMap:
    """Look up a built-in colour map by name, compile colour-map source, or pass a :py:class:`ColorMap` on.

    Args:
        cmap: Name of a built-in map (a key of :py:data:`jlrp.cmap.CMAPS`, e.g. ``'bwr'``), colour-map source
            code (e.g. ``'00f,80:fff,f00'``), or a :py:class:`jlrp.cmap.ColorMap`.

    Returns:
        The colour map.

    Raises:
        ValueError: If ``cmap`` is a string that is neither a built-in name nor valid colour-map source.
        TypeError: If ``cmap`` is neither a string nor a ColorMap.
    """
    if isinstance(cmap, ColorMap):
        return cmap
    if not isinstance(cmap, str):
        raise UsageTypeError(
            f"cmap must be the name of a colour map, colour-map source or a ColorMap, got {type(cmap).__name__}."
        )
    if cmap in CMAPS:
        return CMAPS[cmap]
    try:
        return ColorMap(cmap)
    except ValueError as err:
        reason = str(err).splitlines()[0]
        raise UsageError(
            f"Unknown colour map {cmap!r}: it is not a built-in name (one of {', '.join(sorted(CMAPS))}) "
            f"and not valid colour-map source ({reason})."
        ) from err


def palette(cmap: str | ColorMap = "bwr", level: float = 1.0) -> np.ndarray:
    """Create the 8-bit palette of a colour map.

    Args:
        cmap: Name of a built-in map, colour-map source code, or a :py:class:`jlrp.cmap.ColorMap`.
        level: Contrast of the palette: 1.0 (default) uses the map as it is; below 1 uses a narrower range
            of the map around its centre (0: the centre colour only); above 1 reaches the ends of the map
            earlier, with a steeper transition around the centre.

    Returns:
        A ``uint8`` array of shape (256, 3).
    """
    return get_cmap(cmap).palette(level=level)


def interval_norm_bounds(
    input: Any, symmetric: bool = False, dim: int | Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return the bounds that normalise ``input`` to [0, 1], reduced over ``dim`` (kept as size-1 axes).

    Args:
        input: Array (numpy or jax).
        symmetric: If False (default), the bounds are the minimum and maximum, so the minimum maps to 0 and
            the maximum to 1. If True, they are minus and plus the largest absolute value, so 0 maps to 0.5.
        dim: Axes to reduce over. Default: all axes but the first (one pair of bounds per sample of a
            batch).

    Returns:
        ``(vmin, vmax)``, arrays with the reduced axes kept at size 1, broadcastable against ``input``.
    """
    array = np.asarray(input)
    if dim is None:
        dim = tuple(range(1, array.ndim))
    elif isinstance(dim, int):
        dim = (dim,)
    else:
        dim = tuple(dim)
    if symmetric:
        vmax = np.abs(array).max(axis=dim, keepdims=True)
        return -vmax, vmax
    return array.min(axis=dim, keepdims=True), array.max(axis=dim, keepdims=True)


def _to_channels_last(array: np.ndarray, channels_last: bool | None, what: str) -> np.ndarray:
    """Return a batch ``(N, A, B, C)`` as ``(N, H, W, C)``, finding the channel axis among A and C."""
    leading, trailing = array.shape[1], array.shape[-1]
    if channels_last is None:
        if trailing in (1, 3):
            return array
        if leading in (1, 3):
            return np.moveaxis(array, 1, -1)
        raise UsageError(
            f"Cannot find the colour channels of {what} of shape {array.shape[1:]}: neither the last nor the "
            f"first axis has size 1 or 3. {_LAYOUT_HINT}"
        )
    if channels_last:
        if trailing not in (1, 3):
            raise UsageError(
                f"channels_last=True, but the last axis of {what} of shape {array.shape[1:]} has size "
                f"{trailing}, not 1 or 3."
            )
        return array
    if leading not in (1, 3):
        raise UsageError(
            f"channels_last=False, but the first axis of {what} of shape {array.shape[1:]} has size "
            f"{leading}, not 1 or 3."
        )
    return np.moveaxis(array, 1, -1)


def _as_batch(array: np.ndarray, batched: bool, channels_last: bool | None) -> np.ndarray:
    """Bring an image (``batched=False``) or a batch of images to the layout ``(N, H, W, C)``."""
    if batched:
        if array.ndim == 3:
            return array[..., None]
        if array.ndim == 4:
            return _to_channels_last(array, channels_last, "each sample")
        raise UsageError(
            f"A batch for a grid needs 3 axes (N, H, W) or 4 axes (N, H, W, C) / (N, C, H, W), got shape "
            f"{array.shape}. For a single image, use grid=False; to show several, stack them on a first axis."
        )
    if array.ndim == 2:
        return array[None, ..., None]
    if array.ndim == 3:
        return _to_channels_last(array[None], channels_last, "the image")
    hint = " For a batch, pass grid=True." if array.ndim == 4 else ""
    raise UsageError(
        f"An image needs 2 axes (H, W) or 3 axes (H, W, C) / (C, H, W), got shape {array.shape}.{hint} "
        "For relevance of shape (N, H, W, C), jlrp.image.heatmaps() sums the channels."
    )


def _grid_shape(count: int, shape: Sequence[int] | None) -> tuple[int, int]:
    if shape is None:
        cols = max(1, math.isqrt(count))
        return -(-count // cols), cols
    if len(shape) != 2 or any(int(n) != n or n < 1 for n in shape):
        raise UsageError(f"The grid shape must be two positive integers (rows, columns), got {shape!r}.")
    rows, cols = int(shape[0]), int(shape[1])
    if rows * cols < count:
        raise UsageError(
            f"A grid of {rows} x {cols} = {rows * cols} cells cannot hold {count} images; "
            "use a larger shape or shape=None for a square-ish grid."
        )
    return rows, cols


def _tile(batch: np.ndarray, shape: Sequence[int] | None, fill_value: Any) -> np.ndarray:
    """Tile a batch ``(N, H, W, C)`` into ``(rows * H, cols * W, C)``, filling the empty cells."""
    count, height, width, channels = batch.shape
    rows, cols = _grid_shape(count, shape)
    if fill_value is None:
        fill = batch.min(axis=(0, 1, 2))
    else:
        fill = np.asarray(fill_value)
        if fill.ndim > 1 or fill.size not in (1, channels):
            raise UsageError(
                f"fill_value must be a scalar or have one value per channel ({channels}), got shape "
                f"{fill.shape}."
            )
    cells = np.empty((rows * cols, height, width, channels), dtype=batch.dtype)
    cells[:count] = batch
    cells[count:] = fill
    cells = cells.reshape(rows, cols, height, width, channels).transpose(0, 2, 1, 3, 4)
    return cells.reshape(rows * height, cols * width, channels)


def gridify(
    obj: Any,
    shape: Sequence[int] | None = None,
    fill_value: Any = None,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Arrange a batch of images into one image, in a grid filled row by row.

    Args:
        obj: Batch (numpy or jax array) of shape ``(N, H, W)`` (greyscale), ``(N, H, W, C)`` or
            ``(N, C, H, W)`` with C = 1 or 3 (see the module documentation for how the channel axis is found).
        shape: ``(rows, columns)`` of the grid. Default: ``floor(sqrt(N))`` columns and as many rows as
            needed (zennit's choice).
        fill_value: Value of empty grid cells, a scalar or one value per channel. Default: the minimum of
            each channel over the batch.
        channels_last: None to find the channel axis automatically, True for ``(N, H, W, C)``, False for
            ``(N, C, H, W)``.

    Returns:
        Array of shape ``(rows * H, columns * W, C)`` (channels last, C = 1 for greyscale), same dtype.

    Raises:
        ValueError: If the shape is not a batch of images, or the grid is too small for the batch.
    """
    batch = _as_batch(np.asarray(obj), batched=True, channels_last=channels_last)
    return _tile(batch, shape, fill_value)


def _check_bound(value: Any, name: str) -> Any:
    if value is None:
        return None
    bound = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(bound)):
        raise UsageError(f"{name} must be finite, got {value!r}.")
    return bound


def _normalise(batch: np.ndarray, vmin: Any, vmax: Any, symmetric: bool) -> np.ndarray:
    """Normalise each sample of ``(N, H, W, C)`` to [0, 1] and turn it into ``uint8`` pixels."""
    if batch.dtype == np.uint8 and vmin is None and vmax is None and not symmetric:
        return batch
    if batch.dtype.kind == "c":
        raise UsageError(
            "Cannot make an image of complex values; pass the real part, the imaginary part or abs."
        )
    if batch.dtype not in (np.float32, np.float64):
        batch = batch.astype(np.float64)
    if not np.all(np.isfinite(batch)):
        raise UsageError(
            "The array contains NaN or infinite values, which have no colour; replace them first, "
            "e.g. with np.nan_to_num(array)."
        )
    low, high = interval_norm_bounds(batch, symmetric=symmetric, dim=(1, 2, 3))
    vmin, vmax = _check_bound(vmin, "vmin"), _check_bound(vmax, "vmax")
    if vmin is not None:
        low = np.broadcast_to(vmin, np.broadcast_shapes(vmin.shape, low.shape)).astype(batch.dtype)
    if vmax is not None:
        high = np.broadcast_to(vmax, np.broadcast_shapes(vmax.shape, high.shape)).astype(batch.dtype)
    if np.any(low > high):
        raise UsageError(
            f"vmin must not exceed vmax, but the bounds are vmin={np.min(low)!r} and vmax={np.max(high)!r} "
            "(a bound you leave out is taken from the data)."
        )
    width = high - low
    degenerate = width == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = (batch - low) / np.where(degenerate, 1, width)
    if np.any(degenerate):
        # all values equal (or vmin == vmax): values at the bound get the centre colour, others an end
        step = np.where(batch > low, 1.0, np.where(batch < low, 0.0, 0.5)).astype(batch.dtype)
        scaled = np.where(degenerate, step, scaled)
    return (scaled * 255).clip(0, 255).astype(np.uint8)


def imgify(
    obj: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | ColorMap = "bwr",
    level: float = 1.0,
    symmetric: bool = False,
    grid: bool | Sequence[int] = False,
    gridfill: Any = None,
    channels_last: bool | None = None,
) -> PILImage.Image:
    """Convert an array with 1 or 3 channels, or a batch of them, to a Pillow image.

    The array is normalised to [0, 1] with bounds ``vmin`` and ``vmax`` (per sample of a batch), scaled to
    0 .. 255 and truncated to ``uint8``. One channel gives a palette image (mode ``'P'``) coloured with
    ``cmap``; three channels give an RGB image (``cmap`` and ``level`` are not used).

    Args:
        obj: Array (numpy or jax). Without ``grid``: ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)`` with C = 1 or
            3. With ``grid``: a batch ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``. See the module
            documentation for how the channel axis is found. ``uint8`` arrays are used as pixel values as
            they are, unless ``vmin``, ``vmax`` or ``symmetric`` is given.
        vmin: Value shown as the lowest colour; overrides the bound from the data. Values below are clipped.
        vmax: Value shown as the highest colour; overrides the bound from the data. Values above are clipped.
        cmap: Name of a built-in colour map, colour-map source code or a :py:class:`jlrp.cmap.ColorMap`.
        level: Contrast of the palette (see :py:func:`palette`); 1.0 uses the colour map as it is.
        symmetric: If False (default), the bounds are the minimum and maximum of the data. If True, they
            are minus and plus its largest absolute value, so 0 maps to the centre of the colour map, as
            relevance should be shown. ``vmin``/``vmax`` still override either bound.
        grid: False (default) for a single image; True to treat the first axis as a batch, normalise each
            sample on its own and arrange them in a square-ish grid (see :py:func:`gridify`); or
            ``(rows, columns)`` for a grid of that shape.
        gridfill: Pixel value (0 .. 255, or one per channel) of empty grid cells. Default: the smallest pixel
            value of the batch.
        channels_last: None to find the channel axis automatically, True for channel-last, False for
            channel-first arrays.

    Returns:
        A ``PIL.Image.Image`` of mode ``'P'`` (one channel) or ``'RGB'`` (three channels).

    Raises:
        ValueError: For shapes that are not images (or batches of images with ``grid``), NaN or infinite
            values, ``vmin > vmax``, or an unknown colour map.
        ImportError: If Pillow is not installed.

    Note:
        If the bounds are equal (a constant image, or ``vmin == vmax``), values at the bound get the
        centre colour of the map and values above/below it the ends (zennit divides by zero there).
    """
    image_module = _pil_image()
    array = np.asarray(obj)
    if array.dtype == bool:
        array = array.astype(np.float64)
    batched = grid is not False and grid is not None
    batch = _as_batch(array, batched=batched, channels_last=channels_last)
    pixels = _normalise(batch, vmin, vmax, symmetric)
    if batched:
        shape = None if grid is True else tuple(grid)
        image = _tile(pixels, shape, gridfill)
    else:
        image = pixels[0]
    if image.shape[-1] == 1:
        result = image_module.fromarray(np.ascontiguousarray(image[..., 0]))
        result.putpalette(palette(cmap, level).tobytes())
        return result
    return image_module.fromarray(np.ascontiguousarray(image))


def imsave(
    fp: str | os.PathLike | Any,
    obj: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str | ColorMap = "bwr",
    level: float = 1.0,
    grid: bool | Sequence[int] = False,
    format: str | None = None,
    writer_params: dict[str, Any] | None = None,
    symmetric: bool = False,
    gridfill: Any = None,
    channels_last: bool | None = None,
) -> None:
    """Convert an array to an image with :py:func:`imgify` and save it with Pillow.

    Args:
        fp: File name, path or binary file object.
        obj: Array to show; see :py:func:`imgify`.
        vmin: See :py:func:`imgify`.
        vmax: See :py:func:`imgify`.
        cmap: See :py:func:`imgify`.
        level: See :py:func:`imgify`.
        grid: See :py:func:`imgify`.
        format: Image format for Pillow (e.g. ``'PNG'``). Default: from the file name's extension, and PNG
            when there is none (e.g. for a file object).
        writer_params: Extra keyword arguments for ``PIL.Image.Image.save``.
        symmetric: See :py:func:`imgify`.
        gridfill: See :py:func:`imgify`.
        channels_last: See :py:func:`imgify`.

    Raises:
        ImportError: If Pillow is not installed.
    """
    image = imgify(
        obj,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        level=level,
        symmetric=symmetric,
        grid=grid,
        gridfill=gridfill,
        channels_last=channels_last,
    )
    if format is None and not (isinstance(fp, (str, os.PathLike)) and os.path.splitext(os.fspath(fp))[1]):
        format = "PNG"
    image.save(fp, format=format, **(writer_params or {}))


def heatmaps(relevance: Any) -> np.ndarray:
    """Sum a channel-last relevance batch over its channels: one 2-D heatmap per sample.

    Args:
        relevance: Relevance of shape ``(N, H, W, C)`` (numpy or jax), e.g. the output of an LRP
            attribution of a batch of NHWC images.

    Returns:
        numpy array of shape ``(N, H, W)``, ready for ``imgify(..., symmetric=True, grid=True)``.

    Raises:
        ValueError: If ``relevance`` does not have 4 axes.
    """
    array = np.asarray(relevance)
    if array.ndim != 4:
        raise UsageError(
            f"heatmaps expects a channel-last batch (N, H, W, C), got shape {array.shape}; for a single image "
            "(H, W, C) use heatmaps(relevance[None])[0], for channel-first data move the axis first "
            "(np.moveaxis(relevance, 1, -1))."
        )
    return array.sum(axis=-1)


def resize_crop(image: Any, resize: int, crop: int) -> tuple[Any, list[str]]:
    """Resize the shorter side of a Pillow image to ``resize`` (bicubic) and centre-crop ``crop`` x ``crop``.

    The usual ImageNet evaluation geometry (torchvision's ``Resize(resize)`` + ``CenterCrop(crop)``).
    An image whose shorter side is below ``crop`` is upscaled (and the note says so).

    Args:
        image: a ``PIL.Image.Image``.
        resize: the shorter side after resizing, in pixels.
        crop: the side of the square crop, in pixels.

    Returns:
        ``(cropped image, notes)``; the note says when the image was upscaled (shorter side < ``crop``).
    """
    image_module = _pil_image()
    width, height = image.size
    notes = []
    if min(width, height) < crop:
        notes.append(f"upscaled from {width}x{height} (smaller than the {crop}x{crop} crop)")
    scale = resize / min(width, height)
    size = (max(crop, round(width * scale)), max(crop, round(height * scale)))
    image = image.resize(size, image_module.Resampling.BICUBIC)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    return image.crop((left, top, left + crop, top + crop)), notes
