"""Exceptions raised by jlrp.

jlrp never fails silently (DESIGN.md section 4): every mistake that would otherwise give wrong
relevance quietly raises one of these, with a message that names the module or entry at fault and
says what to do instead. All of them derive from :class:`JlrpError` and from the built-in exception
a Python user would expect (``ValueError`` or ``TypeError``). Warnings derive from :class:`JlrpWarning`.
"""

from __future__ import annotations

from typing import Any


class JlrpError(Exception):
    """Base class of every error raised by jlrp."""


class CompositeError(JlrpError, ValueError):
    """A composite or rule map does not fit the model (unmatched path, no rule anywhere, unknown name)."""


class RuleError(JlrpError, ValueError):
    """A rule landed on a module it cannot serve (a container, a module without parameters...)."""


class InputError(JlrpError, ValueError):
    """The input given to an explained model is unusable (wrong dtype, NaN/inf, wrong shape)."""


class InputDtypeError(InputError, TypeError):
    """The input is not a floating-point array."""


class TargetError(JlrpError, ValueError):
    """The ``target`` of an attribution does not fit the model output."""


class CoverageError(JlrpError, ValueError):
    """``strict=True``: a linear layer or op on the relevance path has no rule."""


class CanonizerError(JlrpError, ValueError):
    """A canonizer cannot be applied (e.g. merging a BatchNorm that runs in training mode)."""


class ModeError(CanonizerError):
    """A Dropout or BatchNorm runs in training mode (call ``model.eval()`` / pass ``train=False``)."""


class UsageError(JlrpError, ValueError):
    """A jlrp function was called with an argument it cannot use (a value out of range, a bad option)."""


class UsageTypeError(UsageError, TypeError):
    """A jlrp function was called with an argument of the wrong type."""


class StateDictError(JlrpError, ValueError):
    """A state dict does not fit the model (missing, unexpected or mis-shaped keys)."""


class JlrpWarning(UserWarning):
    """Base class of every warning jlrp emits (filter with ``warnings.simplefilter(..., JlrpWarning)``),
    e.g. an op on the relevance path that no rule covers; ``strict=True`` turns that one into
    :class:`CoverageError`."""


class OutOfRangeError(UsageError, IndexError):
    """An index past the end (a batch number of a sequence of batches): also an ``IndexError``, so that
    sequence iteration stops there."""


class UnknownNameError(UsageError, KeyError):
    """A name that jlrp does not know (a colour map, an architecture, a variable without counterpart)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


def integer_input_error(where: str, dtype: Any) -> InputDtypeError:
    """The one place that decides what a non-floating leaf of the model input means.

    Integer leaves are indices: they may feed embedding lookups (``nn.Embed``, ``jnp.take`` of a
    table), where :func:`jlrp.attribute` reports their relevance. A leaf that feeds no lookup would
    need a gradient, which integers have not: explaining it raises this error.
    """
    return InputDtypeError(
        f"the {where} has dtype {dtype}; relevance is defined for floating-point inputs and for integer "
        f"indices that feed embedding lookups only. If it is a numeric feature, cast it first, e.g. "
        f"x.astype(jnp.float32) (and scale images to the range the model expects); if it is a mask or "
        f"other non-explained index, pass it as a further positional argument after the explained input."
    )
