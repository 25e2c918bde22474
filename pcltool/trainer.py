"""The PCL training loop: live network, temporal-mean network, optimiser, schedule, augmentation generators.

No files, no printing: the ``train`` stage drives a :class:`PCLTrainer` and owns checkpoints, logs and the
manifest. The same code runs on CPU (tests), one GPU, and under torchrun (``dist_ctx`` active).

The fast path, each piece a recipe switch so ``pcltool bench-train`` can measure it: the uint8 dataset held on
the device (``data.on_device``), the m views augmented together on the device (optionally sent through the
trunk as one batch, ``train.batched_views``, off by default for the reproduction's per-view BatchNorm),
channels_last (``train.channels_last``), bf16/fp16 autocast (``train.precision``), fused/foreach SGD
(``train.fused_optimizer``), a foreach temporal-mean update (``train.foreach_ema``), loss parts summed on the
device and read once per log interval, and optionally ``torch.compile`` of the forward + loss (``train.compile``,
``train.compile_mode``; ``"reduce-overhead"`` adds CUDA graphs). On CPU, reduced precision applies only with
``train.cpu_fast_path``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pcltool.config import Recipe
from pcltool.data.augment import ViewMaker
from pcltool.data.splits import DatasetBundle
from pcltool.errors import UsageError
from pcltool.evaluate import evaluate_networks
from pcltool.models import PCLNetwork
from pcltool.optim import build_optimizer, build_scheduler
from pcltool.pcl import (PCLLossWeights, bn_updates_per_step, ema_decay, ema_update, ensemble_head_lr_scale,
                         mean_bn_momentum, pcl_loss, ramp_up)

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


def runs_mean_teachers(recipe: Recipe) -> bool:
    """Whether training runs the mean network forward (its peers teach the live ones): PCL with the
    mean-teacher term and m > 1. The plain baseline and ``pcl.kd_mean = false`` never run it."""
    return recipe.pcl.enabled and recipe.pcl.kd_mean and recipe.num_branches > 1


def mean_bn_statistics(recipe: Recipe) -> str:
    """``pcl.mean_bn_stats`` as it applies: ``"own"`` needs the mean network's forwards, so where training never
    runs them its statistics follow the live network's by the temporal mean (``"ema"``)."""
    return recipe.pcl.mean_bn_stats if runs_mean_teachers(recipe) else "ema"


def build_networks(recipe: Recipe, num_classes: int, in_channels: int) -> tuple[PCLNetwork, PCLNetwork]:
    """The live PCL network and its temporal mean (a copy that receives no gradients).

    BatchNorm running statistics take, per layer, the horizon they have in the reproduction, which calls the
    trunk once per view and each peer once (on its own view): m updates per step for a trunk layer, one for a
    peer's layer (:func:`pcltool.pcl.bn_updates_per_step`). With ``train.batched_views`` the trunk runs once per
    step on all views together, so its layers get the momentum of m updates (:func:`pcltool.pcl.mean_bn_momentum`,
    0.1 -> 0.271 for m = 3); the peers' layers, and every layer when views go through the trunk one at a time,
    keep 0.1. Running statistics never affect training (the forwards run in train mode, on batch statistics);
    they are what evaluation, ``select`` and the deployed network use.

    BatchNorm in the mean network (``pcl.mean_bn_stats``; the teachers always run in train mode, on batch
    statistics, as the reproduction does):

    - ``"own"`` (default): the running statistics are the mean network's own, updated by those train-mode
      forwards, so at evaluation they describe the averaged weights' activations, as in the reproduction;
    - ``"ema"``: its layers get momentum 0, so the forwards leave them alone, and the statistics are the temporal
      mean of the live network's, updated by :func:`pcltool.pcl.ema_update` like the weights. They then describe
      other weights than the mean network's: on short runs its teachers score near chance (BENCHMARKS.md).
      Also what applies where training never runs the mean network (:func:`mean_bn_statistics`)."""
    live = PCLNetwork(recipe.model.backbone, num_classes, recipe.num_branches, in_channels,
                      ensemble=recipe.pcl.enabled, batched_views=recipe.train.batched_views)
    if recipe.train.batched_views and recipe.num_branches > 1:
        _match_reproduction_bn_horizon(live, recipe.num_branches)
    mean = copy.deepcopy(live)
    if mean_bn_statistics(recipe) == "ema":
        for module in _batchnorms(mean):
            module.momentum = 0.0
    mean.requires_grad_(False)
    return live, mean


