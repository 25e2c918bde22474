"""Wide ResNets (Zagoruyko & Komodakis 2016): pre-activation basic blocks, widths 16k/32k/64k in three stages."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from pcltool.models.cifar_resnet import init_weights
from pcltool.models.registry import SplitBackbone, register_backbone


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[WideBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(blocks)])


def wide_resnet(blocks: int, width: int, num_classes: int, in_channels: int = 3) -> SplitBackbone:
    """Trunk = stem + stage1 + stage2; branch = stage3 -> BN/ReLU -> global average pool."""
    w = [16 * width, 32 * width, 64 * width]
    trunk = nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), _stage(16, w[0], blocks, 1), _stage(w[0], w[1], blocks, 2)
    )
    branch = nn.Sequential(
        _stage(w[1], w[2], blocks, 2), nn.BatchNorm2d(w[2]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    net = SplitBackbone(trunk, branch, nn.Linear(w[2], num_classes))
    init_weights(net)
    return net


@register_backbone("wrn20_8", "cifar", "WRN-20-8: 3 pre-activation blocks per stage, width x8 (feature 512)")
def wrn20_8(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return wide_resnet(3, 8, num_classes, in_channels)


@register_backbone("wrn28_10", "cifar", "WRN-28-10: 4 pre-activation blocks per stage, width x10 (feature 640)")
def wrn28_10(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return wide_resnet(4, 10, num_classes, in_channels)
