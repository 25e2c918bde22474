"""``pcltool bench``: accuracy and latency of every available backend and precision, side by side.

Rows: the deployed (pruned) network in PyTorch eager (and ``torch.compile``), every ONNX Runtime engine the run
has built (CPU, CUDA and TensorRT execution providers where present), every TensorRT engine — plus, as reference
points in PyTorch eager, the unpruned multi-branch network answering with the same branch and the peer-ensemble
teacher, so the table shows what pruning bought. Each row: top-1 (top-5 for >= 100 classes) on the test split,
size, params, FLOPs, and per batch size p50/p90/p99 latency, throughput and the coefficient of variation
(:mod:`pcltool.runtime.timing`); CPU rows also show how far they are from the FLOP floor (FLOPs / measured peak).

``bench.json`` and ``bench.csv`` are rewritten after every measurement, so an interrupted bench keeps what had
finished. This module measures; :mod:`pcltool.stages.bench_table` prints the table and
:mod:`pcltool.stages.bench_plot` draws ``bench.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pcltool.errors import BackendUnavailableError, EngineMismatchError, UsageError
from pcltool.manifest import RunDir, atomic_write_text, now
from pcltool.ranking import top_k_accuracy
from pcltool.runtime.ort import read_metadata
from pcltool.stages.bench_plot import plot
from pcltool.stages.build import FLOAT_FORMAT, MAX_BATCH, check_threads, load_run_data, resolve_export, split_arrays

BENCH_JSON, BENCH_CSV, BENCH_PNG = "bench.json", "bench.csv", "bench.png"
ENGINE_CHOICES = ("torch", "torch-compile", "ort", "trt", "openvino", "all")
DEFAULT_BATCHES = (1, 8, 64, 256)
CSV_FIELDS = ("model", "role", "backend", "provider", "precision", "device", "status", "size_mb", "params", "flops",
              "top1", "top5", "batch", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput", "cv", "iterations",
              "stable", "flop_floor_ms", "x_floor", "note")


@dataclass
class Variant:
    """One row of the table: a model on one backend/precision/device, created lazily by ``make``."""

    model: str
    role: str  # "deployed", "unpruned", "teacher"
    backend: str
    precision: str
    device: str
    make: Callable[[], object] | None
    params: int | None = None
    flops: int | None = None
    size_bytes: int | None = None
    artifact: str | None = None
    provider: str = ""
    status: str = "pending"
    note: str = ""
    input_format: str = FLOAT_FORMAT
    top1: float | None = None
    top5: float | None = None
    results: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        via = f"/{self.provider}" if self.provider else ""
        return f"{self.model} | {self.backend}{via} {self.precision} {self.device}"

    def summary(self) -> dict:
        return {"key": self.key, "model": self.model, "role": self.role, "backend": self.backend,
                "provider": self.provider, "precision": self.precision, "device": self.device, "status": self.status,
                "note": self.note, "artifact": self.artifact, "size_mb": _mb(self.size_bytes), "params": self.params,
                "flops": self.flops, "top1": self.top1, "top5": self.top5}


def _mb(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def parse_batches(text: str | tuple) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(",") if b.strip()) if isinstance(text, str) else tuple(text)
    except ValueError:
        batches = ()
    if not batches or any(not 1 <= b <= MAX_BATCH for b in batches):
        raise UsageError(f"--batch {text}: expected batch sizes from 1 to {MAX_BATCH} separated by commas, "
                         "e.g. 1,8,64,256")
    return batches


def parse_engines(text: str | tuple) -> tuple[str, ...]:
    names = [e.strip() for e in text.split(",")] if isinstance(text, str) else list(text)
    unknown = [e for e in names if e not in ENGINE_CHOICES]
    if unknown or not names:
        raise UsageError(f"unknown engine {', '.join(unknown) or '(none)'}; allowed: {', '.join(ENGINE_CHOICES)}")
    if "all" in names:
        return ("torch", "torch-compile", "ort", "trt", "openvino")
    return tuple(dict.fromkeys(names))


# --- the models -----------------------------------------------------------------------------------------------------
class BranchOf(nn.Module):
    """The whole multi-branch network (every peer and the ensemble head run) answering with one peer's logits."""

    def __init__(self, net: nn.Module, index: int):
        super().__init__()
        self.net, self.index = net, index

    def forward(self, x):
        return self.net(x)[0][self.index]


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _load_models(run: RunDir, candidate: str) -> dict:
    """The deployed network (``prune:<candidate>``), and from the checkpoint it was cut from: the multi-branch
    network answering with the same branch, and the peer-ensemble teacher."""
    from pcltool.models import EnsembleTeacher
    from pcltool.stages.prune import load_pruned
    from pcltool.stages.select import load_run, parse_candidate

    models: dict = {}
    weights = run.artifact(f"prune:{candidate}", "weights", hint=f"pcltool prune {run.path} --peer {candidate}")
    card = json.loads(run.artifact(f"prune:{candidate}", "card").read_text())
    models["pruned"] = (load_pruned(weights, card), weights.stat().st_size, run.relative(weights))
    loaded = load_run(run, card.get("checkpoint", "last"), torch.device("cpu"))
    source, index = parse_candidate(candidate)
    net = loaded.network(source)
    if index is not None:
        models["unpruned"] = BranchOf(net, index)
    if net.ensemble_head is not None:
        models["teacher"] = EnsembleTeacher(net).eval()
    return models


