"""LRP rules, written from their formulas, with zennit's parameter names and defaults.

Notation: a layer computes ``z_j = sum_i x_i w_ij + b_j``; ``R_j`` is the relevance of output ``j``
and ``R_i`` the relevance of input ``i`` returned by the rule. ``a+ = max(a, 0)``,
``a- = min(a, 0)``; ``stab`` is the rule's stabilizer (:func:`jlrp.core.stabilize`: 0 counts as
positive, every entry moves away from 0 by epsilon). ``zero_params`` (a name or list of names, e.g.
``'bias'``; zennit's ``'weight'`` means ``'kernel'``) sets those parameters to zero before the rule
uses them. All the sums are evaluated with the layer's own apply function (transposed convolutions
through the VJP), so every rule works on Dense, DenseGeneral, Conv and ConvTranspose in any dimension.

Every rule of a layer with parameters also gives the relevance of those parameters
(:meth:`jlrp.core.Rule.relevance_with_params`): each connection's share ``R_ij`` of the formula, summed
over the batch, is the relevance of the weight ``w_ij`` it uses, and the bias terms' shares are the
bias's relevance, as in Concept Relevance Propagation (Achtibat et al. 2023) and pruning by explaining
(Yeom et al. 2021). The rules write their maths once (:meth:`jlrp.core.BasicRule.propagate`); without
parameter relevance no derivative w.r.t. the parameters is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .core import (
    Array,
    BasicRule,
    LayerFn,
    Rule,
    Shares,
    Stabilizer,
    input_known_non_negative,
    layer_pullback,
    map_params,
    normalize_zero_params,
    param_product,
    rule_dataclass,
)
from .errors import RuleError

__all__ = [
    "Epsilon",
    "ZPlus",
    "AlphaBeta",
    "Gamma",
    "ZBox",
    "WSquare",
    "Flat",
    "Norm",
    "Pass",
    "ReLUDeconvNet",
    "ReLUGuidedBackprop",
    "ReLUBetaSmooth",
    "Softmax",
    "Uniform",
    "UniformEpsilon",
    "AHRule",
]

StabilizerLike = float | Callable[[Array], Array]
ZeroParams = str | Sequence[str] | None


def _pos(a: Array) -> Array:
    return jnp.maximum(a, 0)


def _neg(a: Array) -> Array:
    return jnp.minimum(a, 0)


def _zeros(a: Array) -> Array:
    return jnp.zeros_like(a)


def _ones(a: Array) -> Array:
    return jnp.ones_like(a)


class _ZeroParamsMixin:
    zero_params: ZeroParams

    def __post_init__(self) -> None:
        zp = normalize_zero_params(self.zero_params)
        object.__setattr__(self, "zero_params", zp if zp else None)

    @property
    def _zero(self) -> tuple[str, ...]:
        return normalize_zero_params(self.zero_params)


@rule_dataclass
class Epsilon(_ZeroParamsMixin, BasicRule):
    """LRP-epsilon (Bach et al. 2015); ``epsilon=0`` gives LRP-0.

    ``R_i = sum_j x_i w_ij / stab(z_j) * R_j`` with ``stab(z) = z + sign(z) * epsilon``; parameter
    relevance ``R_w_ij = sum_n x_ni w_ij / stab(z_nj) R_nj`` and ``R_b_j = sum_n b_j / stab(z_nj) R_nj``.

    Args:
        epsilon: the stabilizer's epsilon, or a callable ``z -> stabilised z`` (e.g.
            :class:`~jlrp.core.Stabilizer`).
        zero_params: parameter names to set to zero (e.g. ``'bias'``).
    """

    epsilon: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def param_modifiers(self, params):
        return [map_params(params, lambda w: w, zero_params=self._zero) if self._zero else params]

    def gradient_mapper(self, relevance, outputs, output):
        return [relevance / Stabilizer.ensure(self.epsilon)(outputs[0])]

    def propagate(self, layer_fn, params, x, output, relevance, with_params=False):
        if self._zero:
            return super().propagate(layer_fn, params, x, output, relevance, with_params)
        # unmodified parameters: the forward's saved output is z, so only the pullback is needed
        _, pull = layer_pullback(layer_fn, params, x, with_params)
        return pull(relevance / Stabilizer.ensure(self.epsilon)(output)).times(x)


def _by_input_sign(x: Array, mixed: Callable[[], Shares], non_negative: Callable[[], Shares]) -> Shares:
    """``non_negative()`` where ``x`` is known to have no negative entry, else the general ``mixed()``.

    Inputs after a ReLU have no negative entry, so the sign rules drop their negative-input terms
    there. Under a trace that is known when :mod:`jlrp.ops` proved ``x >= 0`` from the model's trace
    (:func:`jlrp.core.input_known_non_negative`); eagerly the values decide. A traced input of unknown
    sign takes ``mixed()``, which is exact for any input: a run-time ``lax.cond`` would be slower
    still, since XLA:CPU compiles a transposed convolution inside a conditional branch without its
    fast convolution library (several times slower), and XLA:GPU's conditional reads its predicate on
    the host.
    """
    if input_known_non_negative():
        return non_negative()
    if isinstance(x, jax.core.Tracer):
        return mixed()
    return mixed() if jnp.any(x < 0) else non_negative()


def _sign_split(
    layer_fn: LayerFn,
    pos_params: Any,
    neg_params: Any,
    x: Array,
    relevance: Array,
    stabilizer: Callable[[Array], Array],
    with_params: bool,
) -> Shares:
    """Relevance through the contributions ``x+ w(pos) + x- w(neg)``, normalised by their sum.

    ``pos_params`` act on the positive part of the input, ``neg_params`` (which carry no bias) on the
    negative part; ``R_i = sum_j (x+_i pos_ij + x-_i neg_ij) / stab(z_j) * R_j`` with ``z_j`` the sum of
    both terms, and the parameter relevance ``pos * (dz/dpos)^T c + neg * (dz/dneg)^T c`` with
    ``c = R / stab(z)`` (``with_params``). Without negative inputs the second term (a forward and a
    transposed layer) is skipped (see :func:`_by_input_sign`).
    """

    def both():
        xp, xn = _pos(x), _neg(x)
        zp, pull_p = layer_pullback(layer_fn, pos_params, xp, with_params)
        zn, pull_n = layer_pullback(layer_fn, neg_params, xn, with_params)
        c = relevance / stabilizer(zp + zn)
        return pull_p(c).times(xp) + pull_n(c).times(xn)

    def non_negative():  # x == x+: no max(x, 0) pass, and the saved input itself feeds the layer
        zp, pull_p = layer_pullback(layer_fn, pos_params, x, with_params)
        return pull_p(relevance / stabilizer(zp)).times(x)

    return _by_input_sign(x, both, non_negative)


@rule_dataclass
class ZPlus(_ZeroParamsMixin, BasicRule):
    """LRP-z+ (Montavon et al. 2017), generalised to negative inputs: AlphaBeta with alpha=1, beta=0.

    ``R_i = sum_j (x+_i w+_ij + x-_i w-_ij) / stab(sum_k (x+_k w+_kj + x-_k w-_kj) + b+_j) * R_j``.
    The positive part of the bias stays unless ``zero_params='bias'``. Parameter relevance: each
    connection's term summed over the batch, ``R_w_ij = sum_n (x+_ni w+_ij + x-_ni w-_ij) / stab(.) R_nj``,
    and ``R_b_j = sum_n b+_j / stab(.) R_nj``.

    Args:
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: parameter names to set to zero.
    """

    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def propagate(self, layer_fn, params, x, output, relevance, with_params=False):
        positive = map_params(params, _pos, zero_params=self._zero)
        negative = map_params(params, _neg, _zeros, zero_params=self._zero)
        return _sign_split(
            layer_fn, positive, negative, x, relevance, Stabilizer.ensure(self.stabilizer), with_params
        )


@rule_dataclass
class AlphaBeta(_ZeroParamsMixin, BasicRule):
    """LRP-alpha-beta (Bach et al. 2015): positive and negative contributions weighted separately.

    With positive contributions ``p_ij = x+_i w+_ij + x-_i w-_ij`` (normalised by
    ``sum_i p_ij + b+_j``) and negative ones ``n_ij = x+_i w-_ij + x-_i w+_ij`` (normalised by
    ``sum_i n_ij + b-_j``):
    ``R_i = sum_j (alpha * p_ij / stab(P_j) - beta * n_ij / stab(N_j)) * R_j``. Parameter relevance: the
    same connection terms summed over the batch instead of over ``j``,
    ``R_w_ij = sum_n (alpha p_nij / stab(P_nj) - beta n_nij / stab(N_nj)) R_nj``, and
    ``R_b_j = sum_n (alpha b+_j / stab(P_nj) - beta b-_j / stab(N_nj)) R_nj``.

    Args:
        alpha: weight of the positive part (``alpha >= 0``).
        beta: weight of the negative part (``beta >= 0``, ``alpha - beta == 1``).
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: parameter names to set to zero.

    Raises:
        ValueError: unless ``alpha >= 0``, ``beta >= 0`` and ``alpha - beta == 1``.
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha < 0 or self.beta < 0:
            raise RuleError(
                f"AlphaBeta needs alpha >= 0 and beta >= 0, got alpha={self.alpha}, beta={self.beta}"
            )
        if self.alpha - self.beta != 1:
            raise RuleError(
                f"AlphaBeta needs alpha - beta == 1 to conserve relevance, got alpha={self.alpha}, beta={self.beta}"
            )

    def propagate(self, layer_fn, params, x, output, relevance, with_params=False):
        stab = Stabilizer.ensure(self.stabilizer)
        w_pos_b = map_params(params, _pos, zero_params=self._zero)
        w_neg_b = map_params(params, _neg, zero_params=self._zero)
        w_pos_0 = map_params(params, _pos, _zeros, zero_params=self._zero)
        w_neg_0 = map_params(params, _neg, _zeros, zero_params=self._zero)
        result = self.alpha * _sign_split(layer_fn, w_pos_b, w_neg_0, x, relevance, stab, with_params)
        if self.beta:
            negative = _sign_split(layer_fn, w_neg_b, w_pos_0, x, relevance, stab, with_params)
            result = result - self.beta * negative
        return result


