"""The PCL training loop: live network, temporal-mean network, optimiser, schedule, augmentation generators.

No files, no printing: the ``train`` stage drives a :class:`PCLTrainer` and owns checkpoints, logs and the
manifest. The same code runs on CPU (tests), one GPU, and under torchrun (``distributed`` set).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pcltool.config import Recipe
from pcltool.data.augment import ViewMaker
from pcltool.data.splits import DatasetBundle
from pcltool.evaluate import evaluate_networks
from pcltool.models import PCLNetwork
from pcltool.optim import build_optimizer, build_scheduler
from pcltool.pcl import PCLLossWeights, ema_decay, ema_update, pcl_loss, ramp_up

LOSS_PARTS = ("total", "ce_peers", "ce_ensemble", "kd_ensemble", "kd_mean")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def build_networks(recipe: Recipe, num_classes: int, in_channels: int) -> tuple[PCLNetwork, PCLNetwork]:
    """The live PCL network and its temporal mean (a copy that receives no gradients).

    BatchNorm in the mean network: its layers get momentum 0, so running the mean teachers in train mode
    (batch statistics, as the reference implementation does) never changes its running statistics; those are the
    temporal mean of the live network's, updated by :func:`pcltool.pcl.ema_update` like the weights."""
    live = PCLNetwork(recipe.model.backbone, num_classes, recipe.num_branches, in_channels,
                      ensemble=recipe.pcl.enabled, batched_views=recipe.train.batched_views)
    mean = copy.deepcopy(live)
    for module in mean.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    mean.requires_grad_(False)
    return live, mean


def loss_weights(recipe: Recipe) -> PCLLossWeights:
    p = recipe.pcl
    return PCLLossWeights(
        temperature=p.temperature, ce_weight=p.ce_weight, ensemble_ce_weight=p.ensemble_ce_weight,
        kd_ensemble=p.enabled and p.kd_ensemble, kd_mean=p.enabled and p.kd_mean,
        kd_ensemble_weight=p.kd_ensemble_weight, kd_mean_weight=p.kd_mean_weight,
        mean_kd_reduction=p.mean_kd_reduction, rampup_ensemble=p.rampup_ensemble)


