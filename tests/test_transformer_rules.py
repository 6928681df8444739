"""The transformer rules (AttnLRP, CP-LRP) against slow, obvious float64 references, and the ops they
serve recognised in unmodified code.

The references are written entry by entry in numpy from the papers' formulas (loops over rows and
products), independently of jlrp's implementation (which uses VJPs). Each case runs the rule through
op recognition, i.e. an ordinary Flax/JAX function explained with a rule map, so the recognition of
the softmax unit, of matmuls and products of two activations is checked on the way.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlrp
from jlrp import composites, rules, types
from jlrp.core import Stabilizer, stabilize

EPS = 1e-6


def stab(z, eps=EPS):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def softmax_reference(x, R):
    """AttnLRP Proposition 3.1 per row: R_x_i = x_i (R_i - s_i sum_j R_j); masked (-inf) entries: 0."""
    x, R = np.asarray(x), np.asarray(R)
    out = np.zeros_like(x)
    for row in np.ndindex(*x.shape[:-1]):
        xi, Ri = x[row], R[row]
        finite = np.isfinite(xi)
        e = np.where(finite, np.exp(xi - xi[finite].max()), 0.0)
        s = e / e.sum()
        for i in range(xi.shape[0]):
            out[row + (i,)] = xi[i] * (Ri[i] - s[i] * Ri.sum()) if s[i] > 0 else 0.0
    return out


def matmul_reference(A, B, R, eps=EPS):
    """Uniform epsilon rule for z = A @ B (2-D): R_A[i,k] = sum_j A_ik B_kj R_ij / stab(2 z_ij), R_B alike."""
    A, B, R = (np.asarray(a) for a in (A, B, R))
    z = A @ B
    RA, RB = np.zeros_like(A), np.zeros_like(B)
    for i in range(A.shape[0]):
        for j in range(B.shape[1]):
            for k in range(A.shape[1]):
                share = A[i, k] * B[k, j] / stab(2 * z[i, j], eps) * R[i, j]
                RA[i, k] += share
                RB[k, j] += share
    return RA, RB


class Fn(nn.Module):
    """A parameter-free module calling ``fn`` on its input(s)."""

    fn: object

    def __call__(self, *args):
        return self.fn(*args)


def relevance_of(fn, x, R, rule_map):
    model = Fn(fn)
    explained = jlrp.explain(model, rule_map)
    y, pullback = jax.vjp(lambda v: explained({}, v), x)
    np.testing.assert_allclose(y, fn(x), rtol=1e-13, atol=1e-13)
    return pullback(R)[0]


def _normal(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, dtype=jnp.float64)


def _hand_softmax(x):
    e = jnp.exp(x - jax.lax.stop_gradient(x.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


MASK = np.array([[True, True, False, True, False]] * 3)

SOFTMAXES = {
    "jax.nn.softmax": lambda x: jax.nn.softmax(x, axis=-1),
    "scaled": lambda x: jax.nn.softmax(x * 0.5, axis=-1),
    "by hand": _hand_softmax,
    "where=": lambda x: jax.nn.softmax(x, axis=-1, where=MASK),
    "-inf mask": lambda x: jax.nn.softmax(jnp.where(MASK, x, -jnp.inf), axis=-1),
    "big negative mask": lambda x: jax.nn.softmax(jnp.where(MASK, x, jnp.finfo(x.dtype).min), axis=-1),
    "additive mask": lambda x: jax.nn.softmax(x + jnp.where(MASK, 0.0, -1e9), axis=-1),
}


@pytest.mark.filterwarnings("ignore:.*passes through a softmax")  # here the softmax is explained on purpose
@pytest.mark.parametrize("name", list(SOFTMAXES))
def test_softmax_rule_matches_reference(name):
    fn = SOFTMAXES[name]
    x = _normal(0, (3, 5), 2.0)
    R = _normal(1, (3, 5)) * fn(x)  # relevance of the probabilities, zero where they are
    got = relevance_of(fn, x, R, {types.Softmax: rules.Softmax()})
    logits = {
        "scaled": x * 0.5,
        "where=": np.where(MASK, x, -np.inf),
        "-inf mask": np.where(MASK, x, -np.inf),
        "big negative mask": np.where(MASK, x, -np.inf),
        "additive mask": np.where(MASK, x, -np.inf),
    }.get(name, x)
    expected = softmax_reference(logits, R)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:.*passes through a softmax")
def test_softmax_rule_on_a_masked_row_without_relevance_gives_zero_not_nan():
    x = jnp.array([[1.0, -jnp.inf, 2.0]], jnp.float64)
    R = jnp.array([[0.3, 0.0, 0.7]], jnp.float64)
    got = relevance_of(lambda v: jax.nn.softmax(v), x, R, {types.Softmax: rules.Softmax()})
    np.testing.assert_allclose(got, softmax_reference(x, R), atol=1e-15)
    assert got[0, 1] == 0


@pytest.mark.parametrize("eps", [EPS, 0.1])
def test_uniform_epsilon_on_a_matmul_of_two_activations(eps):
    A, B = _normal(2, (3, 4)), _normal(3, (4, 5))
    R = _normal(4, (3, 5))
    fn = lambda x: x[0] @ x[1]  # noqa: E731
    model = Fn(fn)
    explained = jlrp.explain(model, {types.MatMul: rules.UniformEpsilon(eps)})
    _, pullback = jax.vjp(lambda v: explained({}, v), (A, B))
    RA, RB = pullback(R)[0]
    eA, eB = matmul_reference(A, B, R, eps)
    np.testing.assert_allclose(RA, eA, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(RB, eB, rtol=1e-10, atol=1e-13)
    z = np.asarray(A @ B)
    np.testing.assert_allclose(RA.sum() + RB.sum(), (R * z / stab(z, eps / 2)).sum(), rtol=1e-10)


def test_uniform_epsilon_through_einsum_with_batch_and_heads():
    q, k = _normal(5, (2, 3, 2, 4)), _normal(6, (2, 6, 2, 4))  # batch, tokens, heads, features
    R = _normal(7, (2, 2, 3, 6))
    fn = lambda x: jnp.einsum("bqhd,bkhd->bhqk", x[0], x[1])  # noqa: E731
    explained = jlrp.explain(Fn(fn), {types.MatMul: rules.UniformEpsilon()})
    _, pullback = jax.vjp(lambda v: explained({}, v), (q, k))
    Rq, Rk = pullback(R)[0]
    for b in range(2):
        for h in range(2):
            eq, ek = matmul_reference(q[b, :, h], k[b, :, h].T, R[b, h])
            np.testing.assert_allclose(Rq[b, :, h], eq, rtol=1e-10, atol=1e-13)
            np.testing.assert_allclose(Rk[b, :, h], ek.T, rtol=1e-10, atol=1e-13)


def test_uniform_on_gating_with_broadcast():
    g, u = _normal(8, (2, 3, 4)), _normal(9, (2, 3, 1))
    R = _normal(10, (2, 3, 4))
    fn = lambda x: jax.nn.silu(x[0]) * x[1]  # noqa: E731
    explained = jlrp.explain(Fn(fn), {types.Multiply: rules.Uniform(), types.Activation: rules.Pass()})
    _, pullback = jax.vjp(lambda v: explained({}, v), (g, u))
    Rg, Ru = pullback(R)[0]
    np.testing.assert_allclose(Rg, np.asarray(R) / 2, rtol=1e-14)  # identity rule on silu, half each
    np.testing.assert_allclose(Ru, np.asarray(R).sum(-1, keepdims=True) / 2, rtol=1e-14)


def test_ah_rule_holds_the_attention_probabilities():
    """CP-LRP: y = softmax(q k^T) v with p constant; R_v[k, d] = sum_i p_ik v_kd / stab(y_id) R_id."""
    q, k, v = _normal(11, (3, 4)), _normal(12, (5, 4)), _normal(13, (5, 2))
    R = _normal(14, (3, 2))
    fn = lambda x: jax.nn.softmax(x[0] @ x[1].T, axis=-1) @ x[2]  # noqa: E731
    rule_map = {
        types.Softmax: rules.AHRule(),
        types.MatMul: rules.UniformEpsilon(),
        types.Contraction: rules.Norm(),
    }
    explained = jlrp.explain(Fn(fn), rule_map)
    _, pullback = jax.vjp(lambda a: explained({}, a), (q, k, v))
    Rq, Rk, Rv = pullback(R)[0]
    p = np.asarray(jax.nn.softmax(q @ k.T, axis=-1))
    y = p @ np.asarray(v)
    expected = np.zeros((5, 2))
    for i in range(3):
        for kk in range(5):
            for d in range(2):
                expected[kk, d] += p[i, kk] * v[kk, d] / stab(y[i, d]) * R[i, d]
    np.testing.assert_allclose(Rv, expected, rtol=1e-10, atol=1e-13)
    assert not np.any(Rq) and not np.any(Rk)


def test_attn_lrp_attention_block_equals_composed_references():
    """softmax(q k^T) v under AttnLRP: R_v and R_p from UniformEpsilon, R_logits from Softmax, R_q, R_k
    from UniformEpsilon again -- chained by hand from the references."""
    q, k, v = _normal(15, (3, 4)), _normal(16, (5, 4)), _normal(17, (5, 2))
    R = _normal(18, (3, 2))
    fn = lambda x: jax.nn.softmax(x[0] @ x[1].T, axis=-1) @ x[2]  # noqa: E731
    explained = jlrp.explain(Fn(fn), composites.AttnLRP())
    _, pullback = jax.vjp(lambda a: explained({}, a), (q, k, v))
    Rq, Rk, Rv = pullback(R)[0]
    logits = np.asarray(q @ k.T)
    p = np.asarray(jax.nn.softmax(logits, axis=-1))
    Rp, eRv = matmul_reference(p, v, R)
    Rlogits = softmax_reference(logits, Rp)
    eRq, eRkT = matmul_reference(q, k.T, Rlogits)
    np.testing.assert_allclose(Rv, eRv, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Rq, eRq, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(Rk, eRkT.T, rtol=1e-9, atol=1e-12)


def test_a_single_input_rule_on_a_product_is_refused():
    with pytest.raises(jlrp.errors.RuleError, match="two activations"):
        relevance_of(
            lambda x: x[0] * x[1], (_normal(0, (2, 3)), _normal(1, (2, 3))), _normal(2, (2, 3)),
            {types.Multiply: rules.Epsilon()},
        )  # fmt: skip


def test_unsigned_stabilizer_is_lxts():
    z = jnp.array([-2.0, -1e-9, 0.0, 3.0])
    np.testing.assert_allclose(stabilize(z, 0.1, signed=False), np.asarray(z) + 0.1)
    assert Stabilizer(0.1, signed=False)(z)[0] == pytest.approx(-1.9)
    with pytest.raises(ValueError, match="signed"):
        Stabilizer(0.1, clip=True, signed=False)


#: the transformer rules with a float64 reference here (test_registry checks every rule has one)
REFERENCED = {rules.Softmax, rules.Uniform, rules.UniformEpsilon, rules.AHRule}
