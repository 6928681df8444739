"""The ``jlrp`` command line: ``jlrp demo`` and ``jlrp explain``.

``jlrp demo`` trains a small CNN on scikit-learn's digits and evaluates several explanation methods
(:mod:`jlrp.demo`). ``jlrp explain`` explains the user's own model on a folder of images or an array::

    jlrp explain --model mypkg.models:make_net --variables net.msgpack --inputs images/ \\
        --composite epsilon_gamma_box --composite-arg low=0 --composite-arg high=1 --out relevance/

Output of ``jlrp explain`` (in ``--out``): ``relevance-00000.npz`` ... one shard per batch (arrays
``relevance``, ``output``, ``target``, ``index``, ``score`` = the target's output, ``relevance_sum``), ``heatmaps/<index>[_<name>].png`` per image input,
``index.csv`` (one row per input: index, source, shard, target, score, relevance_sum, heatmap) and
``run.json`` (the settings). Every file is written to a temporary name in its folder and renamed into
place, so an interrupted run leaves no half-written file; rerunning the same command skips the shards
that are complete.

Mistakes in the arguments (a missing file, a model path that does not import, an unknown composite,
inputs that do not fit the model, an empty folder, ...) print one line ``jlrp <command>: error: ...``
with the fix on stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import importlib
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._files import atomic_path, remove_stale_temporaries
from .errors import UsageError

__all__ = ["main", "CLIError", "atomic_path", "build_parser"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ATTRIBUTORS = ("gradient", "smoothgrad", "integrated_gradients", "occlusion")
DEFAULT_COMPOSITE = "epsilon_plus_flat"
#: the arrays of every shard file (``relevance-NNNNN.npz``)
SHARD_ARRAYS = ("relevance", "output", "target", "index", "score", "relevance_sum")


class CLIError(UsageError):
    """A mistake in the command's arguments or inputs; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------
# files


# --------------------------------------------------------------------------------------------------
# parsing helpers


