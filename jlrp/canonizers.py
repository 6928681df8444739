"""Canonizers: rewrite a model into an equivalent form on which LRP rules are well defined.

A canonizer is a stage the front ends run generically: before an explained forward,
:meth:`Canonizer.rewrites` looks at an abstract view of the model call
(:class:`jlrp.frontends.base.ModelView`: every module call in execution order, plus an exact
"is this output used by anything else?" test) and returns ``{module path: rewrite}``:

- :class:`Identity`: the module's call returns its input (e.g. a BatchNorm folded into a neighbour);
- :class:`ParamRewrite`: the module is evaluated with rewritten parameters (and, if needed, a
  wrapped pure apply), e.g. a linear layer with a BatchNorm folded into its kernel and bias;
- :class:`Note`: nothing is rewritten, but the layer's record (and :func:`jlrp.audit`) says why.

Rewrites happen at trace time on the variables the model is called with; the user's variables are
never modified, and the explained forward equals the model's forward (to float rounding).

:class:`MergeBatchNorm` is the implementation the named composites use by default.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from .errors import CanonizerError
from .frontends.calls import Tap, inference_mode, with_bias

__all__ = [
    "Canonizer",
    "Identity",
    "ParamRewrite",
    "Note",
    "MergeBatchNorm",
    "merge_batchnorm",
    "merge_batchnorm_before",
]

LayerFn = Callable[[Any, Any, Any], Any]
Variables = Callable[[str], Mapping[str, Mapping[str, Any]]]


# --------------------------------------------------------------------------------------------
# the interface


@dataclasses.dataclass(frozen=True)
class Identity:
    """The module's call returns its input unchanged (its effect was folded elsewhere)."""

    note: str = ""


@dataclasses.dataclass(frozen=True)
class Note:
    """No rewrite; ``note`` says why (shown in the layer's record and by :func:`jlrp.audit`)."""

    note: str = ""


@dataclasses.dataclass(frozen=True)
class ParamRewrite(abc.ABC):
    """The module is evaluated with rewritten parameters."""

    note: str = ""

    @abc.abstractmethod
    def apply(
        self, params: dict[str, Any], layer_fn: LayerFn, variables: Variables
    ) -> tuple[dict[str, Any], LayerFn]:
        """Rewrite ``(params, layer_fn)`` of the module's pure apply ``layer_fn(params, x, state)``.

        Args:
            params: the module's parameters as a plain dict (values of the current trace).
            layer_fn: the module's pure apply.
            variables: ``variables(path) -> {collection: {name: value}}`` of any module of the model.
        """


class Canonizer(abc.ABC):
    """Base class of canonizers: frozen dataclasses holding only their options.

    Front ends call :meth:`rewrites` once per explained forward and apply the result; a new canonizer
    needs no front-end change.
    """

    @abc.abstractmethod
    def rewrites(self, view: Any) -> Mapping[str, Identity | ParamRewrite | Note]:
        """Plan the rewrites of one model call.

        Args:
            view: a :class:`jlrp.frontends.base.ModelView` of the call. ``view.collections`` is cheap;
                ``view.calls`` costs one abstract pass over the model (shared by all canonizers);
                ``view.exclusive(taps)`` costs one more.

        Returns:
            ``{module path: rewrite}``.
        """


# --------------------------------------------------------------------------------------------
# BatchNorm merging maths


def _scale_shift(
    bn_params: Mapping[str, Any], bn_stats: Mapping[str, Any], epsilon: float
) -> tuple[Any, Any]:
    """``BatchNorm(x) = x * s + t`` with ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``."""
    mean = jnp.asarray(bn_stats["mean"])
    var = jnp.asarray(bn_stats["var"])
    scale = bn_params.get("scale")
    s = (1.0 if scale is None else jnp.asarray(scale)) / jnp.sqrt(var + epsilon)
    beta = bn_params.get("bias")
    return s, (0.0 if beta is None else jnp.asarray(beta)) - mean * s


def merge_batchnorm(
    layer_params: Mapping[str, Any],
    bn_params: Mapping[str, Any],
    bn_stats: Mapping[str, Any],
    epsilon: float,
) -> dict[str, Any]:
    """Fold a BatchNorm over the last axis into the *preceding* linear layer (kernel's output axis last).

    Args:
        layer_params: ``{'kernel': W}`` or ``{'kernel': W, 'bias': b}``.
        bn_params: the BatchNorm's ``{'scale': gamma, 'bias': beta}`` (either may be missing).
        bn_stats: ``{'mean': mu, 'var': sigma2}``.
        epsilon: the BatchNorm's epsilon.

    Returns:
        ``{'kernel': W * s, 'bias': (b - mu) * s + beta}`` with ``s = gamma / sqrt(sigma2 + epsilon)``.
    """
    kernel = jnp.asarray(layer_params["kernel"])
    s, t = _scale_shift(bn_params, bn_stats, epsilon)
    bias = layer_params.get("bias")
    bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if bias is None else jnp.asarray(bias)
    new_bias = bias * s + t
    return {"kernel": (kernel * s).astype(kernel.dtype), "bias": new_bias.astype(kernel.dtype)}


