"""Scoring every branch of a PCL network (live and temporal-mean) on a split, in one pass."""

from __future__ import annotations

import torch
import torch.distributed as dist

from pcltool.pcl import peer_disagreement
from pcltool.ranking import top_k_torch


def candidate_names(num_peers: int, has_ensemble: bool) -> list[str]:
    """``peer1..peerM``, ``mean1..meanM``, then ``ensemble`` and ``mean-ensemble`` when there is an ensemble head."""
    names = [f"peer{j + 1}" for j in range(num_peers)] + [f"mean{j + 1}" for j in range(num_peers)]
    return names + (["ensemble", "mean-ensemble"] if has_ensemble else [])


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    top = top_k_torch(logits, k)
    return (top == labels.unsqueeze(-1)).any(-1).sum()


@torch.no_grad()
def evaluate_networks(live, mean, split, view_maker, device, batch_size: int = 256, autocast_dtype=None,
                      shard: tuple[int, int] = (0, 1), collect_logits: bool = False) -> dict:
    """Top-1 (and top-5) accuracy in % of every candidate, and the peers' mean pairwise disagreement.

    Every branch sees the same un-augmented image. Under torchrun each rank scores its shard and the counts are
    summed across ranks, so the figures cover the whole split. With ``collect_logits`` the per-candidate logits
    (CPU, fp32) are returned under ``"logits"`` (single process only)."""
    was_training = (live.training, mean.training)
    live.eval()
    mean.eval()
    m = live.num_peers
    names = candidate_names(m, live.ensemble_head is not None)
    correct1 = torch.zeros(len(names), dtype=torch.float64, device=device)
    correct5 = torch.zeros(len(names), dtype=torch.float64, device=device)
    disagree = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    collected: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    labels_all = []
    try:
        for images, labels in split.batches(batch_size, device, shard=shard):
            x = view_maker.eval_view(images)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                live_peers, live_ens = live(x)
                mean_peers, mean_ens = mean(x)
            outputs = list(live_peers.float().unbind(0)) + list(mean_peers.float().unbind(0))
            if live_ens is not None:
                outputs += [live_ens.float(), mean_ens.float()]
            for i, logits in enumerate(outputs):
                correct1[i] += _topk_correct(logits, labels, 1)
                correct5[i] += _topk_correct(logits, labels, 5)
                if collect_logits:
                    collected[names[i]].append(logits.cpu())
            disagree += peer_disagreement(live_peers) * labels.shape[0]
            count += labels.shape[0]
            if collect_logits:
                labels_all.append(labels.cpu())
    finally:
        live.train(was_training[0])
        mean.train(was_training[1])
    if dist.is_available() and dist.is_initialized() and shard[1] > 1:
        for t in (correct1, correct5, disagree, count):
            dist.all_reduce(t)
    n = max(count.item(), 1.0)
    result = {
        "top1": {name: 100.0 * correct1[i].item() / n for i, name in enumerate(names)},
        "top5": {name: 100.0 * correct5[i].item() / n for i, name in enumerate(names)},
        "disagreement": disagree.item() / n,
        "images": int(count.item()),
    }
    if collect_logits:
        result["logits"] = {k: torch.cat(v) for k, v in collected.items()}
        result["labels"] = torch.cat(labels_all)
    return result