def _literal(text: str) -> Any:
    """``'0'`` -> 0, ``'1e-6'`` -> 1e-6, ``'[0, 1]'`` -> array, ``'abc'`` -> 'abc'."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value, dtype=np.float32)
    return value


def _key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"{option} takes key=value, got {item!r} (e.g. {option} low=0)")
        out[key.strip()] = _literal(value.strip())
    return out


def _short(err: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type where that helps."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# --------------------------------------------------------------------------------------------------
# the model


def load_model(spec: str) -> Any:
    """Import ``package.module:attribute`` and return a linen or NNX module instance.

    The attribute may be a module instance, a module class that takes no arguments, or a function of no
    arguments that returns a module. The current folder is put on ``sys.path`` first (as ``python -m``
    does), so models next to the user's data import without installing them.
    """
    from flax import linen as nn
    from flax import nnx

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(
            f"--model must look like package.module:attribute (e.g. mypkg.models:make_net), got {spec!r}"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise CLIError(
                f"cannot import {module_name!r} for --model: no module named {err.name!r}; check the spelling and "
                "run from the folder that holds it (or add that folder to PYTHONPATH)"
            ) from err
        raise CLIError(
            f"importing {module_name!r} for --model failed: {_short(err)}; install the missing package"
        ) from err
    except Exception as err:  # the user's module raised while importing
        raise CLIError(
            f"importing {module_name!r} for --model failed with {type(err).__name__}: {_short(err)} "
            "(rerun with --debug for the traceback)"
        ) from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n in dir(module) if not n.startswith("_"))[:20]
            raise CLIError(
                f"module {module_name!r} has no attribute {attr!r}; it defines: {', '.join(names) or 'nothing'}"
            )
        obj = getattr(obj, part)
    if isinstance(obj, (nn.Module, nnx.Module)):
        return obj
    if callable(obj):
        try:
            obj = obj()
        except TypeError as err:
            raise CLIError(
                f"calling {spec} with no arguments failed ({_short(err)}); point --model at a module instance "
                "or at a function that takes no arguments and returns one"
            ) from err
        if isinstance(obj, (nn.Module, nnx.Module)):
            return obj
    raise CLIError(
        f"{spec} is a {type(obj).__name__}, not a flax.linen or flax.nnx Module; point --model at a module "
        "instance, a module class or a zero-argument function that returns one"
    )


def _is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.Module)


def _flatten(tree: Any) -> dict[str, Any]:
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in leaves
    }


def read_variables(path: Path) -> dict[str, np.ndarray]:
    """A flat ``{'a/b/c': array}`` dict from a Flax msgpack file or an ``.npz`` of '/'-joined keys."""
    from flax import serialization

    if not path.is_file():
        raise CLIError(
            f"--variables file {str(path)!r} does not exist; pass the Flax msgpack (flax.serialization.to_bytes) "
            "or .npz file of the model's variables"
        )
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                return {k: np.asarray(data[k]) for k in data.files}
        restored = serialization.msgpack_restore(path.read_bytes())
    except Exception as err:
        raise CLIError(
            f"cannot read --variables {str(path)!r} ({type(err).__name__}: {_short(err)}); it must be a Flax "
            "msgpack file (flax.serialization.to_bytes) or an .npz of a flattened dict with '/'-joined keys"
        ) from err
    if not isinstance(restored, dict):
        raise CLIError(
            f"--variables {str(path)!r} holds a {type(restored).__name__}, not a dict of variables"
        )
    return {k: np.asarray(v) for k, v in _flatten(restored).items()}


def _fill(template: Any, loaded: dict[str, np.ndarray], partial_ok: Any, shape_hint: str) -> Any:
    """Put the loaded arrays into the template's tree, checking names and shapes."""
    import jax

    wanted = _flatten(template)
    if not set(loaded) & set(wanted):  # maybe the file holds the params collection alone
        prefixed = {f"params/{k}": v for k, v in loaded.items()}
        if set(prefixed) & set(wanted):
            loaded = prefixed
    extra = sorted(set(loaded) - set(wanted))
    missing = sorted(k for k in set(wanted) - set(loaded) if not partial_ok(k))
    if extra or missing:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:4])}" + (" ..." if len(extra) > 4 else ""))
        raise CLIError(
            f"the --variables do not fit the model ({'; '.join(parts)}); the model's variables are "
            f"{', '.join(sorted(wanted)[:6])}{' ...' if len(wanted) > 6 else ''} - check --model and --variables"
        )
    for key, leaf in wanted.items():
        if key in loaded and tuple(loaded[key].shape) != tuple(leaf.shape):
            raise CLIError(
                f"inputs of shape {shape_hint} do not fit the model with these --variables: {key!r} has shape "
                f"{tuple(loaded[key].shape)} in the file but {tuple(leaf.shape)} for these inputs; check the size "
                "and channels of --inputs, and that --variables belong to --model"
            )

    def pick(path: Any, leaf: Any) -> Any:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if key not in loaded:
            return leaf
        return np.asarray(loaded[key]).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, template)


