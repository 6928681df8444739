"""Model zoo: torchvision's VGG and ResNet for Flax linen and Flax NNX, with weight converters.

- :mod:`jlrp.models.linen`: linen modules and factories (also re-exported here, so
  ``jlrp.models.resnet50()`` is the linen model).
- :mod:`jlrp.models.nnx`: the same architectures in Flax NNX (``jlrp.models.nnx.resnet50(rngs=...)``),
  with attribute names equal to the linen submodule names.
- :mod:`jlrp.models.convert`: :func:`from_torchvision` (state dict -> linen variables) and
  :func:`load_torchvision_nnx` (state dict -> NNX model, in place).

Inputs are ``NHWC``. The models use the function-level ops real Flax code uses: ``relu`` and
``max_pool`` as functions, residual ``x + h``, global average pool ``jnp.mean(x, axis=(1, 2))``
(ResNet); VGG pools with the module :class:`jlrp.layers.AdaptiveAvgPool` before its classifier.
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
