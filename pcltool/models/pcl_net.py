"""The multi-branch PCL network: a shared trunk, m peers, and the peer ensemble head."""

from __future__ import annotations

import torch
from torch import nn

from pcltool.models.registry import SplitBackbone, create_backbone


class Peer(nn.Module):
    """One peer: the backbone's high-level layers and its own classifier."""

    def __init__(self, branch: nn.Module, classifier: nn.Module):
        super().__init__()
        self.branch = branch
        self.classifier = classifier

    def forward(self, trunk_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.branch(trunk_features)  # (N, d)
        return pooled, self.classifier(pooled)  # (N, d), (N, K)


class PCLNetwork(nn.Module):
    """Shared trunk + ``num_peers`` independently initialised peers + ensemble head ``z_e = W_e [f_1; ...; f_m]``.

    ``forward(views)`` takes either one batch ``(N, C, H, W)`` that every peer sees (evaluation) or per-peer views
    ``(m, N, C, H, W)`` (training; peer j gets view j). It returns ``(peer_logits (m, N, K), ensemble_logits (N, K)
    or None)``. With ``batched_views`` the m views go through the trunk as one batch of m·N images (one kernel
    launch per layer instead of m); BatchNorm then normalises over all views together.
    """

    def __init__(self, backbone: str, num_classes: int, num_peers: int = 3, in_channels: int = 3,
                 ensemble: bool = True, batched_views: bool = True):
        super().__init__()
        if num_peers < 1:
            raise ValueError("num_peers must be >= 1")
        self.backbone = backbone
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.batched_views = batched_views
        plains = [create_backbone(backbone, num_classes, in_channels) for _ in range(num_peers)]
        self.trunk = plains[0].trunk
        self.peers = nn.ModuleList(Peer(p.branch, p.classifier) for p in plains)
        feature_dim = plains[0].feature_dim
        self.ensemble_head = nn.Linear(num_peers * feature_dim, num_classes) if ensemble else None

    @property
    def num_peers(self) -> int:
        return len(self.peers)

    def _trunk_per_view(self, views: torch.Tensor) -> list[torch.Tensor]:
        m, n = views.shape[:2]
        if self.batched_views:
            feats = self.trunk(views.flatten(0, 1))  # (m*N, C', H', W')
            return list(feats.unflatten(0, (m, n)).unbind(0))
        return [self.trunk(views[j]) for j in range(m)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if x.dim() == 5:
            if x.shape[0] != self.num_peers:
                raise ValueError(f"got {x.shape[0]} views for {self.num_peers} peers")
            trunk_feats = self._trunk_per_view(x)
        else:
            shared = self.trunk(x)
            trunk_feats = [shared] * self.num_peers
        pooled, logits = zip(*(peer(f) for peer, f in zip(self.peers, trunk_feats)))
        peer_logits = torch.stack(logits)  # (m, N, K)
        ensemble_logits = self.ensemble_head(torch.cat(pooled, dim=1)) if self.ensemble_head is not None else None
        return peer_logits, ensemble_logits


class EnsembleTeacher(nn.Module):
    """The whole multi-branch network as one classifier: image -> ensemble logits (for export of ``ensemble``)."""

    def __init__(self, net: PCLNetwork):
        super().__init__()
        if net.ensemble_head is None:
            raise ValueError("this network has no ensemble head (trained as a plain baseline)")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[1]


def extract_branch(net: PCLNetwork, peer_index: int) -> SplitBackbone:
    """The standalone plain backbone made of ``net``'s trunk + peer ``peer_index`` + its classifier.

    A fresh instance of the registered backbone class is loaded with copies of those weights (BatchNorm running
    statistics included), so the result holds no trace of the other peers or of the ensemble head."""
    if not 0 <= peer_index < net.num_peers:
        raise IndexError(f"peer index {peer_index} out of range for {net.num_peers} peers")
    plain = create_backbone(net.backbone, net.num_classes, net.in_channels)
    peer = net.peers[peer_index]
    state = {}
    for prefix, module in (("trunk", net.trunk), ("branch", peer.branch), ("classifier", peer.classifier)):
        for key, value in module.state_dict().items():
            state[f"{prefix}.{key}"] = value.detach().clone()
    plain.load_state_dict(state, strict=True)
    return plain.train(net.training)