@rule_dataclass
class Gamma(_ZeroParamsMixin, BasicRule):
    """Generalised LRP-gamma (Montavon et al. 2019; Andeol et al. 2021), valid for inputs of any sign.

    For outputs with ``z_j > 0`` the positive contributions are boosted,
    ``u_ij = x+_i (w_ij + gamma w+_ij) + x-_i (w_ij + gamma w-_ij)``, normalised by
    ``sum_i u_ij + b_j + gamma b+_j``; for ``z_j <= 0`` the negative ones,
    ``d_ij = x+_i (w_ij + gamma w-_ij) + x-_i (w_ij + gamma w+_ij)``, normalised by
    ``sum_i d_ij + b_j + gamma b-_j``. Then ``R_i = sum_j (u_ij / stab(U_j) or d_ij / stab(D_j)) R_j``.
    Parameter relevance: the connection terms summed over the batch,
    ``R_w_ij = sum_n (u_nij / stab(U_nj) or d_nij / stab(D_nj)) R_nj``, and
    ``R_b_j = sum_n ((b_j + gamma b+_j) / stab(U_nj) or (b_j + gamma b-_j) / stab(D_nj)) R_nj``.

    Args:
        gamma: weight of the added positive (or negative) parts.
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: parameter names to set to zero.
    """

    gamma: float = 0.25
    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def propagate(self, layer_fn, params, x, output, relevance, with_params=False):
        stab = Stabilizer.ensure(self.stabilizer)
        g = self.gamma
        up = jnp.where(output > 0, relevance, 0)
        down = jnp.where(output > 0, 0, relevance)

        def mixed():
            boost_pos = map_params(params, lambda w: w + g * _pos(w), zero_params=self._zero)
            boost_neg = map_params(params, lambda w: w + g * _neg(w), zero_params=self._zero)
            boost_pos_0 = map_params(params, lambda w: w + g * _pos(w), _zeros, zero_params=self._zero)
            boost_neg_0 = map_params(params, lambda w: w + g * _neg(w), _zeros, zero_params=self._zero)
            return _sign_split(layer_fn, boost_pos, boost_neg_0, x, up, stab, with_params) + _sign_split(
                layer_fn, boost_neg, boost_pos_0, x, down, stab, with_params
            )

        def non_negative():
            # With x >= 0 and z = layer(w, b)(x) (the saved output), z+ = layer(w+, b+)(x) gives both
            # normalisers: U = z + gamma z+ and D = z + gamma (z - z+) (layer(w-, b-) = layer - layer(w+, b+));
            # U (used where z > 0) and D (where z <= 0) add terms of one sign, so nothing cancels.
            # The relevance, sum_j (w + gamma w+) cU + (w + gamma w-) cD, regrouped, needs two transposed
            # layers: w (cU + (1 + gamma) cD) + gamma w+ (cU - cD). Three layer passes instead of four.
            # The parameter relevance regroups the same way, (w + gamma w-) = (1 + gamma) w - gamma w+
            # (biases too): w * g(cU + (1 + gamma) cD) + gamma w+ * g+(cU - cD).
            z_pos, pull_pos = layer_pullback(layer_fn, map_params(params, _pos), x, with_params)
            _, pull = layer_pullback(layer_fn, params, x, with_params)
            c_up = up / stab(output + g * z_pos)
            c_down = down / stab((1 + g) * output - g * z_pos)
            return (pull(c_up + (1 + g) * c_down) + g * pull_pos(c_up - c_down)).times(x)

        if self._zero:  # the saved output is not z of the modified parameters
            return mixed()
        return _by_input_sign(x, mixed, non_negative)


