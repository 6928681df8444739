"""Third-party transformer code, unmodified: jlrp covers every op and bias-free CP-LRP conserves.

Three implementations that jlrp's authors did not write (issue 12, deliverable 5):

- ``vit`` / ``vit-gap``: the ViT of google-research/vision_transformer (``vit_jax/models_vit.py``,
  vendored unmodified under ``tests/third_party/vit_jax``), classifier ``'token'`` and ``'gap'``;
- ``nnx-vit``: the Flax NNX ViT of the Flax docs example "Train a Vision Transformer (ViT) for image
  classification" (model classes vendored unmodified under ``tests/third_party/flax_nnx_vit``);
- ``hf-bert``: Hugging Face's ``FlaxBertForSequenceClassification`` (``model.module``, a linen module;
  ``crosscheck``: transformers is not a dependency of jlrp, and 5.x dropped Flax).

For each: ``jlrp.audit`` under ``AttnLRP`` (and ``CPLRP``) lists no uncovered op and recognises every
attention's softmax and both matmuls (without the attention rules the same audit lists exactly
those); with biases, class tokens and position/token-type embeddings zeroed, CP-LRP (epsilon 1e-10)
conserves, |sum(R) / score - 1| <= 1e-4, while AttnLRP does not (its softmax rule has a bias term),
so the same check tells the two apart.

Precision: the two ViTs fix their computation dtype in the third-party code (``vit_jax``'s
``Encoder1DBlock`` has ``dtype=float32`` and its ``Encoder`` does not pass one; the Flax example
uses float32 activations and parameters), so their blocks compute in float32 whatever the input
dtype: the inputs and weights here are float64, the conservation error is float32 rounding (~1e-6).
The BERT module takes ``dtype=float64`` and runs in float64 throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlrp
from jlrp import composites
from jlrp import types as jtypes

sys.path.insert(0, str(Path(__file__).parent / "third_party"))  # `vit_jax` imports itself by that name

TARGET = 1
EPS = 1e-10
LAYERS = 2
CONSTANTS = ("bias", "cls", "pos_embedding", "position_embeddings", "token_type_embeddings")


@dataclasses.dataclass(frozen=True)
class Case:
    """One third-party model: ``args``/``kwargs`` are what its explained call takes (``variables, x,
    ...`` for linen, ``x, ...`` for NNX); ``bias_free_*`` the same with the constants zeroed."""

    model: Any
    args: tuple
    bias_free_model: Any
    bias_free_args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    output: Any = None


def _zero_constants(variables):
    """Biases, class tokens, position and token-type embeddings zeroed (the bias-free setting)."""

    def zero(path, a):
        key = jax.tree_util.keystr(path)
        return jnp.zeros_like(a) if any(name in key for name in CONSTANTS) else a

    return jax.tree_util.tree_map_with_path(zero, variables)


def _images(seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (2, 16, 16, 3), jnp.float64)


def _random(shapes, seed=0):
    """Random float64 values for a pytree of ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape`` of the
    model's own init: running that init eagerly costs seconds per model).

    Kernels and tables ``N(0, 1/fan_in)`` (fan-in: all axes but the last), norm scales ``1 + N(0, 0.1^2)``,
    other vectors (biases) ``N(0, 0.1^2)``; integer leaves zero, PRNG keys ``key(seed)``.
    """
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.zeros(leaf.shape, leaf.dtype)
        if len(leaf.shape) >= 2:
            values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif "scale" in jax.tree_util.keystr(path):
            values = 1.0 + rng.normal(0.0, 0.1, leaf.shape)
        else:
            values = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(values, jnp.float64)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _vit_jax(classifier):
    from vit_jax import models_vit

    model = models_vit.VisionTransformer(
        num_classes=3,
        patches=types.SimpleNamespace(size=(4, 4)),
        transformer=dict(
            num_layers=LAYERS, mlp_dim=32, num_heads=2, dropout_rate=0.0, attention_dropout_rate=0.0
        ),
        hidden_size=16,
        classifier=classifier,
    )
    x = _images()
    variables = _random(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False)))
    return Case(model, (variables, x), model, (_zero_constants(variables), x), dict(train=False))


def _flax_nnx_vit():
    from flax_nnx_vit import vit

    config = vit.ModelConfig(
        num_classes=3,
        img_size=16,
        patch_size=4,
        num_layers=LAYERS,
        num_heads=2,
        mlp_dim=32,
        hidden_size=16,
        dropout_rate=0.0,
        use_bfloat16=False,
    )
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.VisionTransformer(config, rngs=nnx.Rngs(0))))
    state = _random(state)
    model, bias_free = nnx.merge(graphdef, state), nnx.merge(graphdef, _zero_constants(state))
    model.eval()
    bias_free.eval()
    x = _images()
    return Case(model, (x,), bias_free, (x,))


PADDED = 2  # the second sentence ends in this many padding tokens


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        type_vocab_size=2,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    module = transformers.FlaxBertForSequenceClassification(config, dtype=jnp.float64, _do_init=False).module
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, config.vocab_size)
    mask = jnp.array([[1] * 6, [1] * (6 - PADDED) + [0] * PADDED])
    token_types = jnp.zeros_like(ids).at[:, 3:].set(1)
    positions = jnp.broadcast_to(jnp.arange(6), ids.shape)
    # FlaxBertForSequenceClassificationModule(input_ids, attention_mask, token_type_ids, position_ids,
    # head_mask, deterministic, output_attentions, output_hidden_states, return_dict) -> (logits,)
    rest = (ids, mask, token_types, positions, None)
    kwargs = dict(deterministic=True, return_dict=False)
    variables = _random(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *rest, **kwargs)))
    return Case(module, (variables, *rest), module, (_zero_constants(variables), *rest), kwargs, output=0)


CASES = {
    "vit": functools.partial(_vit_jax, "token"),
    "vit-gap": functools.partial(_vit_jax, "gap"),
    "nnx-vit": _flax_nnx_vit,
    "hf-bert": _hf_bert,
}
PARAMS = [pytest.param(name, marks=pytest.mark.crosscheck) if name == "hf-bert" else name for name in CASES]


@functools.cache
def _case(name: str) -> Case:
    return CASES[name]()


def _audit(case: Case, composite):
    return jlrp.audit(jlrp.explain(case.model, composite), *case.args, **case.kwargs)


def _ratio(case: Case, composite):
    """sum(relevance) / score per sample, bias-free weights, and the relevance itself."""
    explained = jlrp.explain(case.bias_free_model, composite)
    out, relevance = jlrp.attribute(
        explained, *case.bias_free_args, target=TARGET, output=case.output, **case.kwargs
    )
    total = np.asarray(relevance).reshape(len(out), -1).sum(1)
    return total / np.asarray(out[:, TARGET]), np.asarray(relevance)


def _kinds(report) -> list[str]:
    return [kind for _, kind, *_ in report.rows]


@pytest.mark.parametrize("name", PARAMS)
def test_audit_covers_every_op_and_finds_every_attention(name):
    case = _case(name)
    for composite in (composites.AttnLRP(), composites.CPLRP()):
        report = _audit(case, composite)
        assert report.uncovered == (), (name, str(report))
        kinds = _kinds(report)
        assert kinds.count("Softmax") == LAYERS, str(report)
        matmuls = "MatMul" if isinstance(composite, composites.AttnLRP) else "Contraction"
        assert kinds.count(matmuls) >= LAYERS, str(report)  # CP-LRP: p @ v, linear in v
    assert kinds.count("MatMul") + kinds.count("Contraction") == 2 * LAYERS


@pytest.mark.parametrize("name", PARAMS)
def test_without_the_attention_rules_the_audit_lists_the_attention_ops(name):
    """The audit above can fail: drop AttnLRP's softmax and matmul entries and it names exactly the
    2 matmuls and the softmax of every layer as uncovered."""
    full = composites.AttnLRP().build()
    dropped = (jtypes.Softmax, jtypes.MatMul)
    stripped = dataclasses.replace(full, layer_map=tuple(e for e in full.layer_map if e[0] not in dropped))
    uncovered = _audit(_case(name), stripped).uncovered
    assert len(uncovered) == 3 * LAYERS, uncovered
    assert sum("(MatMul)" in u for u in uncovered) == 2 * LAYERS, uncovered
    assert sum("(Softmax)" in u for u in uncovered) == LAYERS, uncovered


@pytest.mark.parametrize("name", PARAMS)
def test_bias_free_cp_lrp_conserves_and_attn_lrp_does_not(name):
    case = _case(name)
    cp, relevance = _ratio(case, composites.CPLRP(epsilon=EPS, stabilizer=EPS))
    np.testing.assert_allclose(cp, 1.0, atol=1e-4, err_msg=name)
    attn, attn_relevance = _ratio(case, composites.AttnLRP(epsilon=EPS, stabilizer=EPS))
    assert np.isfinite(attn).all()
    assert np.abs(attn - 1.0).max() > 1e-4, attn  # the softmax rule's bias term: not conservative
    if name == "hf-bert":  # relevance per token id; padding tokens are masked keys: no relevance
        assert relevance.shape == attn_relevance.shape == (2, 6)
        assert not relevance[1, -PADDED:].any() and not attn_relevance[1, -PADDED:].any()
        assert np.abs(relevance[1, :-PADDED]).min() > 0
    else:
        assert relevance.shape == attn_relevance.shape == _images().shape
