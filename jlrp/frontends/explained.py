"""The explained model's base: :class:`Explained`, the layer records and the input checks.

Shared by both front ends (:mod:`jlrp.linen`, :mod:`jlrp.nnx`) and by :mod:`jlrp.explain`, which
imports the front ends; nothing here imports them, so there is no import cycle.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..composites import Composite
from ..core import Rule
from ..errors import CompositeError, CoverageError, InputError, JlrpWarning, integer_input_error
from ..ops import ACTIVE_TAPS, ModuleScopes, run_with_op_rules

__all__ = [
    "LayerRecord",
    "Explained",
    "check_input",
    "display_path",
    "uncovered_ops",
    "validate_records",
]


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

        taps = ACTIVE_TAPS.get()
        if taps is not None:
            taps.begin()

        def forward(*call_args):
            output = self._forward(resolver, records, scopes, *call_args, **kwargs)
            # module taps are made while this is traced: their values leave the trace as outputs
            return output if taps is None else (output, taps.module_outputs())

        output = run_with_op_rules(
            forward, args, self.input_argnum, resolver, records, scopes, LayerRecord, notes
        )
        if taps is not None:
            output, module_taps = output
            taps.outputs.update(module_taps)
        self.notes = tuple(dict.fromkeys(notes))
        validate_records(self.composite, resolver, records)
        uncovered = [] if getattr(self.composite, "gradient_based", False) else uncovered_ops(records)
        if uncovered and self.strict:
            raise CoverageError(
                f"strict=True: these ops on the relevance path have no LRP rule: {'; '.join(uncovered)}. "
                "Map them in the composite (by type or path), or explain without strict=True."
            )
        owner = self.warning_owner
        if (uncovered or self.notes) and not getattr(owner, "_warned", False):
            owner._warned = True
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

    @property
    def warning_owner(self) -> Explained:
        """The explained model whose coverage warning this one shares (itself; an NNX ``pure`` view
        shares its model's, so the warning comes once per explained model)."""
        return self

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
