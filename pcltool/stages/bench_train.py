"""``pcltool bench-train``: training speed of pcltool's path against the reference path, in one process.

Measured on the same machine, model and batch: (a) pcltool's path as the recipe configures it, (b) the reference
path of :mod:`pcltool.reference` (PIL views in DataLoader workers, fp32, per-view trunk calls, per-view mean
forwards, Python EMA loop), and (a) with each fast-path piece switched off in turn (compile and batched views:
switched on when the recipe leaves them off). A piece that has no effect on the device (e.g. the device-resident dataset on CPU) is
listed with the reason and not run.

Every variant builds its own trainer, runs ``warmup`` steps (the first one timed apart: it holds compilation and
allocator warm-up), then ``steps`` timed steps including its own data pipeline; the device is synchronised at
both ends of the window. images/s counts images, not views. ``repeat`` runs the whole list several times,
in alternating order, and keeps each variant's fastest window (the machine may be shared); every window's
step time is kept in the report.
"""

from __future__ import annotations

import gc
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pcltool.config import Recipe, apply_overrides, recipe_from_dict
from pcltool.trainer import PCLTrainer, autocast_dtype_for


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...] = ()
    reference: bool = False
    skipped: str | None = None  # why it is not measured


PIECES = ("data_on_device", "batched_views", "channels_last", "autocast", "fused_optimizer", "foreach_ema",
          "compile")


def plan_variants(recipe: Recipe, device: torch.device, skip: tuple[str, ...] = ()) -> list[Variant]:
    """(a), (b), then one variant per fast-path piece."""
    unknown = sorted(set(skip) - set(PIECES) - {"reference"})
    if unknown:
        from pcltool.errors import UsageError

        raise UsageError(f"--skip {', '.join(unknown)}: unknown; choose from reference, {', '.join(PIECES)}")
    t, d = recipe.train, recipe.data
    cpu_note = "n/a on CPU without train.cpu_fast_path" if device.type == "cpu" else "off in the recipe"
    off = "off in the recipe"
    off_reason = {
        "data_on_device": "n/a on CPU (host memory)" if device.type == "cpu" else None if d.on_device else off,
        "batched_views": None,
        "channels_last": None if t.channels_last else off,
        "autocast": None if autocast_dtype_for(t, device) is not None else (cpu_note if t.precision != "fp32" else off),
        "fused_optimizer": None if t.fused_optimizer else off,
        "foreach_ema": None if t.foreach_ema else off,
        "compile": None,
    }
    dtype = autocast_dtype_for(t, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, t.precision)
    described = {
        "data_on_device": ("without data on device", "host-resident uint8 split, each batch copied", "data.on_device=false"),
        "batched_views": (("without batched views", "one trunk call per view", "train.batched_views=false")
                          if t.batched_views else
                          ("with batched views", "the m views through the trunk as one batch",
                           "train.batched_views=true")),
        "channels_last": ("without channels_last", "NCHW tensors", "train.channels_last=false"),
        "autocast": (f"without {precision} autocast", "fp32", "train.precision=fp32"),
        "fused_optimizer": ("without fused optimizer", "for-loop SGD", "train.fused_optimizer=false"),
        "foreach_ema": ("without foreach EMA", "Python loop over tensors", "train.foreach_ema=false"),
        "compile": (("without compile", "eager", "train.compile=false") if t.compile else
                    ("with compile", f"torch.compile mode={t.compile_mode}", "train.compile=true")),
    }
    variants = [Variant("pcltool", "(a) the recipe's training path"),
                Variant("reference", "(b) PIL views in DataLoader workers, fp32, per-view calls, Python EMA",
                        reference=True, skipped="--skip" if "reference" in skip else None)]
    for piece in PIECES:
        name, what, override = described[piece]
        reason = "--skip" if piece in skip else off_reason[piece]
        variants.append(Variant(name, what, (override,), skipped=reason))
    return variants


def _with_overrides(recipe: Recipe, overrides: tuple[str, ...]) -> Recipe:
    return recipe_from_dict(apply_overrides(recipe.resolved(), list(overrides)), source="bench-train")


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _stream(trainer, batch_size: int):
    """Endless ``(batch, epoch_float)`` from the trainer's own data pipeline, epoch after epoch. Only full
    batches: an epoch's shorter last batch would time a recompilation (``train.compile``) as a step."""
    while True:
        full = 0
        for i, batch in enumerate(trainer.epoch_batches()):
            if batch[1].shape[0] == batch_size:
                full += 1
                yield batch, trainer.epoch + i / trainer.steps_per_epoch
        if not full:
            from pcltool.errors import UsageError

            raise UsageError(f"train.batch_size={batch_size} is larger than the training split; lower it")
        trainer.epoch += 1