def prepare_model(model: Any, variables_path: Path | None, sample: np.ndarray) -> tuple[Any, int]:
    """Load the variables into/for the model and check that one input sample runs through it.

    Returns:
        ``(variables or None, n_classes)``; ``variables`` is ``None`` for NNX models (they hold their state).
    """
    import jax

    x1 = jax.ShapeDtypeStruct((1,) + sample.shape, np.float32)
    shape_hint = str((1,) + sample.shape)
    if _is_nnx(model):
        from flax import nnx

        graphdef, state = nnx.split(model)

        def run(s: Any, x: Any) -> Any:
            return nnx.merge(graphdef, s)(x)

        if variables_path is not None:
            loaded = read_variables(variables_path)
            pure = nnx.to_pure_dict(state)
            params_only = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            param_keys = set(_flatten(params_only))
            pure = _fill(pure, loaded, lambda k: k not in param_keys, shape_hint)
            nnx.replace_by_pure_dict(state, pure)
            nnx.update(model, state)
        out = _eval_output(lambda: jax.eval_shape(run, state, x1), shape_hint)
        variables = None
    else:
        if variables_path is None:
            raise CLIError(
                "a flax.linen model needs --variables (its parameters, a Flax msgpack or .npz file)"
            )
        template = _eval_output(lambda: jax.eval_shape(model.init, jax.random.PRNGKey(0), x1), shape_hint)
        variables = _fill(template, read_variables(variables_path), lambda k: False, shape_hint)
        variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
        out = _eval_output(lambda: jax.eval_shape(model.apply, variables, x1), shape_hint)
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise CLIError(
            f"the model returns {getattr(out, 'shape', type(out).__name__)} for inputs of shape {shape_hint}; "
            "jlrp explain needs one vector of class scores per input, shape (N, n_classes)"
        )
    return variables, int(out.shape[-1])


def _eval_output(run: Any, shape_hint: str) -> Any:
    try:
        return run()
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(
            f"inputs of shape {shape_hint} do not fit the model ({type(err).__name__}: {_short(err)}); check the "
            "image size and channels (NHWC) the model expects"
        ) from err


# --------------------------------------------------------------------------------------------------
# the inputs


@dataclasses.dataclass
class Inputs:
    """The inputs of ``jlrp explain``, loaded a batch at a time.

    Attributes:
        names: one source name per input (file name, or the array index).
        sample_shape: the shape of one input.
        files: image files (folder inputs), else ``None``.
        array: the array (array inputs, memory-mapped for ``.npy``), else ``None``.
        channels: channels of folder images (1 or 3).
    """

    names: list[str]
    sample_shape: tuple[int, ...]
    files: list[Path] | None = None
    array: Any = None
    channels: int = 3

    def __len__(self) -> int:
        return len(self.names)

    def load(self, start: int, stop: int) -> np.ndarray:
        """Inputs ``start .. stop-1`` as float32 (images scaled to [0, 1])."""
        if self.array is not None:
            return _as_float(np.asarray(self.array[start:stop]), "--inputs")
        return np.stack([_read_image(f, self.channels) for f in self.files[start:stop]])


