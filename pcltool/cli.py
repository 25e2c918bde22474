"""The pcltool command line. One thin function per stage; heavy libraries are imported inside them so that
``pcltool --help`` answers instantly."""

from __future__ import annotations

import functools
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="pcltool",
    help="Peer Collaborative Learning from training to a verified deployment: "
         "train -> select -> prune -> export -> build -> bench (or all of it: `pcltool run RECIPE`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
deploy_app = typer.Typer(help="Write deployment bundles (Triton model repository).", no_args_is_help=True)
app.add_typer(deploy_app, name="deploy")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def handle_errors(fn):
    """Turn pcltool's typed errors into a one-paragraph message and the error's exit code (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pcltool.errors import PcltoolError

        try:
            return fn(*args, **kwargs)
        except PcltoolError as err:
            from rich.markup import escape

            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", markup=True, soft_wrap=True)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            _console(stderr=True).print("[bold red]interrupted[/] (the run directory keeps what had finished)")
            raise typer.Exit(code=130) from None

    return wrapper


RunArg = Annotated[Optional[Path], typer.Argument(help="run directory (default: the most recent run under runs/)")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="where to look for the most recent run")]


def _open_run(run: Path | None, runs_dir: Path = Path("runs")):
    from pcltool.manifest import RunDir

    return RunDir.open(run if run is not None else RunDir.latest(runs_dir))


@app.command()
@handle_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file, e.g. recipes/cifar10.toml")],
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value: --set train.epochs=10 (repeatable)")] = [],  # noqa: B006
    run: Annotated[Optional[Path], typer.Option("--run", help="run directory (default: runs/<recipe name>[-N])")] = None,
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

    run_dir = train_entry(cfg, run, resume, _console())
    if run_dir is not None:
        _console().print(f"run: {run_dir}")


@app.command()
@handle_errors
def status(
    run: RunArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Show a run's manifest: stages, their status, outputs and key metrics."""
    import json

    rd = _open_run(run, runs_dir)
    manifest = rd.read()
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    from pcltool.stages.show import manifest_table

    _console().print(manifest_table(rd.path, manifest))


def main() -> None:
    """Entry point for ``python -m pcltool`` and torchrun (``torchrun -m pcltool train ...``)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    app()


# Command groups registered on `app` (each module only imports typer at module level).
from pcltool.commands import engine_cmds, model_cmds, train_cmds  # noqa: E402,F401
