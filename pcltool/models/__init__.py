"""Pure-torch models: the backbone registry, the multi-branch PCL network, branch extraction.

Nothing in this package knows about recipes, manifests or the CLI."""

from pcltool.models.pcl_net import EnsembleTeacher, PCLNetwork, extract_branch
from pcltool.models.registry import SplitBackbone, available_backbones, backbone_spec, create_backbone

__all__ = [
    "EnsembleTeacher",
    "PCLNetwork",
    "SplitBackbone",
    "available_backbones",
    "backbone_spec",
    "create_backbone",
    "extract_branch",
]