def merge_batchnorm_before(
    layer_params: Mapping[str, Any],
    bn_params: Mapping[str, Any],
    bn_stats: Mapping[str, Any],
    epsilon: float,
    groups: int = 1,
) -> dict[str, Any]:
    """Fold a BatchNorm over the last axis into the *following* Dense or 'VALID' convolution.

    With ``BatchNorm(x) = x * s + t`` per input channel and a kernel ``W[..., j, o]`` (input channel
    ``j`` of the group of output ``o``; ``groups`` = ``feature_group_count``):
    ``W'[..., j, o] = s[c] W[..., j, o]`` and ``b'[o] = b[o] + sum_{..., j} t[c] W[..., j, o]`` with
    ``c = group(o) * (C / groups) + j``. Exact for a Dense layer and for a convolution *without*
    padding (and without input dilation): with zero padding, the border windows would see ``0``
    where the original saw the BatchNorm of ``0`` (that is, ``t``), so such layers are not merged.
    """
    kernel = jnp.asarray(layer_params["kernel"])
    s, t = _scale_shift(bn_params, bn_stats, epsilon)
    s = jnp.broadcast_to(s, jnp.shape(bn_stats["mean"]))
    t = jnp.broadcast_to(t, jnp.shape(bn_stats["mean"]))
    out = kernel.shape[-1]
    per_group = kernel.shape[-2]
    group_of = np.arange(out) // (out // groups)
    s_mat = s.reshape(groups, per_group)[group_of].T  # (per_group, out)
    t_mat = t.reshape(groups, per_group)[group_of].T
    bias = layer_params.get("bias")
    bias = jnp.zeros(out, kernel.dtype) if bias is None else jnp.asarray(bias)
    new_bias = bias + jnp.sum(kernel * t_mat, axis=tuple(range(kernel.ndim - 1)))
    return {"kernel": (kernel * s_mat).astype(kernel.dtype), "bias": new_bias.astype(kernel.dtype)}


def _with_bias(layer_fn: LayerFn, has_bias: bool) -> LayerFn:

    return with_bias(layer_fn, has_bias)


@dataclasses.dataclass(frozen=True)
class _MergeInto(ParamRewrite):
    """Fold the BatchNorm at ``bn_path`` into this layer (after it or, ``before=True``, before it)."""

    bn_path: str = ""
    epsilon: float = 0.0
    before: bool = False
    groups: int = 1

    def apply(self, params, layer_fn, variables):
        bn = variables(self.bn_path)
        bn_params, bn_stats = bn.get("params", {}), bn["batch_stats"]
        layer_fn = _with_bias(layer_fn, "bias" in params)
        if self.before:
            return merge_batchnorm_before(params, bn_params, bn_stats, self.epsilon, self.groups), layer_fn
        return merge_batchnorm(params, bn_params, bn_stats, self.epsilon), layer_fn


# --------------------------------------------------------------------------------------------
# which layers qualify


def _class_of(module: Any) -> type:
    """The user's class of a module (the NNX front end's rule-carrying subclasses are looked through)."""
    return vars(type(module)).get("_jlrp_original_class", type(module))


def _plain(module: Any, classes: tuple[type, ...]) -> bool:
    """Whether the module is exactly one of the Flax classes (a subclass may change the computation)."""
    return _class_of(module) in classes


def _after_types() -> tuple[type, ...]:
    from flax import linen as nn
    from flax import nnx

    return (
        nn.Dense,
        nn.DenseGeneral,
        nn.Conv,
        nn.ConvTranspose,
        nn.ConvLocal,
        nnx.Linear,
        nnx.LinearGeneral,
        nnx.Conv,
        nnx.ConvTranspose,
    )


def _dense_types() -> tuple[type, ...]:
    from flax import linen as nn
    from flax import nnx

    return (nn.Dense, nnx.Linear)


def _conv_types() -> tuple[type, ...]:
    from flax import linen as nn
    from flax import nnx

    return (nn.Conv, nnx.Conv)


def _no_padding(padding: Any) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "VALID"
    if isinstance(padding, int):
        return padding == 0
    try:
        return all(
            int(v) == 0 for pair in padding for v in (pair if isinstance(pair, (tuple, list)) else (pair,))
        )
    except TypeError:
        return False


def _unit(value: Any) -> bool:
    return value is None or all(int(v) == 1 for v in np.atleast_1d(value))


