#!/usr/bin/env python3
"""Classify a folder of images with a pcltool model — an exported/built ONNX model or a TensorRT engine.

Standalone: numpy, Pillow, and onnxruntime (``.onnx``) or tensorrt (``.plan``); no PyTorch, no pcltool. The
preprocessing is the one recorded in the model (ONNX metadata ``pcltool.*``; for a TensorRT engine, the
``metadata`` in the fingerprint JSON saved beside it): grey-scale or RGB, shorter side resized to ``resize_size``
(bilinear), centre crop to a square and then to the input size, scale to [0, 1], subtract the mean and divide by
the std per channel — exactly what pcltool's evaluation and ``pcltool bench`` do.

    python pcl_infer.py model.onnx images/ [--top-k 3] [--batch 32] [--json]

As a module::

    from pcl_infer import load_model, classify
    model = load_model("mean1.ort-int8.onnx")
    for row in classify(model, ["cat.png", "dog.jpg"], top_k=3): print(row)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
JSON_KEYS = ("class_names", "mean", "std", "input_size", "resize_size", "preprocessing")


# --- preprocessing ------------------------------------------------------------------------------------------------
class Preprocessing:
    """Image file -> the model's input, from the recorded metadata."""

    def __init__(self, meta: dict):
        missing = [k for k in ("input_size", "mean", "std") if k not in meta]
        if missing:
            raise ValueError(f"the model records no {', '.join(missing)} (pcltool.* metadata); "
                             "export it with `pcltool export`")
        self.channels, self.height, self.width = (int(v) for v in meta["input_size"])
        self.mean = np.asarray(meta["mean"], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(meta["std"], dtype=np.float32).reshape(-1, 1, 1)
        self.resize = int(meta.get("resize_size") or max(self.height, self.width))
        self.raw = str(meta.get("input_format", "float32-nchw-normalized")).startswith("uint8")

    def load(self, path: Path) -> np.ndarray:
        """Normalised float32 (C, H, W); for a raw-input model (``uint8-nhwc``) the uint8 (H, W, C) pixels."""
        with Image.open(path) as img:
            img = _resize_and_crop(img.convert("L" if self.channels == 1 else "RGB"), self.resize)
            top, left = (self.resize - self.height) // 2, (self.resize - self.width) // 2
            pixels = np.asarray(img.crop((left, top, left + self.width, top + self.height)), dtype=np.uint8)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]  # (H, W, 1)
        if self.raw:
            return np.ascontiguousarray(pixels)
        return (pixels.transpose(2, 0, 1).astype(np.float32) / 255.0 - self.mean) / self.std


def _resize_and_crop(img, size: int):
    """Shorter side to ``size`` (bilinear; the longer side scaled and truncated), centre ``size`` x ``size`` crop:
    pcltool's decoding (``pcltool.data.preprocess.resize_and_crop``), which training and evaluation used."""
    if img.width <= img.height:
        new = (size, max(size, int(size * img.height / img.width)))
    else:
        new = (max(size, int(size * img.width / img.height)), size)
    if img.size != new:
        img = img.resize(new, Image.BILINEAR)
    if img.size != (size, size):
        left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
    return img


def _decode(meta: dict) -> dict:
    return {k: json.loads(v) if k in JSON_KEYS and isinstance(v, str) else v for k, v in meta.items()}


# --- ONNX Runtime -------------------------------------------------------------------------------------------------
class OnnxModel:
    def __init__(self, path: Path, providers: list[str] | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), providers=providers)
        custom = self.session.get_modelmeta().custom_metadata_map
        self.meta = _decode({k[len("pcltool."):]: v for k, v in custom.items() if k.startswith("pcltool.")})
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.dtype = {"tensor(uint8)": np.uint8, "tensor(float16)": np.float16}.get(inp.type, np.float32)
        self.max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self.dtype)
        return np.asarray(self.session.run([self.output_name], {self.input_name: x})[0], dtype=np.float32)


