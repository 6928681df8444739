"""EfficientNet-Lite (Tan & Le 2019; the "Lite" variants of the TensorFlow TPU repository) in Flax
linen and Flax NNX.

EfficientNet-Lite is EfficientNet made for integer accelerators: no squeeze-and-excitation,
ReLU6 instead of swish, and stem and head widths fixed at 32 and 1280. Lite0 is the unscaled
network (width and depth multiplier 1.0, 224x224 input) with the published block table
:data:`LITE0_BLOCKS`. Each *MBConv* block is

    [expand 1x1 conv - BN - ReLU6] - depthwise kxk conv (stride s) - BN - ReLU6 - project 1x1 conv - BN
    [+ input, where stride 1 and input width = output width]

and the network is ``conv_stem`` (3x3, stride 2, 32) - ``bn0`` - ReLU6 - 16 blocks - ``conv_head``
(1x1, 1280) - ``bn1`` - ReLU6 - global average pool - dropout - ``fc``.

The modules are written as Flax users write them: depthwise convolutions are
``nn.Conv(feature_group_count=channels)``, the activation is the function ``jax.nn.relu6``, the
skip is ``x + h``, the pool is ``jnp.mean(x, axis=(1, 2))``. Convolutions use Flax's
``padding='SAME'``, which is TensorFlow's SAME (at stride 2 the extra row/column of padding goes
at the bottom/right), the padding the pretrained weights were trained with. BatchNorm has
TensorFlow's epsilon 1e-3.

Inputs are ``NHWC`` in the Lite scaling ``(255 * x - 127) / 128`` of RGB values ``x`` in [0, 1]
(see :func:`jlrp.models.efficientnet_lite0_preprocess`). Stochastic depth (drop connect), a
training-only regulariser, is not implemented.

Names follow the ``efficientnet_pytorch`` state-dict keys without their leading underscores:

=================================  ==============================  =========================
state-dict key prefix              linen path / NNX attribute      module
=================================  ==============================  =========================
``_conv_stem``, ``_bn0``           ``conv_stem``, ``bn0``          stem
``_blocks.3._expand_conv``         ``blocks_3/expand_conv``        1x1 expansion (not block 0)
``_blocks.3._bn0``                 ``blocks_3/bn0``                its BatchNorm
``_blocks.3._depthwise_conv``      ``blocks_3/depthwise_conv``     depthwise kxk
``_blocks.3._bn1``                 ``blocks_3/bn1``                its BatchNorm
``_blocks.3._project_conv``        ``blocks_3/project_conv``       1x1 projection
``_blocks.3._bn2``                 ``blocks_3/bn2``                its BatchNorm
``_conv_head``, ``_bn1``, ``_fc``  ``conv_head``, ``bn1``, ``fc``  head
=================================  ==============================  =========================
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "BlockArgs",
    "LITE0_BLOCKS",
    "MBConvBlock",
    "EfficientNetLite",
    "NNXMBConvBlock",
    "NNXEfficientNetLite",
    "efficientnet_lite0",
    "nnx_efficientnet_lite0",
]

Dtype = Any


class BlockArgs(NamedTuple):
    """One stage of the block table: ``repeats`` MBConv blocks; only the first has ``stride`` and
    ``in_features``, the others stride 1 and ``out_features`` inputs."""

    expand_ratio: int
    kernel_size: int
    stride: int
    in_features: int
    out_features: int
    repeats: int


#: EfficientNet-Lite0's published stages (expand, kernel, stride, in, out, repeats).
LITE0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 32, 16, 1),
    BlockArgs(6, 3, 2, 16, 24, 2),
    BlockArgs(6, 5, 2, 24, 40, 2),
    BlockArgs(6, 3, 2, 40, 80, 3),
    BlockArgs(6, 5, 1, 80, 112, 3),
    BlockArgs(6, 5, 2, 112, 192, 4),
    BlockArgs(6, 3, 1, 192, 320, 1),
)

# TensorFlow's BatchNorm defaults (the weights come from TF): epsilon 1e-3, momentum 0.99.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
# TF EfficientNet's initialisers: convolutions N(0, 2 / fan_out), the classifier uniform(+-1/sqrt(fan_out)).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def _expand_blocks(blocks: Sequence[BlockArgs]) -> list[tuple[int, int, int, int, int]]:
    """One ``(expand, kernel, stride, in, out)`` per block, in execution order."""
    out = []
    for b in blocks:
        for i in range(b.repeats):
            cin, stride = (b.in_features, b.stride) if i == 0 else (b.out_features, 1)
            out.append((b.expand_ratio, b.kernel_size, stride, cin, b.out_features))
    return out


# ------------------------------------------------------------------------------------ linen


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (MBConv) without squeeze-excite, in Flax linen.

    Attributes:
        expand_ratio: hidden width = ``in_features * expand_ratio`` (1: no expansion convolution).
        kernel_size: size of the depthwise kernel.
        strides: stride of the depthwise convolution.
        in_features: input channels.
        out_features: output channels.
        dtype: computation dtype.
        param_dtype: parameter dtype.
    """

    expand_ratio: int
    kernel_size: int
    strides: int
    in_features: int
    out_features: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input ``(batch, height, width, in_features)``."""
        kw = {
            "use_bias": False,
            "kernel_init": conv_init,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        norm = {
            "use_running_average": not train,
            "momentum": BN_MOMENTUM,
            "epsilon": BN_EPSILON,
            "dtype": self.dtype,
            "param_dtype": self.param_dtype,
        }
        hidden = self.in_features * self.expand_ratio
        h = x
        if self.expand_ratio != 1:
            h = nn.Conv(hidden, (1, 1), name="expand_conv", **kw)(h)
            h = jax.nn.relu6(nn.BatchNorm(name="bn0", **norm)(h))
        k, s = self.kernel_size, self.strides
        h = nn.Conv(
            hidden, (k, k), (s, s), padding="SAME", feature_group_count=hidden, name="depthwise_conv", **kw
        )(h)
        h = jax.nn.relu6(nn.BatchNorm(name="bn1", **norm)(h))
        h = nn.Conv(self.out_features, (1, 1), name="project_conv", **kw)(h)
        h = nn.BatchNorm(name="bn2", **norm)(h)
        if s == 1 and self.in_features == self.out_features:
            h = x + h
        return h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite in Flax linen (see the module docstring for the architecture and names).

    Attributes:
        blocks: the block table (default :data:`LITE0_BLOCKS`).
        num_classes: number of output logits.
        stem_features: width of the stem convolution (Lite: 32).
        head_features: width of the head convolution (Lite: 1280).
        dropout_rate: dropout before the classifier (Lite0: 0.2; active with ``train=True``).
        dtype: computation dtype (``None``: inferred from inputs and parameters).
        param_dtype: dtype of parameters created by ``init``.
    """

    blocks: Sequence[BlockArgs] = LITE0_BLOCKS
    num_classes: int = 1000
    stem_features: int = 32
    head_features: int = 1280
    dropout_rate: float = 0.2
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, 3)``, in the Lite scaling ``(255 * x - 127) / 128``.
            train: training mode (batch statistics in BatchNorm, active dropout: pass
                ``mutable=['batch_stats']`` and a ``'dropout'`` rng).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        norm = {"use_running_average": not train, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON, **kw}
        x = nn.Conv(
            self.stem_features,
            (3, 3),
            (2, 2),
            "SAME",
            use_bias=False,
            kernel_init=conv_init,
            name="conv_stem",
            **kw,
        )(x)
        x = jax.nn.relu6(nn.BatchNorm(name="bn0", **norm)(x))
        for i, (expand, k, s, cin, cout) in enumerate(_expand_blocks(self.blocks)):
            x = MBConvBlock(expand, k, s, cin, cout, name=f"blocks_{i}", **kw)(x, train)
        x = nn.Conv(
            self.head_features, (1, 1), use_bias=False, kernel_init=conv_init, name="conv_head", **kw
        )(x)
        x = jax.nn.relu6(nn.BatchNorm(name="bn1", **norm)(x))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=dense_init, name="fc", **kw)(x)


