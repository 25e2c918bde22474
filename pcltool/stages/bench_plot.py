"""``bench.png``: accuracy against latency from a ``bench.json`` document, with the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

from pcltool.manifest import atomic_path


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(doc: dict, path: Path) -> None:
    """Accuracy against p50 latency, one panel per batch size; each variant keeps its colour and marker across
    panels (legend below), the Pareto front is the red step line through ringed points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    variants = [v for v in doc["variants"] if v["status"] == "ok"]
    batches = sorted({r["batch"] for r in doc["results"] if "p50_ms" in r})
    if not batches:
        return
    markers = "osD^v<>ph*X"
    style = {v["key"]: (plt.cm.tab10(i % 10), markers[i % len(markers)]) for i, v in enumerate(variants)}
    cols = min(2, len(batches))
    rows = -(-len(batches) // cols)
    legend_in = 0.25 * -(-(len(variants) + 1) // cols) + 0.2  # legend height, inches
    height = 4.2 * rows + legend_in
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, height), squeeze=False)
    for ax in axes.flat[len(batches):]:
        ax.axis("off")
    top1 = {v["key"]: v["top1"] for v in variants}
    for ax, b in zip(axes.flat, batches):
        points = [(r["p50_ms"], top1[r["variant"]], r["variant"]) for r in doc["results"]
                  if r["batch"] == b and "p50_ms" in r and r["variant"] in top1]
        front = pareto_front([(x, y) for x, y, _ in points])
        for x, y, key in points:
            color, marker = style[key]
            ax.scatter(x, y, color=color, marker=marker, s=46, zorder=3, label=key)
        if front:
            fx, fy = zip(*[points[i][:2] for i in front])
            ax.step(fx, fy, where="post", color="tab:red", linewidth=1.2, zorder=2)
            ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="tab:red", linewidths=1.2, zorder=4)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p50 latency per batch (ms, log scale)")
        ax.set_ylabel(f"top-1 on the {doc.get('split', 'test')} split (%)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, linestyle="", label=k) for k, (c, m) in style.items()]
    handles.append(plt.Line2D([], [], color="tab:red", label="Pareto front (faster and at least as accurate)"))
    fig.legend(handles=handles, loc="lower center", ncol=cols, fontsize=8, frameon=False)
    gpu = (doc["hardware"].get("gpu") or {}).get("name")
    fig.suptitle(f"{doc['candidate']}: accuracy vs latency — {gpu or doc['hardware']['cpu'].get('model', '')}, "
                 f"{doc['settings']['threads']} threads", fontsize=11)
    fig.tight_layout(rect=(0, legend_in / height, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
