"""The conservation audit: where relevance is created or lost, layer by layer and op by op.

LRP rules redistribute relevance: a layer's input relevance sums to its output relevance, except
for the share its bias (or an op's additive constant) keeps and what the stabiliser shifts. This
module runs one explained backward pass and reports, for every rule call, the relevance sum that
enters it (from the layer above) and leaves it (to the layer below), and flags

- a rule call that loses or creates relevance although the layer has no bias (beyond ``rtol``):
  a rule that does not conserve (e.g. ``Flat`` on a layer with negative inputs, or a
  gradient-based rule), or a stabiliser that is large against the layer's outputs;
- relevance that appears or vanishes *between* rule calls: on gradient paths through ops that no
  rule covers (see :func:`jlrp.audit`), which is how silently wrong relevance shows.

Use it through ``jlrp.audit(explained, *args, conservation=True, target=...)`` or
:func:`conservation_audit`. No other LRP library reports this (zennit's and lxt's users check sums
by hand).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from .attribution import _vjp_at, leading_length, pure_function
from .core import Ledger, recording_ledger
from .errors import JlrpWarning
from .frontends.explained import check_input
from .targets import as_target, output_cotangent, output_struct

__all__ = ["ConservationRow", "ConservationReport", "conservation_audit"]

_WHERE = re.compile(r"^'(.*)' \((.*)\)$")


@dataclasses.dataclass(frozen=True)
class ConservationRow:
    """One rule call (a layer or an op) of the backward pass.

    Attributes:
        path: the layer's or op's path (``'<root>'`` for the root module).
        kind: its class name.
        rule: ``repr`` of its rule.
        relevance_out: the relevance sum of the layer's output (what enters the rule).
        relevance_in: the relevance sum the rule gives the layer's input (what leaves it).
        bias: whether the layer has a non-zero bias or additive constant, which keeps a share.
        flagged: whether relevance changed beyond what bias and stabiliser explain.
    """

    path: str
    kind: str
    rule: str
    relevance_out: float
    relevance_in: float
    bias: bool
    flagged: bool

    @property
    def change(self) -> float:
        """``relevance_in - relevance_out``: negative where relevance was absorbed."""
        return self.relevance_in - self.relevance_out


@dataclasses.dataclass(frozen=True)
class ConservationReport:
    """What :func:`conservation_audit` measured; ``str()`` is a table, the fields are for tests.

    Attributes:
        rows: one :class:`ConservationRow` per rule call, in the order the backward pass ran them
            (from the output towards the input).
        score: the explained score (sum of the starting relevance).
        input_relevance: the sum of the relevance of every input leaf.
        absorbed: the relevance kept by biases and stabilisers of the rule calls (``-sum(change)``).
        unaccounted: ``score - input_relevance - absorbed``: relevance created or lost between rule
            calls, on gradient paths (uncovered ops).
        rtol: the relative tolerance of the flags (of ``|score|``).
        suspects: the uncovered ops on the relevance path (from :func:`jlrp.audit`).
    """

    rows: tuple[ConservationRow, ...]
    score: float
    input_relevance: float
    absorbed: float
    unaccounted: float
    rtol: float
    suspects: tuple[str, ...] = ()

    @property
    def flagged(self) -> tuple[str, ...]:
        """Paths of the flagged rule calls, plus ``'<between layers>'`` if relevance went unaccounted."""
        found = [r.path for r in self.rows if r.flagged]
        if self.between_flagged:
            found.append("<between layers>")
        return tuple(found)

    @property
    def between_flagged(self) -> bool:
        return abs(self.unaccounted) > self.rtol * max(abs(self.score), 1e-30)

    @property
    def ratio(self) -> float:
        """``input_relevance / score``: 1 for a conserving explanation of a bias-free model."""
        return self.input_relevance / self.score if self.score else float("nan")

    def __str__(self) -> str:
        header = ("path", "type", "rule", "R out", "R in", "change", "note")
        body = []
        for r in self.rows:
            note = "FLAG: not conserved" if r.flagged else ("bias keeps a share" if r.bias else "")
            body.append(
                (
                    r.path,
                    r.kind,
                    r.rule,
                    f"{r.relevance_out:.6g}",
                    f"{r.relevance_in:.6g}",
                    f"{r.change:+.3g}",
                    note,
                )
            )
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()  # noqa: E731
        out = [line(header), line(tuple("-" * w for w in widths)), *map(line, body)]
        out.append(
            f"score {self.score:.6g}; input relevance {self.input_relevance:.6g} (ratio {self.ratio:.6g}); "
            f"kept or changed inside rule calls (biases, stabilisers, non-conserving rules) {self.absorbed:.6g}; "
            f"unaccounted (between rule calls) {self.unaccounted:.3g}"
        )
        if self.between_flagged:
            suspects = "; ".join(self.suspects) if self.suspects else "none reported by audit"
            out.append(
                f"FLAG: relevance created or lost between rule calls (gradient paths). Suspects: {suspects}"
            )
        elif not any(r.flagged for r in self.rows):
            out.append("conservation holds up to biases and stabilisers")
        return "\n".join(out)


def conservation_audit(
    explained: Any,
    *args: Any,
    target: Any = None,
    output: Any = None,
    rtol: float = 1e-5,
    suspects: tuple[str, ...] = (),
    **kwargs: Any,
) -> ConservationReport:
    """Run one explained backward pass and report the relevance entering and leaving every rule call.

    Args:
        explained: a model made by :func:`jlrp.explain`.
        *args: its arguments (``variables, x`` for linen, ``x`` for NNX); ``x`` may be a pytree.
        target: the explained class or starting relevance, as for :func:`jlrp.attribute`.
        output: the output selector, as for :func:`jlrp.attribute`.
        rtol: a rule call of a bias-free layer, and the relevance between rule calls, are flagged when
            they change relevance by more than ``rtol * |score|``.
        suspects: the uncovered ops to name where relevance goes unaccounted (``jlrp.audit`` passes
            its list).
        **kwargs: keyword arguments of the model call.

    Returns:
        A :class:`ConservationReport`.
    """
    fn, params, x, rest = pure_function(explained, args)
    check_input(x)
    output_shape = tuple(output_struct(fn, (params, x, *rest), kwargs, output).shape)
    target = as_target(target, output_shape, leading_length(x))
    ledger = Ledger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", JlrpWarning)
        with recording_ledger(ledger):
            out, relevance = _vjp_at(fn, params, x, rest, tuple(sorted(kwargs.items())), output, target)
            jax.block_until_ready(relevance)
        jax.effects_barrier()
    score = float(jnp.sum(output_cotangent(out, target)))
    scale = rtol * max(abs(score), 1e-30)
    rows = []
    for index in ledger.sums:  # in the order the backward pass reached them
        r_out, r_in, bias_mass = ledger.sums[index]
        where, rule, absorbs = ledger.calls[index]
        match = _WHERE.match(where)
        path, kind = (match.group(1), match.group(2)) if match else (where, "")
        has_bias = absorbs or bias_mass > 0
        flagged = not has_bias and abs(r_in - r_out) > scale
        rows.append(ConservationRow(path, kind, repr(rule), r_out, r_in, has_bias, flagged))
    input_relevance = float(sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(relevance)))
    absorbed = -sum(r.change for r in rows)
    return ConservationReport(
        tuple(rows),
        score,
        input_relevance,
        absorbed,
        score - input_relevance - absorbed,
        rtol,
        tuple(suspects),
    )
