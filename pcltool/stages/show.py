"""Rendering a manifest as a rich table (``pcltool status``)."""

from __future__ import annotations

from pathlib import Path


def _number(value) -> str:
    """Counts as integers, flags as yes/no, measurements with four significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def _short_metrics(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, bool):
            parts.append(f"{key}={_number(value)}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, (int, str)):
            parts.append(f"{key}={value}")
        elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()) and len(value) <= 8:
            inner = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            parts.append(f"{key}: {inner}")
    return "\n".join(parts)


def manifest_table(path: Path, manifest: dict, interrupted: set[str] = frozenset()):
    """The manifest as a table; stages in ``interrupted`` (recorded "running", but no process holds the run) are
    shown as interrupted."""
    from rich.markup import escape
    from rich.table import Table

    env = manifest.get("environment", {})
    title = (f"{escape(str(path))}  ·  run {manifest.get('run_id', '?')[:12]}  ·  "
             f"recipe {escape(str(manifest.get('recipe', {}).get('name')))}  ·  "
             f"torch {env.get('torch')}  ·  {env.get('gpu', 'cpu')}")
    table = Table(title=title, show_lines=True)
    for col in ("stage", "status", "started", "finished", "outputs", "metrics"):
        table.add_column(col, overflow="fold")
    for key, rec in manifest.get("stages", {}).items():
        status = "interrupted" if key in interrupted else rec.get("status")
        style = {"done": "green", "failed": "red", "running": "yellow", "interrupted": "magenta"}.get(status, "")
        outputs = "\n".join(f"{k}: {escape(v['path'])} ({v['sha256'][:10]})" for k, v in rec.get("outputs", {}).items())
        metrics = escape(_short_metrics(rec.get("metrics", {})))
        if key in interrupted:
            metrics = ("[magenta]interrupted: recorded as running, but no pcltool process holds the run "
                       "(killed?); run the stage again (train: --resume)[/]\n" + metrics)
        if rec.get("error"):
            metrics = f"[red]{escape(rec['error'])}[/]\n" + metrics
        table.add_row(escape(key), f"[{style}]{status}[/]", rec.get("started", ""), rec.get("finished", ""),
                      outputs, metrics)
    return table