def _as_bound(value: Any) -> Any:
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return np.asarray(value, dtype=np.float64 if np.asarray(value).dtype == np.float64 else np.float32)


@rule_dataclass
class ZBox(_ZeroParamsMixin, BasicRule):
    """LRP-z^B for bounded ("boxed") inputs (Montavon et al. 2017), usually the first layer.

    ``R_i = sum_j (x_i w_ij - l_i w+_ij - h_i w-_ij) / stab(sum_k (x_k w_kj - l_k w+_kj - h_k w-_kj)) R_j``;
    the bias cancels from the denominator. Parameter relevance: the connection terms summed over the
    batch, ``R_w_ij = sum_n (x_ni w_ij - l_ni w+_ij - h_ni w-_ij) / stab(.) R_nj``; the bias gets
    ``b - b+ - b- = 0``, as it cancels.

    Args:
        low: lowest possible input value: a scalar or an array broadcast to the input (e.g. per
            channel, shape ``(C,)`` for NHWC, or a whole per-sample batch shaped like the input).
        high: highest possible input value, like ``low``.
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: parameter names to set to zero.
    """

    low: Any
    high: Any
    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "low", _as_bound(self.low))
        object.__setattr__(self, "high", _as_bound(self.high))

    def input_modifiers(self, x):
        low = jnp.broadcast_to(jnp.asarray(self.low, dtype=x.dtype), x.shape)
        high = jnp.broadcast_to(jnp.asarray(self.high, dtype=x.dtype), x.shape)
        return [x, low, high]

    def param_modifiers(self, params):
        zero = self._zero
        return [
            map_params(params, lambda w: w, zero_params=zero),
            map_params(params, _pos, zero_params=zero),
            map_params(params, _neg, zero_params=zero),
        ]

    def gradient_mapper(self, relevance, outputs, output):
        c = relevance / Stabilizer.ensure(self.stabilizer)(outputs[0] - outputs[1] - outputs[2])
        return [c, c, c]

    def reducer(self, inputs, gradients):
        return inputs[0] * gradients[0] - inputs[1] * gradients[1] - inputs[2] * gradients[2]

    def param_reducer(self, param_sets, param_gradients):
        # the parameters' side of the reducer's signs: w gW - w+ gW+ - w- gW- (and b - b+ - b- for the bias)
        terms = [param_product(p, g) for p, g in zip(param_sets, param_gradients)]
        return jax.tree_util.tree_map(lambda a, b, c: a - b - c, *terms)