def measure(variant: Variant, recipe: Recipe, data, device: torch.device, steps: int, warmup: int,
            workers: int | None = None) -> dict:
    """Time one variant: build, ``warmup`` steps (the first timed apart), ``steps`` timed steps."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cfg = _with_overrides(recipe, variant.overrides)
    if variant.reference:
        from pcltool.reference import ReferenceTrainer

        trainer = ReferenceTrainer(cfg, data, device, workers=workers)
    else:
        trainer = PCLTrainer(cfg, data, device)
        trainer.live.train()
        trainer.mean.train()
    stream = _stream(trainer, cfg.train.batch_size)
    start = _sync(device)
    for i in range(max(warmup, 1)):
        (images_or_views, labels), epoch_float = next(stream)
        trainer.train_step(images_or_views, labels, epoch_float)
        if i == 0:
            first_step = _sync(device) - start
    images = 0
    loss_sum = torch.zeros((), device=device)
    start = _sync(device)
    for _ in range(steps):
        (images_or_views, labels), epoch_float = next(stream)
        loss_sum += trainer.train_step(images_or_views, labels, epoch_float)[0].to(device)
        images += int(labels.shape[0])
    elapsed = _sync(device) - start
    mean_loss = float(loss_sum) / steps
    result = {
        "images_per_s": images / elapsed,
        "step_ms": 1000.0 * elapsed / steps,
        "first_step_s": first_step,
        "compile_s": getattr(trainer, "compile_seconds", None),  # first compiled forward + backward
        "mean_loss": mean_loss,
        "peak_memory_mb": (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None,
    }
    del stream, trainer
    gc.collect()
    if not math.isfinite(mean_loss):
        result["warning"] = "loss is not finite"
    return result


def run_bench_train(recipe: Recipe, data, device: torch.device, steps: int = 10, warmup: int = 2,
                    skip: tuple[str, ...] = (), repeat: int = 1, workers: int | None = None,
                    progress=None) -> dict:
    """Measure every planned variant; returns the JSON-able report (see the module docstring)."""
    from pcltool.reference import default_workers

    if steps < 1 or warmup < 0 or repeat < 1:
        from pcltool.errors import UsageError

        raise UsageError("--steps and --repeat must be >= 1 and --warmup >= 0")
    variants = plan_variants(recipe, device, skip)
    best: dict[str, dict] = {}
    windows: dict[str, list[float]] = {}
    for i in range(repeat):
        for v in variants if i % 2 == 0 else variants[::-1]:  # alternate the order: no variant always goes first
            if v.skipped:
                continue
            if progress:
                progress(v)
            r = measure(v, recipe, data, device, steps, warmup, workers)
            windows.setdefault(v.name, []).append(round(r["step_ms"], 1))
            if v.name not in best or r["step_ms"] < best[v.name]["step_ms"]:
                best[v.name] = r
    a = best.get("pcltool")
    b = best.get("reference")
    rows = []
    for v in variants:
        row = {"name": v.name, "description": v.description, "overrides": list(v.overrides)}
        if v.skipped:
            row["skipped"] = v.skipped
        else:
            r = best[v.name]
            row.update(r)
            row["all_step_ms"] = windows[v.name]
            row["vs_reference"] = r["images_per_s"] / b["images_per_s"] if b else None
            row["pcltool_over_this"] = a["images_per_s"] / r["images_per_s"] if a else None
        rows.append(row)
    return {
        "recipe": recipe.name,
        "backbone": recipe.model.backbone,
        "peers": recipe.num_branches,
        "batch_size": recipe.train.batch_size,
        "dataset": recipe.data.dataset,
        "device": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reference_workers": default_workers() if workers is None else workers,
        "steps": steps,
        "warmup": warmup,
        "repeat": repeat,
        "speedup_a_over_b": (a["images_per_s"] / b["images_per_s"]) if a and b else None,
        "variants": rows,
        "recipe_resolved": recipe.resolved(),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def write_report(report: dict, path: Path) -> None:
    from pcltool.manifest import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")


def report_table(report: dict):
    """A rich table of the report (rich imported here, for the CLI)."""
    from rich.table import Table

    title = (f"bench-train {report['recipe']}: {report['backbone']}, m={report['peers']}, batch "
             f"{report['batch_size']}, {report['device']}, {report['steps']} steps")
    table = Table(title=title)
    for col in ("variant", "img/s", "step ms", "1st step s", "GPU MB", "vs (b)", "(a)/this"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    table.add_column("note")
    for row in report["variants"]:
        if "skipped" in row:
            table.add_row(row["name"], *["-"] * 6, f"not run: {row['skipped']}")
            continue
        mem = f"{row['peak_memory_mb']:.0f}" if row["peak_memory_mb"] is not None else "-"
        vs_b = f"{row['vs_reference']:.2f}x" if row["vs_reference"] else "-"
        a_over = f"{row['pcltool_over_this']:.2f}x" if row["pcltool_over_this"] else "-"
        table.add_row(row["name"], f"{row['images_per_s']:.1f}", f"{row['step_ms']:.0f}",
                      f"{row['first_step_s']:.2f}", mem, vs_b, a_over, _note(row))
    return table


def _note(row: dict) -> str:
    notes = [f"compile {row['compile_s']:.1f} s"] if row.get("compile_s") else []
    return ", ".join(notes + ([row["warning"]] if "warning" in row else []))
