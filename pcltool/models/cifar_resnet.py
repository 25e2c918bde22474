"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, n blocks each, depth 6n+2.

``resnet{8,14,20,32,56,110}`` use the paper's parameter-free option-A shortcut (subsample + zero-pad), which is
what the published CIFAR sizes count (ResNet-32: 0.46 M). ``resnet{N}_proj`` use option-B projection shortcuts
(1x1 convolution + BatchNorm where the shape changes), as the public PCL reproduction and ONE's code do.
ResNet-110 is also offered in the bottleneck form (depth 9n+2, pooled feature 256) used by some PCL tables."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from pcltool.models.registry import SplitBackbone, register_backbone


class PadShortcut(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: subsample by ``stride`` and zero-pad the new channels.

    Parameter-free, which is why ResNet-32 has 0.46 M parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = planes - in_planes

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra - half))


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: a strided 1x1 convolution + BatchNorm to the new shape."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, projection: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = (projection_shortcut(in_planes, planes, stride) if projection
                             else PadShortcut(in_planes, planes, stride))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, projection: bool = True):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = projection_shortcut(in_planes, out_planes, stride)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _stage(block, in_planes: int, planes: int, blocks: int, stride: int,
           projection: bool) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1, projection))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def cifar_resnet(depth_blocks: int, block, num_classes: int, in_channels: int = 3,
                 projection: bool = False) -> SplitBackbone:
    """Trunk = stem + stage1 + stage2; branch = stage3 -> global average pool; classifier = FC."""
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    stage1, planes = _stage(block, 16, 16, depth_blocks, 1, projection)
    stage2, planes = _stage(block, planes, 32, depth_blocks, 2, projection)
    stage3, planes = _stage(block, planes, 64, depth_blocks, 2, projection)
    net = SplitBackbone(
        trunk=nn.Sequential(stem, stage1, stage2),
        branch=nn.Sequential(stage3, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        classifier=nn.Linear(planes, num_classes),
    )
    init_weights(net)
    return net


for _depth in (8, 14, 20, 32, 56, 110):
    for _projection in (False, True):
        def _factory(num_classes: int, in_channels: int = 3, _n=(_depth - 2) // 6, _p=_projection) -> SplitBackbone:
            return cifar_resnet(_n, BasicBlock, num_classes, in_channels, projection=_p)

        _shortcut = "projection (1x1 conv + BN) shortcuts" if _projection else "zero-padding shortcuts"
        register_backbone(f"resnet{_depth}{'_proj' if _projection else ''}", "cifar",
                          f"CIFAR ResNet-{_depth}, basic blocks, {_shortcut}")(_factory)


@register_backbone("resnet110_bottleneck", "cifar", "CIFAR ResNet-110, bottleneck blocks (feature 256)")
def resnet110_bottleneck(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return cifar_resnet(12, Bottleneck, num_classes, in_channels)