@rule_dataclass
class WSquare(_ZeroParamsMixin, BasicRule):
    """LRP-w^2 (Montavon et al. 2017): relevance by squared weights, independent of the input.

    ``R_i = sum_j w_ij^2 / stab(sum_k w_kj^2 + b_j^2) * R_j`` (the bias is squared too unless
    ``zero_params='bias'``). Parameter relevance of the squared parameters:
    ``R_w_ij = sum_n w_ij^2 / stab(.) R_nj``, ``R_b_j = sum_n b_j^2 / stab(.) R_nj``.

    Args:
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: parameter names to set to zero.
    """

    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def input_modifiers(self, x):
        return [jnp.ones_like(x)]

    def param_modifiers(self, params):
        return [map_params(params, jnp.square, zero_params=self._zero)]

    def gradient_mapper(self, relevance, outputs, output):
        return [relevance / Stabilizer.ensure(self.stabilizer)(outputs[0])]

    def reducer(self, inputs, gradients):
        return gradients[0]


@rule_dataclass
class Flat(_ZeroParamsMixin, BasicRule):
    """LRP-flat (Lapuschkin et al. 2019): WSquare with every weight set to one and no bias.

    ``R_i = sum_j 1[i connected to j] / stab(n_j) * R_j`` where ``n_j`` counts the inputs of ``j``.
    Parameter relevance (of the weights set to one): ``R_w = sum_n sum_(i, j) 1 / stab(n_j) R_nj`` over
    the connections ``(i, j)`` that use the weight; the bias gets 0.

    Args:
        stabilizer: epsilon of the stabilizer, or a callable.
        zero_params: accepted for zennit compatibility; the weights are ones and the bias is zero anyway.
    """

    stabilizer: StabilizerLike = 1e-6
    zero_params: ZeroParams = None

    def input_modifiers(self, x):
        return [jnp.ones_like(x)]

    def param_modifiers(self, params):
        return [map_params(params, _ones, _zeros, zero_params=self._zero)]

    def gradient_mapper(self, relevance, outputs, output):
        return [relevance / Stabilizer.ensure(self.stabilizer)(outputs[0])]

    def reducer(self, inputs, gradients):
        return gradients[0]


