"""``pcltool train``: run the PCL trainer, keep atomic per-epoch checkpoints, log metrics, record the manifest."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pcltool.config import Recipe, recipe_from_dict
from pcltool.errors import RunDirError, TrainingDivergedError, UsageError
from pcltool.manifest import RunDir, atomic_path
from pcltool.stages.report import TrainReporter
from pcltool.trainer import DistributedContext, PCLTrainer

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
METRICS_LOG = "metrics.jsonl"


def resolve_device(choice: str, dist_ctx: DistributedContext | None = None) -> torch.device:
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch (check the driver, CUDA_VISIBLE_DEVICES, "
                         "and that the installed torch is a CUDA build); use --device cpu")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        index = dist_ctx.local_rank if dist_ctx and dist_ctx.active else 0
        return torch.device("cuda", index)
    return torch.device("cpu")


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold only tensors and plain data, so they load with ``weights_only=True`` (no code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def best_single_branch(val: dict) -> float:
    return max(v for k, v in val["top1"].items() if k.startswith(("peer", "mean")) and k != "mean-ensemble")


class _MetricsLog:
    """Append-only JSONL of train/val/test records; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, keep_epochs_below: int | None = None):
        self.path = path
        if keep_epochs_below is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("epoch", 0) <= keep_epochs_below]
            path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        except Exception:  # tensorboard is optional
            self._tb = None

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record.get("step", record.get("epoch", 0)))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}{sep}", sep))
        else:
            out[f"{prefix}{k}"] = v
    return out


def prepare_run(recipe: Recipe, run_path: Path | None, resume: bool) -> tuple[RunDir, dict | None]:
    """A new run directory, or (``resume``) the existing one with its last checkpoint."""
    if not resume:
        return RunDir.create(Path(recipe.output.runs_dir), recipe.name, recipe.resolved(), run_path), None
    path = run_path or RunDir.latest(Path(recipe.output.runs_dir))
    run = RunDir.open(path)
    run.acquire()
    saved = recipe_from_dict(run.recipe, source=str(run.manifest_path)).resolved()  # keys added since: defaults
    if saved != recipe.resolved():
        old, new = _flatten(saved, sep="."), _flatten(recipe.resolved(), sep=".")
        diffs = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        run.release()
        raise RunDirError(f"--resume: the recipe differs from the one {path} was started with ({', '.join(diffs)}); "
                          "resume with the same recipe and --set values, or start a new run")
    record = run.stage("train")
    if record and record.get("status") == "done":
        run.release()
        raise RunDirError(f"{path}: training already finished; nothing to resume")
    if not record or "checkpoint" not in record.get("outputs", {}):
        return run, None  # killed before its first checkpoint: start from scratch in the same directory
    ckpt = run.verify(record["outputs"]["checkpoint"], "train/checkpoint")
    return run, load_checkpoint(ckpt)


