"""Small pieces shared by the front ends and the canonizers: mode flags, bias-less layers, taps.

Nothing here imports the rest of jlrp, so :mod:`jlrp.canonizers` and :mod:`jlrp.frontends.base`
can both use it without an import cycle.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["with_bias", "inference_mode", "Tap"]


def with_bias(layer_fn: Callable[[Any, Any, Any], Any], has_bias: bool) -> Callable[[Any, Any, Any], Any]:
    """A layer function that takes ``{'kernel', 'bias'}`` even if the module has no bias of its own
    (``layer_fn({'kernel': W}, x) + b``)."""
    if has_bias:
        return layer_fn
    return lambda p, x, state: layer_fn({k: v for k, v in p.items() if k != "bias"}, x, state) + p["bias"]


#: attribute / argument names of mode flags, and the value of each that means "inference mode"
_EVAL_FLAGS: tuple[tuple[str, bool], ...] = (
    ("use_running_average", True),
    ("deterministic", True),
    ("training", False),
    ("train", False),
    ("is_training", False),
)


def inference_mode(module: Any, call_fn: Callable[..., Any], args: tuple, kwargs: dict) -> bool | None:
    """Whether a call runs a module in inference mode, read from the module's own flag.

    A flag passed to the call (positionally or by name: ``use_running_average``, ``deterministic``,
    ``training``, ``train``, ``is_training``) wins over the module attribute of the same name, as in
    Flax (``merge_param``). ``None`` when neither the call nor the module has such a flag.
    """
    try:
        binding = inspect.signature(call_fn).bind_partial(module, *args, **kwargs)
        binding.apply_defaults()
        bound = binding.arguments
    except (TypeError, ValueError):
        bound = dict(kwargs)
    for name, eval_value in _EVAL_FLAGS:
        value = bound.get(name)
        if value is None:
            value = getattr(module, name, None)
        if isinstance(value, (bool, np.bool_)):
            return bool(value) == eval_value
    return None


@dataclasses.dataclass(frozen=True)
class Tap:
    """A question for :meth:`ModelView.exclusive`: is call ``(path, index)``'s output used only by
    the calls of ``consumer`` that take it as their input?"""

    path: str
    index: int
    consumer: str