def _before_ok(module: Any, linear: Any = None) -> tuple[bool, str]:
    """Whether a BatchNorm can be folded into this *following* layer exactly (and why not).

    ``linear``: the :class:`~jlrp.frontends.linear.LinearCall` of a layer that is not a plain Flax class.
    """
    if linear is not None and not _plain(module, _after_types()):
        if linear.before_ok:
            return True, ""
        return False, (
            f"the layer after it ({type(module).__name__}) pads or dilates its input, or its kernel is not "
            "laid out as (..., in, out)"
        )
    if _plain(module, _dense_types()):
        return True, ""
    if _plain(module, _conv_types()):
        if getattr(module, "mask", None) is not None or not _unit(getattr(module, "input_dilation", None)):
            return False, "the convolution after it is masked or input-dilated"
        if not _no_padding(getattr(module, "padding", "SAME")):
            return False, (
                "the convolution after it pads its input with zeros, where the BatchNorm would have given "
                "its shift (only padding='VALID' convolutions take a BatchNorm in front exactly)"
            )
        return True, ""
    return False, f"the layer after it ({type(module).__name__}) is not a Dense or Conv layer"


def _is_linear(call: Any) -> bool:
    """A call of a Flax linear layer, or of a module recognised by its computation as one."""
    from . import types as _types

    return isinstance(call.module, _types.Linear) or getattr(call, "linear", None) is not None


# --------------------------------------------------------------------------------------------
# MergeBatchNorm


