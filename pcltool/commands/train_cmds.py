"""Training-side commands: ``train`` and ``bench-train``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pcltool.commands.common import Device, console, escape, handle_errors


@handle_errors
def bench_train(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file, e.g. recipes/cifar10.toml")],
    steps: Annotated[int, typer.Option("--steps", help="timed steps per variant")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed steps before the timed ones (the first is reported apart)")] = 2,
    device: Annotated[Device, typer.Option("--device", help="where to train")] = Device.auto,
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value: --set train.batch_size=128 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", help="JSON report (default: <runs_dir>/bench-train-<recipe name>.json)")] = None,
    skip: Annotated[list[str], typer.Option("--skip", help="leave out a variant: reference, data_on_device, batched_views, channels_last, autocast, fused_optimizer, foreach_ema, compile (repeatable)")] = [],  # noqa: B006
    repeat: Annotated[int, typer.Option("--repeat", help="run all variants N times in alternating order; keep each one's fastest")] = 1,
    workers: Annotated[Optional[int], typer.Option("--workers", help="DataLoader workers of the reference path (default: one per CPU core)")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads for PyTorch ops (default: PyTorch's choice)")] = None,
    accuracy: Annotated[bool, typer.Option("--accuracy", help="instead of timing steps, train (a) and (b) for the recipe's whole schedule (shorten it with --set train.epochs=N) and compare every branch's validation and test top-1")] = False,
):
    """Measure training speed: (a) pcltool's path, (b) the reference path built like the public reproductions,
    and (a) with each fast-path piece switched off in turn. Prints a table (images/s, step time, peak GPU memory,
    (a)/(b)) and writes a JSON report. With --accuracy: train both paths to the end of the schedule and compare
    their accuracy."""
    from pcltool.config import load_recipe
    from pcltool.data import load_dataset
    from pcltool.stages.bench_train import report_table, run_bench_train, write_report
    from pcltool.stages.train import resolve_device

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    overrides = list(set_) + ([f"device={device.value}"] if device != Device.auto else [])
    cfg = load_recipe(recipe, overrides)
    dev = resolve_device(cfg.device)
    data = load_dataset(cfg.data)
    out_console = console()
    if accuracy:
        from pcltool.stages.train_parity import accuracy_table, run_accuracy_parity

        report = run_accuracy_parity(cfg, data, dev, workers=workers, progress=out_console.print)
        out_console.print(accuracy_table(report))
        out_console.print(f"deployed mean teacher, test top-1: (a) {report['paths']['pcltool']['chosen_test_top1']:.2f} "
                      f"vs (b) {report['paths']['reference']['chosen_test_top1']:.2f} "
                      f"({report['chosen_test_top1_a_minus_b']:+.2f} points); wall (b)/(a) = "
                      f"{report['speedup_a_over_b_wall']:.2f}x")
        path = out if out is not None else Path(cfg.output.runs_dir) / f"bench-train-accuracy-{cfg.name}.json"
        write_report(report, path)
        out_console.print(f"report: {escape(str(path))}")
        if not report["finite"]:
            console(stderr=True).print("error: a path's training loss became NaN or infinite; its accuracy "
                                        "means nothing (lower train.lr, or use train.precision=fp32)")
            raise typer.Exit(code=1)
        return
    report = run_bench_train(cfg, data, dev, steps=steps, warmup=warmup, skip=tuple(skip), repeat=repeat,
                             workers=workers, progress=lambda v: out_console.print(f"measuring {v.name} ..."))
    out_console.print(report_table(report))
    if report["speedup_a_over_b"] is not None:
        out_console.print(f"(a)/(b) = {report['speedup_a_over_b']:.2f}x")
    path = out if out is not None else Path(cfg.output.runs_dir) / f"bench-train-{cfg.name}.json"
    write_report(report, path)
    out_console.print(f"report: {escape(str(path))}")


@handle_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file, e.g. recipes/cifar10.toml")],
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value: --set train.epochs=10 (repeatable)")] = [],  # noqa: B006
    run: Annotated[Optional[Path], typer.Option(
        "--run-dir", "--run", help="run directory (default: runs/<recipe name>[-N]); under torchrun write --run-dir "
                                   "(torchrun's parser takes --run for its own --run-path)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run (default: the most recent run)")] = False,
    device: Annotated[Device, typer.Option("--device", help="where to train")] = Device.auto,
    seed: Annotated[Optional[int], typer.Option("--seed", help="random seed (same as --set seed=N)")] = None,
    nproc: Annotated[Optional[int], typer.Option("--nproc", help="launch N processes with torchrun (one per GPU)")] = None,
):
    """Train a PCL network (or the plain baseline with --set pcl.enabled=false) and record it in a run directory."""
    from pcltool.config import load_recipe

    overrides = list(set_) + ([f"seed={seed}"] if seed is not None else [])
    if device != Device.auto:
        overrides.append(f"device={device.value}")
    cfg = load_recipe(recipe, overrides)
    if nproc is not None:
        from pcltool.distributed import launch_torchrun

        raise typer.Exit(code=launch_torchrun(nproc, sys.argv[1:]))
    from pcltool.distributed import train_entry

    run_dir = train_entry(cfg, run, resume, console())
    if run_dir is not None:
        console().print(f"run: {escape(str(run_dir))}")
