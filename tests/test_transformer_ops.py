"""Transformer idioms in unmodified Flax/JAX code: every op on the relevance path is covered under
AttnLRP and CP-LRP, and bias-free CP-LRP conserves relevance (float64).

Blocks written the ways Flax users write them: ``nn.MultiHeadDotProductAttention`` with a padding
mask, ``nnx.MultiHeadAttention``, ``jax.nn.dot_product_attention`` with a causal mask, a GPT-style
hand-written attention (einsum, ``-inf`` causal mask, ``jax.nn.softmax``), a Llama-style block (RMSNorm,
rotary position embeddings, gated MLP ``silu(gate) * up``) and a ViT (patch convolution, class token,
position embeddings, ``token`` head).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites

F64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
EPS = 1e-10
D, HEADS, T = 8, 2, 5


def _mlp(x, hidden=16, act=nn.gelu):
    return nn.Dense(D, **F64)(act(nn.Dense(hidden, **F64)(x)))


class BertBlock(nn.Module):
    """Post-LN encoder block with a padding mask (``mask`` is a (B, T) 0/1 array)."""

    @nn.compact
    def __call__(self, x, mask):
        attention_mask = nn.make_attention_mask(mask, mask)
        h = nn.MultiHeadDotProductAttention(HEADS, **F64)(x, mask=attention_mask)
        x = nn.LayerNorm(**F64)(x + h)
        x = nn.LayerNorm(**F64)(x + _mlp(x, act=lambda a: nn.gelu(a, approximate=False)))
        return nn.Dense(3, **F64)(x[:, 0])


class CausalBlock(nn.Module):
    """Pre-LN decoder block with ``jax.nn.dot_product_attention(is_causal=True)``."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(**F64)(x)
        q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), **F64)(h) for _ in range(3))
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), **F64)(a)
        x = x + _mlp(nn.LayerNorm(**F64)(x))
        return nn.Dense(3, **F64)(x[:, -1])


class GPTBlock(nn.Module):
    """GPT-2-style attention written by hand: one qkv projection, einsum, -inf causal mask, softmax."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(**F64)(x)
        q, k, v = jnp.split(nn.Dense(3 * D, **F64)(h), 3, axis=-1)
        split = lambda a: a.reshape(a.shape[:2] + (HEADS, D // HEADS))  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS)
        causal = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        scores = jnp.where(causal, scores, -jnp.inf)
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(x.shape)
        x = x + nn.Dense(D, **F64)(a)
        x = x + _mlp(nn.LayerNorm(**F64)(x), act=lambda a: nn.gelu(a, approximate=True))
        return nn.Dense(3, **F64)(x[:, -1])


def _rotary(x):
    """Rotary position embedding: multiplication by constant cos/sin tables (B, T, H, d)."""
    t, d = x.shape[1], x.shape[-1]
    freq = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    angles = np.arange(t)[:, None] * freq[None]
    cos = jnp.asarray(np.concatenate([np.cos(angles)] * 2, -1))[None, :, None]
    sin = jnp.asarray(np.concatenate([np.sin(angles)] * 2, -1))[None, :, None]
    half = d // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class LlamaBlock(nn.Module):
    """RMSNorm, rotary embeddings, additive causal mask, gated MLP ``silu(gate) * up``."""

    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(**F64)(x)
        q, k, v = (nn.DenseGeneral((HEADS, D // HEADS), use_bias=False, **F64)(h) for _ in range(3))
        q, k = _rotary(q), _rotary(k)
        t = x.shape[1]
        bias = jnp.where(np.tril(np.ones((t, t), bool)), 0.0, jnp.finfo(jnp.float64).min)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS) + bias
        a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, **F64)(a)
        h = nn.RMSNorm(**F64)(x)
        gate, up = nn.Dense(16, use_bias=False, **F64)(h), nn.Dense(16, use_bias=False, **F64)(h)
        x = x + nn.Dense(D, use_bias=False, **F64)(nn.silu(gate) * up)
        return nn.Dense(3, use_bias=False, **F64)(nn.RMSNorm(**F64)(x)[:, -1])


class ViT(nn.Module):
    """Patch convolution, class token, learned position embeddings, one encoder block, token head."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(D, (4, 4), strides=(4, 4), **F64)(images)
        x = x.reshape(x.shape[0], -1, D)
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, D), jnp.float64)
        x = jnp.concatenate([jnp.tile(cls, (x.shape[0], 1, 1)), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.5), (1, x.shape[1], D), jnp.float64)
        h = nn.LayerNorm(**F64)(x)
        x = x + nn.MultiHeadDotProductAttention(HEADS, **F64)(h, h)
        x = x + _mlp(nn.LayerNorm(**F64)(x))
        return nn.Dense(3, **F64)(nn.LayerNorm(**F64)(x)[:, 0])


