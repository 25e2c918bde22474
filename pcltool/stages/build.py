"""``pcltool build``: turn the exported FP32 ONNX model into an engine, and verify it before it is recorded.

Engines: ONNX Runtime (fp32: graph optimisations applied and saved; int8: static Q/DQ quantisation calibrated on
training images; fp16: for the CUDA execution provider) and TensorRT (a serialized engine with one optimisation
profile, strongly typed from the fp32 / FP16 / INT8 Q/DQ ONNX) and, where installed, OpenVINO (IR of the fp32
model or of the same INT8 Q/DQ model). An ONNX Runtime engine that only ONNX Runtime can load (the saved graph
optimisations add ``com.microsoft`` operators) is named ``*.onnx.ort-only`` and carries ``pcltool.portable =
false``; the INT8 and FP16 models keep standard operators, ``.onnx`` and ``pcltool.portable = true``. Every
engine is compared with the FP32 ONNX model on the whole validation split (top-1 agreement, max |logit difference|,
top-1 change). A reduced-precision engine fails the build, and then nothing is written, when its top-1 *changes*
by more than ``max_top1_drop`` points in either direction (a rise is as suspicious as a drop), or when its top-1
class agrees with the FP32 model's on fewer than ``min_agreement`` % of the images (a model can keep its accuracy
while predicting other classes).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.markup import escape

from pcltool.errors import BackendUnavailableError, MissingArtifactError, UsageError, VerificationError
from pcltool.manifest import RunDir

ENGINE_PRECISIONS = {"ort": ("fp32", "int8", "fp16"), "trt": ("fp32", "fp16", "int8"), "openvino": ("fp32", "int8")}
ENGINE_DIR = "engines"
TIMING_CACHE = "trt-timing.cache"
DEFAULT_BATCH = (1, 64, 256)
MAX_BATCH = 1 << 16  # larger batches only exhaust memory
FP32_RTOL = 1e-3  # fp32 engines: max |diff| <= FP32_RTOL * max(1, max |reference logit|)
DEFAULT_MAX_TOP1_CHANGE = 1.0  # points of top-1, either direction
DEFAULT_MIN_AGREEMENT = 95.0  # % of validation images whose top-1 class is the FP32 model's


def check_thresholds(max_top1_drop: float, min_agreement: float) -> None:
    """Gate thresholds are percentages: finite and within [0, 100] (NaN would switch the gate off)."""
    for flag, value in (("--max-top1-drop", max_top1_drop), ("--min-agreement", min_agreement)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 100):
            raise UsageError(f"{flag} {value}: expected a number of percentage points between 0 and 100")


# --- what is being built ------------------------------------------------------------------------------------------
def exported_candidates(run: RunDir) -> list[str]:
    return [key.split(":", 1)[1] for key, rec in run.read()["stages"].items()
            if key.startswith("export:") and rec.get("status") == "done"]


def resolve_export(run: RunDir, peer: str | None) -> tuple[str, Path]:
    """The candidate name and verified path of its exported ONNX model.

    ``peer`` may be an exported candidate's name or any selector ``pcltool export --peer`` accepts; without it the
    run's only export is used."""
    exported = exported_candidates(run)
    if not exported:
        raise MissingArtifactError(f"{run.path} has no exported model; run `pcltool export {run.path}` first")
    if peer is None:
        if len(exported) > 1:
            raise UsageError(f"{run.path} has several exported models ({', '.join(exported)}); choose one with --peer")
        name = exported[0]
    elif peer in exported:
        name = peer
    else:
        try:
            from pcltool.stages.export import resolve_candidate
        except ImportError:
            raise UsageError(f"--peer {peer}: not an exported candidate of {run.path} "
                             f"(exported: {', '.join(exported)})") from None
        name = resolve_candidate(run, peer)
    return name, run.artifact(f"export:{name}", "onnx", hint=f"pcltool export {run.path} --peer {name}")


def parse_batch(text: str | tuple | None) -> tuple[int, int, int]:
    """``"1,64,256"`` -> (1, 64, 256); one value N means N,N,N."""
    if text is None:
        return DEFAULT_BATCH
    try:
        parts = [int(p) for p in str(text).split(",") if p.strip()] if isinstance(text, str) else list(text)
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2] <= MAX_BATCH:
        raise UsageError(f"--batch {text}: expected MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}, "
                         "e.g. 1,64,256")
    return tuple(parts)


# --- data the model is checked on ---------------------------------------------------------------------------------
FLOAT_FORMAT = "float32-nchw-normalized"  # the export's default input
RAW_FORMAT = "uint8-nhwc"  # `pcltool export --raw-input`: normalisation inside the graph


