"""Commands that read a run: ``status``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pcltool.commands.common import RunArg, RunsDirOpt, console, handle_errors, open_run


@handle_errors
def status(
    run: RunArg = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as JSON")] = False,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Show a run's manifest: stages, their status, outputs and key metrics."""
    import json

    rd = open_run(run, runs_dir)
    manifest = rd.read()
    interrupted = {key for key in manifest["stages"] if rd.status_of(key, manifest) == "interrupted"}
    if as_json:
        for key in interrupted:
            manifest["stages"][key]["status"] = "interrupted"
        typer.echo(json.dumps(manifest, indent=2))
        return
    from pcltool.stages.show import manifest_table

    console().print(manifest_table(rd.path, manifest, interrupted))
