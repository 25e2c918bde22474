"""Console output of the training stage (rich): a progress bar per epoch and one summary line per epoch; when the
console is not a terminal, a plain line every ``LINE_EVERY_S`` seconds instead of the bar (at each
``train.log_every`` step that falls past it)."""

from __future__ import annotations

import time

from pcltool.data.progress import LINE_EVERY_S


class TrainReporter:
    def __init__(self, console, epochs: int, enabled: bool = True):
        self.console = console
        self.epochs = epochs
        self.enabled = enabled and console is not None
        self.progress = None
        self.task = None
        self.start = time.perf_counter()
        self.first_epoch = None
        self.lines = False
        self.last_line = self.start

    def __enter__(self):
        self.lines = self.enabled and not self.console.is_terminal  # logs, CI, nohup: plain lines, no live bar
        self.last_line = time.perf_counter()
        if self.enabled and not self.lines:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, rec: dict) -> None:
        if self.lines:
            now = time.perf_counter()
            if now - self.last_line >= LINE_EVERY_S:
                self.last_line = now
                self.console.print(f"epoch {rec['epoch']}/{self.epochs} step {rec['batch']}/{rec['batches']}  "
                                   f"loss {rec['total']:.3f}  lr {rec['lr']:.4g}  {rec['images_per_s']:.0f} img/s")
            return
        if not self.progress:
            return
        info = (f"loss {rec['total']:.3f} (ce {rec['ce_peers']:.3f} ens {rec['ce_ensemble']:.3f} "
                f"kd-e {rec['kd_ensemble']:.3f} kd-m {rec['kd_mean']:.3f}) λ {rec['lambda']:.3f} "
                f"lr {rec['lr']:.4g} {rec['images_per_s']:.0f} img/s")
        if self.task is None or self.progress.tasks[0].fields["epoch"] != rec["epoch"]:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task("train", total=rec["batches"], epoch=rec["epoch"], epochs=self.epochs,
                                               info=info)
        self.progress.update(self.task, completed=rec["batch"], info=info)

    def epoch_done(self, epoch: int, stats: dict, val: dict) -> None:
        if not self.enabled:
            return
        if self.first_epoch is None:
            self.first_epoch = epoch - 1
        top1 = val["top1"]
        peers = max(v for k, v in top1.items() if k.startswith("peer"))
        means = max(v for k, v in top1.items() if k.startswith("mean") and k != "mean-ensemble")
        ens = top1.get("ensemble")
        done = epoch - self.first_epoch
        eta = (time.perf_counter() - self.start) / done * (self.epochs - epoch)
        ens_text = f" ensemble {ens:5.2f} mean-ens {top1['mean-ensemble']:5.2f}" if ens is not None else ""
        self.console.print(
            f"epoch {epoch:>3}/{self.epochs}  loss {stats['total']:.3f}  val top-1: best peer {peers:5.2f} "
            f"best mean {means:5.2f}{ens_text}  disagreement {val['disagreement']:.3f}  "
            f"{stats['images_per_s']:.0f} img/s  {stats['seconds']:.1f}s  ETA {eta:.0f}s")

    def final(self, test: dict) -> None:
        if not self.enabled:
            return
        parts = "  ".join(f"{k} {v:.2f}" for k, v in test["top1"].items())
        self.console.print(f"test top-1 (recorded once, never used for choosing): {parts}")
