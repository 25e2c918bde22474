"""Measure the method switches whose default issue 11 asked us to justify, on real CIFAR-10.

Each variant is one ``pcltool compare`` (PCL and its plain baseline, the same seeds), so every figure is a
paired, seeded measurement made by the tool itself, and each variant's folder holds its runs and ledger:

- ``batched_views``  trunk BatchNorm over all m views at once (``train.batched_views = true``, the default
                     until these figures), zero-padding shortcuts (``resnet8``);
- ``per_view_bn``    the trunk run once per view, so its BatchNorm normalises each view on its own, as the
                     reproduction does (``train.batched_views = false``, the default since);
- ``projection``     1x1 convolution + BatchNorm shortcuts, as the reproduction and ONE use (``resnet8_proj``),
                     views batched as in the first variant, so the two differ in the shortcut only.

A short budget on a 2-core CPU: 10,000 training images (the other 40,000 are the validation split select
scores on; the 10,000 test images are untouched), ResNet-8, 4 epochs cosine, ramp-up 1 epoch, EMA 0.98 (a
~50-step horizon on a 312-step schedule), seeds 0 and 1. It ranks the variants at this budget only; the
full-budget evidence is ``benchmarks/pcl_evidence.sh``.

    python benchmarks/pcl_switches.py [--cifar DIR] [--out DIR] [--seeds 0,1] [--threads N]

Writes ``switches.md`` and ``switches.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "batched_views": ["train.batched_views=true"],
    "per_view_bn": ["train.batched_views=false"],
    "projection": ["model.backbone=resnet8_proj", "train.batched_views=true"],
}
COMMON = ["model.backbone=resnet8", "data.val_size=40000", "train.epochs=4", "train.schedule=cosine",
          "pcl.rampup_epochs=1", "pcl.ema_decay=0.98"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", default="../shared/data/cifar-10-batches-py")
    parser.add_argument("--out", type=Path, default=Path("runs/switches-cifar10"))
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="run these variants only")
    args = parser.parse_args()

    rows = {}
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        sets = [f"data.root={args.cifar}", *COMMON, *extra]
        command = [sys.executable, "-m", "pcltool", "compare", "recipes/cifar10.toml", "--seeds", args.seeds,
                   "--out", str(args.out / name)]
        command += [a for s in sets for a in ("--set", s)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        print("$", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"variant {name} failed; its runs are kept in {args.out / name} and resume on a rerun",
                  file=sys.stderr)
            return 1

    for name, extra in VARIANTS.items():  # every variant measured so far, in this call or an earlier one
        ledger_path = args.out / name / "ledger.json"
        if ledger_path.is_file():
            book = json.loads(ledger_path.read_text())
            rows[name] = {"sets": extra, "seeds": book["seeds"], "headline": book["headline"], "cost": book["cost"]}

    lines = ["# PCL switches on CIFAR-10 (10k train / 40k val / 10k test, resnet8, 4 epochs unless named)",
             "", "test top-1 %, mean ± sample std over seeds (per seed in brackets)", "",
             "| variant | seeds | deployed PCL | PCL ensemble | baseline | deployed − baseline | PCL train s "
             "| baseline train s |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(stat):
        if stat is None:
            return "-"
        values = ", ".join(f"{v:.2f}" for v in stat["values"])
        spread = "" if stat["std"] is None else f" ± {stat['std']:.2f}"
        return f"{stat['mean']:.2f}{spread} ({values})"

    for name, row in rows.items():
        h, cost = row["headline"], row["cost"]
        pcl_s = cost["pcl_wall_seconds"]["mean"] if cost["pcl_wall_seconds"] else float("nan")
        base_s = cost["baseline_wall_seconds"]["mean"] if cost["baseline_wall_seconds"] else float("nan")
        seeds = ",".join(str(seed) for seed in row["seeds"])
        lines.append(f"| {name} | {seeds} | {cell(h['deployed_pcl'])} | {cell(h['pcl_ensemble'])} "
                     f"| {cell(h['baseline'])} | {cell(h['deployed_minus_baseline'])} | {pcl_s:.0f} | {base_s:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "switches.md").write_text("\n".join(lines) + "\n")
    (args.out / "switches.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
