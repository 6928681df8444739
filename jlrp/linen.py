"""The flax.linen front end: rules attached through ``flax.linen.intercept_methods``.

Every ``__call__`` of a submodule is intercepted and handed to the shared per-call handler
(:func:`jlrp.frontends.base.handle_call`), which asks the composite for the module's rule and
applies the canonizers' rewrites. A module with a rule is replaced by :func:`jlrp.core.apply_rule`
over its pure apply, ``layer_fn(params, x) = module.clone(parent=None).apply({'params': params, ...},
x, ...)``. That nested apply is itself intercepted; it passes straight through, and a sub-module call
inside it reveals a container (a rule must sit on single layers), which raises.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any

from flax import linen as nn
from flax.core import meta

from .frontends.base import CallContext, ModelView, container_error, handle_call, plan_canonizers
from .frontends.explained import Explained, LayerRecord
from .ops import ModuleScopes

__all__ = ["LinenExplained"]

# set while a rule evaluates a module's pure apply: (path of that module, its rule)
_NESTED: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "jlrp_linen_nested", default=None
)


def _pure_layer(module: nn.Module, path: str, rule: Any) -> tuple[dict[str, Any], Any, Any]:
    """``(params, other collections, layer_fn)``: the module's pure apply ``layer_fn(params, x, state)``
    with ``state = (other collections, args, kwargs)``."""
    unbound = module.clone(parent=None)

    def layer_fn(params, x, state):
        others, rest, kwargs = state
        token = _NESTED.set((path, rule))
        try:
            return unbound.apply({**others, "params": params}, x, *rest, **kwargs)
        finally:
            _NESTED.reset(token)

    params = module.variables.get("params", {})
    if isinstance(params, Mapping):
        params = dict(params)
    others = {k: v for k, v in module.variables.items() if k != "params"}
    return params, others, layer_fn


def owns_variables(variables: Mapping[str, Any]) -> bool:
    """Whether a module holds variables of its own and none of sub-modules (a single layer)."""
    values = [v for collection in variables.values() for v in collection.values()]
    return bool(values) and not any(isinstance(v, Mapping) for v in values)


def _variables_at(variables: Mapping[str, Any], path: str) -> dict[str, Any]:
    """``{collection: {name: value}}`` of the module at ``path``."""
    found = {}
    for collection, tree in variables.items():
        try:
            for key in path.split("/") if path else ():
                tree = tree[key]
        except (KeyError, TypeError):
            continue
        if isinstance(tree, Mapping):
            found[collection] = dict(tree)
    return found


class LinenExplained(Explained):
    """An explained ``flax.linen`` model, called like ``model.apply(variables, x, *args, **kwargs)``."""

    input_argnum = 1

    def _view(self, variables: Any, args: tuple, kwargs: dict) -> ModelView:
        """An abstract view of the model call for the canonizers."""

        def run(inputs: Any, hook: Any) -> Any:
            call_variables, call_args, call_kwargs = inputs

            def interceptor(next_fun, a, kw, context):
                if context.method_name != "__call__":
                    return next_fun(*a, **kw)
                module = context.module
                path = "/".join(module.path)
                pure = lambda: _pure_layer(module, path, None)  # noqa: E731
                return hook(path, module, type(module).__call__, a, kw, next_fun, pure)

            with nn.intercept_methods(interceptor):
                return self.model.apply(call_variables, *call_args, **call_kwargs)

        collections = frozenset(variables) if isinstance(variables, Mapping) else frozenset()
        return ModelView(
            run, (variables, args, kwargs), collections, lambda path: _variables_at(variables, path)
        )

    def _forward(
        self,
        resolver: Any,
        records: list[LayerRecord],
        scopes: ModuleScopes,
        variables: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        variables = meta.unbox(variables)  # nn.with_partitioning boxes: the arrays keep their shardings
        view = self._view(variables, args, kwargs)
        plan = plan_canonizers(self.composite.canonizers, view)
        ctx = CallContext(resolver, records, scopes, plan, view.variables)

        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            nested = _NESTED.get()
            if nested is not None:
                if module.path:  # a sub-module inside a module that has a rule
                    owner, rule = nested
                    sub = "/".join((owner,) * bool(owner) + tuple(module.path))
                    raise container_error(rule, owner, sub, type(module).__name__)
                return next_fun(*call_args, **call_kwargs)
            path = "/".join(module.path)
            return handle_call(
                ctx,
                path,
                module,
                type(module).__call__,
                call_args,
                call_kwargs,
                lambda: next_fun(*call_args, **call_kwargs),
                lambda rule: _pure_layer(module, path, rule),
                owns_variables(module.variables),
            )

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, *args, **kwargs)
