"""VGG and ResNet in Flax NNX, the same architectures and ops as :mod:`jlrp.models.linen`.

EfficientNet-Lite0 (:mod:`jlrp.models.efficientnet`) is re-exported here as
:func:`efficientnet_lite0` / :class:`EfficientNetLite` (``efficientnet_lite0(rngs=nnx.Rngs(0))``).

Attribute names equal the linen submodule names (``features_0``, ``classifier_6``, ``avgpool``,
``conv1``, ``bn1``, ``layer1_0.conv1``, ``layer1_0.downsample_conv``, ``fc`` ...), so an NNX
path ``('layer1_0', 'conv1', 'kernel')`` corresponds to the linen path
``params/layer1_0/conv1/kernel`` and to torchvision's ``layer1.0.conv1.weight``. The function-level
ops are the same as in linen: ``nnx.relu``, ``nnx.max_pool``, residual ``x + h``,
``jnp.mean(x, axis=(1, 2))``; VGG's adaptive pool is :class:`jlrp.layers.NNXAdaptiveAvgPool`.

Models are built in *evaluation* mode (BatchNorm uses running averages, dropout is off), like a
torchvision model after ``.eval()``. ``model(x)`` follows the mode of the submodules, which
``model.train()`` / ``model.eval()`` switch; ``model(x, train=True)`` or ``train=False``
overrides it for one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jlrp.layers import NNXAdaptiveAvgPool
from jlrp.models.efficientnet import NNXEfficientNetLite as EfficientNetLite
from jlrp.models.efficientnet import NNXMBConvBlock as MBConvBlock
from jlrp.models.efficientnet import nnx_efficientnet_lite0 as efficientnet_lite0
from jlrp.models.linen import (
    BN_EPSILON,
    BN_MOMENTUM,
    VGG_CFGS,
    conv_init,
    torch_dense_init,
    vgg_dense_init,
)
from jlrp.models.transformers.bert import NNXBert as Bert
from jlrp.models.transformers.bert import NNXSentenceEmbedding as SentenceEmbedding
from jlrp.models.transformers.bert import NNXSentenceSimilarity as SentenceSimilarity
from jlrp.models.transformers.gpt2 import NNXGPT2 as GPT2
from jlrp.models.transformers.vit import NNXViT as ViT

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


def _running(train: bool | None) -> bool | None:
    return None if train is None else not train


class _Factory:
    """Creates layers with shared dtype, rngs and torchvision's hyper-parameters."""

    def __init__(self, dtype: Dtype | None, param_dtype: Dtype, rngs: nnx.Rngs) -> None:
        self.kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}

    def conv(
        self, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0, bias: bool = False
    ) -> nnx.Conv:
        return nnx.Conv(
            cin,
            cout,
            (k, k),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=bias,
            kernel_init=conv_init,
            **self.kw,
        )

    def norm(self, features: int) -> nnx.BatchNorm:
        return nnx.BatchNorm(
            features, use_running_average=True, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, **self.kw
        )

    def linear(self, cin: int, cout: int, init: Any) -> nnx.Linear:
        return nnx.Linear(cin, cout, kernel_init=init, **self.kw)


