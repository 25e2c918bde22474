"""``bench.png``: accuracy against per-image latency from a ``bench.json`` document, with the Pareto front marked."""

from __future__ import annotations

from pathlib import Path

from pcltool.manifest import atomic_path

BATCH_MARKERS = "osD^vP*X"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both latency (lower) and accuracy (higher), by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def accuracy_limits(values: list[float]) -> tuple[float, float]:
    """The y range: the data with a margin (at least one point each side), never outside 0..100."""
    lo, hi = min(values), max(values)
    pad = max(1.0, 0.15 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis from ``lo`` to ``hi``: decades over a wide range, 1-2-5 over a narrower one, finer
    steps under a decade, so that every plot has at least three labelled ticks."""
    import math

    for subs in ((1.0,), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
                 (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)):
        ticks = [m * 10.0**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in subs if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 3 and (subs != (1.0,) or hi / lo >= 1e3):
            return ticks
    return ticks


def dodge(variants: dict[str, dict], step: float = 6.0) -> dict[str, float]:
    """Vertical display offset (points) of each variant: variants with the same top-1 are spread a few points apart
    around their true level so that their lines stay apart; a single variant at a level stays on it."""
    levels: dict[float, list[str]] = {}
    for key, v in variants.items():
        levels.setdefault(v["top1"], []).append(key)
    return {key: (i - (len(keys) - 1) / 2) * step for keys in levels.values() for i, key in enumerate(keys)}


def _short(v: dict) -> str:
    """``ort int8``, ``torch fp32``, ``torch fp32 (unpruned)``."""
    name = f"{v['backend']}{'/' + v['provider'] if v['provider'] not in ('', 'cpu') else ''} {v['precision']}"
    return name if v["role"] == "deployed" else f"{name} ({v['role']})"


def title(doc: dict) -> str:
    threads = doc["settings"]["threads"]
    machine = (doc["hardware"].get("gpu") or {}).get("name") or doc["hardware"]["cpu"].get("model", "")
    return (f"{doc['candidate']}: accuracy vs latency per image\n{machine}, {threads} "
            f"thread{'' if threads == 1 else 's'}")


def plot(doc: dict, path: Path) -> None:
    """One panel: top-1 against p50 latency per image (p50 of a batch / batch size, log scale) for every variant
    (colour; variants with equal top-1 drawn a few points apart) and batch size (marker); the Pareto front — the
    points no other is both faster per image and at least as accurate — is the red step line, its points ringed
    and labelled (engine, precision, batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    from matplotlib.transforms import offset_copy

    variants = {v["key"]: v for v in doc["variants"] if v["status"] == "ok" and v["top1"] is not None}
    points = [(r["p50_ms"] / r["batch"], variants[r["variant"]]["top1"], r["variant"], r["batch"])
              for r in doc["results"] if "p50_ms" in r and r["variant"] in variants]
    if not points:
        return
    batches = sorted({b for *_, b in points})
    marker = {b: BATCH_MARKERS[i % len(BATCH_MARKERS)] for i, b in enumerate(batches)}
    colour = {k: plt.cm.tab10(i % 10) for i, k in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    shift = {key: offset_copy(ax.transData, fig=fig, y=dy, units="points") for key, dy in dodge(variants).items()}
    for key in variants:  # one line per variant through its batch sizes
        own = sorted((x, y) for x, y, k, _ in points if k == key)
        ax.plot(*zip(*own), color=colour[key], linewidth=0.9, alpha=0.6, zorder=2, transform=shift[key])
    for x, y, key, b in points:
        ax.scatter(x, y, color=colour[key], marker=marker[b], s=48, zorder=3, transform=shift[key])
    front = pareto_front([(x, y) for x, y, *_ in points])
    if front:
        fx, fy = zip(*[points[i][:2] for i in front])
        ax.step(fx, fy, where="post", color="tab:red", linewidth=1.4, zorder=2.5)
        for i in front:
            x, y, key, b = points[i]
            ax.scatter(x, y, s=170, facecolors="none", edgecolors="tab:red", linewidths=1.3, zorder=4,
                       transform=shift[key])
            ax.annotate(f"{_short(variants[key])} · b{b}", (x, y), xycoords=shift[key], textcoords="offset points",
                        xytext=(7, -13), fontsize=8, color="tab:red", zorder=5)

    xs = [x for x, *_ in points]
    lo, hi = min(xs) / 1.6, max(xs) * 1.6
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylim(*accuracy_limits([y for _, y, *_ in points]))
    ax.set_xlabel("p50 latency per image, ms (batch p50 / batch size; log scale)")
    ax.set_ylabel(f"top-1 on the {doc.get('split', 'test')} split (%)")
    ax.grid(True, alpha=0.3)

    handles = [plt.Line2D([], [], color=colour[k], marker="o", linestyle="-", linewidth=0.8, label=_short(v))
               for k, v in variants.items()]
    handles += [plt.Line2D([], [], color="0.3", marker=marker[b], linestyle="", label=f"batch {b}") for b in batches]
    handles.append(plt.Line2D([], [], color="tab:red", marker="o", markerfacecolor="none",
                              label="Pareto front (none faster per image and as accurate)"))
    if any(dodge(variants).values()):
        handles.append(plt.Line2D([], [], linestyle="", label="equal top-1: lines drawn a few points apart"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title(doc), fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
