"""The one tie rule every stage uses to turn scores into classes: the highest score wins, and among equal
scores the lowest class index wins (what ``numpy.argmax`` and ``torch.argmax`` do).

Top-k uses a *stable* descending sort, so ``top_k_indices(s, 1)[:, 0] == s.argmax(1)`` always, also when scores tie
(quantised logits tie often). ``deploy/pcl_infer.py`` carries its own copy of :func:`top_k_indices` (it must run
without pcltool); a test checks the two agree."""

from __future__ import annotations

import numpy as np


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores of each row, best first; ties go to the lowest index."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Percent of rows whose label is among :func:`top_k_indices`."""
    return 100.0 * float((top_k_indices(scores, k) == labels[:, None]).any(1).mean())


def top_k_torch(scores, k: int):
    """:func:`top_k_indices` for a torch tensor (``torch.topk`` leaves the order of ties unspecified)."""
    import torch

    k = min(k, scores.shape[-1])
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
