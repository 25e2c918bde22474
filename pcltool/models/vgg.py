"""VGG-16 with BatchNorm for CIFAR (13 conv layers + one linear classifier on the 512-d pooled feature)."""

from __future__ import annotations

from torch import nn

from pcltool.models.cifar_resnet import init_weights
from pcltool.models.registry import SplitBackbone, register_backbone

_BLOCKS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def _conv_block(in_ch: int, widths: list[int]) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    return layers, in_ch


@register_backbone("vgg16", "cifar", "VGG-16 (BN) for CIFAR; trunk = conv blocks 1-4, peer = block 5 (feature 512)")
def vgg16(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    trunk: list[nn.Module] = []
    ch = in_channels
    for widths in _BLOCKS[:4]:
        layers, ch = _conv_block(ch, widths)
        trunk += layers + [nn.MaxPool2d(2)]
    layers, ch = _conv_block(ch, _BLOCKS[4])
    # AdaptiveMaxPool2d(1) equals the usual final 2x2 max-pool at 32x32 input and also serves other sizes.
    branch = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
    net = SplitBackbone(nn.Sequential(*trunk), branch, nn.Linear(ch, num_classes))
    init_weights(net)
    return net
