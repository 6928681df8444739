"""Transformers for Flax linen and NNX: BERT (with sentence-embedding heads), ViT, a GPT-2 decoder.

- :mod:`~jlrp.models.transformers.config`: ``BertConfig``, ``ViTConfig``, ``GPT2Config``
  (``from_hf_json``);
- :mod:`~jlrp.models.transformers.bert`, :mod:`~jlrp.models.transformers.vit`,
  :mod:`~jlrp.models.transformers.gpt2`: the models (linen classes, NNX classes prefixed ``NNX``;
  :mod:`jlrp.models.linen` / :mod:`jlrp.models.nnx` re-export them under the plain names);
- :mod:`~jlrp.models.transformers.hf`: converters from Hugging Face state dicts;
- :mod:`~jlrp.models.transformers.minilm`: the offline all-MiniLM-L6-v2 sentence model.

This package ``__init__`` imports nothing, so that :mod:`jlrp.models.linen` can re-export the models
without an import cycle through the converters.
"""
