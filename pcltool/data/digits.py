"""The embedded dataset: scikit-learn's bundled handwritten digits (1,797 real 8x8 grey images, 10 classes).

No download; used by the quickstart recipe and the tests."""

from __future__ import annotations

import torch


def load_digits_dataset(test_size: float, seed: int = 0):
    """Return ``(train_x, train_y, test_x, test_y, class_names)``; images uint8 (N, 1, 8, 8) scaled from 0..16.

    The test split is a fixed seeded permutation (``seed`` is the dataset's, not the run's), so every run of a
    recipe sees the same test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_size * len(labels)))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], [str(i) for i in range(10)]
