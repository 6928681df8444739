"""The flax.linen front end: rules attached through ``flax.linen.intercept_methods``.

Every ``__call__`` of a submodule is intercepted; the composite decides its rule from the module's
path and type. A module with a rule is replaced by :func:`jlrp.core.apply_rule` over its pure apply,
``layer_fn(params, x) = module.clone(parent=None).apply({'params': params, ...}, x, ...)``. That
nested apply is itself intercepted; it passes straight through, and a sub-module call inside it
reveals a container (a rule must sit on single layers), which raises.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Mapping
from typing import Any

from flax import linen as nn

from . import types as _types
from .core import apply_rule
from .errors import RuleError
from .explain import Explained, LayerRecord, display_path
from .ops import ModuleScopes

__all__ = ["LinenExplained"]

# set while a rule evaluates a module's pure apply: (path of that module, its rule)
_NESTED: contextvars.ContextVar[tuple[str, Any] | None] = contextvars.ContextVar(
    "jlrp_linen_nested", default=None
)


def _first_argument(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, tuple, dict]:
    """Split the call into the input ``x`` and the remaining arguments."""
    if args:
        return args[0], args[1:], kwargs
    params = list(inspect.signature(type(module).__call__).parameters)[1:]
    if params and params[0] in kwargs:
        rest = dict(kwargs)
        return rest.pop(params[0]), (), rest
    raise RuleError(f"cannot find the input of {type(module).__name__}.__call__ among its arguments")


def _layer_fn(module: nn.Module, path: str, rule: Any, rest: tuple, kwargs: dict) -> Any:
    unbound = module.clone(parent=None)
    others = {k: v for k, v in module.variables.items() if k != "params"}

    def layer_fn(params, x):
        token = _NESTED.set((path, rule))
        try:
            return unbound.apply({**others, "params": params}, x, *rest, **kwargs)
        finally:
            _NESTED.reset(token)

    return layer_fn


def owns_variables(variables: Mapping[str, Any]) -> bool:
    """Whether a module holds variables of its own and none of sub-modules (a single layer)."""
    values = [v for collection in variables.values() for v in collection.values()]
    return bool(values) and not any(isinstance(v, Mapping) for v in values)


class LinenExplained(Explained):
    """An explained ``flax.linen`` model, called like ``model.apply(variables, x, *args, **kwargs)``."""

    input_argnum = 1

    def _forward(
        self,
        resolver: Any,
        records: list[LayerRecord],
        scopes: ModuleScopes,
        variables: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            nested = _NESTED.get()
            if nested is not None:
                if module.path:  # a sub-module inside a module that has a rule
                    owner, rule = nested
                    raise RuleError(
                        f"{rule!r} is on '{display_path(owner)}', a container: it calls the sub-module "
                        f"'{'/'.join((owner,) * bool(owner) + tuple(module.path))}' ({type(module).__name__}). "
                        "Rules act on single layers; "
                        "attach the rule to the layers inside (by type, or a path glob like "
                        f"'{owner + '/' if owner else ''}*')."
                    )
                return next_fun(*call_args, **call_kwargs)
            path = "/".join(module.path)
            rule = resolver.rule_for(path, module)
            records.append(LayerRecord(path, type(module).__name__, rule, isinstance(module, _types.Linear)))
            with scopes.scope(path, owns_variables(module.variables)):
                if rule is None:
                    return next_fun(*call_args, **call_kwargs)
                x, rest, rest_kwargs = _first_argument(module, call_args, call_kwargs)
                params = module.variables.get("params", {})
                if isinstance(params, Mapping):
                    params = dict(params)
                where = f"'{display_path(path)}' ({type(module).__name__})"
                return apply_rule(rule, _layer_fn(module, path, rule, rest, rest_kwargs), params, x, where)

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, *args, **kwargs)