def plan_variants(run: RunDir, candidate: str, onnx_path: Path, data, engines: tuple[str, ...], device: str,
                  threads: int, input_format: str) -> list[Variant]:
    from pcltool.runtime.torch_engine import TorchEngine
    from pcltool.stages.select import count_flops, count_params

    input_size = [data.in_channels, data.image_size, data.image_size]
    models = _load_models(run, candidate)
    model, size, artifact = models["pruned"]
    params, flops = count_params(model), count_flops(model, input_size)
    deployed = f"{candidate} (pruned)"
    variants: list[Variant] = []
    for kind in ("torch", "torch-compile"):
        if kind in engines:
            for precision in ("fp32", "fp16", "bf16") if device == "cuda" else ("fp32",):
                variants.append(Variant(deployed, "deployed", kind, precision, device,
                                        lambda p=precision, c=kind != "torch": TorchEngine(model, device, p, c),
                                        params, flops, size, artifact))
    if "torch" in engines:
        references = (("unpruned", lambda net: f"pcl-network ({net.net.num_peers} branches, unpruned)"),
                      ("teacher", lambda net: "ensemble teacher"))
        for role, name in references:
            if role in models:
                net = models[role]
                variants.append(Variant(name(net), role, "torch", "fp32", device,
                                        lambda n=net: TorchEngine(n, device), count_params(net),
                                        count_flops(net, input_size), _tensor_bytes(net)))
    if "ort" in engines:
        variants += _ort_variants(run, candidate, onnx_path, deployed, device, threads, params, flops)
    if "trt" in engines:
        variants += _trt_variants(run, candidate, deployed, device, params, flops)
    if "openvino" in engines:
        variants += _openvino_variants(run, candidate, deployed, device, threads, params, flops)
    for v in variants:
        if v.backend in ("ort", "trt", "openvino"):
            v.input_format = input_format
    return variants


def _built(run: RunDir, engine: str, candidate: str) -> dict[str, Path]:
    """precision -> engine path of every finished ``build:<engine>-<precision>:<candidate>`` (sha256-checked)."""
    found = {}
    for key, rec in run.read()["stages"].items():
        parts = key.split(":")
        if len(parts) == 3 and parts[0] == "build" and parts[2] == candidate and rec.get("status") == "done":
            kind, precision = parts[1].split("-", 1)
            if kind == engine:
                found[precision] = run.artifact(key, "engine")
    return found


