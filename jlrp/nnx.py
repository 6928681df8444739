"""The Flax NNX front end: a clone of the model whose modules carry the rules.

:func:`explain_nnx` (reached through :func:`jlrp.explain`) clones the user's model with
:func:`flax.nnx.clone` and swaps the ``__class__`` of every callable module of the clone for a
*rule-carrying* subclass of its class. The subclass is made once per original class and cached; it
adds nothing but a ``__call__`` that, while an explained forward is being traced, asks that
trace's resolver for the module's rule. With no active trace it calls the original ``__call__``,
so the clone behaves exactly like the model. Because the subclass derives from the original class
and the instances keep their attributes, ``isinstance`` checks, attribute access
(``explained.model.conv1.kernel``), ``nnx.split``/``nnx.merge`` and ``nnx.state`` all work as
before.

A module that gets a rule is replaced by :func:`jlrp.core.apply_rule` over its pure apply
``layer_fn(params, x, state)``: ``params`` is the module's :class:`flax.nnx.Param` state as a plain
dict (``{'kernel': ..., 'bias': ...}``); ``state`` holds the module's other state and the call's
other arguments (operands of the ``custom_vjp``, never closed over); ``layer_fn`` merges the two
states and calls the *original* class's ``__call__``. A sub-module call inside that apply means the
rule sits on a container, which raises :class:`~jlrp.errors.RuleError`.

Paths are attribute paths from the root joined by ``'/'`` (``'backbone/layers/0'``); the root module
is ``''``. Every module call runs in a :class:`jlrp.ops.ModuleScopes` scope, so the function-level
ops of the forward pass (``nnx.relu``, residual adds, ``jnp.mean``) get their rules exactly as in
the linen front end, with paths under the calling module's path (see :mod:`jlrp.ops`). With
:class:`~jlrp.canonizers.MergeBatchNorm` (the named composites' default) every inference-mode
``BatchNorm`` whose input is a linear layer's output is folded into that layer at trace time.

An explained call runs on a copy of the clone merged at the current trace level, so it never
updates the clone's state (batch statistics in training mode, RNG counters) and NNX transforms
inside the forward pass (``nnx.remat``, ``nnx.scan`` over sub-modules) work.

Snapshot semantics: the explained model owns its clone, so later weight updates of the user's model
are *not* seen. Pass fresh weights through the functional route,
``explained.pure(nnx.state(model), x)``, or copy them into the clone with
``nnx.update(explained.model, nnx.state(model))``.

Limitations:

- Only ``__call__`` is intercepted (as in the linen front end); modules reached through other
  methods keep their gradient and are not recorded.
- State updates made during an explained call are discarded (see above); explain models in
  evaluation mode (``model.eval()``). Merging a BatchNorm in training mode raises
  :class:`~jlrp.errors.CanonizerError`.
- A module called during the forward pass must be reachable from the model (an attribute path);
  otherwise it cannot be named and explaining raises :class:`~jlrp.errors.RuleError`.
- Rules give zero cotangents to a module's parameters and other state: the VJP is the relevance of
  the input, not a gradient with respect to the weights.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import threading
import types as _pytypes
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import config as _flax_config
from flax import nnx

from .composites import Composite
from .core import Rule
from .errors import RuleError, UnknownNameError, UsageTypeError
from .frontends.base import CallContext, ModelView, container_error, handle_call, plan_canonizers
from .frontends.explained import Explained, LayerRecord
from .ops import ModuleScopes

__all__ = ["NNXExplained", "explain_nnx", "rule_carrying_class", "original_class"]


# --------------------------------------------------------------------------------------------
# per-trace context


@dataclasses.dataclass
class _Context:
    """A pass over the model: names the modules of ``root`` by their paths."""

    root: nnx.Module

    def __post_init__(self) -> None:
        self.paths = _module_paths(self.root)

    def path_of(self, module: nnx.Module) -> str:
        path = self.paths.get(id(module))
        if path is None:  # the graph changed during the call (e.g. a lazily created sub-module)
            self.paths = _module_paths(self.root)
            path = self.paths.get(id(module))
        if path is None:  # a copy made by an NNX transform inside the forward pass
            path = getattr(module, _PATH_ATTR, None)
        if path is None:
            raise RuleError(
                f"a {type(module).__name__} module was called that is not part of the explained model's "
                "graph (e.g. a module stored outside the model); jlrp cannot name it. Keep every module "
                "the forward pass calls as an attribute of the model."
            )
        return path

    def module_at(self, path: str) -> nnx.Module:
        for parts, module in nnx.iter_modules(self.root):
            if "/".join(str(p) for p in parts) == path:
                return module
        raise UnknownNameError(f"the explained NNX model has no module at path '{path}'")


@dataclasses.dataclass
class _Trace(_Context):
    """The explained forward: the shared per-call context (rules, records, scopes, canonizer plan)."""

    ctx: CallContext | None = None


@dataclasses.dataclass
class _Pass(_Context):
    """An abstract pass for the canonizers: every module call goes to ``hook``."""

    hook: Any = None


@dataclasses.dataclass(frozen=True)
class _Nested:
    """Set while a rule evaluates a module's pure apply."""

    path: str
    rule: Rule | None  # None: a layer without rule evaluated with merged BatchNorm parameters
    module: nnx.Module  # the merged copy being evaluated

    def sub_path(self, sub: nnx.Module) -> str:
        for parts, candidate in nnx.iter_modules(self.module):
            if candidate is sub and parts:
                rel = "/".join(str(p) for p in parts)
                return f"{self.path}/{rel}" if self.path else rel
        return f"{self.path + '/' if self.path else ''}?"


