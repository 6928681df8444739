"""The kernel of jlrp: stabilisers, the rule base classes and the one ``jax.custom_vjp`` wrapper.

A *rule* is a frozen, hashable dataclass of hyper-parameters whose maths works on
``(layer_fn, params, x)`` only, where ``layer_fn(params, x)`` is the layer's pure apply.
:func:`apply_rule` is the single place that turns any rule into a differentiable layer call: its
forward is the layer's ordinary forward; its backward receives the *relevance* of the layer output
and returns the relevance of the layer input (no cotangent flows to the parameters).

Rule hyper-parameters that are Python scalars are static (they become part of the trace, so a new
value means new numbers, never a stale cache); array-valued hyper-parameters (for example
``ZBox``'s bounds) are passed to the ``custom_vjp`` as ordinary operands, so rules are also pytrees.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError, JlrpError, RuleError, UsageError, UsageTypeError

Array = Any
LayerFn = Callable[[Any, Array], Array]

__all__ = [
    "Stabilizer",
    "stabilize",
    "Rule",
    "BasicRule",
    "Shares",
    "layer_pullback",
    "param_product",
    "apply_rule",
    "split_arrays",
    "rule_dataclass",
    "map_params",
    "normalize_zero_params",
    "input_known_non_negative",
    "RuleCall",
    "recording_rule_calls",
]

# Set while a rule's backward is traced for a layer whose input is provably >= 0 (see apply_rule).
_KNOWN_NON_NEGATIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("jlrp_non_negative", default=False)
# The list apply_rule registers its calls in while jlrp.ops traces the explained forward.
_RULE_CALLS: contextvars.ContextVar[list[RuleCall] | None] = contextvars.ContextVar(
    "jlrp_rule_calls", default=None
)


@contextlib.contextmanager
def context_value(var: contextvars.ContextVar[Any], value: Any) -> Iterator[Any]:
    """Set the context variable ``var`` to ``value`` for the ``with`` block (jlrp's side channels)."""
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


class Ledger:
    """Relevance sums entering and leaving every rule call of one explained backward pass.

    Filled by :func:`apply_rule` while :func:`recording_ledger` is active (through
    ``jax.debug.callback`` in each rule's backward, so it also works under ``jax.jit`` and inside
    ``scan`` bodies, where the sums add up over iterations). Read by :mod:`jlrp.conservation`.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, bool]] = []  # (where, rule, constants absorb relevance)
        self.sums: dict[int, list[float]] = {}  # index -> [relevance out, relevance in, bias mass]

    def register(self, where: str, rule: Any, absorbs: bool) -> int:
        self.calls.append((where, rule, absorbs))
        return len(self.calls) - 1

    def add(self, index: Any, out: Any, inp: Any, bias: Any) -> None:
        row = self.sums.setdefault(int(index), [0.0, 0.0, 0.0])
        row[0] += float(out)
        row[1] += float(inp)
        row[2] += float(bias)


_LEDGER: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar("jlrp_ledger", default=None)


@contextlib.contextmanager
def recording_ledger(ledger: Ledger) -> Iterator[Ledger]:
    """While active, rule calls that are traced report their relevance sums to ``ledger``."""
    with context_value(_LEDGER, ledger):
        yield ledger


def _bias_mass(params: Any) -> Any:
    """``sum |b|`` over the parameters named ``bias`` (0 for none)."""
    total = jnp.zeros(())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _leaf_name(path) == "bias" and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            total = total + jnp.sum(jnp.abs(leaf)).astype(total.dtype)
    return total


def input_known_non_negative() -> bool:
    """Whether the layer input of the rule backward being traced is known to be ``>= 0``.

    True when :mod:`jlrp.ops` proved from the model's trace that the input comes out of a ReLU (or
    another op whose result cannot be negative, e.g. a max pool of such values). Rules with separate
    terms for negative inputs (ZPlus, AlphaBeta, Gamma) then drop those terms at trace time; otherwise
    they test the sign at run time.
    """
    return _KNOWN_NON_NEGATIVE.get()


@dataclasses.dataclass(frozen=True)
class RuleCall:
    """One :func:`apply_rule` call seen while the explained forward was traced.

    Attributes:
        call_non_negative: the same layer call, from the flat operands of its ``custom_vjp_call``
            equation, with a backward that may assume the layer input is ``>= 0``.
        input_index: the position of the layer input among those operands.
        num_operands: how many operands the equation has.
    """

    call_non_negative: Callable[[Sequence[Any]], Any]
    input_index: int
    num_operands: int


@contextlib.contextmanager
def recording_rule_calls(calls: list[RuleCall]) -> Iterator[None]:
    """While active, :func:`apply_rule` appends a :class:`RuleCall` to ``calls`` for each call and traces
    it in the named scope ``jlrp_r<index>``, so that its equation can be found again."""
    with context_value(_RULE_CALLS, calls):
        yield


def stabilize(
    input: Array,
    epsilon: float = 1e-6,
    clip: bool = False,
    norm_scale: bool = False,
    dim: Sequence[int] | None = None,
    signed: bool = True,
) -> Array:
    """Stabilise ``input`` for a safe division, with zennit's semantics (or lxt's, ``signed=False``).

    ``sign(z)`` counts 0 as positive. Without ``clip`` every entry is shifted away from zero:
    ``z + sign(z) * epsilon``; with ``clip`` its magnitude is clipped: ``sign(z) * max(|z|, epsilon)``.
    With ``norm_scale`` the epsilon is first multiplied by ``sqrt(mean(z ** 2))`` over the axes ``dim``
    (default: every axis but the first, i.e. per sample of a batch). ``signed=False`` is the
    stabiliser of lxt (the AttnLRP authors' library): ``z + epsilon`` whatever the sign of ``z``
    (a ``z`` near ``-epsilon`` is then not moved away from zero).

    Args:
        input: the denominator to stabilise.
        epsilon: shift (or clip bound).
        clip: clip the magnitude instead of shifting.
        norm_scale: scale ``epsilon`` by the root mean square of ``input`` over ``dim``.
        dim: axes for ``norm_scale``; ``None`` means all axes except axis 0.
        signed: shift by ``sign(z) * epsilon`` (zennit, default) or by ``+epsilon`` (lxt).

    Returns:
        An array of ``input``'s shape and dtype (with ``signed=True``, with no zero entries).

    Raises:
        UsageError: ``clip=True`` with ``signed=False`` (lxt has no clipping stabiliser).
    """
    input = jnp.asarray(input)
    eps = jnp.asarray(epsilon, dtype=input.dtype)
    if norm_scale:
        axes = tuple(dim) if dim is not None else tuple(range(1, input.ndim))
        eps = eps * jnp.sqrt(jnp.mean(input**2, axis=axes, keepdims=True))
    if not signed:
        if clip:
            raise UsageError("stabilize: clip=True needs signed=True (clipping keeps the sign of z)")
        return input + eps
    sign = jnp.where(input >= 0, 1, -1).astype(input.dtype)
    if clip:
        return sign * jnp.maximum(jnp.abs(input), eps)
    return input + sign * eps


@dataclasses.dataclass(frozen=True)
class Stabilizer:
    """A callable, hashable :func:`stabilize` with fixed settings (zennit's ``Stabilizer``).

    Rules accept either a float (plain shift by that epsilon) or any callable ``z -> stabilised z``
    as their ``stabilizer``/``epsilon``; this class is the callable to use for the other modes, e.g.
    ``Epsilon(epsilon=Stabilizer(0.25, norm_scale=True))``.
    """

    epsilon: float = 1e-6
    clip: bool = False
    norm_scale: bool = False
    dim: tuple[int, ...] | None = None
    signed: bool = True

    def __post_init__(self) -> None:
        if self.dim is not None:
            object.__setattr__(self, "dim", tuple(int(d) for d in np.atleast_1d(self.dim)))
        if self.clip and not self.signed:
            raise UsageError("Stabilizer: clip=True needs signed=True (clipping keeps the sign of z)")

    def __call__(self, input: Array) -> Array:
        return stabilize(input, self.epsilon, self.clip, self.norm_scale, self.dim, self.signed)

    @staticmethod
    def ensure(value: float | Callable[[Array], Array]) -> Callable[[Array], Array]:
        """Turn a float into ``Stabilizer(epsilon=value)``; return callables unchanged."""
        if callable(value):
            return value
        if isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            return Stabilizer(epsilon=float(value))
        raise UsageTypeError(
            f"a stabilizer must be a float or a callable z -> stabilised z, got {type(value).__name__}"
        )


# --------------------------------------------------------------------------------------------
# rules are frozen dataclasses and pytrees


def _hashable(value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):
        return ("tracer", id(value))
    if isinstance(value, (np.ndarray, jax.Array)):
        arr = np.asarray(value)
        return ("array", arr.shape, arr.dtype.str, arr.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, jax.Array, jax.core.Tracer))


def rule_dataclass(cls: type) -> type:
    """Decorate a :class:`Rule` subclass: frozen dataclass, value equality/hash, pytree registration.

    Array-valued fields are pytree leaves (so they may be traced and are passed to the backward as
    operands); every other field is static.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)

    def flatten(rule: Any) -> tuple[list[Any], tuple[Any, ...]]:
        leaves, aux = [], []
        for field in dataclasses.fields(rule):
            value = getattr(rule, field.name)
            if _is_array(value):
                leaves.append(value)
                aux.append((field.name, None, True))
            else:
                aux.append((field.name, value, False))
        return leaves, tuple(aux)

    def unflatten(aux: tuple[Any, ...], leaves: Sequence[Any]) -> Any:
        rule = object.__new__(cls)
        it = iter(leaves)
        for name, value, is_leaf in aux:
            object.__setattr__(rule, name, next(it) if is_leaf else value)
        return rule

    jax.tree_util.register_pytree_node(cls, flatten, unflatten)
    return cls


class Rule:
    """Base class of every rule.

    Subclasses are decorated with :func:`rule_dataclass` and implement :meth:`backward`. A rule is
    used by calling it like the layer it replaces: ``rule(layer_fn, params, x)`` (see
    :func:`apply_rule`).
    """

    #: whether the rule needs the layer to have its own parameters (a kernel/weight).
    requires_params: ClassVar[bool] = False
    #: whether the rule needs ``output.shape == input.shape`` (element-wise activations, Pass).
    elementwise: ClassVar[bool] = False
    #: whether the rule serves layers whose input is a tuple of activations (products of two activations).
    multi_input: ClassVar[bool] = False
    #: whether the rule holds the layer's output constant in the relevance pass instead of propagating
    #: through it (CP-LRP's AH-rule): products it enters become linear in their other operand.
    holds: ClassVar[bool] = False

    def _key(self) -> tuple[Any, ...]:
        return (type(self),) + tuple(
            _hashable(getattr(self, f.name))
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        )

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __call__(self, layer_fn: LayerFn, params: Any, x: Array) -> Array:
        return apply_rule(self, layer_fn, params, x)

    def check(self, params: Any, x: Array, output: Array, where: str) -> None:
        """Raise :class:`~jlrp.errors.RuleError` if this rule cannot serve the layer ``where``."""
        if not isinstance(output, (jax.Array, np.ndarray)) and not hasattr(output, "shape"):
            raise RuleError(
                f"{self!r} on {where}: the layer returns {type(output).__name__}, but rules need a layer "
                "that returns one array. Put the rule on the layers inside instead."
            )
        if self.requires_params:
            leaves = params if isinstance(params, Mapping) else None
            if not leaves:
                raise RuleError(
                    f"{self!r} on {where}: this rule needs a layer with its own parameters (a kernel, e.g. "
                    "Dense or Conv), but the module has none. Attach it to a Dense/Conv layer, or use "
                    "Norm() for parameter-free linear ops such as sums and average pooling."
                )
            nested = [k for k, v in leaves.items() if isinstance(v, Mapping)]
            if nested:
                raise RuleError(
                    f"{self!r} on {where}: the module is a container (it holds sub-modules {nested}); "
                    "rules act on single layers. Attach the rule to the layers inside, e.g. by type "
                    "(nn.Dense, nn.Conv) or with a path glob such as '<container>/Conv_*'."
                )
        if self.elementwise and tuple(output.shape) != tuple(jnp.shape(x)):
            raise RuleError(
                f"{self!r} on {where}: this rule passes relevance through element-wise, so it needs a layer "
                f"whose output has the input's shape, but {tuple(x.shape)} -> {tuple(output.shape)}."
            )

    def backward(self, layer_fn: LayerFn, params: Any, x: Array, output: Array, relevance: Array) -> Array:
        """Map the relevance of the layer output to the relevance of its input.

        Args:
            layer_fn: the layer's pure apply, ``layer_fn(params, x) -> output``.
            params: the layer's parameters (a flat mapping for Dense/Conv; ``{}`` for parameter-free ops).
            x: the layer input.
            output: the layer output from the forward pass.
            relevance: the relevance of the output (same shape as ``output``).

        Returns:
            The relevance of the input, shaped like ``x``.
        """
        raise NotImplementedError

    def relevance_with_params(
        self, layer_fn: LayerFn, params: Any, x: Array, output: Array, relevance: Array
    ) -> tuple[Array, Any]:
        """The relevance of the layer input and of the layer's parameters, ``(R_x, R_params)``.

        For a linear layer ``z = L(W, x) + b`` a rule evaluates modified layers ``z_k = L(p_k, x_k)`` and
        pulls cotangents ``c_k`` back through them. The input relevance is ``R_x = sum_k x_k * g_k`` with
        ``g_k = (dz_k/dx_k)^T c_k``; the parameters' side of the same decomposition is
        ``R_p = sum_k p_k * (dz_k/dp_k)^T c_k`` for every parameter leaf (kernel and bias; a parameter the
        rule sets to zero gets 0). Summed over the batch (the batch axis of a parameter cotangent), so
        ``R_kernel`` has the kernel's shape: the relevance of each weight as used by Concept Relevance
        Propagation (Achtibat et al., "From attribution maps to human-understandable explanations
        through Concept Relevance Propagation", Nature Machine Intelligence 2023) and by pruning
        (Yeom et al., "Pruning by explaining: A novel criterion for deep neural network pruning",
        Pattern Recognition 2021). ``b * sum(c)`` is the relevance the bias absorbs. For a bias-free
        layer under LRP-0, ``sum(R_kernel) == sum(R_x)``; with a bias,
        ``sum(R_kernel) + sum(R_bias) == sum(relevance)``.

        Args:
            layer_fn, params, x, output, relevance: as for :meth:`backward`.

        Returns:
            ``(R_x, R_params)``: ``R_x`` as :meth:`backward` returns it; ``R_params`` a pytree shaped like
            ``params`` with the same dtypes.

        Raises:
            RuleError: the rule defines no parameter relevance (this base implementation: rules of
                parameter-free layers, such as element-wise and transformer rules).
        """
        raise RuleError(
            f"rule {self!r} defines no parameter relevance; ask for parameter relevance only of layers whose "
            f"rule has it ({', '.join(_rules_with_param_relevance())} or any BasicRule subclass)"
        )


def _rules_with_param_relevance() -> list[str]:
    """Names of jlrp's rules that override :meth:`Rule.relevance_with_params` (for error messages)."""
    found, stack = set(), list(Rule.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        public = cls.__module__ == "jlrp.rules" and not cls.__name__.startswith("_")
        if public and cls.relevance_with_params is not Rule.relevance_with_params:
            found.add(cls.__name__)
    return sorted(found)


def _zero_cotangent(leaf: Any) -> Any:
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(np.shape(leaf), dtype=jax.dtypes.float0)


def split_arrays(tree: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any]]:
    """Split a pytree into its array leaves and a function that rebuilds it from new arrays.

    Non-array leaves (Python bools, strings, ``None``...) stay in the rebuilt tree unchanged.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    is_array = [_is_array(leaf) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array) if a]

    def rebuild(new_arrays: Sequence[Any]) -> Any:
        it = iter(new_arrays)
        return jax.tree_util.tree_unflatten(
            treedef, [next(it) if a else leaf for leaf, a in zip(leaves, is_array)]
        )

    return arrays, rebuild


def _is_float_array(leaf: Any) -> bool:
    return _is_array(leaf) and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)


def _after(values: Any, anchor_tree: Any) -> Any:
    """``values`` (a pytree), for XLA's scheduler only available once ``anchor_tree`` is computed.

    A rule's backward reads the forward's residuals (parameters, input, output), which exist from the
    forward on, so XLA may compute whatever the backward derives from them alone (``max(w, 0)`` of the
    sign rules, the flipped kernel of a transposed convolution, ``w+`` convolutions of the input) right
    away and keep the results until the layer's turn, and it may recompute a cheap element-wise input
    (a ReLU of a convolution) from *its* inputs, keeping those alive too. XLA:CPU does both: a ResNet50
    pass then held a modified copy of every layer's weights and two activations per layer (2.2x the
    gradient's planned memory). Tied to the relevance that reaches the layer, the backward of each layer
    starts when that relevance is complete (tying its parameters and input suffices; the output is
    not tied, which would cost a pass over it). The tie is a data dependency: every floating leaf times a
    1 computed from ``sum(anchor)``, which XLA cannot fold (no fast math); an optimization barrier would
    not do, XLA:CPU drops them before scheduling. ``x * 1`` is exact, so no value changes (XLA may still
    order a sum differently in the changed program: float rounding). Under ``jlrp.attribute(mesh=...)``
    (one GSPMD program) the sum of a batch-split relevance is one scalar all-reduce per rule call;
    ``devices=`` (``shard_map``, each device its own rows) sums locally. :func:`apply_rule` ties only the
    backwards of layers with floating parameters (the others derive nothing early that costs memory),
    and only under a trace (eagerly each operation runs in program order).
    """
    anchors = [a for a in jax.tree_util.tree_leaves(anchor_tree) if jnp.size(a)]
    if not anchors or not isinstance(anchors[0], jax.core.Tracer):  # eager: nothing to schedule
        return values
    total = jnp.sum(anchors[0])
    one = jnp.where(jnp.isfinite(total), total * 0 + 1, 1)

    def tie(leaf: Any) -> Any:
        if _is_float_array(leaf):
            return leaf * one.astype(jnp.result_type(leaf))
        return leaf

    return jax.tree_util.tree_map(tie, values)


def apply_rule(
    rule: Rule,
    layer_fn: Callable[..., Array],
    params: Any,
    x: Array,
    where: str = "a layer",
    state: Any = None,
    non_negative: bool = False,
    absorbs: bool = False,
    param_relevance: bool = False,
) -> Array:
    """Call ``layer_fn(params, x)`` so that its VJP is ``rule``'s relevance backward.

    This is the single ``jax.custom_vjp`` of jlrp. ``layer_fn`` is not differentiated; ``params`` get a
    zero cotangent (with ``param_relevance``: the rule's parameter relevance); array hyper-parameters
    of the rule are operands with a zero cotangent.

    Args:
        rule: the rule to apply.
        layer_fn: the layer's pure apply ``layer_fn(params, x)``, or ``layer_fn(params, x, state)``
            when ``state`` is given.
        params: the layer's parameters (any pytree).
        x: the layer input (a floating-point array; a tuple of them for rules with ``multi_input``).
        where: a description of the layer for error messages.
        state: other values the layer reads (batch statistics, extra call arguments); its arrays are
            passed to the ``custom_vjp`` as operands with a zero cotangent, never captured in a
            closure (a closure over traced values would leak them into the backward pass).
        non_negative: the caller guarantees ``x >= 0``; the backward then runs with
            :func:`input_known_non_negative` true.
        absorbs: the layer adds constants that keep a share of relevance (an op's bias); only read by
            the conservation audit (:mod:`jlrp.conservation`).
        param_relevance: the cotangent of ``params`` is the rule's parameter relevance
            (:meth:`Rule.relevance_with_params`) instead of zero (concept relevance, :mod:`jlrp.concepts`).

    Returns:
        ``layer_fn(params, x)``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(rule)
    state_arrays, rebuild_state = split_arrays(state)
    ledger = _LEDGER.get()
    entry = None if ledger is None else ledger.register(where, rule, absorbs)

    def bind(arrays: Sequence[Any]) -> LayerFn:
        if state is None:
            return layer_fn
        current = rebuild_state(arrays)
        return lambda p, a: layer_fn(p, a, current)

    def forward(params, x, arrays):
        try:
            output = bind(arrays)(params, x)
        except JlrpError:
            raise
        except Exception as error:  # the layer's own error would name the pure apply's root, not the layer
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            shapes = jax.tree_util.tree_map(lambda a: tuple(jnp.shape(a)), x)
            dtypes = jax.tree_util.tree_map(lambda a: str(jnp.result_type(a)), x)
            raise InputError(
                f"{where} cannot take its input of shape {shapes} ({dtypes}): {message} "
                "-- does the model input have the shape and dtype the model was initialised with?"
            ) from error
        rule.check(params, x, output, where)
        return output

    def make_call(known_non_negative: bool) -> Callable[..., Array]:
        @jax.custom_vjp
        def call(params, x, leaves, arrays):
            return forward(params, x, arrays)

        def fwd(params, x, leaves, arrays):
            output = forward(params, x, arrays)
            return output, (params, x, output, leaves, arrays)

        def bwd(residuals, relevance):
            params, x, output, leaves, arrays = residuals
            # layers with weights: where early copies cost memory
            if any(map(_is_float_array, jax.tree_util.tree_leaves(params))):
                params, x = _after((params, x), relevance)
            live_rule = jax.tree_util.tree_unflatten(treedef, leaves)
            token = _KNOWN_NON_NEGATIVE.set(known_non_negative)
            params_out = None
            try:
                if param_relevance:
                    relevance_in, params_out = live_rule.relevance_with_params(
                        bind(arrays), params, x, output, relevance
                    )
                else:
                    relevance_in = live_rule.backward(bind(arrays), params, x, output, relevance)
            finally:
                _KNOWN_NON_NEGATIVE.reset(token)
            relevance_in = jax.tree_util.tree_map(
                lambda r, a: jnp.asarray(r).astype(jnp.result_type(a)), relevance_in, x
            )
            if entry is not None:
                total_in = sum(jnp.sum(r) for r in jax.tree_util.tree_leaves(relevance_in))
                jax.debug.callback(ledger.add, entry, jnp.sum(relevance), total_in, _bias_mass(params))
            if params_out is None:
                params_cotangent = jax.tree_util.tree_map(_zero_cotangent, params)
            else:
                params_cotangent = jax.tree_util.tree_map(
                    lambda r, p: jnp.asarray(r).astype(jnp.result_type(p)), params_out, params
                )
            return (
                params_cotangent,
                relevance_in,
                jax.tree_util.tree_map(_zero_cotangent, leaves),
                jax.tree_util.tree_map(_zero_cotangent, arrays),
            )

        call.defvjp(fwd, bwd)
        return call

    operands = (params, x, leaves, state_arrays)
    calls = _RULE_CALLS.get()
    if calls is None or non_negative:
        return make_call(non_negative)(*operands)
    flat, operand_tree = jax.tree_util.tree_flatten(operands)
    calls.append(
        RuleCall(
            lambda values: make_call(True)(*jax.tree_util.tree_unflatten(operand_tree, list(values))),
            len(jax.tree_util.tree_leaves(params)),
            len(flat),
        )
    )
    with jax.named_scope(f"jlrp_r{len(calls) - 1}"):
        return make_call(False)(*operands)


# --------------------------------------------------------------------------------------------
# the BasicRule decomposition


_PARAM_ALIASES = {"weight": "kernel"}


def normalize_zero_params(zero_params: str | Sequence[str] | None) -> tuple[str, ...]:
    """Normalise ``zero_params`` to a tuple of parameter names.

    zennit's names are accepted: ``'weight'`` means Flax's ``'kernel'``.
    """
    if zero_params is None:
        return ()
    if isinstance(zero_params, str):
        zero_params = (zero_params,)
    names = []
    for name in zero_params:
        if not isinstance(name, str):
            raise UsageTypeError(f"zero_params must be parameter names (str), got {name!r}")
        names.append(_PARAM_ALIASES.get(name, name))
    return tuple(names)


def _leaf_name(path: tuple[Any, ...]) -> str:
    key = path[-1] if path else ""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def map_params(
    params: Any,
    weight_fn: Callable[[Array], Array],
    bias_fn: Callable[[Array], Array] | None = None,
    zero_params: Sequence[str] = (),
) -> Any:
    """Modify a layer's parameters: ``bias_fn`` on leaves named ``'bias'``, ``weight_fn`` on the rest.

    Leaves whose name is in ``zero_params`` are set to zero afterwards. ``bias_fn`` defaults to
    ``weight_fn``.
    """
    bias_fn = weight_fn if bias_fn is None else bias_fn

    def modify(path, leaf):
        name = _leaf_name(path)
        if name in zero_params:
            return jnp.zeros_like(leaf)
        return bias_fn(leaf) if name == "bias" else weight_fn(leaf)

    return jax.tree_util.tree_map_with_path(modify, params)


def param_product(params: Any, gradients: Any) -> Any:
    """``params * gradients`` leaf by leaf, in each parameter's dtype (the relevance of parameters
    ``p`` whose cotangent is ``gradients``; 0 for a leaf without a gradient, e.g. an integer)."""

    def product(p: Array, g: Array) -> Array:
        dtype = jnp.result_type(p)
        if g is None or jnp.result_type(g) == jax.dtypes.float0:
            return jnp.zeros(jnp.shape(p), dtype)
        return (p * g).astype(dtype)

    return jax.tree_util.tree_map(product, params, gradients)


@dataclasses.dataclass(frozen=True)
class Shares:
    """What a rule's pull-back yields: ``x``, the input's gradient or relevance, and ``params``, the
    parameter relevance beside it (``None`` when not asked for, see :meth:`BasicRule.propagate`).

    Linear combinations act on both at once (``a + b``, ``a - b``, ``2.0 * a``), so a rule writes its
    maths once for both sides. The parameter side is a relevance from the start (each pull-back knows
    its own parameters); the input side stays a gradient until :meth:`times` multiplies it by the
    (modified) input, so that several gradients w.r.t. the same input are summed before the product.
    """

    x: Array
    params: Any = None

    def _tree(self, other: Shares, op: Callable[[Array, Array], Array]) -> Any:
        if self.params is None or other.params is None:
            return None
        return jax.tree_util.tree_map(op, self.params, other.params)

    def __add__(self, other: Shares) -> Shares:
        return Shares(self.x + other.x, self._tree(other, lambda a, b: a + b))

    def __sub__(self, other: Shares) -> Shares:
        return Shares(self.x - other.x, self._tree(other, lambda a, b: a - b))

    def __rmul__(self, scale: Any) -> Shares:
        params = None if self.params is None else jax.tree_util.tree_map(lambda a: scale * a, self.params)
        return Shares(scale * self.x, params)

    def times(self, x: Array) -> Shares:
        """The input side multiplied by ``x`` (gradient -> relevance); the parameter side unchanged."""
        return Shares(x * self.x, self.params)


def layer_pullback(
    layer_fn: LayerFn, params: Any, x: Array, with_params: bool = False
) -> tuple[Array, Callable[[Array], Shares]]:
    """``(z, pull)``: ``z = layer_fn(params, x)`` and ``pull(c) = Shares(g_x, params * g_params)``.

    ``g_x = (dz/dx)^T c`` and ``g_params = (dz/dparams)^T c``. Without ``with_params`` the layer is
    differentiated w.r.t. ``x`` only (no parameter work at all) and ``Shares.params`` is ``None``.
    """
    if not with_params:
        z, vjp = jax.vjp(lambda a: layer_fn(params, a), x)
        return z, lambda c: Shares(vjp(c)[0])
    z, vjp = jax.vjp(layer_fn, params, x)

    def pull(c: Array) -> Shares:
        g_params, g_x = vjp(c)
        return Shares(g_x, param_product(params, g_params))

    return z, pull


@rule_dataclass
class BasicRule(Rule):
    """zennit's BasicHook decomposition of an LRP rule, as an abstract base class.

    For ``k = 1..K`` the rule evaluates the layer on modified inputs and parameters,
    ``z_k = output_modifier_k(layer(param_modifier_k(params), input_modifier_k(x)))``, maps the output
    relevance ``R`` to one cotangent per ``z_k`` with :meth:`gradient_mapper`, pulls each back through
    its layer evaluation, ``g_k = (d z_k / d x_k)^T c_k``, and combines inputs and gradients with
    :meth:`reducer`. The LRP-epsilon rule, for instance, is
    ``K = 1``, identity modifiers, ``c = R / stabilize(z)`` and ``reducer = x * g``. The parameter
    relevance (:meth:`relevance_with_params`) pulls the same cotangents back to the modified parameters,
    ``g_pk = (d z_k / d p_k)^T c_k``, and combines them with :meth:`param_reducer` (default
    ``sum_k p_k * g_pk``).

    Subclass it as a :func:`rule_dataclass` and override the methods you need (:meth:`param_reducer`
    as well when :meth:`reducer` is not ``sum_k x_k * g_k``)::

        @jlrp.core.rule_dataclass
        class MyRule(jlrp.core.BasicRule):
            epsilon: float = 1e-6
            def gradient_mapper(self, relevance, outputs, output):
                return [relevance / jlrp.core.stabilize(outputs[0], self.epsilon)]
    """

    requires_params: ClassVar[bool] = True

    def input_modifiers(self, x: Array) -> Sequence[Array]:
        """The K modified inputs ``x_k`` (default: ``[x]``)."""
        return [x]

    def param_modifiers(self, params: Any) -> Sequence[Any]:
        """The K modified parameter sets, one per modified input (default: ``[params]``)."""
        return [params]

    def output_modifiers(self, outputs: Sequence[Array]) -> Sequence[Array]:
        """Modify the K layer outputs (default: identity)."""
        return outputs

    def gradient_mapper(self, relevance: Array, outputs: Sequence[Array], output: Array) -> Sequence[Array]:
        """The K cotangents ``c_k`` from the output relevance, the modified outputs and the plain output."""
        raise NotImplementedError

    def reducer(self, inputs: Sequence[Array], gradients: Sequence[Array]) -> Array:
        """Combine the modified inputs and their gradients into the input relevance (default ``x * g``)."""
        return sum(x * g for x, g in zip(inputs, gradients))

    def param_reducer(self, param_sets: Sequence[Any], param_gradients: Sequence[Any]) -> Any:
        """Combine the modified parameters and their gradients into the parameter relevance, the
        counterpart of :meth:`reducer` (default ``sum_k p_k * g_k``, leaf by leaf; a rule whose reducer
        weights its terms must weight them here the same way)."""
        products = [param_product(p, g) for p, g in zip(param_sets, param_gradients)]
        return jax.tree_util.tree_map(lambda *leaves: sum(leaves[1:], leaves[0]), *products)

    def propagate(
        self,
        layer_fn: LayerFn,
        params: Any,
        x: Array,
        output: Array,
        relevance: Array,
        with_params: bool = False,
    ) -> Shares:
        """The rule's maths, written once for :meth:`backward` and :meth:`relevance_with_params`.

        Returns ``Shares(R_x, R_params)``; ``R_params`` is ``None`` unless ``with_params`` (then no
        derivative w.r.t. the parameters is taken). Rules that do not fit the modifier decomposition
        override this method (see :func:`layer_pullback` and :class:`Shares`), not :meth:`backward`.
        """
        inputs = list(self.input_modifiers(x))
        param_sets = list(self.param_modifiers(params))
        if len(param_sets) != len(inputs):
            raise RuleError(
                f"{type(self).__name__}: {len(inputs)} input modifiers but {len(param_sets)} param modifiers"
            )
        outputs, pullbacks = [], []
        for x_k, p_k in zip(inputs, param_sets):
            if with_params:
                z_k, pullback = jax.vjp(layer_fn, p_k, x_k)
            else:
                z_k, pullback = jax.vjp(lambda xx, p_k=p_k: layer_fn(p_k, xx), x_k)
            outputs.append(z_k)
            pullbacks.append(pullback)
        outputs = list(self.output_modifiers(outputs))
        cotangents = self.gradient_mapper(relevance, outputs, output)
        pulled = [pullback(c.astype(z.dtype)) for pullback, c, z in zip(pullbacks, cotangents, outputs)]
        relevance_in = self.reducer(inputs, [g[-1] for g in pulled])
        if not with_params:
            return Shares(relevance_in)
        return Shares(relevance_in, self.param_reducer(param_sets, [g[0] for g in pulled]))

    def backward(self, layer_fn: LayerFn, params: Any, x: Array, output: Array, relevance: Array) -> Array:
        return self.propagate(layer_fn, params, x, output, relevance).x

    def relevance_with_params(
        self, layer_fn: LayerFn, params: Any, x: Array, output: Array, relevance: Array
    ) -> tuple[Array, Any]:
        """``(R_x, R_params)`` from :meth:`propagate` (see :meth:`Rule.relevance_with_params`):
        ``R_params = param_reducer(p_k, (dz_k/dp_k)^T c_k)``, by default ``sum_k p_k * (dz_k/dp_k)^T c_k``.

        Raises:
            RuleError: the rule overrides :meth:`backward` but not :meth:`propagate`: its parameter side
                is unknown (the modifier decomposition need not be what its backward computes).
        """
        cls = type(self)
        if cls.backward is not BasicRule.backward and cls.propagate is BasicRule.propagate:
            raise RuleError(
                f"{cls.__name__} overrides backward(), so jlrp cannot know its parameter relevance; override "
                "propagate(..., with_params) instead (see jlrp.core.layer_pullback and Shares)"
            )
        shares = self.propagate(layer_fn, params, x, output, relevance, with_params=True)
        return shares.x, shares.params