def load_run_data(run: RunDir, meta: dict):
    """The run's dataset, after checking that the model's recorded preprocessing is the dataset's."""
    from pcltool.stages.select import load_data
    from pcltool.stages.train import recipe_of_run

    data = load_data(recipe_of_run(run), run)
    for key, expected in (("mean", data.mean), ("std", data.std)):
        recorded = meta.get(key)
        if recorded is not None and not np.allclose(recorded, expected, atol=1e-6):
            raise VerificationError(f"the model's metadata records {key}={recorded} but the run's dataset uses "
                                    f"{list(expected)}; re-export the model")
    resize = meta.get("resize_size")
    if resize is not None and int(resize) != data.preprocessing.resize_size:
        raise VerificationError(f"the model's metadata records resize_size={resize} but the run decodes images at "
                                f"{data.preprocessing.resize_size}; re-export the model")
    if meta.get("input_format", FLOAT_FORMAT) not in (FLOAT_FORMAT, RAW_FORMAT):
        raise VerificationError(f"unknown pcltool.input_format {meta['input_format']!r}; re-export the model")
    return data


def model_batches(data, split, input_format: str = FLOAT_FORMAT, batch_size: int = 256):
    """(model input, int64 labels) numpy batches of ``split``, the eval-time view: centre crop, then normalised
    float32 NCHW — or, for a raw-input model, the uint8 NHWC pixels."""
    from pcltool.data.augment import ViewMaker, center_crop

    views = ViewMaker("none", data.mean, data.std, "cpu", image_size=data.image_size)
    for images, labels in split.batches(batch_size, "cpu"):
        if input_format == RAW_FORMAT:
            x = center_crop(images, data.image_size).permute(0, 2, 3, 1).contiguous().numpy()
        else:
            x = views.eval_view(images).numpy()
        yield x, labels.numpy()


def split_arrays(data, split, input_format: str = FLOAT_FORMAT) -> tuple[list[np.ndarray], np.ndarray]:
    batches, labels = zip(*model_batches(data, split, input_format))
    return list(batches), np.concatenate(labels)


def calibration_set(data, count: int, seed: int, input_format: str = FLOAT_FORMAT) -> tuple[np.ndarray, dict]:
    """``count`` training images (a seeded random draw) as model input, and a record of what they were."""
    from pcltool.runtime.ort import calibration_hash

    if count < 1:
        raise UsageError("--calib-images must be >= 1")
    n = len(data.train)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)].sort().values
    subset = data.train.subset(index)
    raw = torch.cat([images for images, _ in subset.batches(256, "cpu")])
    arrays, _ = split_arrays(data, subset, input_format)
    record = {"images": int(raw.shape[0]), "source": f"train split, seeded random draw (seed {seed})",
              "sha256": calibration_hash(raw.numpy())}
    return np.concatenate(arrays), record


# --- verification -------------------------------------------------------------------------------------------------
def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict:
    """Engine vs FP32 ONNX on the same images: top-1 agreement (%), max |logit diff|, top-1 accuracy and change."""
    ref_pred, cand_pred = reference.argmax(1), candidate.argmax(1)
    ref_top1 = 100.0 * float((ref_pred == labels).mean())
    top1 = 100.0 * float((cand_pred == labels).mean())
    finite = bool(np.isfinite(candidate).all())
    return {"images": int(labels.shape[0]), "top1_agreement": 100.0 * float((ref_pred == cand_pred).mean()),
            "max_abs_diff": float(np.abs(candidate - reference).max()) if finite else None,
            "reference_top1": ref_top1, "top1": top1, "top1_change": top1 - ref_top1, "finite": finite}


def gate(check: dict, precision: str, max_top1_drop: float, reference_scale: float,
         min_agreement: float = DEFAULT_MIN_AGREEMENT) -> None:
    """Raise :class:`VerificationError` listing every failed check."""
    check_thresholds(max_top1_drop, min_agreement)
    failures = []
    if not check["finite"]:
        failures.append("the engine produced NaN or infinite logits")
    change = check["top1_change"]
    if not abs(change) <= max_top1_drop:
        failures.append(f"top-1 {'dropped' if change < 0 else 'rose'} {abs(change):.2f} points "
                        f"({check['reference_top1']:.2f}% -> {check['top1']:.2f}%) on {check['images']} validation "
                        f"images, more than the allowed {max_top1_drop:g} either way")
    if not check["top1_agreement"] >= min_agreement:
        failures.append(f"top-1 agrees with the FP32 model on {check['top1_agreement']:.2f}% of {check['images']} "
                        f"validation images, below the required {min_agreement:g}%")
    tolerance = FP32_RTOL * max(1.0, reference_scale)
    if precision == "fp32" and check["finite"] and check["max_abs_diff"] > tolerance:
        failures.append(f"fp32 logits differ from the ONNX model by up to {check['max_abs_diff']:.3g} "
                        f"(tolerance {tolerance:.3g})")
    if failures:
        raise VerificationError(f"the {precision} engine failed verification against the FP32 ONNX model: "
                                + "; ".join(failures) + ". Nothing was written"
                                + ("; try more --calib-images or --calib-method entropy/percentile"
                                   if precision == "int8" else ""))


