#!/usr/bin/env bash
# What the validation split costs plain training (issue 11, point 3: 45,000 vs the paper's 50,000 images).
#
# `select` chooses the deployed network on a validation split carved from the training images (5,000 by default),
# so pcltool trains on 45,000 CIFAR-10 images where the paper trains on all 50,000. This trains the evidence
# benchmark's plain baseline (benchmarks/pcl_evidence.sh: ResNet-8, 6 epochs, cosine from lr 0.1) on 49,950
# images (data.val_size=50, the least a split may hold here) for the same seeds, and prints its test top-1 beside
# the 45,000-image baselines of $EVIDENCE (run pcl_evidence.sh first). Equal epochs, so the 50k runs also take
# 11 % more steps, as the paper's would. ~6 min per seed on a quiet 2-core CPU.
#   CIFAR=/path/to/cifar-10-batches-py benchmarks/holdout_cost.sh [seeds, default "0 1 2"]
set -euo pipefail
CIFAR=${CIFAR:-../shared/data/cifar-10-batches-py}
EVIDENCE=${EVIDENCE:-runs/evidence-cifar10-per-view}
OUT=${OUT:-runs/holdout-cost}
SEEDS=${1:-0 1 2}
for seed in $SEEDS; do
  run="$OUT/baseline-val50-seed$seed"
  if [ -f "$run/manifest.json" ] && python - "$run" <<'EOF'
import json, sys
sys.exit(0 if json.load(open(sys.argv[1] + "/manifest.json"))["stages"].get("train", {}).get("status") == "done" else 1)
EOF
  then echo "reusing $run"; continue; fi
  resume=()
  [ -f "$run/manifest.json" ] && resume=(--resume)
  pcltool train recipes/cifar10.toml --seed "$seed" --run "$run" "${resume[@]}" \
    --set data.root="$CIFAR" --set data.val_size=50 --set pcl.enabled=false \
    --set model.backbone=resnet8 --set train.epochs=6 --set train.schedule=cosine \
    --set pcl.rampup_epochs=2 --set pcl.ema_decay=0.99
done
python - "$OUT" "$EVIDENCE" $SEEDS <<'EOF'
import json, statistics, sys
from pathlib import Path

out, evidence, seeds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
def top1(run):
    m = json.loads((run / "manifest.json").read_text())
    return m["stages"]["train"]["metrics"]["test_top1"]["peer1"], m["data"]["train"]
rows, diffs = [], []
for s in seeds:
    full, n_full = top1(out / f"baseline-val50-seed{s}")
    held, n_held = top1(evidence / f"baseline-seed{s}")
    rows.append(f"| {s} | {n_held} | {held:.2f} | {n_full} | {full:.2f} | {full - held:+.2f} |")
    diffs.append(full - held)
lines = ["| seed | train images | test top-1 % | train images | test top-1 % | difference (points) |",
         "|---|---|---|---|---|---|", *rows]
if len(diffs) > 1:
    lines.append(f"| mean ± std | | | | | {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |")
text = "\n".join(lines) + "\n"
(out / "holdout_cost.md").write_text(text)
print(text)
EOF
