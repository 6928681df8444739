"""Composites: immutable data that say which rule goes on which layer.

A composite maps ``(path, module)`` to a rule (or ``None``: the layer keeps its gradient). Paths are
Flax module paths joined by ``'/'`` (``'features/Conv_0'``); function-level ops get
``'<module path>/@<kind>_<n>'`` (``'layer1_0/@add_0'``). Path entries are globs where ``*`` and ``?``
stay within one path segment and ``**`` spans segments; wildcards skip ``@`` segments unless the
pattern spells the ``@`` (``'block/*'``: the modules in ``block``; ``'block/@*'``: its ops). The root
module (path ``''``) is matched only by the pattern ``''``. Within a map the first matching entry
wins; in the named presets the user's ``layer_map`` entries come before the base map. The "first
layer" of :class:`SpecialFirstLayerMapComposite` is the first module *in execution order* whose
type matches ``first_map``.

Composites are frozen dataclasses (hashable, usable as static arguments). The per-trace state that
matching needs (which layer came first, which entries matched) lives in a fresh :class:`Resolver`
made for every trace.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from . import types as _types
from .canonizers import MergeBatchNorm
from .core import Rule, _hashable
from .errors import CompositeError, UsageTypeError
from .rules import (
    AHRule,
    AlphaBeta,
    Epsilon,
    Flat,
    Gamma,
    Norm,
    Pass,
    ReLUBetaSmooth,
    ReLUDeconvNet,
    ReLUGuidedBackprop,
    Softmax,
    Uniform,
    UniformEpsilon,
    ZBox,
    ZPlus,
)

__all__ = [
    "Composite",
    "Resolver",
    "LayerMapComposite",
    "SpecialFirstLayerMapComposite",
    "NameMapComposite",
    "MixedComposite",
    "NameLayerMapComposite",
    "EpsilonGammaBox",
    "EpsilonPlus",
    "EpsilonAlpha2Beta1",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1Flat",
    "GuidedBackprop",
    "DeconvNet",
    "ExcitationBackprop",
    "BetaSmooth",
    "AttnLRP",
    "CPLRP",
    "COMPOSITES",
    "register_composite",
    "layer_map_base",
    "get",
    "as_composite",
]

TypeKey = type | tuple[type, ...]
NameKey = str | tuple[str, ...]


# --------------------------------------------------------------------------------------------
# matching


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``*``/``?`` match within one ``/``-separated segment, ``**`` across segments
    (``'**/x'`` also matches ``'x'`` itself, as in shells and ``.gitignore``).

    Like dotfiles in a shell, segments of function-level ops (``'block/@add_0'``) are matched by a
    wildcard only where the pattern itself spells the ``@``: ``'block/*'`` matches the modules of
    ``block``, ``'block/@*'`` its ops.
    """
    out, i = [], 0
    while i < len(pattern):
        at_segment_start = i == 0 or pattern[i - 1] == "/"
        if pattern.startswith("**/", i) and at_segment_start:  # any number of segments, none included
            out.append(r"(?:[^/@][^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r"(?:[^/@][^/]*(?:/[^/@][^/]*)*)?")
            i += 2
        elif pattern[i] in "*?":
            out.append(("(?!@)" if at_segment_start else "") + ("[^/]*" if pattern[i] == "*" else "[^/]"))
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _as_type_key(key: Any) -> tuple[type, ...]:
    items = key if isinstance(key, tuple) else (key,)
    for item in items:
        if not isinstance(item, type):
            raise UsageTypeError(f"layer-map keys must be classes or tuples of classes, got {item!r}")
    return tuple(items)


def _as_name_key(key: Any) -> tuple[str, ...]:
    items = (key,) if isinstance(key, str) else tuple(key)
    for item in items:
        if not isinstance(item, str):
            raise UsageTypeError(f"name-map keys must be path globs (str) or tuples of them, got {item!r}")
    return items


def _as_pairs(entries: Any) -> tuple[tuple[Any, Any], ...]:
    if isinstance(entries, Mapping):
        entries = entries.items()
    pairs = []
    for entry in entries:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise UsageTypeError(f"map entries must be (key, rule) pairs, got {entry!r}")
        key, rule = entry
        if rule is not None and not isinstance(rule, Rule):
            raise UsageTypeError(
                f"the entry for {key!r} maps to {rule!r}, which is not a jlrp rule (or None)"
            )
        pairs.append((tuple(key) if isinstance(key, list) else key, rule))
    return tuple(pairs)


def _type_name(key: tuple[type, ...]) -> str:
    return "(" + ", ".join(f"{t.__module__.split('.')[0]}.{t.__qualname__}" for t in key) + ")"


# --------------------------------------------------------------------------------------------
# resolvers (mutable, one per trace)


def _matches(module: Any, key: tuple[type, ...], like: type | None) -> bool:
    """A type key matches an instance of its classes, or a module that computes like ``like`` does."""
    return isinstance(module, key) or (like is not None and issubclass(like, key))


class Resolver:
    """Per-trace matcher: the front end asks :meth:`rule_for` for every module call in execution order."""

    def rule_for(self, path: str, module: Any, like: type | None = None) -> Rule | None:
        """The rule for the module at ``path`` (``None``: ordinary gradient).

        ``like``: a Flax class the module computes like (a third-party convolution recognised by its
        computation passes ``nn.Conv``); type keys that match ``like`` match the module as well.
        """
        raise NotImplementedError

    def unmatched(self) -> list[str]:
        """Descriptions of entries that must match a module but matched none (path entries)."""
        return []


class _MapResolver(Resolver):
    def __init__(
        self,
        type_entries: Sequence[tuple[tuple[type, ...], Rule | None]] = (),
        name_entries: Sequence[tuple[tuple[str, ...], Rule | None]] = (),
    ):
        self.type_entries = type_entries
        self.name_entries = [(globs, [glob_to_regex(g) for g in globs], rule) for globs, rule in name_entries]
        self.matched: set[str] = set()

    def rule_for(self, path, module, like=None):
        found = False
        rule = None
        for globs, regexes, entry_rule in self.name_entries:
            for glob, regex in zip(globs, regexes):
                if regex.match(path) and (path or not glob):  # the root only by the empty pattern
                    self.matched.add(glob)
                    if not found:
                        found, rule = True, entry_rule
        if found:
            return rule
        for key, entry_rule in self.type_entries:
            if _matches(module, key, like):
                return entry_rule
        return None

    def unmatched(self):
        return [glob for globs, _, _ in self.name_entries for glob in globs if glob not in self.matched]


class _FirstResolver(Resolver):
    def __init__(self, layer: Resolver, first_map: Sequence[tuple[tuple[type, ...], Rule | None]]):
        self.layer = layer
        self.first_map = first_map
        self.first_path: str | None = None

    def rule_for(self, path, module, like=None):
        rule = (
            self.layer.rule_for(path, module, like) if like is not None else self.layer.rule_for(path, module)
        )
        if self.first_path is None and any(_matches(module, key, like) for key, _ in self.first_map):
            self.first_path = path
        if path == self.first_path:
            for key, first_rule in self.first_map:
                if _matches(module, key, like):
                    return first_rule
        return rule

    def unmatched(self):
        return self.layer.unmatched()


class _MixedResolver(Resolver):
    def __init__(self, resolvers: Sequence[Resolver]):
        self.resolvers = resolvers

    def rule_for(self, path, module, like=None):
        # every resolver sees every module (their "first layer" state must not depend on each other)
        rules = [
            r.rule_for(path, module, like) if like is not None else r.rule_for(path, module)
            for r in self.resolvers
        ]
        return next((rule for rule in rules if rule is not None), None)

    def unmatched(self):
        return [u for r in self.resolvers for u in r.unmatched()]


# --------------------------------------------------------------------------------------------
# the five composite kinds


class Composite:
    """Base class of composites. Subclasses are frozen dataclasses with a ``canonizers`` field."""

    canonizers: tuple[Any, ...] = ()

    def resolver(self) -> Resolver:
        """A fresh per-trace :class:`Resolver`."""
        raise NotImplementedError

    # value equality and hashing that also work for array-valued fields (ZBox bounds)
    def _key(self) -> tuple[Any, ...]:
        return (type(self),) + tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())


