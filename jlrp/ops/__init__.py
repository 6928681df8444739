"""Every operation on the relevance path, classified: function-level ops and the insides of rule-less modules.

Flax models write residual connections as ``x + h``, global average pooling as ``jnp.mean``,
activations as ``nn.gelu(x)`` and LayerNorm as a module whose arithmetic jlrp cannot see through
types. With plain gradients a residual add doubles the relevance, a mean divides it, a ``tanh``
shrinks it and a LayerNorm's centring cancels it. jlrp therefore traces the explained forward to a
jaxpr and evaluates it again (:func:`run_with_op_rules`), classifying every equation that lies on
the relevance path (it depends on the model input, is floating point, and relevance can reach the
output from it). Module calls that got a rule are single ``custom_vjp`` equations: covered. Every
other equation, including those inside rule-less modules and inside ``pjit``, ``custom_jvp``,
``custom_vjp``, ``remat``/``checkpoint``, ``scan`` and ``cond`` bodies, belongs to one class:

=====================  ==============================================  ===================================
class                  what                                            treatment (default rule)
=====================  ==============================================  ===================================
structural             reshape, transpose, slice, gather, concat,      gradient (routes relevance exactly)
                       pad, broadcast, convert, select of a constant
                       mask
winner-takes-all       max pooling, ``reduce_max``, max of two         gradient (as in zennit)
                       activations
:class:`ReLU`          ``nn.relu``, ``jnp.maximum(x, 0)``              ``Pass`` (the gradient is the same)
:class:`Activation`    any element-wise non-linear function of one     ``Pass`` (zennit's base map)
                       activation, recognised as one unit however
                       many primitives (gelu, silu, elu, tanh, ...)
:class:`Scale`         an activation times/over constants              ``Pass``
:class:`Affine`        element-wise affine map with an additive        ``Norm`` (the constant absorbs its
                       constant (a bias, an unmerged BatchNorm)        share, like a bias)
:class:`Add`           sum or difference of two activations (with      ``Norm``
                       broadcasting): residuals, merges, centring
:class:`ReduceSum`,    ``jnp.sum``/``jnp.mean``, ``nn.avg_pool``       ``Norm``
:class:`Mean`,
:class:`AvgPool`
:class:`Contraction`   ``dot_general``/convolution of an activation    ``Norm`` (Epsilon with the op's
                       with constant weights outside a ruled module    constants as parameters)
normalisation          ``x * rsqrt(var)``, ``x / norm``: a product     the statistic is held constant
                       with a std/norm statistic of activations        (CP-LRP's LN-rule, AttnLRP's identity
                       (LayerNorm, RMSNorm, GroupNorm, L2 norm)        treatment); the centring is an Add
:class:`Softmax`       ``exp(x - c) / sum(exp(x - c))`` as one unit    ``rules.Softmax`` (AttnLRP);
                       (``jax.nn.softmax``, attention weights, by      ``rules.AHRule`` holds it constant
                       hand; masks, ``where=``)                        (CP-LRP)
:class:`MatMul`        ``dot_general`` of two activations (q k^T,      ``rules.UniformEpsilon`` (AttnLRP)
                       p v, einsum, ``@``)
:class:`Multiply`      element-wise product of two activations         ``rules.Uniform`` (AttnLRP)
                       (gating ``silu(g) * u``)
uncovered              quotients of two activations (other than a      gradient, **reported**: ``audit``,
                       softmax), log-softmax, ``while`` loops, any     one ``JlrpWarning`` per model,
                       other primitive                                 ``CoverageError`` with ``strict``
=====================  ==============================================  ===================================

A product with an operand that a rule holds constant (CP-LRP's :class:`~jlrp.rules.AHRule` on a
softmax: the attention probabilities) is linear in its other operand: a :class:`MatMul` then is a
:class:`Contraction`, a :class:`Multiply` a :class:`Scale` and an :class:`Add` an :class:`Affine`,
and values computed from held values only are constants of the relevance pass.

Ops are matched against composites exactly like modules: by type (the :class:`Op` classes below,
grouped in :mod:`jlrp.types`) and by path (``'<module path>/@<kind>_<n>'``, e.g.
``'layer1_0/@add_0'``). An op that gets no rule from the composite keeps its gradient and, unless it
is a ReLU or a scale (whose gradient equals ``Pass``), is reported as uncovered.

Signs: the same pass tracks which values are provably ``>= 0`` (results of ReLUs, max pools and
shape changes of such values, ...). A layer whose input is one of them gets its rule call traced
again by :func:`jlrp.core.apply_rule` with ``non_negative=True``, so ZPlus, AlphaBeta and Gamma
drop their negative-input terms at trace time.
"""

from ._interpreter import run_with_op_rules
from ._kinds import (
    Activation,
    Add,
    Affine,
    AvgPool,
    Contraction,
    MatMul,
    Mean,
    ModuleScopes,
    Multiply,
    Op,
    ReduceSum,
    ReLU,
    Scale,
    Softmax,
)
from ._probes import ACTIVE_TAPS, EmbeddingProbes, TapPoint, Taps, probing_embeddings, tapping

__all__ = [
    "Op",
    "ReLU",
    "Activation",
    "Scale",
    "Affine",
    "Add",
    "ReduceSum",
    "Mean",
    "AvgPool",
    "Contraction",
    "Softmax",
    "MatMul",
    "Multiply",
    "ModuleScopes",
    "run_with_op_rules",
    "EmbeddingProbes",
    "probing_embeddings",
    "Taps",
    "TapPoint",
    "ACTIVE_TAPS",
    "tapping",
]