# --- the stage ----------------------------------------------------------------------------------------------------
def _check_backend(engine: str, precision: str) -> None:
    """Fail before anything is written when the engine cannot be built here."""
    if engine not in ENGINE_PRECISIONS:
        raise UsageError(f"unknown engine {engine!r}; allowed: {', '.join(ENGINE_PRECISIONS)}")
    if precision not in ENGINE_PRECISIONS[engine]:
        raise UsageError(f"unknown precision {precision!r} for --engine {engine}; allowed: "
                         f"{', '.join(ENGINE_PRECISIONS[engine])}")
    if engine == "trt":
        from pcltool.runtime.tensorrt import import_tensorrt

        import_tensorrt()
    elif engine == "openvino":
        from pcltool.runtime.openvino import import_openvino

        import_openvino()
    elif precision == "fp16":
        from pcltool.runtime.ort import PROVIDERS, available_providers

        if PROVIDERS["cuda"] not in available_providers():
            raise BackendUnavailableError("ONNX Runtime fp16 is for GPU execution providers and this ONNX Runtime "
                                          "has no CUDAExecutionProvider; install onnxruntime-gpu (`pip install "
                                          "pcltool[gpu]`) on a GPU machine, or build fp32/int8 for the CPU")


def _check_trt_flags(engine: str, precision: str) -> None:
    """The weakly typed path exists only where the installed TensorRT still has the precision flags (10.x)."""
    if engine != "trt" or precision == "fp32":
        raise UsageError("--trt-flags applies to --engine trt with --precision fp16 or int8 only")
    from pcltool.runtime.tensorrt import import_tensorrt

    trt = import_tensorrt()
    if not hasattr(trt.BuilderFlag, precision.upper()):
        raise UsageError(f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()} (TensorRT 11 removed "
                         "the precision flags); build without --trt-flags: the strongly typed network from the FP16 / "
                         "INT8 Q/DQ ONNX works on TensorRT 10 and 11")


def run_build(run: RunDir, engine: str = "ort", precision: str = "fp32", peer: str | None = None,
              batch: tuple[int, int, int] = DEFAULT_BATCH, calib_images: int = 512, calib_method: str = "minmax",
              max_top1_drop: float = DEFAULT_MAX_TOP1_CHANGE, threads: int | None = None,
              hardware_compat: str = "none", trt_flags: bool = False, workspace_gib: float = 4.0, console=None,
              min_agreement: float = DEFAULT_MIN_AGREEMENT) -> dict:
    """Build, verify and record ``build:<engine>-<precision>:<candidate>``; returns the stage's metrics."""
    check_thresholds(max_top1_drop, min_agreement)
    check_threads(threads)
    if not 1 <= calib_images <= 1_000_000:
        raise UsageError(f"--calib-images {calib_images}: expected 1 to 1000000 training images")
    _check_backend(engine, precision)
    if engine == "trt" and hardware_compat not in ("none", "ampere+", "same-cc"):
        raise UsageError(f"--hardware-compat {hardware_compat}: allowed none, ampere+, same-cc")
    if trt_flags:
        _check_trt_flags(engine, precision)
    batch = parse_batch(batch)
    with run:
        return _build(run, engine, precision, peer, batch, calib_images, calib_method, max_top1_drop, threads,
                      hardware_compat, trt_flags, workspace_gib, console, min_agreement)


