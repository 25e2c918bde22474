"""``pcltool train``: run the PCL trainer, keep atomic per-epoch checkpoints, log metrics, record the manifest."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from pcltool.config import Recipe, flatten, recipe_from_dict
from pcltool.errors import RunDirError, TrainingDivergedError, UsageError
from pcltool.manifest import RunDir, atomic_write_text
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


DIVERGENCE_FACTOR = 100.0


def load_checkpoint(path: Path) -> dict:
    """Checkpoints hold only tensors and plain data, so they load with ``weights_only=True`` (no code runs)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path} is not a checkpoint pcltool can load safely ({first}); it was refused without "
                          "running any code from it. Use a checkpoint written by pcltool") from None


def _stage_file(obj: dict, path: Path) -> Path:
    """Write ``obj`` to a complete, fsynced temporary file beside ``path`` (put in place by ``replace_outputs``)."""
    import errno
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and "writ" in str(err) and _disk_nearly_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None  # torch wraps ENOSPC
        raise
    return Path(tmp)


def _disk_nearly_full(folder: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(folder).free < (64 << 20)
    except OSError:
        return False


def check_divergence(loss: float, reference: float | None, epoch: int, step: int, run: RunDir | None) -> None:
    """The divergence rule: a logged loss that is NaN or infinite, or more than ``DIVERGENCE_FACTOR`` times the
    first loss this process logged, stops training (the last checkpoint is kept). A PCL loss starts near
    (peers + 1) x ln(classes) and only falls while training works; a hundredfold rise is an exploding run
    (e.g. ``train.lr=20``: 1.7e17 at chance accuracy), not noise."""
    if not math.isfinite(loss):
        raise TrainingDivergedError(_diverged_message(epoch, step, run))
    if reference is not None and loss > DIVERGENCE_FACTOR * max(reference, 1e-3):
        raise TrainingDivergedError(_diverged_message(epoch, step, run, f"rose to {loss:.3g}, more than "
                                                      f"{DIVERGENCE_FACTOR:g}x its first value {reference:.3g}"))


def best_single_branch(val: dict) -> float:
    return max(v for k, v in val["top1"].items() if k.startswith(("peer", "mean")) and k != "mean-ensemble")


class _MetricsLog:
    """Append-only JSONL of train/val/test records; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, keep_epochs_below: int | None = None):
        self.path = path
        if keep_epochs_below is not None and path.exists():
            kept = [line for line in _log_records(path) if json.loads(line).get("epoch", 0) <= keep_epochs_below]
            atomic_write_text(path, "".join(line + "\n" for line in kept))
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
            for key, value in flatten(record, sep="/").items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record.get("step", record.get("epoch", 0)))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _log_records(path: Path) -> list[str]:
    """The complete JSON lines of a metrics log; a line cut short (a kill or a full disk mid-write) is dropped."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            if isinstance(json.loads(line), dict):
                lines.append(line)
        except json.JSONDecodeError:
            continue
    return lines


def prepare_run(recipe: Recipe, run_path: Path | None, resume: bool) -> tuple[RunDir, dict | None]:
    """A new run directory, or (``resume``) the existing one with its last checkpoint."""
    if not resume:
        return RunDir.create(Path(recipe.output.runs_dir), recipe.name, recipe.resolved(), run_path), None
    path = run_path or RunDir.latest(Path(recipe.output.runs_dir))
    run = RunDir.open(path)
    run.acquire()
    diffs = recipe.differences_from(run.recipe, source=str(run.manifest_path))
    if diffs:
        run.release()
        raise RunDirError(f"--resume: the recipe differs from the one {path} was started with ({', '.join(diffs)}); "
                          "resume with the same recipe and --set values, or start a new run")
    record = run.stage("train")
    if record and record.get("status") == "done":
        run.release()
        raise RunDirError(f"{path}: training already finished; nothing to resume")
    if not record or "checkpoint" not in {**record.get("outputs", {}), **record.get("pending_outputs", {})}:
        return run, None  # killed before its first checkpoint: start from scratch in the same directory
    ckpt = run.verify_output("train", "checkpoint")
    run.settle_pending("train")
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
    best = state.get("best_val", -1.0) if state else -1.0
    wall_start = time.perf_counter()
    val = {}
    first_loss: list[float] = []
    try:  # from here on, any exit (SIGTERM and Ctrl-C included) is recorded
        for warning in data.warnings if run else ():
            run.update(lambda m, w=warning: m["stages"]["train"].setdefault("warnings", []).append(w))
        if run and (state is None or "data" not in run.read()):  # a resumed run keeps its first attempt's record
            from pcltool.stages.data import record_data

            record_data(run, data)
        reporter = TrainReporter(console, recipe.train.epochs, enabled=dist_ctx.is_main)
        with reporter:
            while trainer.epoch < recipe.train.epochs:
                def on_log(rec: dict) -> None:
                    check_divergence(rec["total"], first_loss[0] if first_loss else None, rec["epoch"], rec["step"],
                                     run)
                    if not first_loss:
                        first_loss.append(rec["total"])
                    reporter.update(rec)
                    if log:
                        log.write({"kind": "train", **rec})

                stats = trainer.train_epoch(on_log)
                check_divergence(stats["total"], first_loss[0] if first_loss else None, trainer.epoch, trainer.step,
                                 run)
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
                staged = {}
                score = best_single_branch(val)
                checkpoint = trainer.state_dict()
                if recipe.train.checkpoint_best and score > best:
                    best = score
                    staged["best_checkpoint"] = (_stage_file({
                        "live": checkpoint["live"], "mean": checkpoint["mean"], "epoch": trainer.epoch,
                        "val_top1": val["top1"], "recipe": checkpoint["recipe"]}, ckpt_dir / BEST), ckpt_dir / BEST)
                checkpoint["best_val"] = best
                staged["checkpoint"] = (_stage_file(checkpoint, ckpt_dir / LAST), ckpt_dir / LAST)
                log_record = run.describe(run.path / METRICS_LOG)

                def progress(m: dict, log_record=log_record, val=val, stats=stats) -> None:
                    rec = m["stages"]["train"]
                    rec["outputs"]["metrics_log"] = log_record
                    rec["metrics"].update(epochs_done=trainer.epoch, step=trainer.step, val_top1=val["top1"],
                                          val_disagreement=val["disagreement"],
                                          train_images_per_s=stats["images_per_s"], best_val_top1=best)

                # checkpoint, its hash and the epoch's metrics: one recoverable step (see RunDir.replace_outputs)
                run.replace_outputs("train", staged, progress)
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


def _diverged_message(epoch: int, step: int, run: RunDir | None, how: str = "became NaN or infinite") -> str:
    where = f"; the last good checkpoint is kept in {run.path / CHECKPOINT_DIR / LAST}" if run else ""
    return (f"training diverged: the loss {how} at epoch {epoch}, step {step}{where}. "
            "Lower train.lr, use train.precision=fp32 or bf16, or check the data")


def recipe_of_run(run: RunDir) -> Recipe:
    return recipe_from_dict(run.recipe, source=str(run.manifest_path))