def _as_float(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise CLIError(
        f"{what} has dtype {array.dtype}; save floating-point inputs scaled as the model expects "
        "(uint8 images are scaled to [0, 1] automatically)"
    )


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array[..., None] if channels == 1 else array


def load_inputs(path_text: str, channels: int | None = None) -> Inputs:
    """Find the inputs: a folder of PNG/JPEG images, or an ``.npy``/``.npz`` array (N, ...)."""
    path = Path(path_text)
    if not path.exists():
        raise CLIError(
            f"--inputs {path_text!r} does not exist; pass a folder of PNG/JPEG images or an .npy/.npz array "
            "of shape (N, H, W, C)"
        )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            others = sum(1 for p in path.iterdir() if not p.name.startswith("."))
            raise CLIError(
                f"the --inputs folder {path_text!r} holds no PNG/JPEG images ({others} other entries); "
                "put .png/.jpg/.jpeg files in it or pass an .npy array"
            )
        try:
            from PIL import Image
        except ImportError as err:
            raise CLIError('reading image folders needs Pillow: pip install "jlrp[image]"') from err
        sizes, grey = {}, True
        for f in files:
            try:
                with Image.open(f) as image:
                    sizes.setdefault(image.size, f.name)
                    grey = grey and image.mode in ("1", "L", "LA", "I", "I;16", "F")
            except Exception as err:
                raise CLIError(f"cannot read image {str(f)!r} ({_short(err)}); remove or replace it") from err
        if len(sizes) > 1:
            (s1, f1), (s2, f2) = list(sizes.items())[:2]
            raise CLIError(
                f"the images have different sizes ({f1}: {s1[0]}x{s1[1]}, {f2}: {s2[0]}x{s2[1]}); resize them "
                "to the size the model expects"
            )
        width, height = next(iter(sizes))
        n_channels = channels or (1 if grey else 3)
        return Inputs([f.name for f in files], (height, width, n_channels), files=files, channels=n_channels)
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
        raise CLIError(f"cannot read --inputs {path_text!r} ({_short(err)})") from err
    if array.ndim < 2 or array.shape[0] == 0:
        raise CLIError(
            f"--inputs {path_text!r} has shape {array.shape}; it needs a batch axis first and at least one "
            "input, e.g. (N, H, W, C) images (add one with x[None] for a single input)"
        )
    if channels is not None:
        raise CLIError("--channels applies to image folders only; reshape the array instead")
    _as_float(np.asarray(array[:1]), "--inputs")  # fail early on an integer dtype
    return Inputs([str(i) for i in range(array.shape[0])], tuple(array.shape[1:]), array=array)


def load_targets(text: str, n: int, n_classes: int) -> tuple[str, Any]:
    """``('pred', None)``, ``('int', c)`` or ``('array', classes)`` from the ``--target`` argument."""
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
        raise CLIError(f"cannot read --target {text!r} ({_short(err)})") from err
    if not np.issubdtype(classes.dtype, np.integer) or classes.shape != (n,):
        raise CLIError(
            f"--target {text!r} must hold {n} integer class indices (one per input), got {classes.dtype} "
            f"array of shape {classes.shape}"
        )
    if ((classes < 0) | (classes >= n_classes)).any():
        raise CLIError(f"--target {text!r} has classes outside 0..{n_classes - 1}")
    return "array", classes.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# attributors


def make_composite(name: str, args: dict[str, Any]) -> Any:
    """The named composite with ``args``, or ``None`` for ``'none'`` (plain gradients)."""
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
        raise CLIError(f"composite {name!r} rejects these arguments: {_short(err)}") from err


def make_attributor(name: str, model: Any, composite: Any, args: dict[str, Any]) -> Any:
    """The attributor ``name`` over the explained (or, without a composite, plain) model."""
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
        raise CLIError(f"attributor {name!r} rejects these arguments: {_short(err)}") from err


# --------------------------------------------------------------------------------------------------
# jlrp explain


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
        "composite": args.composite,
        "composite_args": {k: plain(v) for k, v in sorted(composite_args.items())},
        "attributor": args.attributor,
        "attributor_args": {k: plain(v) for k, v in sorted(attributor_args.items())},
        "target": target,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "cmap": args.cmap,
        "level": args.level,
    }


def _check_manifest(out: Path, settings: dict) -> None:
    manifest = out / "run.json"
    if manifest.is_file():
        try:
            old = json.loads(manifest.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings:
            diff = [k for k in settings if not isinstance(old, dict) or old.get(k) != settings[k]]
            raise CLIError(
                f"--out {str(out)!r} holds results of a run with other settings ({', '.join(diff[:3]) or 'unreadable run.json'}); "
                "pass a new --out folder, or delete that one to start over"
            )
        return
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(settings, indent=2) + "\n")


def _shard_path(out: Path, shard: int) -> Path:
    return out / f"relevance-{shard:05d}.npz"


def _heatmap_name(index: int, source: str, from_folder: bool) -> str:
    if from_folder:
        return f"{index:06d}_{Path(source).stem}.png"
    return f"{index:06d}.png"


def _shard_complete(path: Path, indices: np.ndarray, pngs: list[Path]) -> bool:
    """A shard is complete when its npz opens with every array for every index and its PNGs exist."""
    if not path.is_file() or not all(p.is_file() for p in pngs):
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            if not set(SHARD_ARRAYS) <= set(data.files):
                return False
            return np.array_equal(data["index"], indices)
    except Exception:
        return False


