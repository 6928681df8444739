"""VGG and ResNet in Flax linen, mirroring torchvision's architectures exactly.

EfficientNet-Lite0 (:mod:`jlrp.models.efficientnet`) is re-exported here as
:func:`efficientnet_lite0` / :class:`EfficientNetLite`.

The models take ``NHWC`` input and are written the way users write Flax models: activations,
pools, residual adds and the global average pool are *function calls* (``nn.relu(x)``,
``nn.max_pool(...)``, ``x + h``, ``jnp.mean(x, axis=(1, 2))``); only VGG's adaptive pool is a
module (:class:`jlrp.layers.AdaptiveAvgPool`), so that reduced input sizes such as 32x32 still
feed torchvision's 25088-wide classifier.

Submodule names mirror torchvision's state-dict keys, with ``.`` replaced by ``_`` inside a
level and ``/`` between levels:

==========================  ===============================  ============================
torchvision key prefix      linen path                       module
==========================  ===============================  ============================
``features.0``              ``features_0``                   ``nn.Conv`` (VGG)
``features.1``              ``features_1``                   ``nn.BatchNorm`` (VGG-BN)
``classifier.0/3/6``        ``classifier_0/3/6``             ``nn.Dense`` (VGG)
``classifier.2/5``          ``classifier_2/5``               ``nn.Dropout`` (VGG)
``conv1``, ``bn1``, ``fc``  ``conv1``, ``bn1``, ``fc``       ResNet stem and head
``layer1.0.conv1``          ``layer1_0/conv1``               block convolution
``layer1.0.downsample.0``   ``layer1_0/downsample_conv``     shortcut convolution
``layer1.0.downsample.1``   ``layer1_0/downsample_bn``       shortcut BatchNorm
==========================  ===============================  ============================

VGG's adaptive pool is named ``avgpool`` as in torchvision.

All models are called as ``model.apply(variables, x, train=False)``; with ``train=True``
BatchNorm uses batch statistics (pass ``mutable=['batch_stats']``) and dropout needs a
``'dropout'`` rng.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jlrp.layers import AdaptiveAvgPool
from jlrp.models.efficientnet import EfficientNetLite, MBConvBlock, efficientnet_lite0
from jlrp.models.transformers.bert import Bert, SentenceEmbedding, SentenceSimilarity
from jlrp.models.transformers.gpt2 import GPT2
from jlrp.models.transformers.vit import ViT

__all__ = [
    "Bert",
    "SentenceEmbedding",
    "SentenceSimilarity",
    "ViT",
    "GPT2",
    "VGG",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "VGG_CFGS",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "EfficientNetLite",
    "MBConvBlock",
    "efficientnet_lite0",
]

Dtype = Any

#: torchvision's VGG configurations: output channels of each 3x3 convolution, ``'M'`` = max-pool.
VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
    + (512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}

# Initialisers as in torchvision: Kaiming-normal (fan-out, ReLU gain) for convolutions,
# N(0, 0.01) for VGG's linear layers, torch's default uniform(+-1/sqrt(fan_in)) for ResNet's fc.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
vgg_dense_init = nn.initializers.normal(0.01)
torch_dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# torch's BatchNorm: eps 1e-5, running stats updated with weight 0.1 (= flax momentum 0.9).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


class VGG(nn.Module):
    """VGG (Simonyan & Zisserman), as torchvision's ``VGG``, in Flax linen.

    ``features`` (3x3 convolutions with padding 1, optional BatchNorm, ReLU, 2x2 max-pools),
    adaptive average pool to 7x7, flatten (``NHWC`` order), and the classifier
    ``Dense(4096) - ReLU - Dropout - Dense(4096) - ReLU - Dropout - Dense(num_classes)``
    (``hidden_features`` = 4096).

    Attributes:
        cfg: layer configuration, e.g. ``VGG_CFGS['A']`` (ints = conv channels, ``'M'`` = max-pool).
        batch_norm: whether a BatchNorm follows every convolution.
        num_classes: number of output logits.
        dropout_rate: dropout probability in the classifier.
        hidden_features: width of the two hidden classifier layers (torchvision: 4096).
        dtype: computation dtype (``None``: inferred from inputs and parameters).
        param_dtype: dtype of parameters created by ``init``.
    """

    cfg: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    dropout_rate: float = 0.5
    hidden_features: int = 4096
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, 3)``.
            train: training mode (batch statistics in BatchNorm, active dropout).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        index = 0
        for v in self.cfg:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
                continue
            x = nn.Conv(
                int(v),
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=conv_init,
                name=f"features_{index}",
                **kw,
            )(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=BN_MOMENTUM,
                    epsilon=BN_EPSILON,
                    name=f"features_{index + 1}",
                    **kw,
                )(x)
                index += 1
            x = nn.relu(x)
            index += 2
        x = AdaptiveAvgPool((7, 7), name="avgpool")(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.hidden_features, kernel_init=vgg_dense_init, name="classifier_0", **kw)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="classifier_2")(x)
        x = nn.Dense(self.hidden_features, kernel_init=vgg_dense_init, name="classifier_3", **kw)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name="classifier_5")(x)
        x = nn.Dense(self.num_classes, kernel_init=vgg_dense_init, name="classifier_6", **kw)(x)
        return x


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convolutions), as torchvision's ``BasicBlock``.

    Attributes:
        planes: output channels.
        strides: stride of the first convolution (and of the shortcut).
        downsample: whether the shortcut is a 1x1 convolution + BatchNorm (else identity).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    planes: int
    strides: int = 1
    downsample: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input."""
        conv = _conv_factory(self.dtype, self.param_dtype)
        norm = _norm_factory(train, self.dtype, self.param_dtype)
        s = (self.strides, self.strides)
        h = conv(self.planes, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv1")(x)
        h = norm(name="bn1")(h)
        h = nn.relu(h)
        h = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
        h = norm(name="bn2")(h)
        if self.downsample:
            x = conv(self.planes * self.expansion, (1, 1), strides=s, name="downsample_conv")(x)
            x = norm(name="downsample_bn")(x)
        return nn.relu(x + h)


class Bottleneck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1; stride on the 3x3), as torchvision's ``Bottleneck``.

    Attributes:
        planes: width of the block; the output has ``4 * planes`` channels.
        strides: stride of the 3x3 convolution (and of the shortcut).
        downsample: whether the shortcut is a 1x1 convolution + BatchNorm (else identity).
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    planes: int
    strides: int = 1
    downsample: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input."""
        conv = _conv_factory(self.dtype, self.param_dtype)
        norm = _norm_factory(train, self.dtype, self.param_dtype)
        s = (self.strides, self.strides)
        h = conv(self.planes, (1, 1), name="conv1")(x)
        h = norm(name="bn1")(h)
        h = nn.relu(h)
        h = conv(self.planes, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv2")(h)
        h = norm(name="bn2")(h)
        h = nn.relu(h)
        h = conv(self.planes * self.expansion, (1, 1), name="conv3")(h)
        h = norm(name="bn3")(h)
        if self.downsample:
            x = conv(self.planes * self.expansion, (1, 1), strides=s, name="downsample_conv")(x)
            x = norm(name="downsample_bn")(x)
        return nn.relu(x + h)


class ResNet(nn.Module):
    """ResNet (He et al., v1.5: stride on the 3x3 convolution), as torchvision's ``ResNet``.

    Stem ``conv1`` (7x7, stride 2, padding 3) - ``bn1`` - ReLU - 3x3 max-pool (stride 2,
    padding 1); four stages ``layer1`` .. ``layer4`` of ``block``s (64, 128, 256, 512 planes);
    global average pool (``jnp.mean`` over height and width); ``fc``.

    Attributes:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: number of output logits.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    block: type[BasicBlock] | type[Bottleneck]
    layers: Sequence[int]
    num_classes: int = 1000
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, 3)``.
            train: training mode (batch statistics in BatchNorm).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        conv = _conv_factory(self.dtype, self.param_dtype)
        x = conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
        x = _norm_factory(train, self.dtype, self.param_dtype)(name="bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers, strict=True)):
            for i in range(blocks):
                strides = 2 if (stage > 0 and i == 0) else 1
                downsample = i == 0 and (strides != 1 or inplanes != planes * self.block.expansion)
                x = self.block(
                    planes,
                    strides=strides,
                    downsample=downsample,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1}_{i}",
                )(x, train)
                inplanes = planes * self.block.expansion
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(
            self.num_classes,
            kernel_init=torch_dense_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="fc",
        )(x)
        return x