class VGG(nnx.Module):
    """VGG, as torchvision's ``VGG``, in Flax NNX; see :class:`jlrp.models.linen.VGG`.

    Args:
        cfg: layer configuration, e.g. ``VGG_CFGS['A']`` (ints = conv channels, ``'M'`` = max-pool).
        batch_norm: whether a BatchNorm follows every convolution.
        num_classes: number of output logits.
        dropout_rate: dropout probability in the classifier.
        hidden_features: width of the two hidden classifier layers (torchvision: 4096).
        in_features: input channels.
        dtype: computation dtype (``None``: inferred from inputs and parameters).
        param_dtype: parameter dtype.
        rngs: random streams for initialisation (and dropout).
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
        batch_norm: bool = False,
        num_classes: int = 1000,
        dropout_rate: float = 0.5,
        hidden_features: int = 4096,
        in_features: int = 3,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        make = _Factory(dtype, param_dtype, rngs)
        self.cfg = tuple(cfg)
        self.batch_norm = batch_norm
        index, channels = 0, in_features
        for v in self.cfg:
            if v == "M":
                index += 1
                continue
            setattr(self, f"features_{index}", make.conv(channels, int(v), 3, pad=1, bias=True))
            channels = int(v)
            if batch_norm:
                setattr(self, f"features_{index + 1}", make.norm(channels))
                index += 1
            index += 2
        self.avgpool = NNXAdaptiveAvgPool((7, 7))
        self.classifier_0 = make.linear(channels * 7 * 7, hidden_features, vgg_dense_init)
        self.classifier_2 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_3 = make.linear(hidden_features, hidden_features, vgg_dense_init)
        self.classifier_5 = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.classifier_6 = make.linear(hidden_features, num_classes, vgg_dense_init)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, channels)``.
            train: ``True``/``False`` forces training/evaluation mode for this call; ``None``
                follows the submodules' mode (evaluation unless ``model.train()`` was called).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        index = 0
        for v in self.cfg:
            if v == "M":
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
                index += 1
                continue
            x = getattr(self, f"features_{index}")(x)
            if self.batch_norm:
                x = getattr(self, f"features_{index + 1}")(x, use_running_average=_running(train))
                index += 1
            x = nnx.relu(x)
            index += 2
        x = self.avgpool(x)
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.classifier_0(x))
        x = self.classifier_2(x, deterministic=_running(train))
        x = nnx.relu(self.classifier_3(x))
        x = self.classifier_5(x, deterministic=_running(train))
        return self.classifier_6(x)


class BasicBlock(nnx.Module):
    """ResNet basic block, as torchvision's ``BasicBlock``; see :class:`jlrp.models.linen.BasicBlock`.

    Args:
        inplanes: input channels.
        planes: output channels.
        strides: stride of the first convolution (and of the shortcut).
        downsample: whether the shortcut is a 1x1 convolution + BatchNorm (else identity).
        dtype: computation dtype.
        param_dtype: parameter dtype.
        rngs: random streams for initialisation.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        strides: int = 1,
        downsample: bool = False,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        make = _Factory(dtype, param_dtype, rngs)
        self.conv1 = make.conv(inplanes, planes, 3, strides, pad=1)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3, pad=1)
        self.bn2 = make.norm(planes)
        self.downsample = downsample
        if downsample:
            self.downsample_conv = make.conv(inplanes, planes * self.expansion, 1, strides)
            self.downsample_bn = make.norm(planes * self.expansion)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input; ``train`` as in :meth:`ResNet.__call__`."""
        ura = _running(train)
        h = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        h = self.bn2(self.conv2(h), use_running_average=ura)
        if self.downsample:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
        return nnx.relu(x + h)


class Bottleneck(nnx.Module):
    """ResNet bottleneck block, as torchvision's ``Bottleneck``; see :class:`jlrp.models.linen.Bottleneck`.

    Args:
        inplanes: input channels.
        planes: width of the block; the output has ``4 * planes`` channels.
        strides: stride of the 3x3 convolution (and of the shortcut).
        downsample: whether the shortcut is a 1x1 convolution + BatchNorm (else identity).
        dtype: computation dtype.
        param_dtype: parameter dtype.
        rngs: random streams for initialisation.
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        strides: int = 1,
        downsample: bool = False,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        make = _Factory(dtype, param_dtype, rngs)
        self.conv1 = make.conv(inplanes, planes, 1)
        self.bn1 = make.norm(planes)
        self.conv2 = make.conv(planes, planes, 3, strides, pad=1)
        self.bn2 = make.norm(planes)
        self.conv3 = make.conv(planes, planes * self.expansion, 1)
        self.bn3 = make.norm(planes * self.expansion)
        self.downsample = downsample
        if downsample:
            self.downsample_conv = make.conv(inplanes, planes * self.expansion, 1, strides)
            self.downsample_bn = make.norm(planes * self.expansion)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input; ``train`` as in :meth:`ResNet.__call__`."""
        ura = _running(train)
        h = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        h = nnx.relu(self.bn2(self.conv2(h), use_running_average=ura))
        h = self.bn3(self.conv3(h), use_running_average=ura)
        if self.downsample:
            x = self.downsample_bn(self.downsample_conv(x), use_running_average=ura)
        return nnx.relu(x + h)


class ResNet(nnx.Module):
    """ResNet v1.5, as torchvision's ``ResNet``, in Flax NNX; see :class:`jlrp.models.linen.ResNet`.

    Blocks are attributes ``layer{stage}_{index}`` (``layer1_0`` ... ``layer4_2``).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: number of output logits.
        in_features: input channels.
        dtype: computation dtype.
        param_dtype: parameter dtype.
        rngs: random streams for initialisation.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        in_features: int = 3,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        make = _Factory(dtype, param_dtype, rngs)
        self.conv1 = make.conv(in_features, 64, 7, 2, pad=3)
        self.bn1 = make.norm(64)
        names = []
        inplanes = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            for i in range(blocks):
                strides = 2 if (stage > 0 and i == 0) else 1
                downsample = i == 0 and (strides != 1 or inplanes != planes * block.expansion)
                name = f"layer{stage + 1}_{i}"
                blk = block(
                    inplanes, planes, strides, downsample, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                setattr(self, name, blk)
                names.append(name)
                inplanes = planes * block.expansion
        self.block_names = tuple(names)
        self.fc = make.linear(inplanes, num_classes, torch_dense_init)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, channels)``.
            train: ``True``/``False`` forces training/evaluation mode for this call; ``None``
                follows the submodules' mode (evaluation unless ``model.train()`` was called).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        x = nnx.relu(self.bn1(self.conv1(x), use_running_average=_running(train)))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return self.fc(x)


