"""Model zoo: torchvision's VGG and ResNet, EfficientNet-Lite0, BERT, ViT and a GPT-2 decoder for Flax
linen and Flax NNX, with weight converters from torchvision, efficientnet_pytorch and Hugging Face
state dicts.

- :mod:`jlrp.models.linen`: linen modules and factories (also re-exported here, so
  ``jlrp.models.resnet50()`` is the linen model).
- :mod:`jlrp.models.nnx`: the same architectures in Flax NNX (``jlrp.models.nnx.resnet50(rngs=...)``),
  with attribute names equal to the linen submodule names.
- :mod:`jlrp.models.convert`: :func:`from_torchvision` (state dict -> linen variables) and
  :func:`load_torchvision_nnx` (state dict -> NNX model, in place); the same for the
  ``efficientnet_pytorch`` layout (:func:`from_efficientnet_lite`, :func:`load_efficientnet_lite_nnx`).
- :mod:`jlrp.models.efficientnet`: EfficientNet-Lite (linen and NNX); pretrained ImageNet weights
  offline with :func:`load_efficientnet_lite0`, inputs from photos with
  :func:`efficientnet_lite0_preprocess`, labels from :func:`imagenet_classes`.
- :func:`read_pth`: a PyTorch ``.pth`` state dict read safely without torch (:mod:`jlrp.models.pth`).

Inputs are ``NHWC``. The models use the function-level ops real Flax code uses: ``relu`` and
``max_pool`` as functions, residual ``x + h``, global average pool ``jnp.mean(x, axis=(1, 2))``
(ResNet); VGG pools with the module :class:`jlrp.layers.AdaptiveAvgPool` before its classifier.

Transformers (:mod:`jlrp.models.transformers`): ``linen.Bert`` / ``nnx.Bert``, ``SentenceEmbedding``,
``SentenceSimilarity``, ``ViT``, ``GPT2``; configs :class:`BertConfig`, :class:`ViTConfig`,
:class:`GPT2Config` (``from_hf_json``); :func:`from_hf` (Hugging Face state dict -> linen variables),
:func:`load_hf_nnx` (-> NNX model, in place); :func:`load_minilm` (all-MiniLM-L6-v2, offline).
"""

from jlrp.models import efficientnet, linen, nnx
from jlrp.models.convert import (
    LINEN_MODELS,
    NNX_MODELS,
    StateDictError,
    efficientnet_key,
    from_efficientnet_lite,
    from_torchvision,
    load_efficientnet_lite_nnx,
    load_torchvision_nnx,
    to_numpy,
    torch_key,
)
from jlrp.models.efficientnet import LITE0_BLOCKS, EfficientNetLite, efficientnet_lite0
from jlrp.models.imagenet import efficientnet_lite0_preprocess, imagenet_classes
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
from jlrp.models.pretrained import efficientnet_lite0_weights, load_efficientnet_lite0
from jlrp.models.pth import read_pth
from jlrp.models.transformers.config import BertConfig, GPT2Config, ViTConfig
from jlrp.models.transformers.hf import HF_ARCHS, from_hf, hf_key, load_hf_nnx
from jlrp.models.transformers.minilm import SentenceModel, load_minilm

__all__ = [
    "efficientnet",
    "linen",
    "nnx",
    "LITE0_BLOCKS",
    "EfficientNetLite",
    "efficientnet_lite0",
    "efficientnet_lite0_preprocess",
    "efficientnet_lite0_weights",
    "imagenet_classes",
    "load_efficientnet_lite0",
    "read_pth",
    "efficientnet_key",
    "from_efficientnet_lite",
    "load_efficientnet_lite_nnx",
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
