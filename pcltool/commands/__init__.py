"""CLI command groups. Each module registers thin typer commands on ``pcltool.cli.app``; they import only typer
and the standard library at module level so ``pcltool --help`` stays instant."""
