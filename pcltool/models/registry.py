"""One registry of backbones. Each factory returns a :class:`SplitBackbone`: the plain network, already split
where PCL's shared trunk ends (the table in PCL.md), so the multi-branch network and the pruned single branch
are assembled from the same modules and share parameter names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


class SplitBackbone(nn.Module):
    """A plain classifier ``classifier(branch(trunk(x)))``.

    ``trunk``: the low-level layers PCL shares between peers; ``branch``: the high-level layers, ending in a
    pooled, flattened feature of size ``feature_dim``; ``classifier``: the linear layer (or a module with
    ``in_features``/``out_features`` like one, e.g. VGG's MLP). There is no multi-branch
    code in it: it is exactly the backbone, and what ``prune`` deploys.
    """

    def __init__(self, trunk: nn.Module, branch: nn.Module, classifier: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.branch = branch
        self.classifier = classifier

    @property
    def feature_dim(self) -> int:
        return self.classifier.in_features

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward_features(self, x):
        return self.branch(self.trunk(x))

    def forward(self, x):
        return self.classifier(self.forward_features(x))


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    factory: Callable[..., SplitBackbone]
    input_kind: str  # "cifar" (small images) or "imagenet"
    description: str


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(name: str, input_kind: str, description: str):
    def decorator(factory: Callable[..., SplitBackbone]):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = BackboneSpec(name, factory, input_kind, description)
        return factory

    return decorator


def _load_all() -> None:
    # Importing the modules runs their @register_backbone decorators.
    from pcltool.models import cifar_resnet, densenet, imagenet, vgg, wrn  # noqa: F401


def available_backbones() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def backbone_spec(name: str) -> BackboneSpec:
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_backbone(name: str, num_classes: int, in_channels: int = 3) -> SplitBackbone:
    """Build the plain backbone ``name`` with freshly initialised weights."""
    return backbone_spec(name).factory(num_classes=num_classes, in_channels=in_channels)