def _build(run, engine, precision, peer, batch, calib_images, calib_method, max_top1_drop, threads, hardware_compat,
           trt_flags, workspace_gib, console, min_agreement) -> dict:
    from pcltool.runtime import ort as ort_rt
    from pcltool.stages.train import recipe_of_run

    candidate, onnx_path = resolve_export(run, peer)
    meta = ort_rt.read_metadata(onnx_path)
    data = load_run_data(run, meta)
    seed = recipe_of_run(run).seed
    key = f"build:{engine}-{precision}:{candidate}"
    out_dir = run.path / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    stem = f"{candidate}.{engine}-{precision}"
    params = {"engine": engine, "precision": precision, "candidate": candidate, "batch": list(batch),
              "max_top1_drop": max_top1_drop, "min_agreement": min_agreement}
    if precision == "int8":
        settings = ort_rt.TRT_INT8 if engine == "trt" else ort_rt.CPU_INT8
        params.update(calib_images=calib_images, calib_method=calib_method, quantization=settings.as_dict())
    if engine == "trt":
        params.update(hardware_compat=hardware_compat, trt_flags=trt_flags, workspace_gib=workspace_gib)
    say = console.print if console is not None else (lambda *a, **k: None)
    with run.running(key, params, inputs={"onnx": onnx_path}):
        t0 = time.perf_counter()
        input_format = meta.get("input_format", FLOAT_FORMAT)
        val_batches, val_labels = split_arrays(data, data.val, input_format)
        reference = ort_rt.OrtEngine(onnx_path, level="basic", threads=threads).predict_all(val_batches)
        metrics: dict = {}
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
            tmp = Path(tmp)
            calib = None
            if precision == "int8":
                calib, metrics["calibration"] = calibration_set(data, calib_images, seed, input_format)
                metrics["calibration"]["method"] = calib_method
            say(f"building {escape(key)} from {escape(run.relative(onnx_path))}")
            if engine == "ort":
                built = _build_ort(onnx_path, tmp, stem, precision, calib, calib_method)
                device = "cuda" if precision == "fp16" else "cpu"
                candidate_engine = ort_rt.OrtEngine(built["engine"], device=device, precision=precision, threads=threads)
            elif engine == "openvino":
                from pcltool.runtime.openvino import OpenVinoEngine

                built = _build_openvino(onnx_path, tmp, stem, precision, calib, calib_method)
                candidate_engine = OpenVinoEngine(built["engine"], precision, threads)
            else:
                built, fingerprint = _build_trt(run, onnx_path, tmp, stem, precision, calib, calib_method, batch,
                                                hardware_compat, trt_flags, workspace_gib, meta)
                metrics["fingerprint"] = {k: v for k, v in fingerprint.items() if k != "metadata"}
                from pcltool.runtime.tensorrt import TrtEngine

                candidate_engine = TrtEngine(built["engine"], precision)
            metrics["build_seconds"] = time.perf_counter() - t0
            say(f"verifying against the FP32 ONNX model on {len(val_labels)} validation images")
            try:
                metrics["verification"] = compare_logits(reference, candidate_engine.predict_all(val_batches),
                                                         val_labels)
            finally:
                candidate_engine.close()
            run.record_metrics(key, metrics)  # kept in the manifest when the gate fails
            gate(metrics["verification"], precision, max_top1_drop, float(np.abs(reference).max()), min_agreement)
            metrics["engine_bytes"] = sum(built[k].stat().st_size for k in ("engine", "weights") if k in built)
            outputs = {}
            for name, path in built.items():
                final = out_dir / path.name
                os.replace(path, final)
                outputs[name] = final
        run.finish(key, outputs, metrics)
    v = metrics["verification"]
    say(f"[green]{escape(key)}[/]: {escape(run.relative(outputs['engine']))}  top-1 {v['top1']:.2f}% "
        f"({v['top1_change']:+.2f} vs fp32 ONNX), agreement {v['top1_agreement']:.2f}%, "
        f"max |diff| {v['max_abs_diff']:.3g}")
    return metrics


def check_threads(threads: int | None) -> None:
    """A thread count from 1 to the machine's logical CPUs (more only oversubscribes the cores)."""
    limit = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= max(limit, 1):
        raise UsageError(f"--threads {threads}: expected 1 to {limit} (this machine's logical CPUs)")


def _build_ort(onnx_path: Path, tmp: Path, stem: str, precision: str, calib, calib_method: str) -> dict[str, Path]:
    from pcltool.runtime import ort as ort_rt

    engine = tmp / f"{stem}.onnx"
    if precision == "fp32":
        ort_rt.optimize(onnx_path, engine)
    elif precision == "int8":
        ort_rt.quantize_int8(onnx_path, engine, calib, ort_rt.CPU_INT8, calib_method)
    else:
        ort_rt.to_fp16(onnx_path, engine)
    return {"engine": ort_rt.label_portability(engine)}


