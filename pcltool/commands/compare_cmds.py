"""``pcltool compare``: PCL against its plain baseline over several seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pcltool.commands.common import Device, console, handle_errors


@handle_errors
def compare(
    recipe: Annotated[Path, typer.Argument(help="PCL recipe TOML file, e.g. recipes/cifar10.toml")],
    seeds: Annotated[str, typer.Option("--seeds", help="seeds to run, e.g. 0,1,2 or 0-4")] = "0,1,2",
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value for both arms: --set train.epochs=30 (repeatable)")] = [],  # noqa: B006
    out: Annotated[Optional[Path], typer.Option("--out", help="folder for the runs and the ledger (default: <runs_dir>/compare-<recipe name>)")] = None,
    device: Annotated[Device, typer.Option("--device", help="where to train")] = Device.auto,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, max=1024, help="CPU threads for PyTorch ops (default: PyTorch's choice)")] = None,
):
    """Train the recipe with PCL and as its plain baseline (pcl.enabled=false) for every seed, choose each run's
    deployed model on the validation split with `select`, and write a ledger (ledger.md, ledger.json): mean ± std
    over seeds of every branch, the deployed PCL model vs the baseline and the baseline's EMA, the ensembles, the
    paired differences and the training time. Finished runs with the same recipe are reused and interrupted ones
    resumed, so the command can be re-run after Ctrl-C or to add seeds."""
    from pcltool.config import load_recipe
    from pcltool.stages.compare import ledger_view, parse_seeds, run_compare

    seed_list = parse_seeds(seeds)
    overrides = list(set_) + ([f"device={device.value}"] if device != Device.auto else [])
    cfg = load_recipe(recipe, overrides)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    folder = out if out is not None else Path(cfg.output.runs_dir) / f"compare-{cfg.name}"
    out_console = console()

    def announce(arm, state):
        verb = {"new": "training", "interrupted": "resuming", "done": "reusing"}[state]
        out_console.print(f"{verb} {arm.kind} seed {arm.seed}: {arm.path}")

    book = run_compare(cfg, seed_list, folder, console=out_console, on_arm=announce)
    out_console.print(ledger_view(book))
    out_console.print(f"ledger: {folder / 'ledger.md'} and {folder / 'ledger.json'}")