def _freeze_canonizers(self: Any) -> None:
    value = self.canonizers
    object.__setattr__(self, "canonizers", () if value is None else tuple(value))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerMapComposite(Composite):
    """Rules by layer type: ``layer_map`` is a sequence (or dict) of ``(type or tuple of types, rule)``.

    Example: ``LayerMapComposite([(jlrp.types.Convolution, ZPlus()), (jlrp.types.Dense, Epsilon())])``.
    """

    layer_map: Any = ()
    canonizers: Any = ()

    def __post_init__(self) -> None:
        pairs = _as_pairs(self.layer_map)
        object.__setattr__(self, "layer_map", tuple((_as_type_key(k), r) for k, r in pairs))
        _freeze_canonizers(self)

    def resolver(self) -> Resolver:
        return _MapResolver(type_entries=self.layer_map)


@dataclasses.dataclass(frozen=True, eq=False)
class SpecialFirstLayerMapComposite(LayerMapComposite):
    """A :class:`LayerMapComposite` whose ``first_map`` applies to the first matching layer.

    "First" is execution order: the first module called in the forward pass whose type matches a
    ``first_map`` key (typically the input layer) gets the ``first_map`` rule at every call.
    """

    first_map: Any = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        pairs = _as_pairs(self.first_map)
        object.__setattr__(self, "first_map", tuple((_as_type_key(k), r) for k, r in pairs))

    def resolver(self) -> Resolver:
        return _FirstResolver(super().resolver(), self.first_map)


