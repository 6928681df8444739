"""Shared pieces of the command line: :class:`CLIError` and small argument parsers."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from typing import Any

import numpy as np

from jlrp.errors import UsageError

__all__ = ["CLIError", "literal", "key_values", "short"]


class CLIError(UsageError):
    """A mistake in the command's arguments or inputs; printed as one line, exit status 2."""


def literal(text: str) -> Any:
    """``'0'`` -> 0, ``'1e-6'`` -> 1e-6, ``'[0, 1]'`` -> float32 array, ``'abc'`` -> ``'abc'``."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return np.asarray(value, dtype=np.float32)
    return value


def key_values(items: Sequence[str] | None, option: str) -> dict[str, Any]:
    """``['low=0', 'high=1']`` -> ``{'low': 0, 'high': 1}``.

    Raises:
        CLIError: for an item without ``=`` or without a key.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"{option} takes key=value, got {item!r} (e.g. {option} low=0)")
        out[key.strip()] = literal(value.strip())
    return out


def short(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 300 characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."
