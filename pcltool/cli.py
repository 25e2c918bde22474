"""The pcltool command line: the typer app and the list of its commands.

The commands live in :mod:`pcltool.commands` (one thin function per stage, heavy libraries imported inside them
so that ``pcltool --help`` answers instantly); this module only assembles them, so the CLI is a tree:
``cli -> commands.* -> commands.common``."""

from __future__ import annotations

import os

import typer

from pcltool.commands import compare_cmds, engine_cmds, model_cmds, run_cmds, train_cmds

app = typer.Typer(
    name="pcltool",
    help="Peer Collaborative Learning from training to a verified deployment: "
         "train -> select -> prune -> export -> build -> bench (or all of it: `pcltool run RECIPE`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
deploy_app = typer.Typer(help="Write deployment bundles (Triton model repository).", no_args_is_help=True)

app.command()(train_cmds.train)
app.command()(model_cmds.select)
app.command()(model_cmds.prune)
app.command()(model_cmds.export)
app.command()(engine_cmds.build)
app.command()(engine_cmds.bench)
app.command("run")(engine_cmds.run_pipeline)
app.command()(run_cmds.status)
app.command("bench-train")(train_cmds.bench_train)
app.command()(compare_cmds.compare)
deploy_app.command("triton")(engine_cmds.triton)
app.add_typer(deploy_app, name="deploy")


def main() -> None:
    """Entry point for ``python -m pcltool`` and torchrun (``torchrun -m pcltool train ...``)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    app()