@dataclasses.dataclass(frozen=True, eq=False)
class NameMapComposite(Composite):
    """Rules by module path: ``name_map`` is a sequence (or dict) of ``(glob or tuple of globs, rule)``.

    Example: ``NameMapComposite([(('features/Conv_0',), ZBox(-3., 3.)), ('classifier/*', Epsilon())])``.
    Every glob must match at least one module path, otherwise explaining raises
    :class:`~jlrp.errors.CompositeError` listing the paths that exist.
    """

    name_map: Any = ()
    canonizers: Any = ()

    def __post_init__(self) -> None:
        pairs = _as_pairs(self.name_map)
        object.__setattr__(self, "name_map", tuple((_as_name_key(k), r) for k, r in pairs))
        _freeze_canonizers(self)

    def resolver(self) -> Resolver:
        return _MapResolver(name_entries=self.name_map)


@dataclasses.dataclass(frozen=True, eq=False)
class MixedComposite(Composite):
    """Several composites; for each layer the first composite that gives a rule wins.

    The canonizers of all parts are applied (in order, duplicates once).
    """

    composites: Any = ()
    canonizers: Any = ()

    def __post_init__(self) -> None:
        composites = tuple(as_composite(c) for c in self.composites)
        object.__setattr__(self, "composites", composites)
        _freeze_canonizers(self)
        merged: list[Any] = list(self.canonizers)
        for composite in composites:
            merged.extend(c for c in composite.canonizers if c not in merged)
        object.__setattr__(self, "canonizers", tuple(merged))

    def resolver(self) -> Resolver:
        return _MixedResolver([c.resolver() for c in self.composites])


@dataclasses.dataclass(frozen=True, eq=False)
class NameLayerMapComposite(Composite):
    """Path entries first, then type entries: ``MixedComposite([NameMapComposite, LayerMapComposite])``."""

    name_map: Any = ()
    layer_map: Any = ()
    canonizers: Any = ()

    def __post_init__(self) -> None:
        names = NameMapComposite(self.name_map)
        layers = LayerMapComposite(self.layer_map)
        object.__setattr__(self, "name_map", names.name_map)
        object.__setattr__(self, "layer_map", layers.layer_map)
        _freeze_canonizers(self)

    def resolver(self) -> Resolver:
        return _MapResolver(type_entries=self.layer_map, name_entries=self.name_map)


# --------------------------------------------------------------------------------------------
# named presets (zennit's layer maps)