def efficientnet_lite0(num_classes: int = 1000, **kwargs: Any) -> EfficientNetLite:
    """EfficientNet-Lite0 in Flax linen (random weights; pretrained: :func:`jlrp.models.load_efficientnet_lite0`).

    Args:
        num_classes: number of output logits.
        **kwargs: further :class:`EfficientNetLite` attributes (``dropout_rate``, ``dtype``,
            ``param_dtype``).
    """
    return EfficientNetLite(LITE0_BLOCKS, num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------------------ NNX


def _running(train: bool | None) -> bool | None:
    return None if train is None else not train


class NNXMBConvBlock(nnx.Module):
    """Mobile inverted bottleneck (MBConv) in Flax NNX; see :class:`MBConvBlock`.

    Args:
        expand_ratio: hidden width = ``in_features * expand_ratio`` (1: no expansion convolution).
        kernel_size: size of the depthwise kernel.
        strides: stride of the depthwise convolution.
        in_features: input channels.
        out_features: output channels.
        dtype: computation dtype.
        param_dtype: parameter dtype.
        rngs: random streams for initialisation.
    """

    def __init__(
        self,
        expand_ratio: int,
        kernel_size: int,
        strides: int,
        in_features: int,
        out_features: int,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        conv = {"use_bias": False, "kernel_init": conv_init, **kw}
        norm = {"use_running_average": True, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON, **kw}
        hidden = in_features * expand_ratio
        self.expand = expand_ratio != 1
        self.skip = strides == 1 and in_features == out_features
        if self.expand:
            self.expand_conv = nnx.Conv(in_features, hidden, (1, 1), **conv)
            self.bn0 = nnx.BatchNorm(hidden, **norm)
        k = kernel_size
        self.depthwise_conv = nnx.Conv(
            hidden,
            hidden,
            (k, k),
            strides=(strides, strides),
            padding="SAME",
            feature_group_count=hidden,
            **conv,
        )
        self.bn1 = nnx.BatchNorm(hidden, **norm)
        self.project_conv = nnx.Conv(hidden, out_features, (1, 1), **conv)
        self.bn2 = nnx.BatchNorm(out_features, **norm)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Apply the block to ``NHWC`` input; ``train`` as in :meth:`NNXEfficientNetLite.__call__`."""
        ura = _running(train)
        h = x
        if self.expand:
            h = jax.nn.relu6(self.bn0(self.expand_conv(h), use_running_average=ura))
        h = jax.nn.relu6(self.bn1(self.depthwise_conv(h), use_running_average=ura))
        h = self.bn2(self.project_conv(h), use_running_average=ura)
        if self.skip:
            h = x + h
        return h


class NNXEfficientNetLite(nnx.Module):
    """EfficientNet-Lite in Flax NNX; see :class:`EfficientNetLite`.

    Blocks are attributes ``blocks_0`` ... ``blocks_15`` (Lite0). Built in evaluation mode
    (BatchNorm uses running averages, dropout off), like a torch model after ``.eval()``.

    Args:
        blocks: the block table (default :data:`LITE0_BLOCKS`).
        num_classes: number of output logits.
        stem_features: width of the stem convolution.
        head_features: width of the head convolution.
        dropout_rate: dropout before the classifier.
        in_features: input channels.
        dtype: computation dtype.
        param_dtype: parameter dtype.
        rngs: random streams for initialisation (and dropout).
    """

    def __init__(
        self,
        blocks: Sequence[BlockArgs] = LITE0_BLOCKS,
        num_classes: int = 1000,
        stem_features: int = 32,
        head_features: int = 1280,
        dropout_rate: float = 0.2,
        in_features: int = 3,
        *,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> None:
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        norm = {"use_running_average": True, "momentum": BN_MOMENTUM, "epsilon": BN_EPSILON, **kw}
        self.conv_stem = nnx.Conv(
            in_features,
            stem_features,
            (3, 3),
            strides=(2, 2),
            padding="SAME",
            use_bias=False,
            kernel_init=conv_init,
            **kw,
        )
        self.bn0 = nnx.BatchNorm(stem_features, **norm)
        names = []
        for i, (expand, k, s, cin, cout) in enumerate(_expand_blocks(blocks)):
            setattr(self, f"blocks_{i}", NNXMBConvBlock(expand, k, s, cin, cout, **kw))
            names.append(f"blocks_{i}")
            last = cout
        self.block_names = tuple(names)
        self.conv_head = nnx.Conv(last, head_features, (1, 1), use_bias=False, kernel_init=conv_init, **kw)
        self.bn1 = nnx.BatchNorm(head_features, **norm)
        self.dropout = nnx.Dropout(dropout_rate, deterministic=True, rngs=rngs)
        self.fc = nnx.Linear(head_features, num_classes, kernel_init=dense_init, **kw)

    def __call__(self, x: jnp.ndarray, train: bool | None = None) -> jnp.ndarray:
        """Compute logits.

        Args:
            x: images, ``(batch, height, width, channels)``, in the Lite scaling.
            train: ``True``/``False`` forces training/evaluation mode for this call; ``None``
                follows the submodules' mode (evaluation unless ``model.train()`` was called).

        Returns:
            Logits of shape ``(batch, num_classes)``.
        """
        ura = _running(train)
        x = jax.nn.relu6(self.bn0(self.conv_stem(x), use_running_average=ura))
        for name in self.block_names:
            x = getattr(self, name)(x, train)
        x = jax.nn.relu6(self.bn1(self.conv_head(x), use_running_average=ura))
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x, deterministic=None if train is None else not train)
        return self.fc(x)


def nnx_efficientnet_lite0(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs: Any) -> NNXEfficientNetLite:
    """EfficientNet-Lite0 in Flax NNX (random weights; pretrained: :func:`jlrp.models.load_efficientnet_lite0`).

    Also available as ``jlrp.models.nnx.efficientnet_lite0``.

    Args:
        num_classes: number of output logits.
        rngs: random streams for initialisation (and dropout).
        **kwargs: further :class:`NNXEfficientNetLite` arguments (``dropout_rate``, ``dtype``,
            ``param_dtype``).
    """
    return NNXEfficientNetLite(LITE0_BLOCKS, num_classes, rngs=rngs, **kwargs)
