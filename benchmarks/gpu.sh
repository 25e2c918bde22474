#!/usr/bin/env bash
# The GPU measurements of BENCHMARKS.md ("Issue 5 — training speed") in as few calls as a short GPU lease allows.
#
#   OUT=/path/for/results bash benchmarks/gpu.sh STAGE [STAGE ...]      (from the repository root)
#
# Stages, with the time each takes on one H100/H200 (estimates until measured; each is capped by `timeout`):
#   env        GPU, driver, torch/CUDA versions, ONNX Runtime providers                          (~10 s)
#   tests      pytest -m cuda: device-resident data, no host sync in the step, bf16 / fp16 /
#              compiled + CUDA-graph steps against the fp32 reference, train on GPU -> export      (~3 min)
#   speed      pcltool bench-train recipes/cifar10.toml: (a) vs (b) and every piece switched off (~3 min)
#   epoch      3 real epochs of recipes/cifar10.toml (eager, then compiled) -> 300-epoch projection (~2 min)
#   accuracy   pcltool bench-train --accuracy: fast and reference paths, same 15-epoch schedule    (~5 min)
#
# Needs CIFAR-10 in the python layout at $DATA (default .data, holding cifar-10-batches-py: six ~31 MB files).
# Runs the checkout without installing it (PYTHONPATH), so it works where pcltool's dependencies are present but
# pcltool itself is not. Everything goes under $OUT: one JSON and one log per stage, and summary.txt (printed last).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench-out}"
DATA="${DATA:-.data}"
RECIPE="${RECIPE:-recipes/cifar10.toml}"  # RECIPE=recipes/quickstart.toml DEVICE=cpu: a dry run of the script itself
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
PCL=(python -m pcltool)
CIFAR=(--set "data.root=$DATA" --device "$DEVICE")

run() {  # run NAME LIMIT_S CMD...: log to $OUT/NAME.log, record the exit code and wall time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
  return 0
}

need_cifar() {
  case "$RECIPE" in *cifar10*) ;; *) return 0 ;; esac
  if [ ! -f "$DATA/cifar-10-batches-py/test_batch" ] || [ ! -f "$DATA/cifar-10-batches-py/data_batch_5" ]; then
    echo "CIFAR-10 is not complete under $DATA/cifar-10-batches-py; copy all six batch files and batches.meta" | tee -a "$OUT/summary.txt"
    return 1
  fi
}

for stage in "$@"; do
  case "$stage" in
    env)
      run env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
        python -c "import torch, onnxruntime as ort; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
        \"cudnn\", torch.backends.cudnn.version()); print(\"gpu\", torch.cuda.get_device_name(0)); print(\"ort\",
        ort.__version__, ort.get_available_providers())"; nproc; free -g | head -2'
      ;;
    tests)
      run tests 420 python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
      ;;
    speed)
      need_cifar || continue
      run speed 540 "${PCL[@]}" bench-train "$RECIPE" "${CIFAR[@]}" --steps 40 --warmup 5 \
        --out "$OUT/speed.json"
      ;;
    epoch)
      need_cifar || continue
      for mode in eager compiled; do
        extra=()
        [ "$mode" = compiled ] && extra=(--set train.compile=true)
        run "epoch-$mode" 300 "${PCL[@]}" train "$RECIPE" "${CIFAR[@]}" --set train.epochs=3 \
          --set "output.runs_dir=$OUT/runs" --run "$OUT/runs/epoch-$mode" "${extra[@]}"
        cp "$OUT/runs/epoch-$mode/metrics.jsonl" "$OUT/epoch-$mode.metrics.jsonl" 2>/dev/null
      done
      ;;
    accuracy)
      need_cifar || continue
      run accuracy 600 "${PCL[@]}" bench-train "$RECIPE" --accuracy "${CIFAR[@]}" \
        --set train.epochs=15 --set train.schedule=cosine --set train.warmup_epochs=1 --set pcl.rampup_epochs=5 \
        --out "$OUT/accuracy.json"
      ;;
    *)
      echo "unknown stage $stage (env, tests, speed, epoch, accuracy)" >&2
      exit 2
      ;;
  esac
done

python - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
"""One short table of what the stages measured."""
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
speed = out / "speed.json"
if speed.exists():
    r = json.loads(speed.read_text())
    print(f"speed on {r['device']} (torch {r['torch']}): (a)/(b) = {r['speedup_a_over_b']:.2f}x")
    for v in r["variants"]:
        if "skipped" in v:
            print(f"  {v['name']:<28} not run: {v['skipped']}")
        else:
            mem = f"{v['peak_memory_mb']:.0f} MB" if v["peak_memory_mb"] else "-"
            comp = f", compile {v['compile_s']:.0f} s" if v.get("compile_s") else ""
            print(f"  {v['name']:<28} {v['images_per_s']:>9.0f} img/s {v['step_ms']:>7.1f} ms/step {mem:>9}{comp}")
for mode in ("eager", "compiled"):
    log = out / f"epoch-{mode}.metrics.jsonl"
    if log.exists():
        vals = [json.loads(line) for line in log.read_text().splitlines() if '"kind": "val"' in line]
        if len(vals) >= 2:
            steady = vals[1:]  # epoch 1 holds warm-up (and compilation)
            train_s = sum(v["epoch_seconds"] for v in steady) / len(steady)
            val_s = sum(v.get("val_seconds", 0.0) for v in steady) / len(steady)
            print(f"epoch ({mode}): train s per epoch {[round(v['epoch_seconds'], 1) for v in vals]}, "
                  f"validation {val_s:.1f} s; steady {train_s + val_s:.1f} s -> 300 epochs "
                  f"{300 * (train_s + val_s) / 60:.1f} min ({300 * train_s / 60:.1f} min training alone)")
acc = out / "accuracy.json"
if acc.exists():
    r = json.loads(acc.read_text())
    a, b = r["paths"]["pcltool"], r["paths"]["reference"]
    print(f"accuracy, {r['epochs']} epochs: deployed mean teacher test top-1 (a) {a['chosen_test_top1']:.2f} "
          f"({a['chosen_mean_teacher']}) vs (b) {b['chosen_test_top1']:.2f} ({b['chosen_mean_teacher']}), "
          f"ensemble (a) {a['test_top1']['ensemble']:.2f} vs (b) {b['test_top1']['ensemble']:.2f}; "
          f"wall (a) {a['wall_seconds']:.0f} s, (b) {b['wall_seconds']:.0f} s")
EOF
