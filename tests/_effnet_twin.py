"""A torch EfficientNet-Lite0 written from the published block table, as an independent reference.

Not jlrp code: written here from the paper's description (MBConv without squeeze-excite, ReLU6,
BatchNorm eps 1e-3, skip where stride 1 and widths match) with TensorFlow's SAME padding done by
``F.pad`` (``pad_total = max((ceil(n / s) - 1) * s + k - n, 0)``, the smaller half first). Module
names follow the ``efficientnet_pytorch`` state dict, so ``load_state_dict`` takes the package's
weights. Activations are modules and every convolution is registered right before its BatchNorm,
so zennit's ``SequentialMergeBatchNorm`` finds every pair; the skip is ``zennit.layer.Sum`` (a
module zennit's composites give the Norm rule), as zennit's own ResNet canonizer does.

``symmetric_stem=True`` pads the stem inside ``Conv2d(padding=1)`` instead of by ``F.pad``: equal
to SAME for odd input sizes, and what zennit's first-layer rules (ZBox, Flat) need to treat the
padding as zeros rather than as input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from zennit.layer import Sum

BLOCKS = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
EPS = 1e-3


def same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    pads = []
    for n in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Block(torch.nn.Module):
    def __init__(self, expand: int, k: int, s: int, cin: int, cout: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.k, self.s, self.expand = k, s, expand != 1
        if self.expand:
            self._expand_conv = torch.nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = torch.nn.BatchNorm2d(hidden, eps=EPS)
            self.act0 = torch.nn.ReLU6()
        self._depthwise_conv = torch.nn.Conv2d(hidden, hidden, k, stride=s, groups=hidden, bias=False)
        self._bn1 = torch.nn.BatchNorm2d(hidden, eps=EPS)
        self.act1 = torch.nn.ReLU6()
        self._project_conv = torch.nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = torch.nn.BatchNorm2d(cout, eps=EPS)
        self.skip = s == 1 and cin == cout
        if self.skip:
            self.sum = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act0(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self.act1(self._bn1(self._depthwise_conv(same_pad(h, self.k, self.s))))
        h = self._bn2(self._project_conv(h))
        return self.sum(torch.stack([x, h], dim=-1)) if self.skip else h


class TorchEfficientNetLite0(torch.nn.Module):
    def __init__(
        self, num_classes: int = 1000, symmetric_stem: bool = False, blocks: tuple = BLOCKS, head: int = 1280
    ) -> None:
        super().__init__()
        self.symmetric_stem = symmetric_stem
        self._conv_stem = torch.nn.Conv2d(3, 32, 3, stride=2, padding=1 if symmetric_stem else 0, bias=False)
        self._bn0 = torch.nn.BatchNorm2d(32, eps=EPS)
        self.act0 = torch.nn.ReLU6()
        modules = []
        for expand, k, s, cin, cout, repeats in blocks:
            for i in range(repeats):
                modules.append(Block(expand, k, s if i == 0 else 1, cin if i == 0 else cout, cout))
        self._blocks = torch.nn.ModuleList(modules)
        self._conv_head = torch.nn.Conv2d(blocks[-1][4], head, 1, bias=False)
        self._bn1 = torch.nn.BatchNorm2d(head, eps=EPS)
        self.act1 = torch.nn.ReLU6()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self._fc = torch.nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric_stem:
            x = same_pad(x, 3, 2)
        x = self.act0(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self.act1(self._bn1(self._conv_head(x)))
        return self._fc(self.pool(x).flatten(1))