def _build_openvino(onnx_path: Path, tmp: Path, stem: str, precision: str, calib, calib_method: str) -> dict[str, Path]:
    """OpenVINO IR (``.xml`` + ``.bin``) of the FP32 model, or of the same INT8 Q/DQ model the ORT build makes."""
    from pcltool.runtime import ort as ort_rt
    from pcltool.runtime.openvino import convert

    source = onnx_path
    if precision == "int8":
        source = tmp / f"{stem}.qdq.onnx"
        ort_rt.quantize_int8(onnx_path, source, calib, ort_rt.CPU_INT8, calib_method)
    built = convert(source, tmp / f"{stem}.xml")
    if source != onnx_path:
        source.unlink()
    return built


def _build_trt(run: RunDir, onnx_path: Path, tmp: Path, stem: str, precision: str, calib, calib_method: str,
               batch, hardware_compat: str, trt_flags: bool, workspace_gib: float,
               meta: dict) -> tuple[dict[str, Path], dict]:
    from pcltool.runtime import ort as ort_rt
    from pcltool.runtime.tensorrt import build_engine, fingerprint_path

    outputs: dict[str, Path] = {}
    source, weak_flag = onnx_path, None
    if precision == "fp16" and trt_flags:
        weak_flag = "FP16"
    elif precision == "fp16":
        source = outputs["onnx"] = tmp / f"{stem}.onnx"
        ort_rt.to_fp16(onnx_path, source)
    elif precision == "int8":
        source = outputs["onnx"] = tmp / f"{stem}.qdq.onnx"
        ort_rt.quantize_int8(onnx_path, source, calib, ort_rt.TRT_INT8, calib_method)
        weak_flag = "INT8" if trt_flags else None
    plan = outputs["engine"] = tmp / f"{stem}.plan"
    fingerprint = build_engine(source, plan, batch, precision, weak_flag, hardware_compat, workspace_gib,
                               timing_cache=run.path / ENGINE_DIR / TIMING_CACHE, metadata=meta)
    outputs["fingerprint"] = fingerprint_path(plan)
    return outputs, fingerprint


def run_triton(run: RunDir, out: Path, engine: str = "ort", precision: str = "fp32", peer: str | None = None,
               name: str | None = None, max_batch: int | None = None, instances: int = 1, force: bool = False) -> Path:
    """``pcltool deploy triton``: a Triton model repository for a built engine (ORT fp32 may use the export)."""
    from pcltool.runtime import triton
    from pcltool.runtime.ort import read_metadata

    if max_batch is not None and not 1 <= max_batch <= MAX_BATCH:
        raise UsageError(f"--max-batch {max_batch}: expected a batch size from 1 to {MAX_BATCH}")
    if not 1 <= instances <= 64:
        raise UsageError(f"--instances {instances}: expected 1 to 64 model instances")
    triton.check_output_folder(out)
    allowed = {e: p for e, p in ENGINE_PRECISIONS.items() if e != "openvino"}  # Triton's onnxruntime/tensorrt
    if engine not in allowed or precision not in allowed[engine]:
        raise UsageError(f"--engine {engine} --precision {precision}: allowed engines "
                         + "; ".join(f"{e} ({', '.join(p)})" for e, p in allowed.items()))
    candidate, onnx_path = resolve_export(run, peer)
    key = f"build:{engine}-{precision}:{candidate}"
    record = run.stage(key)
    if record is None and engine == "ort" and precision == "fp32":
        model_file, batch = onnx_path, DEFAULT_BATCH  # ONNX Runtime optimises the export when it loads it
    else:
        model_file = run.artifact(key, "engine", hint=f"pcltool build {run.path} --engine {engine} "
                                                     f"--precision {precision}")
        batch = tuple(record["params"].get("batch", DEFAULT_BATCH))
    meta = read_metadata(onnx_path)
    extra = {}
    if engine == "trt":
        extra["fingerprint.json"] = run.artifact(key, "fingerprint")
        if batch[0] > 1:
            raise UsageError(f"the engine's profile starts at batch {batch[0]}; Triton sends batches from 1: rebuild "
                             f"with --batch 1,{batch[1]},{batch[2]}")
    limit = max_batch or batch[2]
    if limit > batch[2]:
        raise UsageError(f"--max-batch {limit} is outside the engine's profile (max {batch[2]}); rebuild with a "
                         "larger --batch MIN,OPT,MAX")
    preferred = sorted({min(batch[1], limit), limit})
    return triton.write_repository(out, name or f"{candidate}_{engine}_{precision}".replace("-", "_"), engine,
                                   model_file, meta, limit, preferred, gpu=engine == "trt" or precision == "fp16",
                                   instances=instances, force=force, extra_files=extra)
