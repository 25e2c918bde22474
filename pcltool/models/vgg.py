"""VGG-16 with BatchNorm for CIFAR: 13 conv layers, then one linear classifier on the 512-d pooled feature
(``vgg16``, the plain network of the CIFAR literature) or the three-layer classifier 512-512-512-K of the public
PCL reproduction (``vgg16_mlp``; the ensemble head still reads the 512-d pooled features)."""

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


class MLPClassifier(nn.Sequential):
    """Linear-ReLU-Linear-ReLU-Linear on the pooled feature; ``in_features``/``out_features`` like nn.Linear."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out_features))
        self.in_features, self.out_features = in_features, out_features


@register_backbone("vgg16", "cifar", "VGG-16 (BN) for CIFAR; trunk = conv blocks 1-4, peer = block 5 (feature 512)")
def vgg16(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return _vgg16(num_classes, in_channels, mlp=False)


@register_backbone("vgg16_mlp", "cifar", "VGG-16 (BN) with the reproduction's 512-512-512-K classifier")
def vgg16_mlp(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    return _vgg16(num_classes, in_channels, mlp=True)


def _vgg16(num_classes: int, in_channels: int, mlp: bool) -> SplitBackbone:
    trunk: list[nn.Module] = []
    ch = in_channels
    for widths in _BLOCKS[:4]:
        layers, ch = _conv_block(ch, widths)
        trunk += layers + [nn.MaxPool2d(2)]
    layers, ch = _conv_block(ch, _BLOCKS[4])
    # AdaptiveMaxPool2d(1) equals the usual final 2x2 max-pool at 32x32 input and also serves other sizes.
    branch = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
    classifier = MLPClassifier(ch, ch, num_classes) if mlp else nn.Linear(ch, num_classes)
    net = SplitBackbone(nn.Sequential(*trunk), branch, classifier)
    init_weights(net)
    return net
