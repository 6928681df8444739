"""Model zoo: torchvision's VGG and ResNet, BERT, ViT and a GPT-2 decoder for Flax linen and Flax
NNX, with weight converters from torchvision and Hugging Face state dicts.

- :mod:`jlrp.models.linen`: linen modules and factories (also re-exported here, so
  ``jlrp.models.resnet50()`` is the linen model).
- :mod:`jlrp.models.nnx`: the same architectures in Flax NNX (``jlrp.models.nnx.resnet50(rngs=...)``),
  with attribute names equal to the linen submodule names.
- :mod:`jlrp.models.convert`: :func:`from_torchvision` (state dict -> linen variables) and
  :func:`load_torchvision_nnx` (state dict -> NNX model, in place).

Inputs are ``NHWC``. The models use the function-level ops real Flax code uses: ``relu`` and
``max_pool`` as functions, residual ``x + h``, global average pool ``jnp.mean(x, axis=(1, 2))``
(ResNet); VGG pools with the module :class:`jlrp.layers.AdaptiveAvgPool` before its classifier.

Transformers (:mod:`jlrp.models.transformers`): ``linen.Bert`` / ``nnx.Bert``, ``SentenceEmbedding``,
``SentenceSimilarity``, ``ViT``, ``GPT2``; configs :class:`BertConfig`, :class:`ViTConfig`,
:class:`GPT2Config` (``from_hf_json``); :func:`from_hf` (Hugging Face state dict -> linen variables),
:func:`load_hf_nnx` (-> NNX model, in place); :func:`load_minilm` (all-MiniLM-L6-v2, offline).
"""

from jlrp.models import linen, nnx
from jlrp.models.convert import (
    LINEN_MODELS,
    NNX_MODELS,
    StateDictError,
    from_torchvision,
    load_torchvision_nnx,
    to_numpy,
    torch_key,
)
from jlrp.models.linen import (
    GPT2,
    VGG,
    VGG_CFGS,
    BasicBlock,
    Bert,
    Bottleneck,
    ResNet,
    SentenceEmbedding,
    SentenceSimilarity,
    ViT,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    vgg11,
    vgg11_bn,
    vgg13,
    vgg13_bn,
    vgg16,
    vgg16_bn,
    vgg19,
    vgg19_bn,
)
from jlrp.models.transformers.config import BertConfig, GPT2Config, ViTConfig
from jlrp.models.transformers.hf import HF_ARCHS, from_hf, hf_key, load_hf_nnx
from jlrp.models.transformers.minilm import SentenceModel, load_minilm

__all__ = [
    "linen",
    "nnx",
    "LINEN_MODELS",
    "NNX_MODELS",
    "StateDictError",
    "from_torchvision",
    "load_torchvision_nnx",
    "to_numpy",
    "torch_key",
    "BertConfig",
    "ViTConfig",
    "GPT2Config",
    "HF_ARCHS",
    "from_hf",
    "hf_key",
    "load_hf_nnx",
    "load_minilm",
    "SentenceModel",
    "Bert",
    "SentenceEmbedding",
    "SentenceSimilarity",
    "ViT",
    "GPT2",
    "VGG",
    "VGG_CFGS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
]
