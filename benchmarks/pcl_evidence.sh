#!/usr/bin/env bash
# Evidence that PCL's deployed model beats plain training on real CIFAR-10 (issue 11).
# Three seeds of PCL and of its plain baseline (same recipe with pcl.enabled=false), full 45k/5k split,
# ResNet-8, 10 epochs cosine: one PCL run takes ~15 min and its baseline ~3 min on a 2-core CPU.
# `pcltool compare` trains whatever is missing (finished runs with the same recipe are reused),
# scores every branch with `select` and writes the ledger (ledger.md, ledger.json) into the output folder.
#   CIFAR=/path/to/cifar-10-batches-py benchmarks/pcl_evidence.sh
set -euo pipefail
CIFAR=${CIFAR:-../shared/data/cifar-10-batches-py}
OUT=${OUT:-runs/evidence-cifar10}
exec pcltool compare recipes/cifar10.toml --seeds 0,1,2 --out "$OUT" \
  --set data.root="$CIFAR" \
  --set model.backbone=resnet8 \
  --set train.epochs=6 --set train.schedule=cosine \
  --set pcl.rampup_epochs=2 \
  "$@"