def _heatmap_image(relevance: np.ndarray) -> np.ndarray | None:
    """A 2-D heatmap of one input's relevance (summed over channels), or ``None`` if it is no image."""
    if relevance.ndim == 3:
        return relevance.sum(axis=-1)
    if relevance.ndim == 2:
        return relevance
    return None


def _save_shard(
    path: Path,
    arrays: dict[str, np.ndarray],
    heatmaps: list[tuple[Path, np.ndarray]],
    cmap: str,
    level: float,
) -> None:
    """Write a shard: the PNGs first, the npz (the shard's completion mark) last, each atomically."""
    from jlrp.image import imgify

    for png, heat in heatmaps:
        image = imgify(heat, symmetric=True, cmap=cmap, level=level)
        with atomic_path(png) as tmp:
            image.save(tmp, format="PNG")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def _compute(attributor: Any, variables: Any, x: Any, target: Any, rng: Any, smooth: bool) -> tuple[Any, Any]:
    kwargs = {"rng": rng} if smooth else {}
    if variables is None:
        return attributor(x, target=target, **kwargs)
    return attributor(variables, x, target=target, **kwargs)


def cmd_explain(args: argparse.Namespace) -> int:
    """Run ``jlrp explain`` (see :func:`build_parser` for the arguments)."""
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    composite_args = _key_values(args.composite_arg, "--composite-arg")
    attributor_args = _key_values(args.attributor_arg, "--attributor-arg")
    if args.composite is None:
        args.composite = "none" if args.attributor == "occlusion" else DEFAULT_COMPOSITE
    elif args.attributor == "occlusion" and args.composite != "none":
        print(
            "jlrp explain: note: occlusion uses no gradients, so --composite has no effect", file=sys.stderr
        )
    composite = make_composite(args.composite, composite_args)
    inputs = load_inputs(args.inputs, args.channels)
    variables_path = Path(args.variables) if args.variables else None
    model = load_model(args.model)
    from jlrp.image import get_cmap

    try:
        get_cmap(args.cmap)
    except Exception as err:
        raise CLIError(f"--cmap {args.cmap!r} is not a colour map ({_short(err)}); e.g. --cmap bwr") from err
    sample = inputs.load(0, 1)[0]
    variables, n_classes = prepare_model(model, variables_path, sample)
    target_kind, target_value = load_targets(args.target, len(inputs), n_classes)
    attributor = make_attributor(
        args.attributor, model, composite if args.attributor != "occlusion" else None, attributor_args
    )

    out = Path(args.out)
    heat_dir = out / "heatmaps"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create --out {args.out!r} ({_short(err)})") from err
    image_like = _heatmap_image(np.zeros(inputs.sample_shape)) is not None
    if image_like:
        heat_dir.mkdir(exist_ok=True)
    remove_stale_temporaries(out, heat_dir)
    settings = _settings(args, inputs, composite_args, attributor_args)
    _check_manifest(out, settings)

    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    n, batch = len(inputs), args.batch_size
    n_shards = -(-n // batch)
    from_folder = inputs.files is not None
    plans = []
    for shard in range(n_shards):
        indices = np.arange(shard * batch, min((shard + 1) * batch, n))
        pngs = (
            [heat_dir / _heatmap_name(int(i), inputs.names[i], from_folder) for i in indices]
            if image_like
            else []
        )
        plans.append((shard, indices, pngs))
    todo = [p for p in plans if not _shard_complete(_shard_path(out, p[0]), p[1], p[2])]
    done = n_shards - len(todo)
    if done:
        print(f"resuming: {done} of {n_shards} shards are complete in {out}", file=sys.stderr)
    smooth = args.attributor == "smoothgrad"
    bar = tqdm(total=n_shards, initial=done, desc="explaining", unit="shard", disable=args.no_progress)
    try:
        for shard, indices, pngs in todo:
            x = inputs.load(int(indices[0]), int(indices[-1]) + 1)
            pad = batch - len(x) if n_shards > 1 else 0  # one compiled shape for every shard
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
            output, relevance = _compute(attributor, variables, jnp.asarray(x), target, rng, smooth)
            output = np.asarray(output)[: len(indices)]
            relevance = np.asarray(relevance)[: len(indices)]
            if target is None:
                used = output.argmax(axis=-1)
            else:
                used = np.broadcast_to(np.asarray(target), (len(x),))[: len(indices)]
            used = used.astype(np.int32)
            arrays = {
                "relevance": relevance,
                "output": output,
                "target": used,
                "index": indices.astype(np.int64),
                "score": np.take_along_axis(output, used[:, None], axis=-1)[:, 0],
                "relevance_sum": relevance.reshape(len(relevance), -1).sum(axis=1),
            }
            heatmaps = [(png, _heatmap_image(r)) for png, r in zip(pngs, relevance)]
            _save_shard(_shard_path(out, shard), arrays, heatmaps, args.cmap, args.level)
            bar.update(1)
    finally:
        bar.close()

    index_path = out / "index.csv"
    with atomic_path(index_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "source", "shard", "target", "score", "relevance_sum", "heatmap"])
        for shard, indices, pngs in plans:
            path = _shard_path(out, shard)
            with np.load(path, allow_pickle=False) as data:
                targets, scores, sums = data["target"], data["score"], data["relevance_sum"]
            for j, i in enumerate(indices):
                writer.writerow(
                    [
                        int(i),
                        inputs.names[i],
                        path.name,
                        int(targets[j]),
                        f"{float(scores[j]):.6g}",
                        f"{float(sums[j]):.6g}",
                        str(pngs[j].relative_to(out)) if pngs else "",
                    ]
                )
    print(f"explained {n} inputs in {n_shards} shards ({done} reused) -> {index_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``jlrp demo``."""
    try:
        import sklearn  # noqa: F401
    except ImportError as err:
        raise CLIError('the demo needs scikit-learn and Pillow: pip install "jlrp[demo]"') from err
    from jlrp.demo import run_demo

    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}")
    try:
        run_demo(
            args.out,
            seed=args.seed,
            epochs=args.epochs,
            n_explain=args.n_explain,
            progress=not args.no_progress,
        )
    except ValueError as err:
        if str(err).startswith("--"):
            raise CLIError(str(err)) from err
        raise
    return 0