def _ort_variants(run, candidate, onnx_path, deployed, device, threads, params, flops) -> list[Variant]:
    from pcltool.runtime.ort import PROVIDERS, OrtEngine, available_providers

    built = _built(run, "ort", candidate)
    built.setdefault("fp32", onnx_path)  # ORT applies the same optimisations online
    if device == "cpu":
        wanted = [(p, None) for p in ("fp32", "int8") if p in built]
    else:
        wanted = [(p, None) for p in ("fp32", "fp16") if p in built]
        if PROVIDERS["tensorrt"] in available_providers():
            wanted.append(("fp32", "tensorrt"))
    variants = []
    for precision, provider in wanted:
        path = built[precision]
        v = Variant(deployed, "deployed", "ort", precision, device,
                    lambda p=path, pr=precision, pv=provider: OrtEngine(p, device, pr, pv, threads),
                    params, flops, path.stat().st_size, run.relative(path),
                    provider=provider or ("cuda" if device == "cuda" else "cpu"))
        variants.append(v)
    if device == "cuda" and "fp16" not in built:
        variants.append(Variant(deployed, "deployed", "ort", "fp16", device, None, params, flops, provider="cuda",
                                status="skipped", note="not built: pcltool build RUN --engine ort --precision fp16"))
    return variants


def _trt_variants(run, candidate, deployed, device, params, flops) -> list[Variant]:
    from pcltool.runtime.tensorrt import TrtEngine, tensorrt_available

    built = _built(run, "trt", candidate)
    if not built:
        return [Variant(deployed, "deployed", "trt", "-", device, None, params, flops, status="skipped",
                        note="no TensorRT engine built: pcltool build RUN --engine trt")]
    reason = ""
    if device != "cuda":
        reason = "TensorRT engines run on a GPU: use --device cuda"
    elif not tensorrt_available():
        reason = "TensorRT is not installed (pip install 'pcltool[tensorrt]')"
    variants = []
    for precision, path in sorted(built.items()):
        make = None if reason else (lambda p=path, pr=precision: TrtEngine(p, pr))
        variants.append(Variant(deployed, "deployed", "trt", precision, "cuda", make, params, flops,
                                path.stat().st_size, run.relative(path), status="skipped" if reason else "pending",
                                note=reason))
    return variants


def _openvino_variants(run, candidate, deployed, device, threads, params, flops) -> list[Variant]:
    from pcltool.runtime.openvino import INSTALL_HINT, OpenVinoEngine, openvino_available

    built = _built(run, "openvino", candidate)
    if not built:
        return [Variant(deployed, "deployed", "openvino", "-", "cpu", None, params, flops, status="skipped",
                        note="no OpenVINO engine built: pcltool build RUN --engine openvino")]
    reason = ("OpenVINO runs on the CPU here: use --device cpu" if device != "cpu"
              else "" if openvino_available() else INSTALL_HINT)
    variants = []
    for precision, path in sorted(built.items()):
        size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
        make = None if reason else (lambda p=path, pr=precision: OpenVinoEngine(p, pr, threads))
        variants.append(Variant(deployed, "deployed", "openvino", precision, "cpu", make, params, flops, size,
                                run.relative(path), status="skipped" if reason else "pending", note=reason))
    return variants


