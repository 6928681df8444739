"""Every exception jlrp raises is a :class:`jlrp.errors.JlrpError` that keeps its built-in base.

A source scan guards the rule: no module raises a bare built-in exception (``ValueError``,
``TypeError``, ``KeyError``...). ``NotImplementedError`` (abstract methods) and ``ImportError``
(missing optional extras) are the documented exceptions to it; every module of the package is scanned.
"""

from __future__ import annotations

import ast
import builtins
import importlib.metadata
import inspect
from pathlib import Path

import pytest

import jlrp
import jlrp.cli
from jlrp import errors

PACKAGE = Path(jlrp.__file__).parent
_ALLOWED = {"NotImplementedError", "ImportError"}
_NOT_YET: set[str] = set()
_BUILTINS = {
    name for name, obj in vars(builtins).items() if inspect.isclass(obj) and issubclass(obj, BaseException)
}


def _bare_raises(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Raise) or node.exc is None:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in _BUILTINS and exc.id not in _ALLOWED:
            found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} raise {exc.id}")
    return found


def test_no_bare_builtin_raises():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name not in _NOT_YET or p.parent != PACKAGE]
    bare = [hit for p in files for hit in _bare_raises(p)]
    assert not bare, "raise a jlrp.errors class instead:\n" + "\n".join(bare)


def test_error_tree_keeps_builtin_bases():
    classes = [
        c
        for c in vars(errors).values()
        if inspect.isclass(c) and issubclass(c, BaseException) and not issubclass(c, Warning)
    ]
    assert all(issubclass(c, errors.JlrpError) for c in classes)
    assert issubclass(errors.UsageError, ValueError)
    assert issubclass(errors.UsageTypeError, TypeError) and issubclass(
        errors.UsageTypeError, errors.UsageError
    )
    assert issubclass(errors.UnknownNameError, KeyError)
    assert issubclass(errors.StateDictError, ValueError)
    assert issubclass(errors.JlrpWarning, UserWarning)
    assert jlrp.models.StateDictError is errors.StateDictError
    assert issubclass(jlrp.cli.CLIError, errors.UsageError)


def test_unknown_name_reads_like_a_sentence():
    from jlrp.cmap import CMAPS

    with pytest.raises(KeyError) as info:
        CMAPS["no-such-map"]
    assert isinstance(info.value, errors.JlrpError)
    assert str(info.value).startswith("Unknown colour map 'no-such-map'")


def test_typed_and_versioned():
    assert (PACKAGE / "py.typed").is_file()
    assert jlrp.__version__ == importlib.metadata.version("jlrp")