class PCLTrainer:
    def __init__(self, recipe: Recipe, data: DatasetBundle, device: torch.device,
                 dist_ctx: DistributedContext | None = None):
        self.recipe = recipe
        self.data = data
        self.device = device
        self.dist = dist_ctx or DistributedContext()
        cfg = recipe.train
        torch.manual_seed(recipe.seed)
        self.live, self.mean = build_networks(recipe, data.num_classes, data.in_channels)
        if cfg.sync_batchnorm and self.dist.active:
            self.live = nn.SyncBatchNorm.convert_sync_batchnorm(self.live)
        self.live.to(device)
        self.mean.to(device)
        self.channels_last = cfg.channels_last and device.type == "cuda"
        if self.channels_last:
            self.live.to(memory_format=torch.channels_last)
            self.mean.to(memory_format=torch.channels_last)
        self.model = self.live
        if self.dist.active:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.live, device_ids=ids)
        if data.train.__len__() < self.dist.world_size:
            raise ValueError("fewer training images than ranks")
        self.local_batch = max(1, cfg.batch_size // self.dist.world_size)
        self.steps_per_epoch = data.train.num_batches(self.local_batch, shard=(0, self.dist.world_size))
        self.optimizer = build_optimizer(self.live.parameters(), cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.autocast_dtype = None
        if device.type == "cuda" and cfg.precision != "fp32":
            self.autocast_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        # shuffle order on the CPU (same on every rank); augmentation on the device. Both are re-seeded from
        # (seed, epoch[, rank]) at the start of every epoch, so a resumed run draws exactly the same numbers.
        self.shuffle_gen = torch.Generator()
        self.augment_gen = torch.Generator(device=device)
        self.view_maker = ViewMaker(recipe.data.augment, data.mean, data.std, device, recipe.data.pad,
                                    data.image_size, tuple(recipe.data.scale))
        self.weights = loss_weights(recipe)
        self.use_mean_teachers = self.weights.kd_mean and recipe.num_branches > 1
        self._ema_pairs = self._collect_ema_tensors()
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps taken
        self._step_fn = self._train_step
        if cfg.compile:
            self._step_fn = torch.compile(self._train_step, mode=cfg.compile_mode)

    # --- the method ---------------------------------------------------------------------------------------------
    def _collect_ema_tensors(self):
        live_state = self.live.state_dict(keep_vars=True)
        mean_state = self.mean.state_dict(keep_vars=True)
        floats_live, floats_mean, ints_live, ints_mean = [], [], [], []
        for key, mean_t in mean_state.items():
            live_t = live_state[key]
            if mean_t.is_floating_point():
                floats_mean.append(mean_t.data)
                floats_live.append(live_t.data)
            else:
                ints_mean.append(mean_t.data)
                ints_live.append(live_t.data)
        return floats_mean, floats_live, ints_mean, ints_live

    def update_mean(self) -> None:
        """θ' ← α θ' + (1 − α) θ after the optimiser step, α = min(1 − 1/(step + 1), decay)."""
        floats_mean, floats_live, ints_mean, ints_live = self._ema_pairs
        ema_update(floats_mean, floats_live, ema_decay(self.step, self.recipe.pcl.ema_decay))
        for dst, src in zip(ints_mean, ints_live):
            dst.copy_(src)

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor, rampup_weight: torch.Tensor):
        views = self.view_maker.views(images, self.recipe.num_branches, self.augment_gen)  # (m, N, C, H, W)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            peer_logits, ensemble_logits = self.model(views)  # (m, N, K), (N, K)
            mean_logits = None
            if self.use_mean_teachers:
                with torch.no_grad():
                    mean_logits = self.mean(views)[0]  # mean teacher k on view k
            parts = pcl_loss(peer_logits, ensemble_logits, mean_logits, labels, rampup_weight, self.weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(parts["total"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return torch.stack([parts[k].detach().float() for k in LOSS_PARTS])

    # --- loops --------------------------------------------------------------------------------------------------
    def train_epoch(self, on_log: Callable[[dict], None] | None = None) -> dict:
        """One epoch. Loss parts are summed on the device and read once per ``log_every`` steps (the only syncs)."""
        cfg = self.recipe.train
        seed = self.recipe.seed
        self.shuffle_gen.manual_seed(seed * 1_000_003 + self.epoch)
        self.augment_gen.manual_seed((seed * 1_000_003 + self.epoch) * 4099 + 1 + self.dist.rank)
        self.live.train()
        self.mean.train()
        sums = torch.zeros(len(LOSS_PARTS), device=self.device)
        window = torch.zeros(len(LOSS_PARTS), device=self.device)
        window_steps, window_images, images_seen = 0, 0, 0
        start = window_start = time.perf_counter()
        rampup_tensor = torch.zeros((), device=self.device)
        batches = self.data.train.batches(self.local_batch, self.device, shuffle=True, generator=self.shuffle_gen,
                                          shard=(self.dist.rank, self.dist.world_size), even_shards=True)
        for i, (images, labels) in enumerate(batches):
            epoch_float = self.epoch + i / self.steps_per_epoch
            rampup_tensor.fill_(ramp_up(epoch_float, self.recipe.pcl.rampup_epochs))
            parts = self._step_fn(images, labels, rampup_tensor)
            self.scheduler.step()
            self.update_mean()
            self.step += 1
            sums += parts
            window += parts
            window_steps += 1
            n = labels.shape[0] * self.dist.world_size
            window_images += n
            images_seen += n
            if on_log is not None and (window_steps == cfg.log_every or i + 1 == self.steps_per_epoch):
                values = (window / window_steps).tolist()  # host sync, once per window
                now = time.perf_counter()
                on_log({
                    "epoch": self.epoch + 1, "step": self.step, "batch": i + 1, "batches": self.steps_per_epoch,
                    **dict(zip(LOSS_PARTS, values)),
                    "lambda": ramp_up(epoch_float, self.recipe.pcl.rampup_epochs),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_s": window_images / max(now - window_start, 1e-9),
                })
                window.zero_()
                window_steps, window_images, window_start = 0, 0, now
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if self.dist.active:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
        means = (sums / max(self.steps_per_epoch, 1)).tolist()
        self.epoch += 1
        return {**dict(zip(LOSS_PARTS, means)), "seconds": elapsed, "images_per_s": images_seen / max(elapsed, 1e-9)}

    def evaluate(self, split) -> dict:
        return evaluate_networks(self.live, self.mean, split, self.view_maker, self.device,
                                 batch_size=max(256, self.local_batch), autocast_dtype=self.autocast_dtype,
                                 shard=(self.dist.rank, self.dist.world_size))

    # --- checkpoint state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": 1,
            "live": self.live.state_dict(),
            "mean": self.mean.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "step": self.step,
            "recipe": self.recipe.resolved(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.live.load_state_dict(state["live"])
        self.mean.load_state_dict(state["mean"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
