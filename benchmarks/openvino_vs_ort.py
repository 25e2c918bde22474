"""OpenVINO against ONNX Runtime on the same ONNX model, side by side in one process (BENCHMARKS.md, issue 12).

    python benchmarks/openvino_vs_ort.py                         # ResNet-32, CIFAR input (3x32x32), 10 classes
    python benchmarks/openvino_vs_ort.py --onnx runs/x/exports/mean1.onnx --int8 runs/x/engines/mean1.ort-int8.onnx

Without ``--onnx`` a freshly initialised backbone is exported (latency does not depend on the weights) and
quantised with pcltool's CPU INT8 settings on Gaussian calibration images. Both runtimes read the same files:
the FP32 ONNX model and the INT8 Q/DQ model. The four engines are timed in rotation, ``--rounds`` times, with
pcltool's latency measurement, and each keeps its fastest median, so a busy machine's slow moments fall on all of
them alike. Prints one line per batch size and precision: p50 of each runtime and OpenVINO / ONNX Runtime.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def _export(backbone: str, size: int, classes: int, out: Path) -> None:
    import torch

    from pcltool.models.registry import create_backbone

    net = create_backbone(backbone, classes).eval()
    torch.onnx.export(net, (torch.randn(1, 3, size, size),), str(out), input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="FP32 ONNX model (default: export --backbone)")
    parser.add_argument("--int8", type=Path, help="INT8 Q/DQ ONNX model (default: quantise --onnx)")
    parser.add_argument("--backbone", default="resnet32")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", default="1,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()

    from pcltool.runtime.openvino import OpenVinoEngine, openvino_version
    from pcltool.runtime.ort import CPU_INT8, OrtEngine, quantize_int8
    from pcltool.runtime.timing import measure

    tmp = Path(tempfile.mkdtemp(prefix="ov-vs-ort-"))
    fp32 = args.onnx or tmp / f"{args.backbone}.onnx"
    if args.onnx is None:
        _export(args.backbone, args.size, 10, fp32)
    int8 = args.int8 or tmp / f"{fp32.stem}.int8.onnx"
    if args.int8 is None:
        calib = np.random.default_rng(0).standard_normal((256, 3, args.size, args.size)).astype(np.float32)
        quantize_int8(fp32, int8, calib, CPU_INT8)
    engines = {("ort", "fp32"): OrtEngine(fp32, threads=args.threads),
               ("openvino", "fp32"): OpenVinoEngine(fp32, "fp32", threads=args.threads),
               ("ort", "int8"): OrtEngine(int8, precision="int8", threads=args.threads),
               ("openvino", "int8"): OpenVinoEngine(int8, "int8", threads=args.threads)}
    batches = [int(b) for b in args.batch.split(",")]
    rng = np.random.default_rng(1)
    images = {b: rng.standard_normal((b, 3, args.size, args.size)).astype(np.float32) for b in batches}
    for precision in ("fp32", "int8"):  # same input, same answer (INT8: within quantisation noise)
        a, b = (engines[(rt, precision)].predict(images[batches[0]]) for rt in ("ort", "openvino"))
        print(f"{precision}: max |ORT - OpenVINO| = {np.abs(a - b).max():.3g} on batch {batches[0]}")
    best: dict = {}
    for _ in range(args.rounds):
        for b in batches:
            for key, engine in engines.items():
                p50 = measure(engine, images[b], max_seconds=args.max_seconds).p50_ms
                best[(key, b)] = min(best.get((key, b), float("inf")), p50)
    rows = []
    for b in batches:
        for precision in ("fp32", "int8"):
            ort_ms, ov_ms = best[(("ort", precision), b)], best[(("openvino", precision), b)]
            rows.append({"batch": b, "precision": precision, "ort_p50_ms": ort_ms, "openvino_p50_ms": ov_ms,
                         "openvino_over_ort": ov_ms / ort_ms})
            print(f"batch {b:4d} {precision}: ORT {ort_ms:8.3f} ms   OpenVINO {ov_ms:8.3f} ms   "
                  f"OpenVINO/ORT {ov_ms / ort_ms:.2f}x")
    import onnxruntime

    doc = {"model": str(fp32) if args.onnx else f"{args.backbone} {args.size}x{args.size} (random init)",
           "threads": args.threads, "rounds": args.rounds, "onnxruntime": onnxruntime.__version__,
           "openvino": openvino_version(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
