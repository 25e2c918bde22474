"""DenseNet-BC for CIFAR (Huang et al. 2017): bottleneck layers, compression 0.5. DenseNet-40-12: feature 132."""

from __future__ import annotations

import torch
from torch import nn

from pcltool.models.cifar_resnet import init_weights
from pcltool.models.registry import SplitBackbone, register_backbone


class DenseLayer(nn.Module):
    def __init__(self, in_ch: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def _dense_block(in_ch: int, layers: int, growth: int) -> tuple[nn.Sequential, int]:
    mods = []
    for _ in range(layers):
        mods.append(DenseLayer(in_ch, growth))
        in_ch += growth
    return nn.Sequential(*mods), in_ch


def _transition(in_ch: int) -> tuple[nn.Sequential, int]:
    out = in_ch // 2
    return nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True), nn.Conv2d(in_ch, out, 1, bias=False), nn.AvgPool2d(2)), out


def densenet_bc(depth: int, growth: int, num_classes: int, in_channels: int = 3) -> SplitBackbone:
    """Trunk = conv0, dense1, trans1, dense2, trans2; branch = dense3 -> BN/ReLU -> pool."""
    n = (depth - 4) // 6
    ch = 2 * growth
    conv0 = nn.Conv2d(in_channels, ch, 3, padding=1, bias=False)
    dense1, ch = _dense_block(ch, n, growth)
    trans1, ch = _transition(ch)
    dense2, ch = _dense_block(ch, n, growth)
    trans2, ch = _transition(ch)
    dense3, ch = _dense_block(ch, n, growth)
    trunk = nn.Sequential(conv0, dense1, trans1, dense2, trans2)
    branch = nn.Sequential(dense3, nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net = SplitBackbone(trunk, branch, nn.Linear(ch, num_classes))
    init_weights(net)
    return net


@register_backbone("densenet40_12", "cifar", "DenseNet-BC-40-12 (feature 132)")
def densenet40_12(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return densenet_bc(40, 12, num_classes, in_channels)