_ACTIVE: contextvars.ContextVar[_Trace | _Pass | None] = contextvars.ContextVar(
    "jlrp_nnx_trace", default=None
)
_NESTED: contextvars.ContextVar[_Nested | None] = contextvars.ContextVar("jlrp_nnx_nested", default=None)


def _module_paths(root: nnx.Module) -> dict[int, str]:
    """``id(module) -> 'a/b/0'`` for every module of ``root`` (the root itself is ``''``)."""
    return {id(module): "/".join(str(p) for p in parts) for parts, module in nnx.iter_modules(root)}


def owns_variables(module: nnx.Module) -> bool:
    """Whether a module holds Variables of its own and no sub-modules (a single layer).

    The arithmetic inside such a module is part of the layer, never a function-level op.
    """
    children = [child for _, child in nnx.iter_children(module)]
    if any(isinstance(child, nnx.Module) for child in children):
        return False
    return any(isinstance(child, nnx.Variable) for child in children)


# --------------------------------------------------------------------------------------------
# rule-carrying subclasses


_SUBCLASSES: dict[type, type] = {}
_SUBCLASS_LOCK = threading.Lock()
_ORIGINAL_ATTR = "_jlrp_original_class"
_PATH_ATTR = "_jlrp_path"


def _has_call(cls: type) -> bool:
    return any("__call__" in vars(klass) for klass in cls.__mro__ if klass is not object)


def rule_carrying_class(cls: type) -> type:
    """The cached rule-carrying subclass of the NNX module class ``cls``.

    The subclass has the name, qualified name and module of ``cls`` and overrides only
    ``__call__``. Passing a rule-carrying class returns it unchanged.

    Args:
        cls: a subclass of :class:`flax.nnx.Module` that defines ``__call__``.

    Returns:
        The subclass (the same object for every call with the same ``cls``).
    """
    if _ORIGINAL_ATTR in vars(cls):
        return cls
    with _SUBCLASS_LOCK:
        sub = _SUBCLASSES.get(cls)
        if sub is not None:
            return sub
        original_call = cls.__call__

        def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
            return _call(cls, self, args, kwargs)

        functools.update_wrapper(__call__, original_call)
        namespace = {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            _ORIGINAL_ATTR: cls,
        }
        keywords: dict[str, Any] = {}
        is_pytree = getattr(cls, "_pytree__is_pytree", _flax_config.flax_pytree_module)
        if is_pytree != _flax_config.flax_pytree_module:
            keywords["pytree"] = is_pytree
        sub = _pytypes.new_class(cls.__name__, (cls,), keywords, lambda ns: ns.update(namespace))
        _SUBCLASSES[cls] = sub
        return sub


def original_class(module: Any) -> type:
    """The user's class of a (possibly rule-carrying) module.

    Args:
        module: an NNX module, e.g. one of ``explained.model``'s.

    Returns:
        The class the user wrote (``type(module)`` for modules that are not rule-carrying).
    """
    return vars(type(module)).get(_ORIGINAL_ATTR, type(module))


def _swap_classes(root: nnx.Module) -> None:
    """Give every callable module of ``root`` its rule-carrying class and its path (in place).

    The path is also kept as a static attribute, so that copies which NNX transforms inside the
    forward pass make (``nnx.remat``, ``nnx.scan`` over sub-modules) can still be named.
    """
    for parts, module in nnx.iter_modules(root):
        cls = type(module)
        if _has_call(cls):
            object.__setattr__(module, "__class__", rule_carrying_class(cls))
            setattr(module, _PATH_ATTR, "/".join(str(p) for p in parts))


# --------------------------------------------------------------------------------------------
# the intercepted call