def layer_map_base(
    stabilizer: float | Callable[[Any], Any] = 1e-6,
) -> tuple[tuple[tuple[type, ...], Rule], ...]:
    """zennit's base map, plus jlrp's function-level ops.

    Activations (ReLU modules, ``nn.relu`` calls and every other element-wise non-linearity found in
    the trace) pass (AttnLRP's identity rule), the multiplicative interactions of transformers get
    AttnLRP's rules (softmax: :class:`~jlrp.rules.Softmax`; matmul of two activations:
    :class:`~jlrp.rules.UniformEpsilon`; element-wise product: :class:`~jlrp.rules.Uniform`), sums (residual adds, ``Sum`` modules), average pools (``nn.avg_pool``,
    ``jnp.mean``, ``AvgPool`` modules), element-wise affine maps and contractions with constant
    weights outside ruled modules get :class:`~jlrp.rules.Norm`, and an activation scaled by a
    constant (``x * 2``, ``x / 255``) passes its relevance unchanged.

    Difference from zennit: zennit's base map puts ``Pass`` on BatchNorm. Here a BatchNorm that the
    canonizers do not merge gets no module rule; its arithmetic is an element-wise affine op
    (:class:`jlrp.ops.Affine`) and gets ``Norm``, the Epsilon formula of a linear layer whose shift
    keeps its share (``R_x = x s R / (x s + b)``), and ``jlrp.audit`` says why it was not merged.
    """
    return (
        (_types.Activation, Pass()),
        (_types.Sum, Norm(stabilizer)),
        (_types.AvgPool, Norm(stabilizer)),
        (_types.Affine, Norm(stabilizer)),
        (_types.Contraction, Norm(stabilizer)),
        (_types.Scale, Pass()),
        (_types.Softmax, Softmax()),
        (_types.MatMul, UniformEpsilon(stabilizer)),
        (_types.Multiply, Uniform()),
    )


COMPOSITES: dict[str, type] = {}


def register_composite(name: str) -> Callable[[type], type]:
    """Class decorator adding a composite to :data:`COMPOSITES` under ``name``."""

    def register(cls: type) -> type:
        COMPOSITES[name] = cls
        return cls

    return register


class _Preset(Composite):
    """A named composite: its fields are hyper-parameters, :meth:`build` gives the generic composite.

    ``canonizers=None`` (the default) means ``(MergeBatchNorm(),)``: BatchNorms that follow a linear
    layer are merged into it, as zennit users do by hand; pass ``canonizers=()`` to switch it off.
    """

    def build(self) -> Composite:
        raise NotImplementedError

    def resolver(self) -> Resolver:
        return self.build().resolver()

    def __post_init__(self) -> None:
        if self.canonizers is None:  # the right thing by default: BatchNorms merged into their layers
            object.__setattr__(self, "canonizers", (MergeBatchNorm(),))
        _freeze_canonizers(self)
        object.__setattr__(self, "layer_map", LayerMapComposite(self.layer_map).layer_map)
        if hasattr(self, "first_map"):
            object.__setattr__(self, "first_map", LayerMapComposite(self.first_map).layer_map)


def _first_kwargs(preset: Any) -> dict[str, Any]:
    return {"stabilizer": preset.stabilizer, "zero_params": preset.zero_params}


@register_composite("epsilon_gamma_box")
@dataclasses.dataclass(frozen=True, eq=False)
class EpsilonGammaBox(_Preset):
    """ZBox on the first convolution, Gamma on the other convolutions, Epsilon on dense layers.

    Args:
        low: lowest input value (scalar or array broadcast to the input), for ZBox.
        high: highest input value, for ZBox.
        epsilon: Epsilon's epsilon.
        gamma: Gamma's gamma.
        stabilizer: stabilizer of the other rules.
        layer_map: extra ``(type, rule)`` entries, checked before the preset's.
        first_map: extra first-layer entries, checked before the preset's.
        zero_params: passed to every rule that takes it.
        canonizers: canonizers to apply (e.g. ``[MergeBatchNorm()]``).
    """

    low: Any
    high: Any
    epsilon: Any = 1e-6
    gamma: float = 0.25
    stabilizer: Any = 1e-6
    layer_map: Any = ()
    first_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def build(self) -> Composite:
        kw = _first_kwargs(self)
        return SpecialFirstLayerMapComposite(
            layer_map=self.layer_map
            + layer_map_base(self.stabilizer)
            + (
                (_types.Convolution, Gamma(gamma=self.gamma, **kw)),
                (_types.Dense, Epsilon(epsilon=self.epsilon, zero_params=self.zero_params)),
            ),
            first_map=self.first_map + ((_types.Convolution, ZBox(self.low, self.high, **kw)),),
        )


