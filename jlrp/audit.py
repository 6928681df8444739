"""``jlrp.audit``: which rule every layer and op on the relevance path gets, what no rule covers, and
(with ``conservation=True``) where relevance is created or lost."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax

from . import types as _types
from .canonizers import MergeBatchNorm
from .errors import JlrpWarning, UsageTypeError
from .frontends.explained import Explained, LayerRecord, display_path, uncovered_ops

__all__ = ["audit", "AuditReport"]


@dataclasses.dataclass(frozen=True)
class AuditReport:
    """What :func:`audit` found: one row per layer/op path, and the linear ones that got no rule.

    ``str(report)`` is a readable table; ``report.uncovered`` lists the uncovered paths and
    ``report.notes`` what the canonizers did or could not do.
    """

    rows: tuple[tuple[str, str, str, int, str], ...]
    uncovered: tuple[str, ...]
    notes: tuple[str, ...] = ()
    #: the conservation audit (:class:`jlrp.conservation.ConservationReport`) with ``conservation=True``
    conservation: Any = None

    def __str__(self) -> str:
        header = ("path", "type", "rule", "calls", "note")
        body = [(p, k, r, str(n), note) for p, k, r, n, note in self.rows]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
        out = [line(header), line(tuple("-" * w for w in widths)), *map(line, body)]
        if self.uncovered:
            out.append(f"uncovered ops (plain gradient, not an LRP rule): {'; '.join(self.uncovered)}")
        else:
            out.append("every op on the relevance path is covered")
        out.extend(self.notes)
        if self.conservation is not None:
            out.extend(["", "conservation (one backward pass):", str(self.conservation)])
        return "\n".join(out)


def audit(
    explained: Explained,
    *args: Any,
    conservation: bool = False,
    target: Any = None,
    output: Any = None,
    rtol: float = 1e-5,
    **kwargs: Any,
) -> AuditReport:
    """List every layer and function-level op on the relevance path with the rule it gets.

    Runs the explained forward abstractly (``jax.eval_shape``: no computation), so it is cheap even
    for large models. Also reports BatchNorms that a ``MergeBatchNorm`` canonizer could not merge,
    uncovered ops with their source line, and notes such as a final softmax.

    Args:
        explained: a model made by :func:`explain`.
        *args: the arguments of the explained model (``variables, x`` for linen, ``x`` for NNX).
        conservation: also run one backward pass and report the relevance entering and leaving every
            layer and op, flagging where it is created or lost beyond biases and stabilisers
            (:func:`jlrp.conservation.conservation_audit`); the report is ``.conservation``.
        target: the explained class for ``conservation`` (as in :func:`jlrp.attribute`).
        output: the output selector for ``conservation`` (as in :func:`jlrp.attribute`).
        rtol: the flags' tolerance for ``conservation``, relative to the score.
        **kwargs: keyword arguments of the model call (the names above are taken).

    Returns:
        An :class:`AuditReport`; print it for a table.
    """
    if not isinstance(explained, Explained):
        raise UsageTypeError(f"jlrp.audit needs a model made by jlrp.explain, got {type(explained).__name__}")
    found: list[list[LayerRecord]] = []

    def run(*call_args):
        output, records = explained.trace(*call_args, **kwargs)
        found.append(records)
        return output

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JlrpWarning)
        jax.eval_shape(run, *args)
    records = found[0]
    rows: dict[str, list[Any]] = {}
    for record in records:
        if record.path in rows:
            rows[record.path][3] += 1
            continue
        rule = "-" if record.rule is None else repr(record.rule)
        if record.uncovered:
            rule = "UNCOVERED (gradient)"
        elif record.rule is None and record.linear:
            rule = "- (its ops are classified)"
        note = record.note + (f" [{record.source}]" if record.source and record.uncovered else "")
        rows[record.path] = [display_path(record.path), record.kind, rule, 1, note]
    uncovered = () if getattr(explained.composite, "gradient_based", False) else tuple(uncovered_ops(records))
    notes = list(getattr(explained, "notes", ()))
    for record in records:
        if record.note.startswith("not merged"):
            notes.append(f"{record.kind} '{display_path(record.path)}' {record.note}")
    if any(isinstance(c, MergeBatchNorm) for c in explained.composite.canonizers):
        kinds = tuple(t.__name__ for t in _types.BatchNorm)
        for record in records:
            if record.kind in kinds and not record.note:
                treatment = (
                    f"its rule: {record.rule!r}"
                    if record.rule is not None
                    else "its arithmetic is an element-wise affine op with the Norm (Epsilon) rule"
                )
                notes.append(
                    f"BatchNorm '{display_path(record.path)}' was not merged: it follows no linear layer, or "
                    "it is a BatchNorm class of your own (register it: "
                    f"MergeBatchNorm(batchnorm_types=(YourBatchNorm,))) ({treatment})"
                )
    report = AuditReport(tuple(tuple(row) for row in rows.values()), uncovered, tuple(dict.fromkeys(notes)))
    if conservation:
        from .conservation import conservation_audit

        found_conservation = conservation_audit(
            explained, *args, target=target, output=output, rtol=rtol, suspects=uncovered, **kwargs
        )
        report = dataclasses.replace(report, conservation=found_conservation)
    return report