@dataclasses.dataclass(frozen=True)
class MergeBatchNorm(Canonizer):
    """Fold inference-mode BatchNorms into an adjacent linear layer, only where that is exact.

    After a layer (``BN(layer(x))``, VGG/ResNet): with ``s = scale / sqrt(var + epsilon)`` the merged
    layer has kernel ``W * s`` (output axis) and bias ``(b - mean) * s + beta``. Before a layer
    (``layer(BN(x))``, pre-activation ResNets): see :func:`merge_batchnorm_before`; only for Dense
    layers and convolutions with ``padding='VALID'``. The BatchNorm becomes the identity.

    A pair is merged only if the result is the same function: the first module's output is used by
    nothing but the second (an output that is also used elsewhere, e.g. ``BN(h) + h``, is not merged),
    every call of the linear layer is paired with that BatchNorm and every call of the BatchNorm with
    that layer, the BatchNorm normalises the last axis, and the layer is a plain Flax ``Dense``/``Conv``
    or a module (a subclass or a third-party layer) whose traced call is one contraction with its
    (possibly computed) kernel over the kernel's last axis plus a per-channel bias
    (:class:`jlrp.frontends.linear.LinearCall`; a computed kernel is merged in its effective form).
    Stacked statistics (a BatchNorm scanned or vmapped over layers) are not merged. Everything else is left alone, with a
    note in the layer record and in :func:`jlrp.audit` saying why; an unmerged BatchNorm keeps the
    composite's rule.

    BatchNorms are recognised as instances of :data:`jlrp.types.BatchNorm` (Flax's ``BatchNorm``
    and subclasses) or of ``batchnorm_types``: register your own copies in one line,
    ``MergeBatchNorm(batchnorm_types=(MyBatchNorm,))``. A registered module must keep ``mean``
    and ``var`` in the ``batch_stats`` collection (``nnx.BatchStat``), with optional ``scale`` and
    ``bias`` parameters and an ``epsilon`` attribute; its inference mode is read from its own flag
    (``use_running_average``, ``deterministic``, ``training``, ``train`` or ``is_training``, as an
    argument of the call or an attribute). A BatchNorm in training mode raises
    :class:`~jlrp.errors.CanonizerError`.

    Attributes:
        batchnorm_types: further classes to treat as BatchNorm.
    """

    batchnorm_types: tuple[type, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "batchnorm_types", tuple(self.batchnorm_types))

    def is_batchnorm(self, module: Any) -> bool:
        """Whether ``module`` is treated as a BatchNorm."""
        from . import types as _types

        return isinstance(module, _types.BatchNorm + self.batchnorm_types)

    def rewrites(self, view):

        if "batch_stats" not in view.collections:
            return {}
        calls = view.calls
        if not any(self.is_batchnorm(c.module) for c in calls):
            return {}
        by_path: dict[str, list[Any]] = {}
        for c in calls:
            by_path.setdefault(c.path, []).append(c)
        producers = {c.output_id: c for c in calls if _is_linear(c)}
        consumers: dict[int, list[Any]] = {}
        for c in calls:
            consumers.setdefault(c.input_id, []).append(c)
        out: dict[str, Any] = {}
        candidates: list[tuple[str, str, bool, list[Tap], Any]] = []
        claimed: set[str] = set()
        for bn_path, bn_calls in by_path.items():
            bn = bn_calls[0].module
            if not self.is_batchnorm(bn):
                continue
            sources = [producers.get(c.input_id) for c in bn_calls]
            sinks = [[d for d in consumers.get(c.output_id, []) if _is_linear(d)] for c in bn_calls]
            after = all(s is not None for s in sources) and len({s.path for s in sources}) == 1
            before = not after and all(len(s) == 1 for s in sinks) and len({s[0].path for s in sinks}) == 1
            if not (after or before):
                if any(s is not None for s in sources):
                    out[bn_path] = Note(
                        "not merged: its input does not always come from the same linear layer"
                    )
                continue
            for c in bn_calls:
                if inference_mode(c.module, c.call_fn, c.args, dict(c.kwargs)) is False:
                    raise CanonizerError(
                        f"MergeBatchNorm: the BatchNorm '{bn_path}' runs in training mode, so its statistics "
                        "are not constants and cannot be merged. Explain the model in inference mode "
                        "(train=False for linen, model.eval() for NNX), or pass canonizers=() to the composite."
                    )
            partners = sources if after else [s[0] for s in sinks]
            layer_path = partners[0].path
            why = self._refusal(view, bn_path, bn, bn_calls[0], partners[0], after)
            if why:
                out[bn_path] = Note(f"not merged: {why}")
                continue
            if {p.index for p in partners} != set(range(len(by_path[layer_path]))) or len(partners) != len(
                by_path[layer_path]
            ):
                out[bn_path] = Note(f"not merged: '{layer_path}' is also called without this BatchNorm")
                continue
            if layer_path in claimed:
                out[bn_path] = Note(f"not merged: '{layer_path}' already takes another BatchNorm")
                continue
            claimed.add(layer_path)
            taps = (
                [Tap(layer_path, p.index, bn_path) for p in partners]
                if after
                else [Tap(bn_path, c.index, layer_path) for c in bn_calls]
            )
            candidates.append((bn_path, layer_path, after, taps, bn))
        exclusive = iter(view.exclusive([t for cand in candidates for t in cand[3]]))
        for bn_path, layer_path, after, taps, bn in candidates:
            if not all([next(exclusive) for _ in taps]):
                first = layer_path if after else bn_path
                second = bn_path if after else layer_path
                out[bn_path] = Note(f"not merged: the output of '{first}' is used by more than '{second}'")
                continue
            epsilon = float(bn.epsilon)
            first = by_path[layer_path][0]
            groups = first.linear.groups if first.linear is not None else None
            groups = int(groups or getattr(first.module, "feature_group_count", 1) or 1)
            where = "merged into" if after else "merged into the following"
            out[bn_path] = Identity(f"{where} '{layer_path}'")
            rewrite = _MergeInto(f"BatchNorm '{bn_path}' merged in", bn_path, epsilon, not after, groups)
            out[layer_path] = rewrite
        return out

    def _refusal(self, view: Any, bn_path: str, bn: Any, call: Any, partner: Any, after: bool) -> str:
        """Why this BatchNorm cannot be merged with the layer of call ``partner`` ('' if it can)."""
        layer, linear = partner.module, partner.linear
        if after and not (_plain(layer, _after_types()) or (linear is not None and linear.canonical)):
            return (
                f"'{type(layer).__name__}' before it is not a plain Flax Dense/Conv layer, nor a layer whose "
                "call is one contraction with its kernel over the last axis plus a per-channel bias"
            )
        if not after:
            ok, why = _before_ok(layer, linear)
            if not ok:
                return why
        epsilon = getattr(bn, "epsilon", None)
        if not isinstance(epsilon, (int, float)):
            return "it has no numeric 'epsilon' attribute"
        ndim = len(np.shape(call.input))
        axis = getattr(bn, "axis", -1)
        if not isinstance(axis, int) or axis not in (-1, ndim - 1):
            return f"it normalises axis {axis}, not the last axis"
        stats = view.variables(bn_path).get("batch_stats", {})
        channels = np.shape(call.input)[-1] if ndim else None
        shapes = {np.shape(v) for v in stats.values()}
        if len(shapes) == 1 and len(next(iter(shapes))) > 1 and next(iter(shapes))[-1:] == (channels,):
            return (
                f"its statistics are stacked, shape {next(iter(shapes))}: one BatchNorm per layer of an "
                "nnx.scan / nnx.vmap (or nn.scan) over layers; per-layer merging is not supported, so it "
                "stays a BatchNorm with the composite's rule for BatchNorm"
            )
        if set(stats) != {"mean", "var"} or any(np.shape(stats[k]) != (channels,) for k in stats):
            return "its 'batch_stats' are not one 'mean' and one 'var' per channel"
        return ""
