"""Dataset splits as uint8 image batches. In-memory splits can live on the training device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch


class ImageSplit:
    """A split that yields ``(images uint8 (B, C, H, W), labels int64 (B,))`` batches on ``device``."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, device, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, shard: tuple[int, int] = (0, 1),
                even_shards: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``shard = (rank, world_size)`` takes every world_size-th sample of the epoch order. ``even_shards``
        first drops the last (< world_size) samples so every rank runs the same number of steps (training)."""
        raise NotImplementedError

    def num_batches(self, batch_size: int, drop_last: bool = False, shard: tuple[int, int] = (0, 1)) -> int:
        n = len(self) // shard[1]  # as with even_shards
        return n // batch_size if drop_last else -(-n // batch_size)


def epoch_order(n: int, shuffle: bool, generator: torch.Generator | None, shard: tuple[int, int] = (0, 1),
                even_shards: bool = False) -> torch.Tensor:
    """This rank's sample order for one epoch, drawn on the CPU so it is identical on every device and rank."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if even_shards:
        order = order[: n - n % shard[1]]
    return order[shard[0] :: shard[1]]


@dataclass
class TensorSplit(ImageSplit):
    """A split held whole in memory (CIFAR: 150 MB as uint8). ``to(device)`` moves it once."""

    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    _cache: dict = field(default_factory=dict, repr=False)

    def subset(self, index: torch.Tensor) -> TensorSplit:
        return TensorSplit(self.images[index], self.labels[index])

    def on(self, device) -> TensorSplit:
        key = str(device)
        if key not in self._cache:
            self._cache[key] = TensorSplit(self.images.to(device), self.labels.to(device))
        return self._cache[key]

    def batches(self, batch_size, device, shuffle=False, generator=None, drop_last=False, shard=(0, 1),
                even_shards=False):
        resident = self.on(device)
        order = epoch_order(len(self), shuffle, generator, shard, even_shards)
        if resident.images.device.type == "cuda":  # from pinned memory: the copy does not wait for the GPU
            order = order.pin_memory().to(resident.images.device, non_blocking=True)
        else:
            order = order.to(resident.images.device)
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield resident.images[idx], resident.labels[idx]


@dataclass
class DatasetBundle:
    """Train / validation (carved from train) / test splits and what is needed to use them."""

    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    image_size: int
    warnings: list[str] = field(default_factory=list)
    resize_size: int | None = None  # decode size (image folders); None: images used at their stored size
    fingerprint: dict = field(default_factory=dict)  # what the data was (pcltool.data.fingerprint)
    listing: list[str] | None = None  # image folders: the file listing the fingerprint hashes
    skipped: list[dict] = field(default_factory=list)  # unreadable files left out (data.skip_unreadable)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocessing(self):
        """The contract every consumer follows (:class:`pcltool.data.preprocess.Preprocessing`)."""
        from pcltool.data.preprocess import Preprocessing

        return Preprocessing(self.resize_size or self.image_size, self.image_size, self.in_channels,
                             tuple(self.mean), tuple(self.std))

    def record(self) -> dict:
        """What a run stores about its data in the manifest (``data``)."""
        return {"dataset": self.name, "fingerprint": self.fingerprint, "preprocessing": self.preprocessing.as_dict(),
                "classes": len(self.class_names), "train": len(self.train), "val": len(self.val),
                "test": len(self.test), "skipped": self.skipped, "warnings": self.warnings}


def validation_count(num_train: int, val_size: float) -> int:
    """Images carved for validation; raises before anything is decoded when ``val_size`` does not fit."""
    count = int(round(val_size * num_train)) if val_size < 1 else int(val_size)
    if not 0 < count < num_train:
        from pcltool.errors import RecipeError

        raise RecipeError(f"data.val_size={val_size} gives {count} validation images out of {num_train}; "
                          f"use a fraction in (0, 1) or a count below {num_train}")
    return count


def carve_validation(num_train: int, val_size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split train indices into (train, val). ``val_size`` < 1 is a fraction, otherwise a count."""
    count = validation_count(num_train, val_size)
    perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed))
    return perm[count:].sort().values, perm[:count].sort().values