class _EpsilonConv(_Preset):
    """Epsilon on dense layers, :meth:`conv_rule` on convolutions, zennit's base map for the rest."""

    def conv_rule(self) -> Rule:
        raise NotImplementedError

    def build(self) -> Composite:
        return LayerMapComposite(
            self.layer_map
            + layer_map_base(self.stabilizer)
            + (
                (_types.Convolution, self.conv_rule()),
                (_types.Dense, Epsilon(epsilon=self.epsilon, zero_params=self.zero_params)),
            )
        )


@register_composite("epsilon_plus")
@dataclasses.dataclass(frozen=True, eq=False)
class EpsilonPlus(_EpsilonConv):
    """ZPlus on convolutions, Epsilon on dense layers.

    Args:
        epsilon: Epsilon's epsilon.
        stabilizer: ZPlus's stabilizer (and Norm's).
        layer_map: extra ``(type, rule)`` entries, checked before the preset's.
        zero_params: passed to every rule that takes it.
        canonizers: canonizers to apply (``None``: ``(MergeBatchNorm(),)``).
    """

    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def conv_rule(self) -> Rule:
        return ZPlus(**_first_kwargs(self))


@register_composite("epsilon_alpha2_beta1")
@dataclasses.dataclass(frozen=True, eq=False)
class EpsilonAlpha2Beta1(_EpsilonConv):
    """AlphaBeta(2, 1) on convolutions, Epsilon on dense layers (arguments as :class:`EpsilonPlus`)."""

    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def conv_rule(self) -> Rule:
        return AlphaBeta(2.0, 1.0, **_first_kwargs(self))


class _FlatFirst(_Preset):
    """The composite :attr:`base` with Flat on the first linear layer (convolution or dense)."""

    base: ClassVar[type[_EpsilonConv]]

    def build(self) -> Composite:
        base = self.base(self.epsilon, self.stabilizer, self.layer_map, self.zero_params).build()
        return SpecialFirstLayerMapComposite(
            layer_map=base.layer_map,
            first_map=self.first_map + ((_types.Linear, Flat(**_first_kwargs(self))),),
        )


@register_composite("epsilon_plus_flat")
@dataclasses.dataclass(frozen=True, eq=False)
class EpsilonPlusFlat(_FlatFirst):
    """:class:`EpsilonPlus` with Flat on the first linear layer (convolution or dense).

    Args:
        epsilon: Epsilon's epsilon.
        stabilizer: stabilizer of ZPlus, Flat and Norm.
        layer_map: extra ``(type, rule)`` entries, checked before the preset's.
        first_map: extra first-layer entries, checked before the preset's.
        zero_params: passed to every rule that takes it.
        canonizers: canonizers to apply (``None``: ``(MergeBatchNorm(),)``).
    """

    base: ClassVar[type[_EpsilonConv]] = EpsilonPlus
    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    layer_map: Any = ()
    first_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None


@register_composite("epsilon_alpha2_beta1_flat")
@dataclasses.dataclass(frozen=True, eq=False)
class EpsilonAlpha2Beta1Flat(_FlatFirst):
    """:class:`EpsilonAlpha2Beta1` with Flat on the first linear layer (arguments as :class:`EpsilonPlusFlat`)."""

    base: ClassVar[type[_EpsilonConv]] = EpsilonAlpha2Beta1
    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    layer_map: Any = ()
    first_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None


@register_composite("guided_backprop")
@dataclasses.dataclass(frozen=True, eq=False)
class GuidedBackprop(_Preset):
    """Guided backpropagation: every ReLU gets :class:`~jlrp.rules.ReLUGuidedBackprop`."""

    #: a modified gradient: layers and ops without a rule keep their gradient by design
    gradient_based: ClassVar[bool] = True

    layer_map: Any = ()
    canonizers: Any = None

    def build(self) -> Composite:
        return LayerMapComposite(self.layer_map + ((_types.ReLU, ReLUGuidedBackprop()),))


