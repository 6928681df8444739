"""Embedding probes: zero arrays added at the lookups of integer inputs, whose cotangent is the
relevance there (used by :func:`jlrp.attribute` for token ids)."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

from ..core import context_value

# --------------------------------------------------------------------------------------------
# embedding probes: relevance at the output of lookups by integer inputs


@dataclasses.dataclass
class EmbeddingProbes:
    """Zero arrays added to the output of every embedding lookup (a gather from a constant table by
    indices that come from an integer input leaf), so that their cotangent is the relevance there.

    Attributes:
        leaf: the index of the integer leaf (among the input's leaves) whose lookups are probed.
        values: the probes to add, in lookup order; ``None`` only records the lookups' shapes.
        found: ``(shape, dtype)`` of every lookup, in order (filled while tracing).
    """

    leaf: int
    values: Sequence[Any] | None = None
    found: list[tuple[tuple[int, ...], Any]] = dataclasses.field(default_factory=list)


ACTIVE_PROBES: contextvars.ContextVar[EmbeddingProbes | None] = contextvars.ContextVar(
    "jlrp_probes", default=None
)


@contextlib.contextmanager
def probing_embeddings(probes: EmbeddingProbes) -> Iterator[EmbeddingProbes]:
    """While active, explained forwards add ``probes.values`` at the embedding lookups of ``probes.leaf``."""
    with context_value(ACTIVE_PROBES, probes):
        yield probes