def _pure_layer(
    module: nnx.Module, cls: type, path: str, rule: Rule | None
) -> tuple[dict[str, Any], nnx.State, Callable[[Any, Any, Any], Any]]:
    """``(params, other_state, layer_fn)`` of a module.

    ``params`` is its ``Param`` state as a plain dict, ``other_state`` the rest of its state, and
    ``layer_fn(params, x, (other_state, args, kwargs))`` its pure apply with the original class's
    ``__call__``. Everything the apply reads goes through its arguments (never a closure), so that
    :func:`jlrp.core.apply_rule` can pass traced values to the backward as operands.
    """
    graphdef, param_state, other_state = nnx.split(module, nnx.Param, ...)

    def layer_fn(params: Any, x: Any, state: tuple[Any, tuple, dict]) -> Any:
        other, rest, kwargs = state
        # copy=True: the evaluated copy never shares Variables with the explained model, so
        # nothing traced inside the custom_vjp can leak into it
        copy = nnx.merge(graphdef, params, other, copy=True)
        token = _NESTED.set(_Nested(path, rule, copy))
        try:
            return cls.__call__(copy, x, *rest, **kwargs)
        finally:
            _NESTED.reset(token)

    return nnx.to_pure_dict(param_state), other_state, layer_fn


def _call(cls: type, module: nnx.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``__call__`` of a rule-carrying module (``cls`` is the original class)."""
    nested = _NESTED.get()
    if nested is not None:
        raise container_error(nested.rule, nested.path, nested.sub_path(module), cls.__name__)
    trace = _ACTIVE.get()
    if trace is None:
        return cls.__call__(module, *args, **kwargs)
    path = trace.path_of(module)
    if isinstance(trace, _Pass):
        return trace.hook(
            path,
            module,
            cls.__call__,
            args,
            kwargs,
            lambda *a, **k: cls.__call__(module, *a, **k),
            lambda: _pure_layer(module, cls, path, None),
        )
    return handle_call(
        trace.ctx,
        path,
        module,
        cls.__call__,
        args,
        kwargs,
        lambda: cls.__call__(module, *args, **kwargs),
        lambda rule: _pure_layer(module, cls, path, rule),
        owns_variables(module),
    )


def _variables_of(module: nnx.Module) -> dict[str, dict[str, Any]]:
    """``{'params': {...}, 'batch_stats': {...}}`` of a module (the linen collection names)."""
    found = {}
    for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        values = nnx.to_pure_dict(nnx.state(module, kind))
        if values:
            found[collection] = dict(values)
    return found


def _view(model: nnx.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ModelView:
    """An abstract view of the model call for the canonizers."""
    graphdef, state = nnx.split(model)
    root = _Context(model)

    def run(inputs: Any, hook: Any) -> Any:
        call_state, call_args, call_kwargs = inputs
        copy = nnx.merge(graphdef, call_state, copy=True)
        token = _ACTIVE.set(_Pass(copy, hook))
        try:
            return copy(*call_args, **call_kwargs)
        finally:
            _ACTIVE.reset(token)

    collections = frozenset(
        name
        for name, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat))
        if jax.tree_util.tree_leaves(nnx.state(model, kind))
    )
    return ModelView(
        run, (state, args, kwargs), collections, lambda path: _variables_of(root.module_at(path))
    )


def _run(
    model: nnx.Module,
    composite: Composite,
    resolver: Any,
    records: list[LayerRecord],
    scopes: ModuleScopes,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call a rule-carrying model with the trace context set."""
    view = _view(model, args, kwargs)
    plan = plan_canonizers(composite.canonizers, view)
    token = _ACTIVE.set(_Trace(model, CallContext(resolver, records, scopes, plan, view.variables)))
    try:
        return model(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)


# --------------------------------------------------------------------------------------------
# the explained model


class NNXExplained(Explained):
    """An explained ``flax.nnx`` model, called like the model: ``explained(x, *args, **kwargs)``.

    It holds a private clone of the model (:attr:`model`) whose modules carry the rules; the user's
    model is never modified, and later updates of it are not seen (see the module docstring).

    Three ways to use it:

    - eagerly or under plain JAX transforms: ``jax.vjp(lambda x: explained(x), x)``;
    - under NNX transforms: it is a JAX pytree whose only child is the clone, so
      ``nnx.jit(lambda e, x: e(x))(explained, x)`` (and ``jax.jit`` alike) work;
    - functionally: ``explained.pure(explained.state, x)`` is a pure function of the state, for
      ``jax.jit``, ``jax.vmap`` and sharding; :func:`jlrp.attribute` uses this route.

    Hashable by identity, so :meth:`pure` (a bound method) can be a static ``jax.jit`` argument.

    Attributes:
        model: the rule-carrying clone (a ``flax.nnx.Module`` of the user's class).
        composite: the composite.
        strict: whether uncovered linear layers raise.
    """

    model: nnx.Module

    def __init__(self, model: nnx.Module, composite: Composite, strict: bool = False):
        clone = nnx.clone(model)
        # nnx.clone shares array buffers; NumPy ones can be written in place, so the clone owns copies
        state = nnx.state(clone)
        if any(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(state)):
            owned = jax.tree_util.tree_map(
                lambda leaf: np.array(leaf, copy=True) if isinstance(leaf, np.ndarray) else leaf, state
            )
            nnx.update(clone, owned)
        _swap_classes(clone)
        super().__init__(clone, composite, strict=strict)
        self._graphdef = nnx.graphdef(clone)

    @property
    def graphdef(self) -> Any:
        """The clone's :class:`flax.nnx.GraphDef` (used by :meth:`pure`)."""
        return self._graphdef

    @property
    def state(self) -> nnx.State:
        """The clone's full state, ``nnx.state(self.model)``, the first argument of :meth:`pure`."""
        return nnx.state(self.model)

    def pure(self, state: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        """The explained forward as a pure function of the model state.

        Args:
            state: a state with the clone's structure: :attr:`state`, or ``nnx.state(model)`` of the
                user's model (or of any model of the same structure) to explain other weights.
            x: the input.
            *args: further positional arguments of the model call.
            **kwargs: keyword arguments of the model call.

        Returns:
            The model output; its VJP is the relevance.
        """
        return _Functional(self)(state, x, *args, **kwargs)

    def _forward(
        self, resolver: Any, records: list[LayerRecord], scopes: ModuleScopes, *args: Any, **kwargs: Any
    ) -> Any:
        graphdef, state = nnx.split(self.model)
        # the forward runs on a copy merged at the current trace level: NNX transforms inside the
        # model (nnx.remat, nnx.scan) work, and state updates are discarded instead of leaking tracers
        model = nnx.merge(graphdef, state, copy=True)
        return _run(model, self.composite, resolver, records, scopes, *args, **kwargs)

    @classmethod
    def _from_clone(
        cls, clone: nnx.Module, composite: Composite, strict: bool, graphdef: Any
    ) -> NNXExplained:
        obj = object.__new__(cls)
        Explained.__init__(obj, clone, composite, strict=strict)
        obj._graphdef = graphdef
        return obj


class _Functional(Explained):
    """:meth:`NNXExplained.pure` as an explained function ``(state, x, *args, **kwargs)``."""

    input_argnum = 1

    def __init__(self, owner: NNXExplained):
        super().__init__(owner.model, owner.composite, strict=owner.strict)
        self.graphdef = owner.graphdef
        self._owner = owner

    @property
    def warning_owner(self) -> Explained:
        return self._owner

    def _forward(
        self,
        resolver: Any,
        records: list[LayerRecord],
        scopes: ModuleScopes,
        state: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        # copy=True: fresh Variables at the current trace level; the caller's state is never written
        model = nnx.merge(self.graphdef, state, copy=True)
        return _run(model, self.composite, resolver, records, scopes, *args, **kwargs)


def _flatten_with_keys(explained: NNXExplained) -> tuple[tuple[tuple[Any, Any], ...], tuple[Any, ...]]:
    return (
        ((jax.tree_util.GetAttrKey("model"), explained.model),),
        (explained.composite, explained.strict, explained._graphdef),
    )


def _flatten(explained: NNXExplained) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (explained.model,), (explained.composite, explained.strict, explained._graphdef)


def _unflatten(aux: tuple[Any, ...], children: Any) -> NNXExplained:
    composite, strict, graphdef = aux
    (clone,) = children
    return NNXExplained._from_clone(clone, composite, strict, graphdef)


jax.tree_util.register_pytree_with_keys(NNXExplained, _flatten_with_keys, _unflatten, _flatten)


def explain_nnx(model: nnx.Module, composite: Composite, strict: bool = False) -> NNXExplained:
    """Explain a ``flax.nnx`` model (called by :func:`jlrp.explain` for NNX modules).

    Args:
        model: the model; it is cloned, never modified.
        composite: the composite (already normalised by :func:`jlrp.composites.as_composite`).
        strict: raise :class:`~jlrp.errors.CoverageError` for uncovered linear layers.

    Returns:
        The explained model, called like ``model``: ``explained(x, *args, **kwargs)``.
    """
    if not isinstance(model, nnx.Module):
        raise UsageTypeError(f"explain_nnx needs a flax.nnx.Module, got {type(model).__name__}")
    return NNXExplained(model, composite, strict=strict)