@register_composite("deconvnet")
@dataclasses.dataclass(frozen=True, eq=False)
class DeconvNet(_Preset):
    """DeconvNet: every ReLU gets :class:`~jlrp.rules.ReLUDeconvNet`."""

    #: a modified gradient: layers and ops without a rule keep their gradient by design
    gradient_based: ClassVar[bool] = True

    layer_map: Any = ()
    canonizers: Any = None

    def build(self) -> Composite:
        return LayerMapComposite(self.layer_map + ((_types.ReLU, ReLUDeconvNet()),))


@register_composite("excitation_backprop")
@dataclasses.dataclass(frozen=True, eq=False)
class ExcitationBackprop(_Preset):
    """Excitation backprop (Zhang et al. 2016): ZPlus on every linear layer, Norm on sums and pools."""

    stabilizer: Any = 1e-6
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def build(self) -> Composite:
        return LayerMapComposite(
            self.layer_map
            + (
                (_types.Sum, Norm(self.stabilizer)),
                (_types.AvgPool, Norm(self.stabilizer)),
                (_types.Affine, Norm(self.stabilizer)),
                (_types.Contraction, Norm(self.stabilizer)),
                (_types.Activation, Pass()),
                (_types.Scale, Pass()),
                (_types.Linear, ZPlus(**_first_kwargs(self))),
            )
        )


@register_composite("beta_smooth")
@dataclasses.dataclass(frozen=True, eq=False)
class BetaSmooth(_Preset):
    """Every ReLU's gradient replaced by that of a softplus with ``beta_smooth``."""

    #: a modified gradient: layers and ops without a rule keep their gradient by design
    gradient_based: ClassVar[bool] = True

    beta_smooth: float = 10.0
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def build(self) -> Composite:
        return LayerMapComposite(self.layer_map + ((_types.ReLU, ReLUBetaSmooth(self.beta_smooth)),))


class _Transformer(_Preset):
    """Epsilon (or Gamma) on linear layers, :meth:`softmax_rule` on softmaxes, the base map for the rest."""

    def softmax_rule(self) -> Rule:
        raise NotImplementedError

    def build(self) -> Composite:
        kw = _first_kwargs(self)
        epsilon = Epsilon(epsilon=self.epsilon, zero_params=self.zero_params)
        conv = epsilon if self.conv_gamma is None else Gamma(gamma=self.conv_gamma, **kw)
        dense = epsilon if self.dense_gamma is None else Gamma(gamma=self.dense_gamma, **kw)
        return LayerMapComposite(
            self.layer_map
            + ((_types.Softmax, self.softmax_rule()), (_types.MatMul, UniformEpsilon(self.epsilon)))
            + layer_map_base(self.stabilizer)
            + ((_types.Convolution, conv), (_types.Dense, dense))
        )