def run_train(recipe: Recipe, data, device: torch.device, run: RunDir | None, state: dict | None,
              dist_ctx: DistributedContext | None = None, console=None) -> dict:
    """Train to ``recipe.train.epochs``; returns the final metrics. Only rank 0 (``run`` not None) writes."""
    dist_ctx = dist_ctx or DistributedContext()
    trainer = PCLTrainer(recipe, data, device, dist_ctx)
    if state is not None:
        trainer.load_state_dict(state)
    ckpt_dir = run.path / CHECKPOINT_DIR if run else None
    log = _MetricsLog(run.path / METRICS_LOG, keep_epochs_below=trainer.epoch) if run else None
    if run:
        run.begin("train", params={"device": str(device), "world_size": dist_ctx.world_size,
                                   "resumed_from_epoch": trainer.epoch if state else None,
                                   "steps_per_epoch": trainer.steps_per_epoch}, keep_outputs=state is not None)
        for warning in data.warnings:
            run.update(lambda m, w=warning: m["stages"]["train"].setdefault("warnings", []).append(w))
        if state is None or "data" not in run.read():  # a resumed run keeps what its first attempt recorded
            from pcltool.stages.data import record_data

            record_data(run, data)
    reporter = TrainReporter(console, recipe.train.epochs, enabled=dist_ctx.is_main)
    best = state.get("best_val", -1.0) if state else -1.0
    wall_start = time.perf_counter()
    val = {}
    try:
        with reporter:
            while trainer.epoch < recipe.train.epochs:
                def on_log(rec: dict) -> None:
                    if not math.isfinite(rec["total"]):
                        raise TrainingDivergedError(_diverged_message(rec["epoch"], rec["step"], run))
                    reporter.update(rec)
                    if log:
                        log.write({"kind": "train", **rec})

                stats = trainer.train_epoch(on_log)
                if not math.isfinite(stats["total"]):
                    raise TrainingDivergedError(_diverged_message(trainer.epoch, trainer.step, run))
                val_start = time.perf_counter()
                val = trainer.evaluate(data.val)
                val_seconds = time.perf_counter() - val_start
                reporter.epoch_done(trainer.epoch, stats, val)
                if run is None:
                    continue
                log.write({"kind": "val", "epoch": trainer.epoch, "step": trainer.step, "top1": val["top1"],
                           "disagreement": val["disagreement"], "train_images_per_s": stats["images_per_s"],
                           "epoch_seconds": stats["seconds"], "val_seconds": val_seconds,
                           **({"compile_seconds": stats["compile_seconds"]} if "compile_seconds" in stats else {})})
                outputs = {}
                score = best_single_branch(val)
                checkpoint = trainer.state_dict()
                if recipe.train.checkpoint_best and score > best:
                    best = score
                    _save({"live": checkpoint["live"], "mean": checkpoint["mean"], "epoch": trainer.epoch,
                           "val_top1": val["top1"], "recipe": checkpoint["recipe"]}, ckpt_dir / BEST)
                    outputs["best_checkpoint"] = ckpt_dir / BEST
                checkpoint["best_val"] = best
                _save(checkpoint, ckpt_dir / LAST)
                outputs["checkpoint"] = ckpt_dir / LAST
                outputs["metrics_log"] = run.path / METRICS_LOG
                described = {k: run.describe(p) for k, p in outputs.items()}

                def progress(m: dict, described=described, val=val, stats=stats) -> None:
                    rec = m["stages"]["train"]
                    rec["outputs"].update(described)
                    rec["metrics"].update(epochs_done=trainer.epoch, step=trainer.step, val_top1=val["top1"],
                                          val_disagreement=val["disagreement"],
                                          train_images_per_s=stats["images_per_s"], best_val_top1=best)

                run.update(progress)
        test = trainer.evaluate(data.test)
        metrics = {"epochs_done": trainer.epoch, "step": trainer.step, "val_top1": val.get("top1"),
                   "test_top1": test["top1"], "test_disagreement": test["disagreement"],
                   "best_val_top1": best, "wall_seconds": time.perf_counter() - wall_start}
        if data.num_classes >= 100:
            metrics["test_top5"] = test["top5"]
        reporter.final(test)
        if run:
            log.write({"kind": "test", "epoch": trainer.epoch, "step": trainer.step, "top1": test["top1"]})
            outputs = {k: run.resolve(v["path"]) for k, v in run.stage("train")["outputs"].items()}
            prior = run.stage("train")["metrics"]
            run.finish("train", outputs, {**prior, **metrics})
        return metrics
    except BaseException as err:
        if run:
            run.fail("train", err)
        raise
    finally:
        if log:
            log.close()


def _diverged_message(epoch: int, step: int, run: RunDir | None) -> str:
    where = f"; the last good checkpoint is kept in {run.path / CHECKPOINT_DIR / LAST}" if run else ""
    return (f"the training loss became NaN or infinite at epoch {epoch}, step {step}{where}. "
            "Lower train.lr, use train.precision=fp32 or bf16, or check the data")


def recipe_of_run(run: RunDir) -> Recipe:
    return recipe_from_dict(run.recipe, source=str(run.manifest_path))
