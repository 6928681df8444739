"""The inputs of ``jlrp explain``: a folder of PNG/JPEG/``.npy`` files or one array file, read with Pillow.

Per-file problems never stop a run: a file that is no image, cannot be decoded (corrupt or truncated),
or does not fit the size of the others is reported in one line naming it, listed in the summary with
status ``skipped``, and the other files are explained. Photos that need a conversion (greyscale or RGBA
to RGB, an image smaller than the crop, which is upscaled) are explained with a note saying so.

Preprocessing (``--preprocess``):

- ``none``: images are scaled to [0, 1] at their own size (all must share one size; the others are
  skipped); arrays are used as they are (uint8 scaled to [0, 1]).
- ``imagenet``: the usual ImageNet evaluation transform: resize the shorter side to ``resize``
  (bicubic), centre-crop ``crop`` x ``crop`` and normalise per channel with ImageNet's mean
  (0.485, 0.456, 0.406) and standard deviation (0.229, 0.224, 0.225) (torchvision's ``Resize`` +
  ``CenterCrop`` + ``Normalize``). A photo whose shorter side is below ``crop`` is upscaled (noted);
  greyscale and RGBA photos are converted to RGB (noted). A zoo model replaces the normalisation (and
  geometry) by its own preprocessing (e.g. EfficientNet-Lite0's ``(255 x - 127) / 128``).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jlrp.errors import InputError
from jlrp.image import resize_crop

from .args import CLIError, short

__all__ = [
    "IMAGE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FileProblem",
    "Preprocess",
    "Sample",
    "Inputs",
    "load_inputs",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FILE_SUFFIXES = (*IMAGE_SUFFIXES, ".npy")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class FileProblem(InputError):
    """One input file cannot be explained (it is skipped and listed in the summary)."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a file becomes a model input.

    Attributes:
        kind: ``'none'`` or ``'imagenet'``.
        crop: side of the centre crop (``'imagenet'``).
        resize: the shorter side is resized to this before cropping (``'imagenet'``).
        normalise: a zoo model's own preprocessing ``PIL image -> (crop, crop, 3) float32``; ``None``
            for ImageNet's mean/std normalisation.
        channels: forced channel count for ``'none'`` (1 or 3), ``None`` to take it from the files.
    """

    kind: str = "none"
    crop: int = 224
    resize: int = 256
    normalise: Callable[[Any], np.ndarray] | None = None
    channels: int | None = None

    @property
    def input_range(self) -> tuple[Any, Any]:
        """The lowest and highest value a model input can take (for ZBox's ``low``/``high``)."""
        if self.kind == "none":
            return 0.0, 1.0
        return (0.0 - IMAGENET_MEAN) / IMAGENET_STD, (1.0 - IMAGENET_MEAN) / IMAGENET_STD


@dataclasses.dataclass
class Sample:
    """One loaded input: ``x`` (model input, float32), ``display`` (uint8 image for overlays) and notes."""

    x: np.ndarray
    display: np.ndarray | None
    notes: list[str]


def _open_image(path: Path) -> Any:
    """Open and fully decode an image file (a truncated file fails here, not later)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except UnidentifiedImageError as err:
        raise FileProblem(f"{path.name}: not an image Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise FileProblem(f"{path.name}: corrupt or truncated image ({short(err)})") from err
    return image


def _image_from_npy(path: Path) -> Any:
    """A ``.npy`` in a folder: one image ``(H, W)`` or ``(H, W, C)``, uint8 or floats in [0, 1]."""
    from PIL import Image

    array = _read_npy(path)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise FileProblem(f"{path.name}: shape {array.shape} is no image (H, W[, 1|3|4])")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating):
            raise FileProblem(f"{path.name}: dtype {array.dtype}; save uint8 pixels or floats in [0, 1]")
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise FileProblem(f"{path.name}: cannot read the .npy file ({short(err)})") from err


def _as_rgb(image: Any, notes: list[str]) -> Any:
    if image.mode != "RGB":
        what = f"greyscale ({image.mode})" if image.mode in _GREY_MODES else image.mode
        notes.append(f"{what} converted to RGB" + (" (alpha dropped)" if "A" in image.mode else ""))
        image = image.convert("RGB")
    return image


def _as_float(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise CLIError(
        f"{what} has dtype {array.dtype}; save floating-point inputs scaled as the model expects "
        "(uint8 images are scaled to [0, 1] automatically)"
    )


@dataclasses.dataclass
class Inputs:
    """The inputs of ``jlrp explain``, loaded one at a time.

    Attributes:
        names: one source name per input (file name, or the array index).
        sample_shape: the shape of one model input.
        preprocess: how files become inputs.
        files: the files (folder inputs), else ``None``.
        array: the array (array inputs, memory-mapped for ``.npy``), else ``None``.
        skipped: ``(file name, reason)`` of the folder's files that are skipped before any work.
    """

    names: list[str]
    sample_shape: tuple[int, ...]
    preprocess: Preprocess
    files: list[Path] | None = None
    array: Any = None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int) -> Sample:
        """Input ``i``.

        Raises:
            FileProblem: the file cannot be explained (one line naming it).
        """
        if self.array is not None:
            x = _as_float(np.asarray(self.array[i]), "--inputs")
            return Sample(x, None, [])
        path = self.files[i]
        image = _image_from_npy(path) if path.suffix.lower() == ".npy" else _open_image(path)
        notes: list[str] = []
        if self.preprocess.kind == "imagenet":
            image = _as_rgb(image, notes)
            display, crop_notes = resize_crop(image, self.preprocess.resize, self.preprocess.crop)
            notes += crop_notes
            if self.preprocess.normalise is not None:
                try:
                    x = np.asarray(self.preprocess.normalise(image), np.float32)
                except Exception as err:
                    raise FileProblem(
                        f"{path.name}: the model's preprocessing failed ({short(err)})"
                    ) from err
            else:
                x = (np.asarray(display, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
            display = np.asarray(display)
        else:
            channels = self.sample_shape[-1]
            if channels == 1:
                if image.mode not in _GREY_MODES:
                    notes.append(f"{image.mode} converted to greyscale")
                image = image.convert("L")
            else:
                image = _as_rgb(image, notes)
            display = np.asarray(image)
            x = display.astype(np.float32) / 255.0
            if x.ndim == 2:
                x = x[..., None]
        if x.shape != self.sample_shape:
            raise FileProblem(
                f"{path.name}: preprocessed to shape {x.shape}, the model inputs are {self.sample_shape}"
            )
        return Sample(x, display, notes)


def _scan_size(path: Path) -> tuple[tuple[int, int], bool]:
    """``((height, width), is_grey)`` from a file's header (images) or array header (``.npy``)."""
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as err:
            raise FileProblem(f"{path.name}: cannot read the .npy file ({short(err)})") from err
        if array.ndim not in (2, 3):
            raise FileProblem(f"{path.name}: shape {array.shape} is no image (H, W[, C])")
        return tuple(array.shape[:2]), array.ndim == 2 or array.shape[-1] == 1
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return (image.size[1], image.size[0]), image.mode in _GREY_MODES
    except UnidentifiedImageError as err:
        raise FileProblem(f"{path.name}: not an image Pillow can read") from err
    except Exception as err:
        raise FileProblem(f"{path.name}: cannot read the image ({short(err)})") from err


def load_inputs(path_text: str, preprocess: Preprocess) -> Inputs:
    """Find the inputs: a folder of PNG/JPEG/``.npy`` files, or an ``.npy``/``.npz`` array ``(N, ...)``.

    Args:
        path_text: the ``--inputs`` argument.
        preprocess: the preprocessing (the sample shape follows from it for ``'imagenet'``).

    Returns:
        The inputs; files skipped while scanning are in ``skipped`` (the caller reports them).

    Raises:
        CLIError: a missing path, a folder without any usable file, an unreadable array file.
    """
    path = Path(path_text)
    if not path.exists():
        raise CLIError(
            f"--inputs {path_text!r} does not exist; pass a folder of PNG/JPEG images or an .npy/.npz array "
            "of shape (N, H, W, C)"
        )
    if path.is_dir():
        return _load_folder(path, path_text, preprocess)
    if preprocess.kind != "none":
        raise CLIError(
            f"--preprocess {preprocess.kind} applies to image folders; --inputs {path_text!r} is an array file "
            "(save it preprocessed and use --preprocess none)"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = data.files
                key = next(
                    (k for k in ("x", "inputs", "images") if k in keys), keys[0] if len(keys) == 1 else None
                )
                if key is None:
                    raise CLIError(
                        f"--inputs {path_text!r} holds several arrays ({', '.join(keys)}); name the inputs 'x' "
                        "or save them alone"
                    )
                array = data[key]
        else:
            raise CLIError(
                f"--inputs {path_text!r} is neither a folder nor an .npy/.npz file; pass a folder of PNG/JPEG "
                "images or a NumPy array file"
            )
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(f"cannot read --inputs {path_text!r} ({short(err)})") from err
    if array.ndim < 2 or array.shape[0] == 0:
        raise CLIError(
            f"--inputs {path_text!r} has shape {array.shape}; it needs a batch axis first and at least one "
            "input, e.g. (N, H, W, C) images (add one with x[None] for a single input)"
        )
    if preprocess.channels is not None:
        raise CLIError("--channels applies to image folders only; reshape the array instead")
    _as_float(np.asarray(array[:1]), "--inputs")  # fail early on an integer dtype
    return Inputs([str(i) for i in range(array.shape[0])], tuple(array.shape[1:]), preprocess, array=array)


def _load_folder(path: Path, path_text: str, preprocess: Preprocess) -> Inputs:
    try:
        import PIL  # noqa: F401
    except ImportError as err:
        raise CLIError('reading image folders needs Pillow: pip install "jlrp[image]"') from err
    skipped: list[tuple[str, str]] = []

    def skip(name: str, reason: str) -> None:
        skipped.append((name, reason))

    entries = sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    candidates, headers = [], {}
    for entry in entries:
        if entry.suffix.lower() not in FILE_SUFFIXES:
            skip(entry.name, f"{entry.name}: not a PNG/JPEG image or .npy file")
            continue
        try:
            headers[entry] = _scan_size(entry)
        except FileProblem as err:
            skip(entry.name, str(err))
            continue
        candidates.append(entry)
    if not candidates:
        raise CLIError(
            f"the --inputs folder {path_text!r} holds no PNG/JPEG images ({len(entries)} other entries); "
            "put .png/.jpg/.jpeg files in it or pass an .npy array"
        )
    if preprocess.kind == "imagenet":
        files = candidates
        shape: tuple[int, ...] = (preprocess.crop, preprocess.crop, 3)
    else:
        (height, width), _ = collections.Counter(headers[f][0] for f in candidates).most_common(1)[0]
        files = []
        for f in candidates:
            size = headers[f][0]
            if size != (height, width):
                skip(
                    f.name,
                    f"{f.name}: {size[1]}x{size[0]} pixels, the other images are {width}x{height}; resize it or use "
                    "--preprocess imagenet",
                )
            else:
                files.append(f)
        grey = all(headers[f][1] for f in files)
        channels = preprocess.channels or (1 if grey else 3)
        shape = (height, width, channels)
    return Inputs([f.name for f in files], shape, preprocess, files=files, skipped=sorted(skipped))
