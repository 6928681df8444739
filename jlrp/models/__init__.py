"""Model zoo: torchvision's VGG and ResNet and EfficientNet-Lite0 for Flax linen and Flax NNX,
with weight converters.

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
    VGG,
    VGG_CFGS,
    BasicBlock,
    Bottleneck,
    ResNet,
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
