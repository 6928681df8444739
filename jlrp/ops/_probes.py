"""Probes: zero arrays whose cotangent is the relevance where they are added.

Embedding probes sit at the lookups of integer inputs (used by :func:`jlrp.attribute` for token ids);
taps (:class:`Taps`) at chosen module and op outputs and parameters (used by :mod:`jlrp.concepts`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..core import context_value
from ..errors import UsageError

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


# --------------------------------------------------------------------------------------------
# taps: relevance, activations, conditions and parameter relevance at named layers and ops


@jax.custom_vjp
def _capture(out: Any, probe: Any) -> Any:
    return out


def _capture_fwd(out: Any, probe: Any) -> tuple[Any, None]:
    return out, None


def _capture_bwd(_: None, relevance: Any) -> tuple[Any, Any]:
    return relevance, relevance


_capture.defvjp(_capture_fwd, _capture_bwd)


@jax.custom_vjp
def _condition(out: Any, probe: Any) -> tuple[Any, Any]:
    return out, jnp.zeros_like(out)


def _condition_fwd(out: Any, probe: Any) -> tuple[tuple[Any, Any], None]:
    return (out, jnp.zeros_like(out)), None


def _condition_bwd(_: None, cotangents: tuple[Any, Any]) -> tuple[Any, Any]:
    relevance, mask = cotangents
    return relevance * mask.astype(relevance.dtype), relevance


_condition.defvjp(_condition_fwd, _condition_bwd)


@dataclasses.dataclass(frozen=True)
class TapPoint:
    """One tapped layer or op call, found while tracing.

    Attributes:
        key: the call's key: its path, with ``#n`` appended for the n-th repeated call (n >= 1).
        path: the module or op path (``'features_28'``, ``'layer1_0/@add_0'``).
        shape: the output's shape; dtype: its dtype.
        captured: relevance and activation are returned; conditioned: a condition mask applies.
    """

    key: str
    path: str
    shape: tuple[int, ...]
    dtype: Any
    captured: bool
    conditioned: bool


@dataclasses.dataclass
class Taps:
    """Zero probes and condition masks at chosen module and op outputs (concept relevance, CRP).

    A tapped output ``a`` becomes ``a`` again in the forward pass; in the backward pass its relevance
    ``R`` (the cotangent arriving there) is also the cotangent of a zero *probe* (so that the VJP
    returns it) and, at a *conditioned* output, is multiplied by a mask that arrives as the cotangent of
    an extra zero output, the *carrier* (so one forward serves any number of masks under ``vmap``).
    Parameter taps add zero probes to a ruled module's (effective) parameters, whose cotangent is the
    rule's parameter relevance (:meth:`jlrp.core.Rule.relevance_with_params`).

    Used by :mod:`jlrp.concepts`; the front ends call :meth:`module_output` / :meth:`module_params`,
    the op interpreter :meth:`op_output`.

    Attributes:
        capture, conditions, params: predicates ``path -> bool``: which outputs to capture, to
            condition, and which modules' parameter relevance to return.
        values: ``None`` while discovering the tap points (abstract pass); then ``{'out': {key:
            probe}, 'params': {key: probe tree}}``.
        points: the tapped outputs (:meth:`ordered_points`: in execution order); param_points:
            ``{key: abstract params}``.
        outputs: ``{key: (activation, carrier or None)}`` of the current pass.
        skipped: why matching calls were not tapped (non-array outputs, modules without a rule).
    """

    capture: Callable[[str], bool]
    conditions: Callable[[str], bool]
    params: Callable[[str], bool]
    values: dict[str, dict[str, Any]] | None = None
    points: dict[str, TapPoint] = dataclasses.field(default_factory=dict)
    param_points: dict[str, Any] = dataclasses.field(default_factory=dict)
    outputs: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    order: list[str] = dataclasses.field(default_factory=list)
    _counts: dict[str, int] = dataclasses.field(default_factory=dict)
    _module_keys: list[str] = dataclasses.field(default_factory=list)

    def begin(self) -> None:
        """Start a new trace of the explained forward (keys count calls from zero again)."""
        self._counts.clear()
        self.outputs.clear()
        self._module_keys.clear()
        self.order.clear()

    def _key(self, path: str) -> str:
        n = self._counts.get(path, 0)
        self._counts[path] = n + 1
        return path if n == 0 else f"{path}#{n}"

    def _tap(self, key: str, path: str, out: Any, module: bool) -> Any:
        captured, conditioned = self.capture(path), self.conditions(path)
        if not (captured or conditioned or key in self.param_points):
            return out
        if not isinstance(out, (jax.Array, np.ndarray)) or not jnp.issubdtype(out.dtype, jnp.floating):
            if captured or conditioned:
                self.skipped[key] = f"its output is {type(out).__name__}, not one floating-point array"
            return out
        self.points[key] = TapPoint(key, path, tuple(out.shape), out.dtype, captured, conditioned)
        if module:  # traced now, evaluated later by the op interpreter, which reports the order
            self._module_keys.append(key)
            scope = f"jlrp_r_tap{len(self._module_keys) - 1}"
        else:
            self.order.append(key)
            scope = "jlrp_r_tap"
        probe = jnp.zeros_like(out) if self.values is None else self.values["out"][key]
        with jax.named_scope(scope):  # the op analysis treats it like a rule call: kept as it is
            if conditioned:
                out, carrier = _condition(out, probe)
            else:
                out, carrier = _capture(out, probe), None
        self.outputs[key] = (out, carrier)
        return out

    def module_output(self, path: str, out: Any) -> Any:
        """Tap a module call's output (the front ends call this for every module call)."""
        return self._tap(self._key(path), path, out, module=True)

    def op_output(self, path: str, out: Any) -> Any:
        """Tap an op's output (the interpreter calls this for ops whose path is wanted)."""
        return self._tap(self._key(path), path, out, module=False)

    def reached(self, index: int, inner: bool = False) -> None:
        """The op interpreter evaluates module tap ``index`` now (execution order of the taps); ``inner``:
        inside a scan, cond or checkpoint body, whose values cannot leave it (a UsageError)."""
        if index < len(self._module_keys):
            if inner:
                raise UsageError(
                    f"'{self._module_keys[index]}' lies inside a scan, cond or checkpoint (remat) body, where "
                    "relevance and activations cannot be captured per iteration; capture or condition the "
                    "output of the module that contains the loop or checkpoint instead."
                )
            self.order.append(self._module_keys[index])

    def wants(self, path: str) -> bool:
        """Whether the output at ``path`` is captured or conditioned."""
        return self.capture(path) or self.conditions(path)

    def module_params(self, path: str, rule: Any, params: Any) -> tuple[Any, bool]:
        """``(params, tapped)``: the parameters a ruled module's rule acts on, with zero probes added
        when ``path`` is one whose parameter relevance is wanted. The module's output is then tapped as
        well (it places the parameters in the execution order)."""
        if not self.params(path):
            return params, False
        n = self._counts.get(path, 0)
        key = path if n == 0 else f"{path}#{n}"
        if rule is None:
            if params:
                self.skipped[key] = "it has no rule (its gradient is kept), so no parameter relevance"
            return params, False
        self.param_points[key] = jax.tree_util.tree_map(
            lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)), params
        )
        if self.values is None:
            return params, True
        probe = self.values["params"][key]
        return jax.tree_util.tree_map(lambda p, z: p + z.astype(jnp.result_type(p)), params, probe), True

    def module_outputs(self) -> dict[str, tuple[Any, Any]]:
        """The module taps of the current trace (returned from the traced forward, see
        :meth:`jlrp.frontends.explained.Explained.trace`)."""
        return {key: self.outputs[key] for key in self._module_keys}

    def ordered_points(self) -> dict[str, TapPoint]:
        """:attr:`points` in execution order (as the op interpreter evaluated them)."""
        ordered = {k: self.points[k] for k in dict.fromkeys(self.order) if k in self.points}
        ordered.update({k: p for k, p in self.points.items() if k not in ordered})
        return ordered


ACTIVE_TAPS: contextvars.ContextVar[Taps | None] = contextvars.ContextVar("jlrp_taps", default=None)


@contextlib.contextmanager
def tapping(taps: Taps) -> Iterator[Taps]:
    """While active, explained forwards tap the outputs and parameters ``taps`` selects."""
    with context_value(ACTIVE_TAPS, taps):
        yield taps