# --- TensorRT -----------------------------------------------------------------------------------------------------
class _CudaRuntime:
    """The few CUDA runtime calls a TensorRT engine needs, through ctypes (libcudart ships with TensorRT's wheels)."""

    H2D, D2H = 1, 2

    def __init__(self):
        candidates = [ctypes.util.find_library("cudart"), "libcudart.so", "libcudart.so.13", "libcudart.so.12"]
        for base in map(Path, sys.path):
            candidates += [str(p) for p in (base / "nvidia").glob("cu*/lib/libcudart.so*")]
            candidates += [str(p) for p in (base / "nvidia" / "cuda_runtime" / "lib").glob("libcudart.so*")]
        for name in filter(None, candidates):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise RuntimeError("the CUDA runtime (libcudart) was not found; install the NVIDIA driver and TensorRT")
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what} failed (CUDA error {err})")

    def compute_capability(self) -> str:
        major, minor, device = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.cudaGetDevice(ctypes.byref(device)), "cudaGetDevice")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "cudaDeviceGetAttribute")
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "cudaDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst, src, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind),
                    "cudaMemcpy")

    def synchronize(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class TensorRTModel:
    """A serialized engine built by ``pcltool build --engine trt`` on a machine like this one."""

    def __init__(self, path: Path):
        import tensorrt as trt

        self.trt = trt
        fingerprint_file = Path(path).with_suffix(".json")
        if not fingerprint_file.is_file():
            raise RuntimeError(f"{fingerprint_file} is missing: the engine's fingerprint and preprocessing are "
                               "saved there by `pcltool build --engine trt`")
        fingerprint = json.loads(fingerprint_file.read_text())
        self.meta = _decode(fingerprint.get("metadata", {}))
        self.cuda = _CudaRuntime()
        here = {"tensorrt": trt.__version__, "compute_capability": self.cuda.compute_capability()}
        built = {k: fingerprint.get(k) for k in here}
        if built["tensorrt"] != here["tensorrt"] or (fingerprint.get("hardware_compatibility_level", "none") != "ampere+"
                                                     and built["compute_capability"] != here["compute_capability"]):
            raise RuntimeError(f"{path} was built for {built}, this machine has {here}; rebuild the engine here with "
                               "`pcltool build RUN --engine trt`")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path}; rebuild it with `pcltool build RUN --engine trt`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_name = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if n != self.input_name)
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        self.out_dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(self.output_name)))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self.dtype)
        self.context.set_input_shape(self.input_name, x.shape)
        y = np.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype)
        d_in, d_out = self.cuda.malloc(x.nbytes), self.cuda.malloc(y.nbytes)
        try:
            self.cuda.copy(d_in, x.ctypes.data, x.nbytes, _CudaRuntime.H2D)
            self.context.set_tensor_address(self.input_name, d_in)
            self.context.set_tensor_address(self.output_name, d_out)
            if not self.context.execute_async_v3(self.cuda.stream.value or 0):
                raise RuntimeError("TensorRT execution failed")
            self.cuda.synchronize()
            self.cuda.copy(y.ctypes.data, d_out, y.nbytes, _CudaRuntime.D2H)
        finally:
            self.cuda.free(d_in)
            self.cuda.free(d_out)
        return y.astype(np.float32)


# --- the command --------------------------------------------------------------------------------------------------
def load_model(path: str | Path):
    path = Path(path)
    if path.suffix == ".onnx" or path.name.endswith(".onnx.ort-only"):  # .ort-only: ONNX Runtime's own operators
        return OnnxModel(path)
    if path.suffix in (".plan", ".engine", ".trt"):
        return TensorRTModel(path)
    raise ValueError(f"{path}: expected an ONNX model (.onnx) or a TensorRT engine (.plan)")


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images in {folder} ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores of each row, best first; ties go to the lowest index (pcltool's rule:
    the same as ``argmax``)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def classify(model, files: list[Path], top_k: int = 1, batch: int = 32) -> list[dict]:
    """One dict per file: its top-k classes with probabilities."""
    prep = Preprocessing(model.meta)
    names = model.meta.get("class_names")
    batch = min(batch, model.max_batch or batch)
    rows = []
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        logits = model(np.stack([prep.load(f) for f in chunk]))
        # classes are ranked on the logits (softmax can round distinct logits to one probability)
        for f, p, top in zip(chunk, _softmax(logits), top_k_indices(logits, top_k)):
            rows.append({"file": str(f), "predictions": [
                {"class": names[i] if names else int(i), "index": int(i), "probability": float(p[i])} for i in top]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="exported/built ONNX model (.onnx) or TensorRT engine (.plan)")
    parser.add_argument("images", help="an image file or a folder of images (searched recursively)")
    parser.add_argument("--top-k", type=int, default=1, help="classes to print per image (default 1)")
    parser.add_argument("--batch", type=int, default=32, help="images per inference call (default 32)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model)
        rows = classify(model, image_files(args.images), args.top_k, args.batch)
    except (OSError, ValueError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            preds = "  ".join(f"{p['class']} ({p['probability']:.3f})" for p in row["predictions"])
            print(f"{row['file']}\t{preds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
