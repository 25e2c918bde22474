"""torchvision's ResNet-18, split for PCL: trunk = stem + layer1..3, branch = layer4 -> pool (feature 512)."""

from __future__ import annotations

from torch import nn

from pcltool.models.registry import SplitBackbone, register_backbone


@register_backbone("resnet18", "imagenet", "torchvision ResNet-18 (ImageNet, 11.7 M params)")
def resnet18(num_classes: int, in_channels: int = 3) -> SplitBackbone:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    branch = nn.Sequential(net.layer4, net.avgpool, nn.Flatten())
    return SplitBackbone(trunk, branch, net.fc)