def _conv_factory(dtype: Dtype | None, param_dtype: Dtype) -> Callable[..., nn.Conv]:
    """Bias-free convolution with torchvision's initialisation (ResNet)."""

    def make(features: int, kernel_size: tuple[int, int], **kw: Any) -> nn.Conv:
        kw.setdefault("padding", "VALID")
        return nn.Conv(
            features,
            kernel_size,
            use_bias=False,
            kernel_init=conv_init,
            dtype=dtype,
            param_dtype=param_dtype,
            **kw,
        )

    return make


def _norm_factory(train: bool, dtype: Dtype | None, param_dtype: Dtype) -> Callable[..., nn.BatchNorm]:
    """BatchNorm with torch's epsilon and momentum."""

    def make(**kw: Any) -> nn.BatchNorm:
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=dtype,
            param_dtype=param_dtype,
            **kw,
        )

    return make


# ------------------------------------------------------------------------------------ factories


def vgg11(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-11 (configuration "A") without BatchNorm.

    Args:
        num_classes: number of output logits.
        **kwargs: further :class:`VGG` attributes (``dropout_rate``, ``hidden_features``, ``dtype``,
            ``param_dtype``).
    """
    return VGG(VGG_CFGS["A"], batch_norm=False, num_classes=num_classes, **kwargs)


def vgg11_bn(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-11 (configuration "A") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["A"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg13(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-13 (configuration "B") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["B"], batch_norm=False, num_classes=num_classes, **kwargs)


def vgg13_bn(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-13 (configuration "B") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["B"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg16(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-16 (configuration "D") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["D"], batch_norm=False, num_classes=num_classes, **kwargs)


def vgg16_bn(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-16 (configuration "D") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["D"], batch_norm=True, num_classes=num_classes, **kwargs)


def vgg19(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-19 (configuration "E") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["E"], batch_norm=False, num_classes=num_classes, **kwargs)


def vgg19_bn(num_classes: int = 1000, **kwargs: Any) -> VGG:
    """VGG-19 (configuration "E") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["E"], batch_norm=True, num_classes=num_classes, **kwargs)


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 (basic blocks, ``(2, 2, 2, 2)``).

    Args:
        num_classes: number of output logits.
        **kwargs: further :class:`ResNet` attributes (``dtype``, ``param_dtype``).
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks, ``(3, 4, 6, 3)``); see :func:`resnet18`."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (bottleneck blocks, ``(3, 4, 6, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, **kwargs)


def resnet101(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-101 (bottleneck blocks, ``(3, 4, 23, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes=num_classes, **kwargs)


def resnet152(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-152 (bottleneck blocks, ``(3, 8, 36, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes=num_classes, **kwargs)