# ------------------------------------------------------------------------------------ factories


def vgg11(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-11 (configuration "A") without BatchNorm, in Flax NNX.

    Args:
        num_classes: number of output logits.
        rngs: random streams for initialisation (and dropout).
        **kwargs: further :class:`VGG` arguments (``dropout_rate``, ``hidden_features``, ``dtype``,
            ``param_dtype``).
    """
    return VGG(VGG_CFGS["A"], False, num_classes, rngs=rngs, **kwargs)


def vgg11_bn(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-11 (configuration "A") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["A"], True, num_classes, rngs=rngs, **kwargs)


def vgg13(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-13 (configuration "B") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["B"], False, num_classes, rngs=rngs, **kwargs)


def vgg13_bn(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-13 (configuration "B") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["B"], True, num_classes, rngs=rngs, **kwargs)


def vgg16(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-16 (configuration "D") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["D"], False, num_classes, rngs=rngs, **kwargs)


def vgg16_bn(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-16 (configuration "D") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["D"], True, num_classes, rngs=rngs, **kwargs)


def vgg19(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-19 (configuration "E") without BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["E"], False, num_classes, rngs=rngs, **kwargs)


def vgg19_bn(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> VGG:
    """VGG-19 (configuration "E") with BatchNorm; see :func:`vgg11`."""
    return VGG(VGG_CFGS["E"], True, num_classes, rngs=rngs, **kwargs)


def resnet18(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-18 (basic blocks, ``(2, 2, 2, 2)``), in Flax NNX.

    Args:
        num_classes: number of output logits.
        rngs: random streams for initialisation.
        **kwargs: further :class:`ResNet` arguments (``dtype``, ``param_dtype``).
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, rngs=rngs, **kwargs)


def resnet34(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-34 (basic blocks, ``(3, 4, 6, 3)``); see :func:`resnet18`."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, rngs=rngs, **kwargs)


def resnet50(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-50 (bottleneck blocks, ``(3, 4, 6, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, rngs=rngs, **kwargs)


def resnet101(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-101 (bottleneck blocks, ``(3, 4, 23, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, rngs=rngs, **kwargs)


def resnet152(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """ResNet-152 (bottleneck blocks, ``(3, 8, 36, 3)``); see :func:`resnet18`."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, rngs=rngs, **kwargs)
