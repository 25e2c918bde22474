"""Optimiser and learning-rate schedule (per iteration, so warm-up and cosine are smooth)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str, milestones: list[int], gamma: float,
              warmup_epochs: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step``.

    - warm-up: linear from 1/W to 1 over the first W = warmup_epochs·steps_per_epoch steps;
    - ``multistep``: γ^(number of milestones ≤ current epoch) (epoch = step // steps_per_epoch);
    - ``cosine``: ½(1 + cos(π·t/T)), t, T in steps after warm-up;
    - ``constant``: 1.
    """
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "multistep":
        epoch = step // steps_per_epoch
        return gamma ** sum(1 for m in milestones if epoch >= m)
    if schedule == "cosine":
        total = max(1, epochs * steps_per_epoch - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, total) / total))
    return 1.0


def build_optimizer(params, cfg, device: torch.device) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum; fused kernels on CUDA, foreach (multi-tensor) kernels elsewhere.

    fp16 (with the gradient scaler) takes the foreach kernels on CUDA too: the fused kernel allocates its
    momentum buffers uninitialised on the first step and, when the scaler finds an overflow on that step (likely
    at the initial scale of 2^16), returns without writing them, so the next step would read garbage."""
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                  weight_decay=cfg.weight_decay)
    if cfg.fused_optimizer and device.type == "cuda" and cfg.precision != "fp16":
        kwargs["fused"] = True
    elif cfg.fused_optimizer:
        kwargs["foreach"] = True
    return torch.optim.SGD(params, **kwargs)


def build_scheduler(optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, steps_per_epoch, cfg.epochs, cfg.schedule, cfg.milestones, cfg.gamma, cfg.warmup_epochs)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
