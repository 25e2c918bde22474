"""``pcltool recipe keys`` and ``pcltool recipe show``: what a recipe may say, and what a recipe resolves to."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pcltool.commands.common import console, handle_errors

recipe_app = typer.Typer(help="List every recipe key, or print a recipe as pcltool resolves it.",
                         no_args_is_help=True)


@recipe_app.command("keys")
@handle_errors
def keys(
    section: Annotated[Optional[str], typer.Argument(help="only this table (data, model, pcl, train, output) or key "
                                                          "prefix")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the keys as JSON")] = False,
):
    """Every recipe key: its type, default, allowed values and meaning (set any of them with --set key=value)."""
    import json

    from pcltool.errors import UsageError
    from pcltool.recipe_keys import format_default, recipe_keys

    rows = [k for k in recipe_keys() if section is None or k.key == section or k.key.startswith(f"{section}.")]
    if not rows:
        tables = sorted({k.key.split(".")[0] for k in recipe_keys() if "." in k.key})
        raise UsageError(f"no recipe key starts with {section!r}; tables: {', '.join(tables)}")
    if as_json:
        typer.echo(json.dumps([k.as_dict() for k in rows], indent=2))
        return
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="override any key: pcltool train RECIPE --set train.epochs=10 --set pcl.peers=4")
    for col in ("key", "type", "default", "allowed", "meaning"):
        table.add_column(col, overflow="fold")
    for k in rows:
        table.add_row(k.key, escape(k.type), escape(format_default(k.default)), escape(k.allowed), escape(k.meaning))
    out = console()
    if not out.is_terminal:
        out.width = max(out.width, 160)
    out.print(table)


@recipe_app.command("show")
@handle_errors
def show(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file, e.g. recipes/cifar10.toml")],
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value: --set train.epochs=10 "
                                                          "(repeatable)")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of TOML")] = False,
):
    """Print the recipe as a run would resolve and save it: every key, defaults filled in, --set applied."""
    import json

    from pcltool.config import load_recipe

    resolved = load_recipe(recipe, list(set_)).resolved()
    if as_json:
        typer.echo(json.dumps(resolved, indent=2))
        return
    import tomli_w

    unset: list[str] = []
    typer.echo(tomli_w.dumps(_without_none(resolved, "", unset)).rstrip())
    if unset:
        typer.echo(f"\n# not set (TOML has no null; each falls back as `pcltool recipe keys` says): {', '.join(unset)}")


def _without_none(data: dict, prefix: str, unset: list[str]) -> dict:
    """``data`` without its None values (TOML cannot write them); their dotted keys are appended to ``unset``."""
    out = {}
    for k, v in data.items():
        if v is None:
            unset.append(prefix + k)
        else:
            out[k] = _without_none(v, f"{prefix}{k}.", unset) if isinstance(v, dict) else v
    return out
