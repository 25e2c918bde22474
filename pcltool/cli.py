"""The pcltool command line: the typer app and the list of its commands.

The commands live in :mod:`pcltool.commands` (one thin function per stage, heavy libraries imported inside them
so that ``pcltool --help`` answers instantly); this module only assembles them, so the CLI is a tree:
``cli -> commands.* -> commands.common``."""

from __future__ import annotations

import inspect
import os
from typing import Annotated

import typer

from pcltool.commands import compare_cmds, engine_cmds, model_cmds, recipe_cmds, run_cmds, train_cmds

app = typer.Typer(
    name="pcltool",
    help="Peer Collaborative Learning from training to a verified deployment: "
         "train -> select -> prune -> export -> build -> bench (or all of it: `pcltool run RECIPE`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # docstrings' hard line breaks are joined into one paragraph
)
deploy_app = typer.Typer(help="Write deployment bundles (Triton model repository).", no_args_is_help=True)



def one_paragraph_per_block(doc: str | None) -> str:
    """A docstring with its hard line breaks joined: typer keeps them in the command list, where they would wrap
    mid-sentence; blank lines still separate paragraphs."""
    return "\n\n".join(" ".join(block.split()) for block in inspect.cleandoc(doc or "").split("\n\n"))


def _add(group: typer.Typer, fn, name: str | None = None) -> None:
    group.command(name, help=one_paragraph_per_block(fn.__doc__))(fn)


_add(app, train_cmds.train)
_add(app, model_cmds.select)
_add(app, model_cmds.prune)
_add(app, model_cmds.export)
_add(app, engine_cmds.build)
_add(app, engine_cmds.bench)
_add(app, engine_cmds.run_pipeline, "run")
_add(app, run_cmds.status)
_add(app, train_cmds.bench_train, "bench-train")
_add(app, compare_cmds.compare)
_add(deploy_app, engine_cmds.triton, "triton")
app.add_typer(deploy_app, name="deploy")
app.add_typer(recipe_cmds.recipe_app, name="recipe")


def version_text() -> str:
    """``pcltool X.Y.Z`` from the installed package's metadata (the source tree's version when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pcltool {version('pcltool')}"
    except PackageNotFoundError:
        from pcltool import __version__

        return f"pcltool {__version__}"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="print pcltool's version and exit")] = False,
) -> None:
    """Options that apply before any command (the app's help text is given above)."""


def main() -> None:
    """Entry point for ``python -m pcltool`` and torchrun (``torchrun -m pcltool train ...``)."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    app()