def _tokens(seed=0, batch=2):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, T, D), jnp.float64)


MASK = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])

LINEN = {
    "bert (MultiHeadDotProductAttention, padding mask)": (BertBlock(), (_tokens(), MASK)),
    "jax.nn.dot_product_attention (causal)": (CausalBlock(), (_tokens(1),)),
    "gpt (einsum, -inf causal mask)": (GPTBlock(), (_tokens(2),)),
    "llama (RMSNorm, rotary, gated MLP)": (LlamaBlock(), (_tokens(3),)),
    "vit (class token, position embeddings)": (
        ViT(),
        (jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 3), jnp.float64),),
    ),
}


def _zero_constants(variables):
    """The bias-free setting: every bias, class token and position embedding zeroed."""

    def zero(path, a):
        key = jax.tree_util.keystr(path)
        return jnp.zeros_like(a) if any(n in key for n in ("bias", "cls", "pos_embedding")) else a

    return jax.tree_util.tree_map_with_path(zero, variables)


def _ratio(explained, variables, args, target=1):
    fn = lambda x: explained(variables, x, *args[1:])  # noqa: E731
    y, vjp = jax.vjp(fn, args[0])
    (relevance,) = vjp(y * jax.nn.one_hot(target, y.shape[-1], dtype=y.dtype))
    return np.asarray(relevance.reshape(len(y), -1).sum(1)) / np.asarray(y[:, target])


@pytest.mark.parametrize("name", list(LINEN))
def test_linen_transformer_idioms_are_covered_and_cp_lrp_conserves(name):
    model, args = LINEN[name]
    variables = model.init(jax.random.PRNGKey(0), *args)
    for composite in (composites.AttnLRP(), composites.CPLRP()):
        report = jlrp.audit(jlrp.explain(model, composite), variables, *args)
        assert report.uncovered == (), (name, str(report))
        kinds = {k for _, k, *_ in report.rows}
        assert {"Softmax", "MatMul" if isinstance(composite, composites.AttnLRP) else "Contraction"} <= kinds
    bias_free = _zero_constants(variables)
    cp = jlrp.explain(model, composites.CPLRP(epsilon=EPS, stabilizer=EPS))
    np.testing.assert_allclose(_ratio(cp, bias_free, args), 1.0, atol=1e-6)
    attn = jlrp.explain(model, composites.AttnLRP(epsilon=EPS, stabilizer=EPS))
    ratio = _ratio(attn, bias_free, args)
    assert np.isfinite(ratio).all() and (np.abs(ratio - 1) > 1e-6).any()  # the softmax's bias term


def test_cp_lrp_gives_queries_and_keys_no_relevance():
    """Only the value path carries relevance under CP-LRP: changing how q and k are computed from the
    input cannot change the relevance when the attention probabilities stay the same."""

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x, qk_input):
            q = nn.Dense(D, **F64)(qk_input)
            p = jax.nn.softmax(q @ q.swapaxes(-1, -2))
            return nn.Dense(2, **F64)((p @ nn.Dense(D, **F64)(x)).sum(1))

    model, x = Two(), _tokens(5)
    variables = model.init(jax.random.PRNGKey(0), x, x)
    both = jlrp.explain(model, composites.CPLRP())
    # the same model, with the query input fed as the *input* (tainted) or as a constant argument
    y, vjp = jax.vjp(lambda a: both(variables, a, a), x)
    r_through_qk = vjp(y * jax.nn.one_hot(0, 2))[0]
    y2, vjp2 = jax.vjp(lambda a: both(variables, a, x), x)
    r_value_only = vjp2(y2 * jax.nn.one_hot(0, 2))[0]
    np.testing.assert_allclose(r_through_qk, r_value_only, rtol=1e-12, atol=1e-14)


class NNXBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.attention = nnx.MultiHeadAttention(
            HEADS, D, decode=False, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs
        )
        self.norm = nnx.LayerNorm(D, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(D, 3, dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)

    def __call__(self, x):
        x = self.norm(x + self.attention(x, x, x))
        return self.head(x.mean(1))


def test_nnx_multi_head_attention_is_covered_and_conserves():
    model = NNXBlock(nnx.Rngs(0))
    for path, param in nnx.iter_graph(model):
        if isinstance(param, nnx.Param) and path and path[-1] == "bias":
            param.value = jnp.zeros_like(param.value)
    x = _tokens(6)
    report = jlrp.audit(jlrp.explain(model, composites.AttnLRP()), x)
    assert report.uncovered == (), str(report)
    explained = jlrp.explain(model, composites.CPLRP(epsilon=EPS, stabilizer=EPS))
    y, vjp = jax.vjp(explained, x)
    (relevance,) = vjp(y * jax.nn.one_hot(2, 3, dtype=y.dtype))
    np.testing.assert_allclose(relevance.reshape(2, -1).sum(1) / y[:, 2], 1.0, atol=1e-6)


def test_class_token_and_position_embeddings_create_no_relevance():
    """Constants in the input stream keep their share of relevance (of either sign, like a bias) and
    none is created from them: the conservation audit accounts for every share (the class token's at
    the concatenation, the positions' at their add; nothing unaccounted between rule calls), and an
    all-zero image, whose every activation comes from the class token and the positions, gets exactly
    zero relevance. (The class token's share vanished between rule calls before: a false gap.)"""
    model, (images,) = LINEN["vit (class token, position embeddings)"]
    variables = model.init(jax.random.PRNGKey(0), images)

    def zero_biases(path, a):
        return jnp.zeros_like(a) if "bias" in jax.tree_util.keystr(path) else a

    variables = jax.tree_util.tree_map_with_path(zero_biases, variables)
    explained = jlrp.explain(model, composites.CPLRP(epsilon=EPS, stabilizer=EPS))
    found = jlrp.audit(explained, variables, images[:1], conservation=True, target=1).conservation
    assert found.flagged == () and abs(found.unaccounted) < 1e-6 * abs(found.score)
    kinds = {r.path: r.kind for r in found.rows}  # the class token's share is kept at the concatenation
    assert kinds["@concatenate_0"] == "structural, with constants" and kinds["@affine_0"] == "Affine"
    zero = jnp.zeros_like(images)
    y, vjp = jax.vjp(lambda a: explained(variables, a), zero)
    assert np.abs(np.asarray(y)).max() > 0  # the constants alone give an output
    assert not np.any(vjp(y)[0])


def test_every_piece_of_a_split_carries_relevance():
    """``q, k, v = jnp.split(qkv, 3)``: the second and third pieces were taken for constants, so the
    relevance through them vanished without a message."""

    class Split(nn.Module):
        @nn.compact
        def __call__(self, x):
            a, b = jnp.split(nn.Dense(8, use_bias=False, **F64)(x), 2, axis=-1)
            return nn.Dense(2, use_bias=False, **F64)(a * 2.0 + b)

    model, x = Split(), _tokens(7)[:, 0]
    variables = model.init(jax.random.PRNGKey(0), x)
    explained = jlrp.explain(model, composites.EpsilonPlus(epsilon=EPS, stabilizer=EPS))
    np.testing.assert_allclose(_ratio(explained, variables, (x,)), 1.0, atol=1e-6)
    rows = {p: k for p, k, *_ in jlrp.audit(explained, variables, x).rows}
    assert rows["@add_0"] == "Add"
