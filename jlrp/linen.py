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

import jax
from flax import linen as nn

from . import types as _types
from .canonizers import BatchNormPairing, has_merge_batchnorm, merge_batchnorm
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


def _layer_fn(module: nn.Module, path: str, rule: Any) -> Any:
    """The module's pure apply ``layer_fn(params, x, state)``; ``state = (other collections, args, kwargs)``."""
    unbound = module.clone(parent=None)

    def layer_fn(params, x, state):
        others, rest, kwargs = state
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


def _lookup(tree: Any, path: str) -> Any:
    for key in path.split("/") if path else ():
        tree = tree[key]
    return tree


class LinenExplained(Explained):
    """An explained ``flax.linen`` model, called like ``model.apply(variables, x, *args, **kwargs)``."""

    input_argnum = 1

    def _batchnorm_pairs(self, variables: Any, args: tuple, kwargs: dict) -> dict[str, tuple[str, float]]:
        """Abstractly run the model once to find BatchNorms whose input is a linear layer's output.

        Returns:
            ``{linear path: (batchnorm path, epsilon)}``.
        """
        if not has_merge_batchnorm(self.composite.canonizers) or "batch_stats" not in variables:
            return {}
        pairing = BatchNormPairing()

        def interceptor(next_fun, call_args, call_kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*call_args, **call_kwargs)
            module = context.module
            path = "/".join(module.path)
            pairing.before(module, path, call_args, call_kwargs)
            output = next_fun(*call_args, **call_kwargs)
            pairing.after(module, path, output)
            return output

        def run():
            with nn.intercept_methods(interceptor):
                return self.model.apply(variables, *args, **kwargs)

        jax.eval_shape(run)
        return pairing.pairs

    def _forward(
        self,
        resolver: Any,
        records: list[LayerRecord],
        scopes: ModuleScopes,
        variables: Any,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        pairs = self._batchnorm_pairs(variables, args, kwargs)
        merged_bns = {bn: linear for linear, (bn, _) in pairs.items()}

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
            kind = type(module).__name__
            if path in merged_bns:  # folded into the preceding layer: the identity
                records.append(LayerRecord(path, kind, None, False, f"merged into '{merged_bns[path]}'"))
                return call_args[0]
            rule = resolver.rule_for(path, module)
            note = f"BatchNorm '{pairs[path][0]}' merged in" if path in pairs else ""
            records.append(LayerRecord(path, kind, rule, isinstance(module, _types.Linear), note))
            with scopes.scope(path, owns_variables(module.variables)):
                if rule is None and path not in pairs:
                    return next_fun(*call_args, **call_kwargs)
                x, rest, rest_kwargs = _first_argument(module, call_args, call_kwargs)
                params = module.variables.get("params", {})
                if isinstance(params, Mapping):
                    params = dict(params)
                layer_fn = _layer_fn(module, path, rule)
                state = ({k: v for k, v in module.variables.items() if k != "params"}, rest, rest_kwargs)
                if path in pairs:
                    bn_path, epsilon = pairs[path]
                    bn_params = _lookup(variables.get("params", {}), bn_path) if "params" in variables else {}
                    params = merge_batchnorm(
                        params, bn_params, _lookup(variables["batch_stats"], bn_path), epsilon
                    )
                    layer_fn = _with_bias(layer_fn, has_bias="bias" in module.variables.get("params", {}))
                    if rule is None:
                        return layer_fn(params, x, state)
                where = f"'{display_path(path)}' ({kind})"
                return apply_rule(rule, layer_fn, params, x, where, state)

        with nn.intercept_methods(interceptor):
            return self.model.apply(variables, *args, **kwargs)


def _with_bias(layer_fn: Any, has_bias: bool) -> Any:
    """A layer function that takes ``{'kernel', 'bias'}`` even if the module has no bias of its own."""
    if has_bias:
        return layer_fn
    return lambda p, x, state: layer_fn({"kernel": p["kernel"]}, x, state) + p["bias"]
