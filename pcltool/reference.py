"""The reference training path: PCL as the public reproductions train it, for ``pcltool bench-train``.

Built the way those codebases are: a torchvision-style dataset (HWC uint8 array, one PIL image per sample) whose
``__getitem__`` applies the PIL transform pipeline m times (one view per peer), a DataLoader with one worker per
CPU core, fp32, contiguous (NCHW) tensors, one trunk call per view in both the live and the mean network (the
mean network's peer k runs on view k only, as the reproduction's mean model does, so its trunk BatchNorm layers
take m running-statistics updates per step and each peer's layers one), ``loss.item()`` every step, and a
Python loop over parameters for the temporal mean, whose BatchNorm layers keep their own running statistics by
running in train mode.

It shares with pcltool only what makes losses comparable: the network construction and initialisation
(:func:`pcltool.trainer.build_networks`), the optimiser's parameter groups (:func:`pcltool.trainer.param_groups`),
the loss (:func:`pcltool.pcl.pcl_loss`), the ramp-up and EMA decay formulas, the learning-rate schedule and the
epoch's sample order. With ``data.augment = "none"`` both paths see
the same inputs, so their losses match step for step (pcltool with ``train.batched_views = false``; with
batched views BatchNorm in the trunk normalises over all m views jointly, which differs once views differ).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pcltool.config import Recipe
from pcltool.data.splits import DatasetBundle, TensorSplit, epoch_order
from pcltool.optim import build_scheduler
from pcltool.pcl import ema_decay, pcl_loss, ramp_up
from pcltool.trainer import (LOSS_PARTS, build_networks, loss_weights, param_groups, runs_mean_teachers,
                             shuffle_seed)


def pil_transform(recipe: Recipe, data: DatasetBundle):
    """The torchvision (PIL) transform producing one training view, as the reproductions write it."""
    from torchvision import transforms as T

    cfg = recipe.data
    size = data.image_size
    steps = []
    if cfg.augment == "random_resized_crop_flip":
        steps += [T.RandomResizedCrop(size, scale=tuple(cfg.scale)), T.RandomHorizontalFlip()]
    elif cfg.augment in ("crop", "crop_flip"):
        steps += [T.CenterCrop(size), T.RandomCrop(size, padding=cfg.pad)]
        if cfg.augment == "crop_flip":
            steps.append(T.RandomHorizontalFlip())
    else:
        steps.append(T.CenterCrop(size))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(data.mean, data.std)])


class MultiViewImageDataset(Dataset):
    """torchvision's CIFAR10 dataset shape (``data``: (N, H, W, C) uint8, ``targets``: list of int) with the
    reproductions' multi-view ``__getitem__``: ``([transform(img) for each of the m views], target)``.

    (torchvision's own ``CIFAR10`` class is not used because it insists on the official files' md5 sums.)"""

    def __init__(self, split: TensorSplit, transform, num_views: int):
        self.data = split.images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
        self.targets = split.labels.tolist()
        self.transform = transform
        self.num_views = num_views

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        from PIL import Image

        img = self.data[index]
        img = Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img)
        return [self.transform(img) for _ in range(self.num_views)], self.targets[index]


class EpochOrderSampler(Sampler):
    """pcltool's epoch order (so both paths see the same batches); ``set_epoch`` before each epoch."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        gen = torch.Generator().manual_seed(shuffle_seed(self.seed, self.epoch))
        return iter(epoch_order(self.n, True, gen).tolist())


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class ReferenceTrainer:
    """The reproductions' PCL training step. ``epoch_batches()`` yields ``(views, labels)`` from the DataLoader;
    ``train_step(views, labels, epoch_float)`` returns the loss parts (``LOSS_PARTS`` order, a CPU tensor)."""

    def __init__(self, recipe: Recipe, data: DatasetBundle, device: torch.device, workers: int | None = None):
        if not isinstance(data.train, TensorSplit):
            raise ValueError("the reference path needs an in-memory training split")
        self.recipe = recipe
        self.device = device
        cfg = recipe.train
        torch.manual_seed(recipe.seed)
        self.live, self.mean = build_networks(recipe, data.num_classes, data.in_channels)
        for net in (self.live, self.mean):  # one update per call, m trunk calls per step: PyTorch's default
            for module in net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.momentum = 0.1
        self.live.to(device).train()
        self.mean.to(device).train()
        self.num_views = recipe.num_branches
        self.weights = loss_weights(recipe)
        self.use_mean_teachers = runs_mean_teachers(recipe)
        self.optimizer = torch.optim.SGD(param_groups(self.live, recipe), lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.dataset = MultiViewImageDataset(data.train, pil_transform(recipe, data), self.num_views)
        self.sampler = EpochOrderSampler(len(self.dataset), recipe.seed)
        self.workers = default_workers() if workers is None else workers
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                 num_workers=self.workers, pin_memory=device.type == "cuda",
                                 persistent_workers=self.workers > 0)
        self.steps_per_epoch = len(self.loader)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.epoch = 0
        self.step = 0

    def epoch_batches(self):
        self.sampler.set_epoch(self.epoch)
        for views, labels in self.loader:
            yield [v.to(self.device) for v in views], labels.to(self.device)

    def forward(self, views: list[torch.Tensor]):
        feats = [self.live.trunk(v) for v in views]  # one trunk call per view
        pooled, logits = zip(*(peer(f) for peer, f in zip(self.live.peers, feats)))
        head = self.live.ensemble_head
        ensemble_logits = head(torch.cat(pooled, dim=1)) if head is not None else None
        mean_logits = None
        if self.use_mean_teachers:
            with torch.no_grad():
                mean_logits = torch.stack([self.mean.peers[k](self.mean.trunk(views[k]))[1]
                                           for k in range(self.num_views)])
        return torch.stack(logits), ensemble_logits, mean_logits

    def train_step(self, views: list[torch.Tensor], labels: torch.Tensor, epoch_float: float) -> torch.Tensor:
        lam = ramp_up(epoch_float, self.recipe.pcl.rampup_epochs)
        peer_logits, ensemble_logits, mean_logits = self.forward(views)
        parts = pcl_loss(peer_logits, ensemble_logits, mean_logits, labels, lam, self.weights)
        self.optimizer.zero_grad()
        parts["total"].backward()
        self.optimizer.step()
        self.scheduler.step()
        alpha = ema_decay(self.step, self.recipe.pcl.ema_decay)
        with torch.no_grad():
            for mean_p, live_p in zip(self.mean.parameters(), self.live.parameters()):
                mean_p.mul_(alpha).add_(live_p, alpha=1.0 - alpha)
            if not self.use_mean_teachers:  # never run, so its BatchNorm statistics follow the live network's
                for mean_b, live_b in zip(self.mean.buffers(), self.live.buffers()):
                    if mean_b.is_floating_point():
                        mean_b.mul_(alpha).add_(live_b, alpha=1.0 - alpha)
                    else:
                        mean_b.copy_(live_b)
        self.step += 1
        return torch.tensor([parts[k].item() for k in LOSS_PARTS])  # .item() every step, as the reproductions log


    def train_epoch(self) -> dict:
        """One epoch of :meth:`train_step` over the DataLoader; returns mean loss parts, seconds and images/s."""
        import time

        self.live.train()
        self.mean.train()
        sums = torch.zeros(len(LOSS_PARTS))
        steps, images = 0, 0
        start = time.perf_counter()
        for i, (views, labels) in enumerate(self.epoch_batches()):
            sums += self.train_step(views, labels, self.epoch + i / self.steps_per_epoch)
            steps += 1
            images += int(labels.shape[0])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        self.epoch += 1
        return {**dict(zip(LOSS_PARTS, (sums / max(steps, 1)).tolist())), "seconds": elapsed,
                "images_per_s": images / max(elapsed, 1e-9)}


def reference_losses(recipe: Recipe, data: DatasetBundle, device: torch.device, steps: int,
                     workers: int = 0) -> np.ndarray:
    """Loss parts of the first ``steps`` steps of the reference path, (steps, len(LOSS_PARTS))."""
    trainer = ReferenceTrainer(recipe, data, device, workers=workers)
    out = []
    while len(out) < steps:
        for i, (views, labels) in enumerate(trainer.epoch_batches()):
            out.append(trainer.train_step(views, labels, trainer.epoch + i / trainer.steps_per_epoch).numpy())
            if len(out) == steps:
                break
        trainer.epoch += 1
    return np.stack(out)
