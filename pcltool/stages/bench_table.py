"""The bench table (rich) from a ``bench.json`` document."""

from __future__ import annotations


def bench_table(doc: dict):
    """A rich table: one line per variant and batch size."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    hw = doc["hardware"]
    peak = hw.get("peak_fp32", {}).get("measured")
    gpu = (hw.get("gpu") or {}).get("name")
    title = (f"{doc['candidate']} · {hw['cpu'].get('model')} ({hw['cpu'].get('usable_cpus')} CPUs)"
             + (f" · {gpu}" if gpu else "") + f" · {doc['settings']['threads']} thread{'' if doc['settings']['threads'] == 1 else 's'}"
             + (f" · peak {peak['gflops']:.0f} GFLOP/s (sgemm" + _after(hw["peak_fp32"]) + ")" if peak else ""))
    table = Table(title=title, title_style="bold", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"top-1{' / top-5' if doc['variants'] and doc['variants'][0].get('top5') is not None else ''}"
                          f" on the {doc.get('split', 'test')} split · latency per batch · CV: coefficient of "
                          "variation (! = median not stable) · x floor: p50 / (FLOPs / peak FP32 rate, the higher "
                          "of two sgemm measurements, before and after the bench); ! = below 1 (faster than the "
                          "measured peak, so the peak was measured under load) or the two peak measurements "
                          "differ by more than 15 %: not a trustworthy distance from the floor")
    for col in ("model", "engine", "MB", "top-1", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "CV", "x floor"):
        table.add_column(col, justify="left" if col in ("model", "engine") else "right")
    results: dict[str, list[dict]] = {}
    for r in doc["results"]:
        results.setdefault(r["variant"], []).append(r)
    for v in doc["variants"]:
        model = v["model"] + (f"\n[dim]{v['params'] / 1e6:.3g} M params · {v['flops'] / 1e6:.4g} MFLOPs[/]"
                              if v["params"] and v["flops"] else "")
        engine = f"{v['backend']}{'/' + v['provider'] if v['provider'] else ''} {v['precision']}"
        acc = "-" if v["top1"] is None else f"{v['top1']:.2f}" + (f" / {v['top5']:.2f}" if v["top5"] else "")
        head = [model, engine, _fmt(v["size_mb"], ".2f"), acc]
        if v["status"] != "ok":
            table.add_row(*head, "", f"[yellow]{v['status']}[/]", escape(v["note"]), *[""] * 4)
            continue
        for i, r in enumerate(results.get(v["key"], [])):
            cells = head if i == 0 else [""] * len(head)
            if "p50_ms" not in r:
                table.add_row(*cells, str(r["batch"]), "", escape(r.get("note", "")), *[""] * 4)
                continue
            cv = f"{100 * r['cv']:.1f}%" + ("" if r["stable"] else " [yellow]![/]")
            table.add_row(*cells, str(r["batch"]), f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['p99_ms']:.3f}",
                          f"{r['throughput']:.0f}", cv,
                          _fmt(r.get("x_floor"), ".2f") + (" [yellow]![/]" if r.get("x_floor_suspect") else ""))
        table.add_section()
    return table


def print_table(console, doc: dict) -> None:
    """Print :func:`bench_table`; into a file or pipe, wide enough not to fold the columns."""
    if not console.is_terminal:
        console.width = max(console.width, 160)
    console.print(bench_table(doc))


def _after(peak: dict) -> str:
    """``; before/after 180/175``: both peak measurements, flagged when they disagree."""
    if "measured_after" not in peak:
        return ""
    before, after = peak["measured"].get("gflops_before"), peak["measured_after"]["gflops"]
    return f"; before/after {before:.0f}/{after:.0f}" + ("" if peak.get("stable") else " [yellow]![/]")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)