def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None]


def _match_reproduction_bn_horizon(net: PCLNetwork, num_peers: int) -> None:
    """Trunk BatchNorm layers of a batched-views network: the momentum of m per-view updates in one update."""
    for module in _batchnorms(net.trunk):
        module.momentum = mean_bn_momentum(module.momentum, bn_updates_per_step(True, num_peers))


def param_groups(live: PCLNetwork, recipe: Recipe) -> list[dict]:
    """Optimiser parameter groups: the network, and the ensemble head at ``lr_scale`` times the learning rate
    (``pcl.ensemble_head_lr``: ``"1/m"`` -> :func:`pcltool.pcl.ensemble_head_lr_scale`, ``"same"`` -> 1)."""
    head = live.ensemble_head
    if head is None:
        return [{"params": list(live.parameters())}]
    head_ids = {id(p) for p in head.parameters()}
    body = [p for p in live.parameters() if id(p) not in head_ids]
    scale = ensemble_head_lr_scale(live.num_peers) if recipe.pcl.ensemble_head_lr == "1/m" else 1.0
    return [{"params": body}, {"params": list(head.parameters()), "lr": recipe.train.lr * scale}]


def loss_weights(recipe: Recipe) -> PCLLossWeights:
    p = recipe.pcl
    return PCLLossWeights(
        temperature=p.temperature, ce_weight=p.ce_weight, ensemble_ce_weight=p.ensemble_ce_weight,
        kd_ensemble=p.enabled and p.kd_ensemble, kd_mean=p.enabled and p.kd_mean,
        kd_ensemble_weight=p.kd_ensemble_weight, kd_mean_weight=p.kd_mean_weight,
        mean_kd_reduction=p.mean_kd_reduction, rampup_ensemble=p.rampup_ensemble)


def shuffle_seed(seed: int, epoch: int) -> int:
    """Seed of the epoch's sample order (CPU generator, identical on every rank and in the reference path)."""
    return seed * 1_000_003 + epoch