# --------------------------------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (with a pointer to --help), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``jlrp`` argument parser with its ``demo`` and ``explain`` subcommands."""
    from jlrp import __version__

    parser = _Parser(
        prog="jlrp",
        description="Layer-wise Relevance Propagation (LRP) for JAX and Flax, from the command line.",
        epilog="Run 'jlrp COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"jlrp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    common.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small CNN on scikit-learn's digits, explain it and compare methods (offline, ~1 min on CPU)",
        description=(
            "Train a small Flax CNN on scikit-learn's bundled handwritten digits, explain held-out images with "
            "LRP composites (EpsilonPlusFlat, EpsilonGammaBox, EpsilonAlpha2Beta1), Gradient, SmoothGrad, "
            "IntegratedGradients and a random baseline, and evaluate them with pixel flipping (MoRF/LeRF AUC, "
            "AOPC) and the conservation check. Writes heatmaps.png, metrics.csv, curves.csv, model.msgpack and "
            "inputs.npy to --out. Seeded: the same command gives the same numbers. Needs the demo extra: "
            'pip install "jlrp[demo]".'
        ),
    )
    demo.add_argument(
        "--out", default="jlrp-demo", metavar="DIR", help="output folder (default: ./jlrp-demo)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    demo.add_argument(
        "--n-explain",
        type=int,
        default=64,
        metavar="N",
        help="held-out images to explain and evaluate (default: 64)",
    )
    demo.set_defaults(func=cmd_demo)

    from jlrp import composites

    explain = sub.add_parser(
        "explain",
        parents=[common],
        help="explain your own Flax model on a folder of images or an array",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compute relevance for your own flax.linen or flax.nnx model and write it to --out:\n"
            "  relevance-NNNNN.npz  one shard per --batch-size inputs (relevance, output, target, index, ...)\n"
            "  heatmaps/*.png       one heatmap per image input (relevance summed over channels)\n"
            "  index.csv            one row per input: source, shard, target, score, relevance sum, heatmap\n"
            "  run.json             the settings\n"
            "Interrupted runs resume: rerun the same command and complete shards are skipped. Every file is\n"
            "written under a temporary name and renamed into place, so none is ever half-written."
        ),
        epilog=(
            "example:\n"
            "  jlrp explain --model mypkg.models:make_net --variables net.msgpack --inputs images/ \\\n"
            "      --composite epsilon_gamma_box --composite-arg low=0 --composite-arg high=1 --out relevance/"
        ),
    )
    explain.add_argument(
        "--model",
        required=True,
        metavar="PKG.MODULE:ATTR",
        help="the model: a linen/NNX module instance, module class or zero-argument factory, imported from "
        "PKG.MODULE (the current folder is on the import path)",
    )
    explain.add_argument(
        "--variables",
        metavar="FILE",
        help="the model's variables: a Flax msgpack file (flax.serialization.to_bytes) or an .npz of a "
        "flattened dict with '/'-joined keys (required for linen; optional for NNX, which holds its own)",
    )
    explain.add_argument(
        "--inputs",
        required=True,
        metavar="PATH",
        help="a folder of PNG/JPEG images (scaled to [0, 1], NHWC) or an .npy/.npz array with the batch on "
        "axis 0 (uint8 is scaled to [0, 1], floats are used as they are)",
    )
    explain.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        help="image folders: force greyscale (1) or RGB (3) (default: from the files)",
    )
    explain.add_argument(
        "--composite",
        metavar="NAME",
        help=f"LRP composite: {', '.join(composites.COMPOSITES)}, or none to run the attributor on the "
        f"unmodified model (default: {DEFAULT_COMPOSITE}; none for occlusion)",
    )
    explain.add_argument(
        "--composite-arg",
        action="append",
        metavar="KEY=VALUE",
        help="composite argument, repeatable, e.g. --composite-arg low=0 --composite-arg high=1 (epsilon_gamma_box)",
    )
    explain.add_argument(
        "--attributor",
        choices=ATTRIBUTORS,
        default="gradient",
        help="attribution method (default: gradient = plain LRP)",
    )
    explain.add_argument(
        "--attributor-arg",
        action="append",
        metavar="KEY=VALUE",
        help="attributor argument, repeatable, e.g. --attributor-arg n_iter=32 (smoothgrad, integrated_gradients)",
    )
    explain.add_argument(
        "--target",
        default="pred",
        metavar="pred|CLASS|FILE.npy",
        help="class to explain: pred (the predicted class, default), a class index, or an .npy of one index per input",
    )
    explain.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="inputs per shard (default: 32)"
    )
    explain.add_argument(
        "--out", default="jlrp-explain", metavar="DIR", help="output folder (default: ./jlrp-explain)"
    )
    explain.add_argument(
        "--cmap", default="bwr", help="heatmap colour map: a name or a colour-map source (default: bwr)"
    )
    explain.add_argument("--level", type=float, default=1.0, help="heatmap palette contrast (default: 1.0)")
    explain.add_argument("--seed", type=int, default=0, help="seed of SmoothGrad's noise (default: 0)")
    explain.set_defaults(func=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jlrp`` command; returns the exit status.

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

    prog = f"jlrp {args.command}"
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
            f"{prog}: error: {type(err).__name__}: {' '.join(_short(err).split())} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
