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


def fingerprint_digest(fingerprint: dict) -> str:
    """A short name for a recorded data fingerprint, to compare runs by eye: the content hash where the run has one,
    else the listing's, else the first 12 hex digits of the sha256 of the whole record (canonical JSON)."""
    import hashlib
    import json

    for key in ("content_sha256", "listing_sha256"):
        if fingerprint.get(key):
            return fingerprint[key][:12]
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def data_summary(record: dict | None) -> str:
    """The manifest's ``data`` record in a few lines: what was trained on, its fingerprint, the preprocessing every
    stage follows, and what loading skipped or warned about."""
    if not record:
        return "data: not recorded (a run trained before pcltool recorded data, or not trained yet)"
    fingerprint = record.get("fingerprint") or {}
    lines = [f"data: {record.get('dataset')}  ·  train {record.get('train')} / val {record.get('val')} / "
             f"test {record.get('test')}  ·  {record.get('classes')} classes  ·  "
             f"fingerprint {fingerprint.get('kind', '?')} {fingerprint_digest(fingerprint)}"]
    steps = (record.get("preprocessing") or {}).get("steps")
    if steps:
        lines.append(f"preprocessing: {steps}")
    skipped = record.get("skipped") or []
    if skipped:
        lines.append(f"{len(skipped)} file(s) skipped while loading (listed in the manifest's data.skipped)")
    lines += [f"warning: {w}" for w in record.get("warnings") or []]
    return "\n".join(lines)


def manifest_table(path: Path, manifest: dict, interrupted: set[str] = frozenset()):
    """The manifest as a table; stages in ``interrupted`` (recorded "running", but no process holds the run) are
    shown as interrupted."""
    from rich.markup import escape
    from rich.table import Table

    env = manifest.get("environment", {})
    title = (f"{escape(str(path))}  ·  run {manifest.get('run_id', '?')[:12]}  ·  "
             f"recipe {escape(str(manifest.get('recipe', {}).get('name')))}  ·  "
             f"torch {env.get('torch')}  ·  {env.get('gpu', 'cpu')}")
    table = Table(title=title, caption=escape(data_summary(manifest.get("data"))), caption_justify="left",
                  show_lines=True)
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