def autocast_dtype_for(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: fp32). CPU: bf16 only, with cpu_fast_path."""
    if cfg.precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    if device.type == "cpu" and cfg.cpu_fast_path:
        return torch.bfloat16
    return None


def uses_cuda_graphs(compile_mode: str) -> bool:
    """Whether ``torch.compile(mode=...)`` records CUDA graphs: ``reduce-overhead`` and ``max-autotune`` do,
    ``default`` and ``max-autotune-no-cudagraphs`` do not."""
    return compile_mode in ("reduce-overhead", "max-autotune")


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class PCLTrainer:
    def __init__(self, recipe: Recipe, data: DatasetBundle, device: torch.device,
                 dist_ctx: DistributedContext | None = None):
        self.recipe = recipe
        self.data = data
        self.device = device
        self.dist = dist_ctx or DistributedContext()
        cfg = recipe.train
        if self.dist.active and cfg.batch_size % self.dist.world_size:
            raise UsageError(f"train.batch_size={cfg.batch_size} is the global batch and must be divisible by the "
                             f"number of processes ({self.dist.world_size})")
        if len(data.train) < self.dist.world_size:
            raise UsageError("fewer training images than processes")
        torch.manual_seed(recipe.seed)
        self.live, self.mean = build_networks(recipe, data.num_classes, data.in_channels)
        if cfg.sync_batchnorm and self.dist.active:
            if device.type != "cuda":
                raise UsageError("train.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm does not run on "
                                 "CPU); set train.sync_batchnorm=false for CPU processes")
            self.live = nn.SyncBatchNorm.convert_sync_batchnorm(self.live)
        self.live.to(device)
        self.mean.to(device)
        # on every device: the same fp32 arithmetic in NHWC order, which cuDNN and oneDNN both run faster for
        # these convolutions (CPU, ResNet-32, m = 3, batch 128: 1.7x on forward + backward)
        self.channels_last = cfg.channels_last
        if self.channels_last:
            self.live.to(memory_format=torch.channels_last)
            self.mean.to(memory_format=torch.channels_last)
        self.model = self.live
        if self.dist.active:
            ids = [device.index] if device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.live, device_ids=ids)
        self.local_batch = cfg.batch_size // self.dist.world_size
        self.steps_per_epoch = data.train.num_batches(self.local_batch, shard=(0, self.dist.world_size))
        self.optimizer = build_optimizer(param_groups(self.live, recipe), cfg, device)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.steps_per_epoch)
        self.autocast_dtype = autocast_dtype_for(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.autocast_dtype is torch.float16)
        # shuffle order on the CPU (same on every rank); augmentation on the device. Both are re-seeded from
        # (seed, epoch[, rank]) at the start of every epoch, so a resumed run draws exactly the same numbers.
        self.shuffle_gen = torch.Generator()
        self.augment_gen = torch.Generator(device=device)
        self.view_maker = ViewMaker.from_config(recipe.data, data, device)
        self.weights = loss_weights(recipe)
        self.use_mean_teachers = runs_mean_teachers(recipe)
        self._ema_pairs = self._collect_ema_tensors()
        self._rampup = torch.zeros((), device=device)
        self.epoch = 0  # completed epochs
        self.step = 0  # optimiser steps taken
        self.compiled = cfg.compile
        self.compile_seconds: float | None = None  # first compiled forward + backward (compile + one step)
        self._forward_fn = self._forward_loss
        self._cuda_graphs = cfg.compile and device.type == "cuda" and uses_cuda_graphs(cfg.compile_mode)
        if cfg.compile:
            # dynamic=False: one static graph per batch shape (the full batch, and the epoch's shorter last
            # one) rather than a dynamic-shape graph that every full batch would then run
            self._forward_fn = torch.compile(self._forward_loss, mode=cfg.compile_mode, dynamic=False)

    # --- the method ---------------------------------------------------------------------------------------------
    def _collect_ema_tensors(self):
        """(mean floats, live floats, mean ints, live ints) that :meth:`update_mean` averages or copies: the
        parameters, plus the BatchNorm buffers where :func:`mean_bn_statistics` is ``"ema"``."""
        with_buffers = mean_bn_statistics(self.recipe) == "ema"
        live_state = self.live.state_dict(keep_vars=True) if with_buffers else dict(self.live.named_parameters())
        mean_state = self.mean.state_dict(keep_vars=True) if with_buffers else dict(self.mean.named_parameters())
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

    @torch.no_grad()
    def update_mean(self) -> None:
        """θ' ← α θ' + (1 − α) θ after the optimiser step, α = min(1 − 1/(step + 1), decay); one foreach launch
        for all tensors, or (``train.foreach_ema = false``) a Python loop over them."""
        floats_mean, floats_live, ints_mean, ints_live = self._ema_pairs
        alpha = ema_decay(self.step, self.recipe.pcl.ema_decay)
        if self.recipe.train.foreach_ema:
            ema_update(floats_mean, floats_live, alpha)
        else:
            for dst, src in zip(floats_mean, floats_live):
                dst.mul_(alpha).add_(src, alpha=1.0 - alpha)
        for dst, src in zip(ints_mean, ints_live):
            dst.copy_(src)

    def _views(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 batch -> m augmented, normalised views (m, N, C, H, W) on the device. Kept out of the compiled
        region: random draws from an explicit generator break torch.compile's graph."""
        views = self.view_maker.views(images, self.recipe.num_branches, self.augment_gen)
        if self.channels_last:
            m, n = views.shape[:2]
            views = views.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (m, n))
        return views

    def _forward_loss(self, views: torch.Tensor, labels: torch.Tensor, rampup_weight: torch.Tensor):
        """Live and mean forwards on the views -> (total loss, stacked loss parts); what ``train.compile`` compiles."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            peer_logits, ensemble_logits = self.model(views)  # (m, N, K), (N, K)
            mean_logits = None
            if self.use_mean_teachers:
                with torch.no_grad():
                    mean_logits = self.mean(views)[0]  # mean teacher k on view k
            parts = pcl_loss(peer_logits, ensemble_logits, mean_logits, labels, rampup_weight, self.weights)
        return parts["total"], torch.stack([parts[k].detach().float() for k in LOSS_PARTS])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, epoch_float: float) -> torch.Tensor:
        """One optimiser step and temporal-mean update on a uint8 batch. Returns the loss parts (``LOSS_PARTS``
        order) as a device tensor; nothing here waits for the device."""
        self._rampup.fill_(ramp_up(epoch_float, self.recipe.pcl.rampup_epochs))
        timing = self.compiled and self.compile_seconds is None
        views = self._views(images)
        if self._cuda_graphs:
            # a new iteration: lets the graphs reuse the previous step's output memory (its loss parts have
            # already been added to the caller's running sums)
            torch.compiler.cudagraph_mark_step_begin()
        start = _sync(self.device) if timing else 0.0
        total, parts = self._forward_fn(views, labels, self._rampup)
        # set_to_none: under CUDA graphs the previous step's gradients live in graph memory that the step mark
        # above has released; they must be dropped, never zeroed in place or read
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if timing:
            self.compile_seconds = _sync(self.device) - start
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.update_mean()
        self.step += 1
        return parts

    # --- loops --------------------------------------------------------------------------------------------------
    def epoch_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's uint8 batches of epoch ``self.epoch`` on the device; re-seeds the shuffle and augmentation
        generators. With ``data.on_device = false`` the split stays in host memory and each batch is copied."""
        seed = self.recipe.seed
        self.shuffle_gen.manual_seed(shuffle_seed(seed, self.epoch))
        self.augment_gen.manual_seed(shuffle_seed(seed, self.epoch) * 4099 + 1 + self.dist.rank)
        host = not self.recipe.data.on_device and self.device.type != "cpu"
        source = torch.device("cpu") if host else self.device
        batches = self.data.train.batches(self.local_batch, source, shuffle=True, generator=self.shuffle_gen,
                                          shard=(self.dist.rank, self.dist.world_size), even_shards=True)
        for images, labels in batches:
            if host:
                images = images.pin_memory().to(self.device, non_blocking=True)
                labels = labels.pin_memory().to(self.device, non_blocking=True)
            yield images, labels

    def train_epoch(self, on_log: Callable[[dict], None] | None = None) -> dict:
        """One epoch. Loss parts are summed on the device and read once per ``log_every`` steps (the only syncs);
        across ranks they are averaged first, so every rank logs, and judges divergence on, the same values.

        ``images_per_s`` leaves out the first compiled step (reported as ``compile_seconds``)."""
        cfg = self.recipe.train
        self.live.train()
        self.mean.train()
        sums = torch.zeros(len(LOSS_PARTS), device=self.device)
        window = torch.zeros(len(LOSS_PARTS), device=self.device)
        window_steps, window_images, images_seen = 0, 0, 0
        compile_before = self.compile_seconds
        start = window_start = time.perf_counter()
        for i, (images, labels) in enumerate(self.epoch_batches()):
            epoch_float = self.epoch + i / self.steps_per_epoch
            parts = self.train_step(images, labels, epoch_float)
            sums += parts
            window += parts
            window_steps += 1
            n = labels.shape[0] * self.dist.world_size
            window_images += n
            images_seen += n
            if on_log is not None and (window_steps == cfg.log_every or i + 1 == self.steps_per_epoch):
                if self.dist.active:  # every rank logs (and judges divergence on) the same global mean
                    dist.all_reduce(window)
                    window /= self.dist.world_size
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
        elapsed = _sync(self.device) - start
        if self.dist.active:
            dist.all_reduce(sums)
            sums /= self.dist.world_size
            self._broadcast_buffers()
        means = (sums / max(self.steps_per_epoch, 1)).tolist()
        self.epoch += 1
        stats = {**dict(zip(LOSS_PARTS, means)), "seconds": elapsed}
        compile_s = self.compile_seconds if compile_before is None and self.compile_seconds is not None else 0.0
        stats["images_per_s"] = images_seen / max(elapsed - compile_s, 1e-9)
        if compile_s:
            stats["compile_seconds"] = compile_s
        return stats

    def _broadcast_buffers(self) -> None:
        """Make every rank hold rank 0's BatchNorm statistics, live and mean.

        DDP broadcasts the live buffers before each forward, but the forward then updates them from the rank's
        own shard, and the mean network's come from its forwards on that shard (or average the live ones); the
        weights themselves never differ across ranks."""
        for net in (self.live, self.mean):
            for buf in net.buffers():
                dist.broadcast(buf, src=0)

    def evaluate(self, split) -> dict:
        """Accuracy of every branch over the whole ``split`` (each rank scores its shard; counts are summed)."""
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