# --- measuring ------------------------------------------------------------------------------------------------------
def _batch_of(test_batches: list[np.ndarray], n: int) -> np.ndarray:
    images = np.concatenate(test_batches[: -(-n // test_batches[0].shape[0])])
    reps = -(-n // images.shape[0])
    return np.ascontiguousarray(np.concatenate([images] * reps)[:n]) if reps > 1 else np.ascontiguousarray(images[:n])


class BenchFiles:
    """bench.json / bench.csv, rewritten atomically after every measurement."""

    def __init__(self, run: RunDir, header: dict):
        self.run, self.header = run, header
        self.variants: list[Variant] = []

    def save(self, status: str) -> None:
        doc = {**self.header, "status": status, "updated": now(), "variants": [v.summary() for v in self.variants],
               "results": [{"variant": v.key, **r} for v in self.variants for r in v.results]}
        atomic_write_text(self.run.path / BENCH_JSON, json.dumps(doc, indent=2) + "\n")
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for v in self.variants:
            for row in v.results or [{}]:
                writer.writerow({**v.summary(), **row, "params": v.params, "flops": v.flops})
        atomic_write_text(self.run.path / BENCH_CSV, out.getvalue())


def run_bench(run: RunDir, engines=("torch", "ort", "trt"), batches=DEFAULT_BATCHES, device: str = "auto",
              threads: int | None = None, peer: str | None = None, max_seconds: float = 3.0, console=None) -> dict:
    """Benchmark, write bench.json/csv/png, record the ``bench`` stage; returns the bench.json document."""
    engines, batches = parse_engines(engines), parse_batches(batches)
    check_threads(threads)
    if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds) and 0 < max_seconds <= 3600):
        raise UsageError(f"--max-seconds {max_seconds}: expected a time limit above 0 and at most 3600 seconds")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"--device {device}: allowed auto, cpu, cuda")
    threads = threads or torch.get_num_threads()
    with run:
        candidate, onnx_path = resolve_export(run, peer)
        meta = read_metadata(onnx_path)
        data = load_run_data(run, meta)
        params = {"engines": list(engines), "batches": list(batches), "device": device, "threads": threads,
                  "candidate": candidate, "max_seconds": max_seconds}
        inputs = {"onnx": onnx_path, **_bench_inputs(run, candidate)}
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        # Denormal floats take slow microcode paths on x86: PyTorch (here) and ONNX Runtime
        # (session.set_denormal_as_zero) both flush them to zero, so neither is timed on that accident.
        params["flush_denormal"] = torch.set_flush_denormal(True)
        try:
            with run.running("bench", params, inputs):
                doc = _bench(run, candidate, onnx_path, meta, data, params, console)
                outputs = {"json": run.path / BENCH_JSON, "csv": run.path / BENCH_CSV}
                if (run.path / BENCH_PNG).exists():
                    outputs["plot"] = run.path / BENCH_PNG
                best = _best_rows(doc)
                run.finish("bench", outputs, {"variants": len(doc["variants"]), "best": best})
        finally:
            torch.set_num_threads(previous_threads)
            torch.set_flush_denormal(False)
    return doc


def _bench_inputs(run: RunDir, candidate: str) -> dict[str, Path]:
    """Every artifact the bench reads, so ``pcltool run`` can tell when it is stale."""
    found = {"checkpoint": run.artifact("train", "checkpoint")}
    for key, rec in run.read()["stages"].items():
        if rec.get("status") == "done" and key.startswith(("build:", "prune:")) and key.endswith(f":{candidate}"):
            for name in rec["outputs"]:
                found[f"{key}/{name}"] = run.artifact(key, name)
    return found


def _header(run: RunDir, candidate: str, params: dict) -> dict:
    """What the bench ran on: CPU (and, for CPU rows, its measured peak FP32 rate), GPU, library versions."""
    from pcltool.runtime import hardware

    cpu = hardware.cpu_info()
    header = {"schema": 1, "run": str(run.path), "run_id": run.run_id, "candidate": candidate, "started": now(),
              "settings": params, "split": "test",
              "hardware": {"cpu": cpu, "gpu": hardware.gpu_info()}, "software": hardware.library_versions()}
    if params["device"] == "cpu":
        header["hardware"]["peak_fp32"] = {"measured": hardware.measure_peak_fp32(params["threads"]),
                                           "nominal": hardware.nominal_peak_fp32(cpu, params["threads"])}
    return header


def _time(engine, v: Variant, test_batches: list[np.ndarray], batch: int, peak: float | None,
          max_seconds: float) -> dict:
    from pcltool.runtime.timing import measure

    if batch < engine.min_batch or (engine.max_batch is not None and batch > engine.max_batch):
        return {"batch": batch, "note": f"outside the engine's profile {engine.min_batch}..{engine.max_batch}"}
    t = measure(engine, _batch_of(test_batches, batch), max_seconds=max_seconds).as_dict()
    if peak and v.device == "cpu" and v.precision == "fp32" and v.flops:  # the floor of FP32 arithmetic
        t["flop_floor_ms"] = v.flops * batch / (peak * 1e9) * 1e3
        t["x_floor"] = t["p50_ms"] / t["flop_floor_ms"]
    return t


def _bench(run: RunDir, candidate: str, onnx_path: Path, meta: dict, data, params: dict, console) -> dict:
    files = BenchFiles(run, _header(run, candidate, params))
    peak = files.header["hardware"].get("peak_fp32", {}).get("measured", {}).get("gflops")
    batches = params["batches"]
    files.variants = plan_variants(run, candidate, onnx_path, data, params["engines"], params["device"],
                                   params["threads"], meta.get("input_format", FLOAT_FORMAT))
    tests = {fmt: split_arrays(data, data.test, fmt) for fmt in {v.input_format for v in files.variants}}
    todo = [v for v in files.variants if v.status == "pending"]
    files.save("running")
    progress = _progress(console, len(todo) * (len(batches) + 1))
    try:
        with progress:
            for v in todo:
                task = f"{v.model} · {v.backend} {v.precision}"
                test_batches, test_labels = tests[v.input_format]
                try:
                    engine = v.make()
                    logits = engine.predict_all(test_batches)
                except (BackendUnavailableError, EngineMismatchError) as err:
                    v.status, v.note = "skipped", str(err)
                except Exception as err:  # e.g. torch.compile without a working compiler: recorded, not fatal
                    v.status, v.note = "failed", f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                if v.status != "pending":
                    progress.advance(len(batches) + 1, task)
                    files.save("running")
                    continue
                v.status, v.top1 = "ok", top_k_accuracy(logits, test_labels, 1)
                v.top5 = top_k_accuracy(logits, test_labels, 5) if data.num_classes >= 100 else None
                progress.advance(1, task)
                for b in batches:
                    v.results.append(_time(engine, v, test_batches, b, peak, params["max_seconds"]))
                    progress.advance(1, f"{task} · batch {b}")
                    files.save("running")
                engine.close()
    except BaseException:
        files.save("interrupted")
        raise
    _floor_after(files, params)
    files.header["finished"] = now()
    files.save("done")
    doc = json.loads((run.path / BENCH_JSON).read_text())
    plot(doc, run.path / BENCH_PNG)
    return doc


PEAK_DISAGREEMENT = 0.15  # two peak measurements further apart than this: the machine was busy


def _floor_after(files: BenchFiles, params: dict) -> None:
    """Measure the peak FP32 rate again after the bench and base "x floor" on the higher of the two (load only
    lowers a measured peak). Flag every figure below 1 (faster than the peak: impossible, so the peak was measured
    low) and, when the two peak measurements disagree by more than 15 %, every figure of the bench."""
    from pcltool.runtime import hardware

    peak = files.header["hardware"].get("peak_fp32")
    if not peak:
        return
    before = peak["measured"]["gflops"]
    after = hardware.measure_peak_fp32(params["threads"])["gflops"]
    best = max(before, after)
    peak["measured_after"] = {"gflops": after}
    peak["measured"]["gflops_before"] = before
    peak["measured"]["gflops"] = best
    peak["disagreement"] = abs(before - after) / best
    peak["stable"] = peak["disagreement"] <= PEAK_DISAGREEMENT
    for v in files.variants:
        for r in v.results:
            if "flop_floor_ms" in r:
                r["flop_floor_ms"] = v.flops * r["batch"] / (best * 1e9) * 1e3
                r["x_floor"] = r["p50_ms"] / r["flop_floor_ms"]
                r["x_floor_suspect"] = r["x_floor"] < 1 or not peak["stable"]


def _best_rows(doc: dict) -> dict:
    """Per batch size: the fastest variant (p50) — a one-line answer in the manifest."""
    best = {}
    for r in doc["results"]:
        if "p50_ms" in r and (r["batch"] not in best or r["p50_ms"] < best[r["batch"]]["p50_ms"]):
            best[r["batch"]] = {"variant": r["variant"], "p50_ms": r["p50_ms"]}
    return {str(k): v for k, v in sorted(best.items())}


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def advance(self, n: int, description: str) -> None:
        pass


class _Progress:
    def __init__(self, console, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.description}"), console=console, transient=True)
        self.task = self.progress.add_task("", total=total)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def advance(self, n: int, description: str) -> None:
        self.progress.update(self.task, advance=n, description=description)


def _progress(console, total: int):
    return _Progress(console, total) if console is not None else _NoProgress()