@rule_dataclass
class Norm(BasicRule):
    """Relevance split in proportion to each input's contribution, for parameter-free linear ops.

    ``R_i = sum_j x_i (dz_j/dx_i) / stab(z_j) * R_j`` — LRP-epsilon with a fixed stabilizer, without
    requiring parameters. It is jlrp's (and zennit's) rule for sums, residual adds and average pooling.
    Parameter relevance (on a layer that has parameters): as :class:`Epsilon`'s.

    Args:
        stabilizer: epsilon of the stabilizer, or a callable.
    """

    requires_params: ClassVar[bool] = False

    stabilizer: StabilizerLike = 1e-6

    def gradient_mapper(self, relevance, outputs, output):
        return [relevance / Stabilizer.ensure(self.stabilizer)(outputs[0])]


@rule_dataclass
class Pass(Rule):
    """Pass the relevance through unchanged: ``R_in = R_out`` (element-wise layers only)."""

    elementwise: ClassVar[bool] = True

    def backward(self, layer_fn, params, x, output, relevance):
        return relevance


@rule_dataclass
class ReLUDeconvNet(Rule):
    """DeconvNet's ReLU backward (Zeiler & Fergus 2014): ``R_in = max(R_out, 0)``, ignoring the forward."""

    elementwise: ClassVar[bool] = True

    def backward(self, layer_fn, params, x, output, relevance):
        return _pos(relevance)


@rule_dataclass
class ReLUGuidedBackprop(Rule):
    """Guided backpropagation's ReLU backward (Springenberg et al. 2015).

    ``R_in = max(R_out * relu'(x), 0)``: the ordinary gradient, with negative values cut.
    """

    elementwise: ClassVar[bool] = True

    def backward(self, layer_fn, params, x, output, relevance):
        _, pullback = jax.vjp(lambda a: layer_fn(params, a), x)
        return _pos(pullback(relevance)[0])


@rule_dataclass
class ReLUBetaSmooth(Rule):
    """The ReLU's gradient replaced by that of softplus with ``beta`` (Dombrowski et al. 2019).

    ``R_in = sigmoid(beta_smooth * x) * R_out``.

    Args:
        beta_smooth: the softplus ``beta``; larger values approach the ReLU's gradient.
    """

    elementwise: ClassVar[bool] = True

    beta_smooth: float = 10.0

    def backward(self, layer_fn, params, x, output, relevance):
        return jax.nn.sigmoid(self.beta_smooth * x) * relevance


# --------------------------------------------------------------------------------------------
# transformer rules: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022)


