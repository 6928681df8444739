"""Canonizers: rewrite a model into an equivalent form on which LRP rules are well defined.

:class:`MergeBatchNorm` folds every inference-mode BatchNorm that directly follows a linear layer
(Dense/Conv, the BatchNorm's input *is* that layer's output) into the layer's kernel and bias, and
turns the BatchNorm into the identity. It happens at trace time on the variables the model is
called with; the user's variables are never modified. The merge maths (:func:`merge_batchnorm`)
works on plain parameter dicts and is shared by the linen and NNX front ends.

Limitations: the linear layer's output must feed only the BatchNorm (as in every VGG/ResNet);
a BatchNorm over an axis other than the last, or in training mode, is not merged (in training mode
merging raises, since the batch statistics are not constants).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from .errors import CanonizerError

__all__ = ["Canonizer", "MergeBatchNorm", "merge_batchnorm", "BatchNormPairing"]


class Canonizer:
    """Base class of canonizers (frozen dataclasses; front ends recognise each kind)."""


@dataclasses.dataclass(frozen=True)
class MergeBatchNorm(Canonizer):
    """Merge inference-mode BatchNorms into the preceding linear layer (zennit's ``MergeBatchNorm``).

    With ``s = scale / sqrt(var + epsilon)`` the merged layer has kernel ``W * s`` (scaled along the
    output axis) and bias ``(b - mean) * s + beta``; its output equals ``BatchNorm(layer(x))`` to
    float rounding. The named composites include it by default.
    """


def merge_batchnorm(
    layer_params: Mapping[str, Any],
    bn_params: Mapping[str, Any],
    bn_stats: Mapping[str, Any],
    epsilon: float,
) -> dict[str, Any]:
    """Fold a BatchNorm over the last axis into a linear layer's ``kernel`` (output axis last) and bias.

    Args:
        layer_params: ``{'kernel': W}`` or ``{'kernel': W, 'bias': b}``.
        bn_params: the BatchNorm's ``{'scale': gamma, 'bias': beta}`` (either may be missing).
        bn_stats: ``{'mean': mu, 'var': sigma2}``.
        epsilon: the BatchNorm's epsilon.

    Returns:
        ``{'kernel': W * s, 'bias': (b - mu) * s + beta}`` with ``s = gamma / sqrt(sigma2 + epsilon)``.
    """
    kernel = jnp.asarray(layer_params["kernel"])
    mean = jnp.asarray(bn_stats["mean"])
    var = jnp.asarray(bn_stats["var"])
    dtype = jnp.result_type(kernel, mean)
    scale = bn_params.get("scale")
    s = (1.0 if scale is None else jnp.asarray(scale)) / jnp.sqrt(var + epsilon)
    bias = layer_params.get("bias")
    bias = jnp.zeros(kernel.shape[-1], dtype) if bias is None else jnp.asarray(bias)
    beta = bn_params.get("bias")
    new_bias = (bias - mean) * s + (0.0 if beta is None else jnp.asarray(beta))
    return {"kernel": (kernel * s).astype(kernel.dtype), "bias": new_bias.astype(kernel.dtype)}


def has_merge_batchnorm(canonizers: Any) -> bool:
    """Whether a composite's canonizers ask for BatchNorm merging."""
    return any(isinstance(c, MergeBatchNorm) for c in canonizers)


class BatchNormPairing:
    """Finds, during one abstract forward pass, the BatchNorms whose input *is* a linear layer's output.

    Front ends call :meth:`before` when a module is entered and :meth:`after` with its output; the
    result is :attr:`pairs`, ``{linear layer path: (BatchNorm path, epsilon)}``. Shared by the linen and
    NNX front ends.
    """

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[str, Any]] = {}
        self.pairs: dict[str, tuple[str, float]] = {}

    def before(self, module: Any, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Record a BatchNorm call whose input came straight from a linear layer.

        Raises:
            CanonizerError: if that BatchNorm runs in training mode (its statistics are not constants).
        """
        from . import types as _types

        if not (isinstance(module, _types.BatchNorm) and args and id(args[0]) in self.outputs):
            return
        value = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        if not (module.use_running_average if value is None else value):
            raise CanonizerError(
                f"MergeBatchNorm: the BatchNorm '{path}' runs in training mode (use_running_average=False), "
                "so its statistics are not constants and cannot be merged. Explain the model in inference "
                "mode (train=False for linen, model.eval() for NNX), or pass canonizers=() to the composite."
            )
        if module.axis in (-1, args[0].ndim - 1):
            self.pairs[self.outputs[id(args[0])][0]] = (path, float(module.epsilon))

    def after(self, module: Any, path: str, output: Any) -> None:
        """Remember a linear layer's output (kept alive, so ids stay unique during the pass)."""
        from . import types as _types

        if isinstance(module, _types.Linear):
            self.outputs[id(output)] = (path, output)
