"""A Triton Inference Server model repository for one engine::

    OUT/<name>/config.pbtxt        platform, max_batch_size, inputs/outputs (dims without the batch axis),
                                   dynamic_batching, instance_group
    OUT/<name>/1/model.onnx        (ONNX Runtime backend) or 1/model.plan (TensorRT backend)
    OUT/<name>/labels.txt          class names, one per line (Triton's classification extension)
    OUT/<name>/preprocessing.json  what a client must do to an image first (from the model's metadata)

The directory is assembled beside ``OUT/<name>`` and renamed into place, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pcltool.errors import UsageError

PLATFORMS = {"ort": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "uint8": "TYPE_UINT8"}


def config_pbtxt(name: str, engine: str, input_dims: list[int], num_classes: int, max_batch: int,
                 preferred_batch: list[int], input_type: str = "float32", gpu: bool = False, instances: int = 1,
                 input_name: str = "images", output_name: str = "logits") -> str:
    platform, _ = PLATFORMS[engine]
    preferred = ", ".join(str(b) for b in preferred_batch)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{input_name}"
    data_type: {TRITON_TYPES[input_type]}
    dims: [ {", ".join(str(d) for d in input_dims)} ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: 100
}}
instance_group [
  {{
    count: {instances}
    kind: {"KIND_GPU" if gpu else "KIND_CPU"}
  }}
]
"""


def check_output_folder(out: Path) -> None:
    """``out`` (or a folder above it) must not be an existing file."""
    for folder in (Path(out), *Path(out).parents):
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file, not a folder; choose another OUT for the model repository")


def write_repository(out: Path, name: str, engine: str, model_file: Path, meta: dict, max_batch: int,
                     preferred_batch: list[int], gpu: bool, instances: int = 1, force: bool = False,
                     extra_files: dict[str, Path] | None = None) -> Path:
    """Write ``out/name`` (see the module docstring); returns its path."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UsageError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    target = Path(out) / name
    check_output_folder(out)
    if target.exists() and not force:
        raise UsageError(f"{target} already exists; pass --force to replace it")
    size = meta.get("input_size")
    classes = meta.get("class_names")
    if not size or not classes:
        raise UsageError(f"{model_file} records no pcltool.input_size / pcltool.class_names metadata; re-export it")
    raw = str(meta.get("input_format", "")).startswith("uint8")
    Path(out).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(model_file, tmp / "1" / PLATFORMS[engine][1])
        for filename, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / filename)
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, engine, list(size), len(classes), max_batch,
                                                       preferred_batch, "uint8" if raw else "float32", gpu, instances))
        (tmp / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
        (tmp / "preprocessing.json").write_text(json.dumps(
            {k: meta.get(k) for k in ("input_size", "mean", "std", "input_format", "resize_size", "interpolation",
                                      "preprocessing") if k in meta},
            indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