def _operands(x: Array) -> tuple[Array, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _as_input(x: Array, relevances: Sequence[Array]) -> Array:
    return tuple(relevances) if isinstance(x, (tuple, list)) else relevances[0]


def _sum_to_shape(value: Array, shape: tuple[int, ...]) -> Array:
    """Sum ``value`` over the axes along which an array of ``shape`` was broadcast to ``value.shape``."""
    _, pullback = jax.vjp(lambda t: jnp.broadcast_to(t, value.shape), jnp.zeros(shape, value.dtype))
    return pullback(value)[0]


@rule_dataclass
class Softmax(Rule):
    """AttnLRP's softmax rule: the Taylor decomposition of ``s = softmax(x)`` at ``x``, with bias.

    ``R_x_i = x_i (R_i - s_i sum_j R_j)`` (Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise
    Relevance Propagation for Transformers", ICML 2024, Proposition 3.1), the sum running over the
    softmax axis. It is evaluated as ``x * J^T (R / s)`` with ``J`` the Jacobian of the unit as found
    in the trace, so masks (``where=``, ``-inf`` or very negative entries) and the softmax axis come from
    the model itself. Entries whose probability is exactly 0 (masked out, or so negative that ``exp``
    underflows) and entries with ``x = -inf`` get no relevance. The rule is not conservative: the part
    ``sum_i x_i s_i sum_j R_j`` is the bias term of the decomposition.

    In lxt's Gradient x Input formulation this is the plain softmax gradient; jlrp's op recognition
    applies it to :class:`jlrp.ops.Softmax` (``jax.nn.softmax``, Flax attention, hand-written softmaxes).
    """

    def backward(self, layer_fn, params, x, output, relevance):
        positive = output != 0
        ratio = jnp.where(positive, relevance / jnp.where(positive, output, 1), 0)
        _, pullback = jax.vjp(lambda a: layer_fn(params, a), x)
        gradient = pullback(ratio.astype(output.dtype))[0]
        return jnp.where(jnp.isfinite(x), x * gradient, 0)


@rule_dataclass
class Uniform(Rule):
    """AttnLRP's uniform rule for an element-wise product of ``N`` activations (gating: ``silu(g) * u``).

    ``R_k = R / N`` for each operand ``k`` (summed over the axes along which the operand was broadcast):
    the relevance is shared equally, as the Shapley values of a product are (Achtibat et al., ICML 2024,
    Proposition 3.3). Conservative. The layer's input is the tuple of operands (:class:`jlrp.ops.Multiply`).
    """

    multi_input: ClassVar[bool] = True

    def backward(self, layer_fn, params, x, output, relevance):
        operands = _operands(x)
        share = relevance / len(operands)
        return _as_input(x, [_sum_to_shape(share, jnp.shape(a)) for a in operands])


@rule_dataclass
class UniformEpsilon(Rule):
    """AttnLRP's rule for a bilinear product of ``N`` activations (``q @ k.T``, ``p @ v``): LRP-epsilon,
    its relevance shared uniformly between the operands.

    ``S = R / stab(N z)``, ``R_k = x_k (dz/dx_k)^T S``; for a matmul ``z = A @ B``:
    ``R_A = A * (S @ B.T)``, ``R_B = B * (A.T @ S)`` (Achtibat et al., ICML 2024, Section 3.3). Since a
    product of ``N`` factors is homogeneous of degree ``N`` in them, the ``R_k`` sum to
    ``R z / stab(z)``: conservative up to the stabiliser. With one operand it is LRP-epsilon.

    Args:
        epsilon: the stabiliser's epsilon, or a callable (e.g. ``Stabilizer(1e-6, signed=False)`` for
            lxt's ``z + epsilon``; the default float is zennit's ``z + sign(z) epsilon``).
    """

    multi_input: ClassVar[bool] = True

    epsilon: StabilizerLike = 1e-6

    def backward(self, layer_fn, params, x, output, relevance):
        operands = _operands(x)
        scaled = relevance / Stabilizer.ensure(self.epsilon)(len(operands) * output)

        def product(*args):
            return layer_fn(params, _as_input(x, args))

        _, pullback = jax.vjp(product, *operands)
        gradients = pullback(scaled.astype(output.dtype))
        return _as_input(x, [a * g for a, g in zip(operands, gradients)])


@rule_dataclass
class AHRule(Rule):
    """CP-LRP's AH-rule: the attention probabilities are treated as constants.

    Ali et al., "XAI for Transformers: Better Explanations through Conservative Propagation", ICML 2022,
    Section 4: the softmax output ``p_ij`` is held constant in the relevance pass, so ``y = p v`` is
    linear in the values ``v`` and relevance flows through the value path only; none reaches the
    queries and keys. jlrp holds the op's output constant (``stop_gradient``) and treats the products
    it enters as linear ops of their other operand (a matmul with it gets the composite's rule for
    :data:`jlrp.types.Contraction`). Its backward, used only when the rule is called directly, returns
    zero relevance. Put it on :data:`jlrp.types.Softmax` (as :class:`jlrp.composites.CPLRP` does).
    """

    holds: ClassVar[bool] = True

    def backward(self, layer_fn, params, x, output, relevance):
        return jnp.zeros_like(x)