@register_composite("attn_lrp")
@dataclasses.dataclass(frozen=True, eq=False)
class AttnLRP(_Transformer):
    """AttnLRP (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for
    Transformers", ICML 2024) for transformers written in plain Flax.

    ========================================  ============================================================
    where                                     rule
    ========================================  ============================================================
    softmax (:data:`jlrp.types.Softmax`)      :class:`~jlrp.rules.Softmax` (Taylor decomposition at x)
    matmul of two activations (q k^T, p v)    :class:`~jlrp.rules.UniformEpsilon` (``epsilon``)
    element-wise product of two activations   :class:`~jlrp.rules.Uniform`
    element-wise non-linearities (GELU, ...)  :class:`~jlrp.rules.Pass` (AttnLRP's identity rule)
    LayerNorm / RMSNorm                       normaliser held constant (identity rule), centring ``Norm``
    residual adds, sums, means, biases        :class:`~jlrp.rules.Norm` (``stabilizer``)
    Dense / DenseGeneral / Einsum             :class:`~jlrp.rules.Epsilon` (``epsilon``), or Gamma
    Conv (e.g. ViT's patch embedding)         :class:`~jlrp.rules.Epsilon`, or Gamma
    ========================================  ============================================================

    The stabilisers are zennit's (``z + sign(z) epsilon``); lxt adds ``+epsilon`` without a sign: pass
    ``epsilon=jlrp.core.Stabilizer(1e-6, signed=False)`` for that. With ``epsilon`` this small the two
    differ only where ``|z| < epsilon``. Relevance reaching constants added to the input stream (position
    embeddings, class tokens, biases, masks) stays there: it is not created from them.

    Args:
        epsilon: epsilon of the linear layers' Epsilon rule and of UniformEpsilon.
        stabilizer: stabiliser of Norm (sums, means, biases) and of the Gamma rules.
        conv_gamma: if set, ``Gamma(conv_gamma)`` on convolutions (lxt's ViT recipe uses Gamma on the
            patch embedding and the dense layers).
        dense_gamma: if set, ``Gamma(dense_gamma)`` on dense layers.
        layer_map: extra ``(type, rule)`` entries, checked before the preset's.
        zero_params: passed to every rule that takes it (``'bias'``: bias-free, conservative relevance).
        canonizers: canonizers to apply (``None``: ``(MergeBatchNorm(),)``).
    """

    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    conv_gamma: float | None = None
    dense_gamma: float | None = None
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def softmax_rule(self) -> Rule:
        return Softmax()


@register_composite("cp_lrp")
@dataclasses.dataclass(frozen=True, eq=False)
class CPLRP(_Transformer):
    """CP-LRP (Ali et al., "XAI for Transformers: Better Explanations through Conservative
    Propagation", ICML 2022): :class:`AttnLRP` with the attention probabilities held constant.

    Every softmax gets :class:`~jlrp.rules.AHRule`: its output is a constant of the relevance pass, so
    ``p @ v`` is a linear map of the values (rule of :data:`jlrp.types.Contraction`: ``Norm``) and no
    relevance reaches queries and keys. LayerNorm's normaliser is held constant (the LN-rule) as in
    every jlrp composite. Element-wise products of two activations (gated MLPs) keep the uniform rule.
    Stabilisers, ``epsilon``, gammas and the other arguments as :class:`AttnLRP`.
    """

    epsilon: Any = 1e-6
    stabilizer: Any = 1e-6
    conv_gamma: float | None = None
    dense_gamma: float | None = None
    layer_map: Any = ()
    zero_params: Any = None
    canonizers: Any = None

    def softmax_rule(self) -> Rule:
        return AHRule()


# --------------------------------------------------------------------------------------------
# lookup


def get(name: str, **kwargs: Any) -> Composite:
    """Instantiate the named composite of :data:`COMPOSITES`, e.g. ``get('epsilon_plus', epsilon=0.1)``.

    Raises:
        CompositeError: if ``name`` is not a registered key.
    """
    if name not in COMPOSITES:
        raise CompositeError(
            f"unknown composite {name!r}; the registered composites are: {', '.join(COMPOSITES)}"
        )
    return COMPOSITES[name](**kwargs)


def as_composite(obj: Any) -> Composite:
    """Accept a composite, a registry key, or a plain rule map.

    A rule map is a dict or a list of ``(key, rule)`` pairs whose keys are layer types (or tuples of
    them) or path globs (or tuples of them); path entries take precedence over type entries
    (:class:`NameLayerMapComposite`).
    """
    if isinstance(obj, Composite):
        return obj
    if isinstance(obj, str):
        return get(obj)
    if isinstance(obj, (Mapping, list, tuple)):
        pairs = _as_pairs(obj)
        names = [
            (k, r)
            for k, r in pairs
            if isinstance(k, str) or (isinstance(k, tuple) and k and isinstance(k[0], str))
        ]
        layers = [(k, r) for k, r in pairs if (k, r) not in names]
        return NameLayerMapComposite(name_map=names, layer_map=layers)
    raise UsageTypeError(
        f"expected a composite, a composite name from {sorted(COMPOSITES)} or a rule map "
        f"(dict of layer type / path glob -> rule), got {type(obj).__name__}"
    )
