"""``jlrp.explain``: wrap a Flax model so that its VJP is the relevance of the chosen composite.

The explained function computes exactly the model's forward pass; only its backward changes. With
the model output masked to the explained class as cotangent, the VJP with respect to the input is
the relevance (DESIGN.md section 1)::

    explained = jlrp.explain(model, composites.EpsilonPlusFlat())   # linen: f(variables, x, ...)
    y, vjp = jax.vjp(lambda x: explained(variables, x), x)
    (relevance,) = vjp(y * jax.nn.one_hot(target, y.shape[-1]))
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .composites import Composite, as_composite
from .core import Rule
from .errors import CompositeError, CoverageError, InputDtypeError, InputError, JlrpWarning, UsageTypeError
from .ops import ModuleScopes, run_with_op_rules

__all__ = ["explain", "audit", "AuditReport", "Explained", "LayerRecord", "check_input"]


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """One module (or function-level op) call seen while explaining.

    Attributes:
        path: the module path (``''`` is the root module).
        kind: the module's class name (or the op's).
        rule: the rule it got, ``None`` if it kept its gradient.
        linear: whether it is a layer/op whose plain gradient would not be an LRP rule (it needs one).
        note: what a canonizer did to it, or what the op is, if anything.
        source: ``file:line`` of the user code that made a function-level op (``''`` for modules).
    """

    path: str
    kind: str
    rule: Rule | None
    linear: bool = False
    note: str = ""
    source: str = ""

    @property
    def is_op(self) -> bool:
        """Whether this record is a function-level op (its path has an ``@`` segment)."""
        return self.path.startswith("@") or "/@" in self.path

    @property
    def uncovered(self) -> bool:
        """An op on the relevance path that keeps a gradient which is not an LRP rule."""
        return self.is_op and self.linear and self.rule is None


def uncovered_ops(records: list[LayerRecord]) -> list[str]:
    """``'path (kind) at file:line'`` for every uncovered op, without repeats."""
    found = []
    for r in records:
        if r.uncovered:
            where = f" at {r.source}" if r.source else ""
            note = f": {r.note}" if r.note else ""
            found.append(f"{display_path(r.path)} ({r.kind}{note}){where}")
    return list(dict.fromkeys(found))


def display_path(path: str) -> str:
    return path if path else "<root>"


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


def check_input(x: Any, name: str = "input") -> None:
    """Check the model input, an array or any pytree of arrays (several inputs), before explaining it.

    Every leaf must be floating-point or integer (indices that feed embedding lookups: the explained
    trace raises where one does not); where a float leaf is concrete (not traced), it must be finite. Error
    messages name the offending leaf by its key path (e.g. ``input[1]``, ``input['image']``).

    Raises:
        InputDtypeError: a leaf that is neither floating-point nor integer (see :func:`integer_input_error`).
        InputError: a concrete leaf with NaN or inf values, or an input without any array.
    """
    leaves = jax.tree_util.tree_leaves_with_path(x)
    if not leaves:
        raise InputError(f"the {name} {x!r} holds no array; pass the batch to explain")
    for path, leaf in leaves:
        where = name + jax.tree_util.keystr(path)
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            leaf = np.asarray(leaf)
            dtype = leaf.dtype
        if jnp.issubdtype(dtype, jnp.integer):
            continue  # indices for embedding lookups; the trace checks that they feed one
        if not jnp.issubdtype(dtype, jnp.floating):
            raise integer_input_error(where, dtype)
        if isinstance(leaf, jax.core.Tracer):
            continue
        finite = np.isfinite(np.asarray(leaf))
        if not finite.all():
            raise InputError(
                f"the {where} contains {int((~finite).sum())} NaN/inf value(s) (first at index "
                f"{tuple(int(i) for i in np.argwhere(~finite)[0])}); relevance would be NaN. Clean the input."
            )


class Explained:
    """An explained model: a pure function with the model's call signature and an LRP backward.

    Created by :func:`explain`; the front end (linen or NNX) decides the exact call signature.
    Hashable by identity, so it can be a static argument of ``jax.jit``.
    """

    def __init__(self, model: Any, composite: Composite, strict: bool = False):
        self.model = model
        self.composite = composite
        self.strict = strict

    #: position of the model input among the call's positional arguments
    input_argnum: int = 0

    def trace(self, *args: Any, **kwargs: Any) -> tuple[Any, list[LayerRecord]]:
        """Run the explained forward and also return the records of every layer and op on the way."""
        if len(args) > self.input_argnum:
            check_input(args[self.input_argnum])
        resolver = self.composite.resolver()
        records: list[LayerRecord] = []
        notes: list[str] = []
        scopes = ModuleScopes()

        def forward(*call_args):
            return self._forward(resolver, records, scopes, *call_args, **kwargs)

        output = run_with_op_rules(
            forward, args, self.input_argnum, resolver, records, scopes, LayerRecord, notes
        )
        self.notes = tuple(dict.fromkeys(notes))
        validate_records(self.composite, resolver, records)
        uncovered = [] if getattr(self.composite, "gradient_based", False) else uncovered_ops(records)
        if uncovered and self.strict:
            raise CoverageError(
                f"strict=True: these ops on the relevance path have no LRP rule: {'; '.join(uncovered)}. "
                "Map them in the composite (by type or path), or explain without strict=True."
            )
        if (uncovered or self.notes) and not getattr(self, "_warned", False):
            self._warned = True
            message = "; ".join(uncovered)
            warnings.warn(
                (
                    f"jlrp: these ops on the relevance path have no LRP rule and keep their gradient: {message}. "
                    "jlrp.audit lists them; map them in the composite or pass strict=True to raise. "
                    if uncovered
                    else ""
                )
                + " ".join(self.notes),
                JlrpWarning,
                stacklevel=3,
            )
        return output, records

    def _forward(
        self, resolver: Any, records: list[LayerRecord], scopes: ModuleScopes, *args: Any, **kwargs: Any
    ) -> Any:
        """Front-end specific: run the model, asking ``resolver.rule_for(path, module)`` for every module
        call in execution order, appending a :class:`LayerRecord` per call, wrapping each call in
        ``scopes.scope(path, owns_variables)`` and applying rules with :func:`jlrp.core.apply_rule`."""
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.trace(*args, **kwargs)[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, {self.composite!r})"


def validate_records(composite: Composite, resolver: Any, records: list[LayerRecord]) -> None:
    """The checks after a traced forward: unmatched path entries, no rule anywhere."""
    paths = sorted({display_path(r.path) for r in records if not r.is_op})
    unmatched = resolver.unmatched()
    if unmatched:
        raise CompositeError(
            f"path entries {unmatched} of {type(composite).__name__} match no module of the model. "
            f"The module paths are: {', '.join(paths)}"
        )
    if not any(r.rule is not None for r in records):
        layers = sorted({f"{display_path(r.path)} ({r.kind})" for r in records})
        raise CompositeError(
            f"{type(composite).__name__} puts no rule on any layer of the model, so the result would be "
            f"the plain gradient times the output. The layers are: {', '.join(layers)}. Map the layer types "
            "(jlrp.types.Dense, jlrp.types.Convolution, or your own classes) or their paths to rules."
        )


def explain(model: Any, composite: Any, *, strict: bool = False) -> Explained:
    """Wrap a Flax model so that its VJP computes LRP relevance.

    Args:
        model: a ``flax.linen.Module`` (the result is called like ``model.apply``:
            ``explained(variables, x, *args, **kwargs)``) or a ``flax.nnx.Module`` (called like the
            model: ``explained(x, *args, **kwargs)``).
        composite: a composite (:mod:`jlrp.composites`), a registry key such as ``'epsilon_plus'``, or
            a plain rule map ``{layer type or path glob: rule}``.
        strict: raise :class:`~jlrp.errors.CoverageError` when a linear layer or op on the relevance
            path gets no rule.

    Returns:
        The explained model, a pure function that works under ``jax.jit``, ``jax.vmap`` and
        ``jax.checkpoint``.
    """
    composite = as_composite(composite)
    from flax import linen as nn

    if isinstance(model, nn.Module):
        from .linen import LinenExplained

        return LinenExplained(model, composite, strict=strict)
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax always ships nnx in supported versions
        nnx = None
    if nnx is not None and isinstance(model, nnx.Module):
        from .nnx import explain_nnx

        return explain_nnx(model, composite, strict=strict)
    if isinstance(model, Explained):
        raise UsageTypeError("this model is already explained; pass the original model to jlrp.explain")
    raise UsageTypeError(f"jlrp.explain needs a flax.linen or flax.nnx Module, got {type(model).__name__}")


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
    from . import types as _types
    from .canonizers import MergeBatchNorm

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
                    f"BatchNorm '{display_path(record.path)}' follows no linear layer, so it was not merged "
                    f"({treatment})"
                )
    report = AuditReport(tuple(tuple(row) for row in rows.values()), uncovered, tuple(dict.fromkeys(notes)))
    if conservation:
        from .conservation import conservation_audit

        found_conservation = conservation_audit(
            explained, *args, target=target, output=output, rtol=rtol, **kwargs
        )
        report = dataclasses.replace(report, conservation=found_conservation)
    return report
