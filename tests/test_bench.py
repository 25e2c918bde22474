"""``pcltool bench`` (output schema, plot, interruption), the latency measurement, and ``pcltool run``."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.errors import UsageError
from pcltool.manifest import RunDir
from pcltool.runtime import Engine
from pcltool.runtime.timing import measure, median_ci_rel
from pcltool.stages.bench import CSV_FIELDS, parse_batches, parse_engines, run_bench
from pcltool.stages.bench_plot import pareto_front
from tests.test_build import (  # noqa: F401  (fixtures)
    CANDIDATE, _one_thread, built_run, exported_run, exported_template, int8_template)

FAST = {"max_seconds": 0.3}


def test_bench_writes_json_csv_and_plot(built_run):
    run = RunDir.open(built_run)
    doc = run_bench(run, engines="torch,ort", batches=(1, 16), device="cpu", **FAST)
    assert doc["status"] == "done" and doc["candidate"] == CANDIDATE and doc["split"] == "test"
    hw, sw = doc["hardware"], doc["software"]
    assert hw["cpu"]["model"] and hw["cpu"]["logical_cpus"] >= 1
    assert hw["peak_fp32"]["measured"]["gflops"] > 0 and "sgemm" in hw["peak_fp32"]["measured"]["method"]
    assert {"torch", "onnxruntime", "onnx", "numpy", "python"} <= set(sw)
    rows = {(v["role"], v["backend"], v["precision"]): v for v in doc["variants"]}
    assert {("deployed", "torch", "fp32"), ("unpruned", "torch", "fp32"), ("teacher", "torch", "fp32"),
            ("deployed", "ort", "fp32"), ("deployed", "ort", "int8")} <= set(rows)
    deployed = rows[("deployed", "torch", "fp32")]
    assert rows[("unpruned", "torch", "fp32")]["flops"] > deployed["flops"] > 0  # what pruning bought
    assert rows[("deployed", "ort", "int8")]["size_mb"] < rows[("deployed", "ort", "fp32")]["size_mb"]
    for v in doc["variants"]:
        assert v["status"] == "ok" and 0 <= v["top1"] <= 100
    # the same network gives the same top-1 in PyTorch, in ONNX Runtime and inside the multi-branch network
    assert deployed["top1"] == rows[("deployed", "ort", "fp32")]["top1"] == rows[("unpruned", "torch", "fp32")]["top1"]
    assert len(doc["results"]) == len(doc["variants"]) * 2
    for r in doc["results"]:
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["iterations"] >= 6 and r["throughput"] > 0
        assert r["cv"] >= 0
        if "int8" in r["variant"]:
            assert "x_floor" not in r  # the FLOP floor is FP32 arithmetic's
        else:
            assert r["flop_floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["p50_ms"] / r["flop_floor_ms"])

    with (built_run / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0].keys()) == CSV_FIELDS and len(table) == len(doc["results"])
    assert (built_run / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = run.require("bench")
    assert set(record["outputs"]) == {"json", "csv", "plot"} and record["params"]["batches"] == [1, 16]
    assert set(record["metrics"]["best"]) == {"1", "16"}


def test_interrupted_bench_keeps_what_finished(built_run, monkeypatch):
    import pcltool.runtime.timing as timing

    real, calls = timing.measure, []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(timing, "measure", interrupted)
    run = RunDir.open(built_run)
    with pytest.raises(KeyboardInterrupt):
        run_bench(run, engines="ort", batches=(1, 2, 4), device="cpu", **FAST)
    doc = json.loads((built_run / "bench.json").read_text())
    assert doc["status"] == "interrupted" and [r["batch"] for r in doc["results"]] == [1, 2]
    assert run.stage("bench")["status"] == "interrupted"  # Ctrl-C / SIGTERM: interrupted, not failed


class _Sleeper(Engine):
    """An engine whose run takes a known time (tests the timing loop, not a model)."""

    backend = "sleep"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def prepare(self, images):
        return images

    def run(self, prepared):
        time.sleep(self.seconds)
        return prepared


def test_measure_reports_percentiles_of_the_call():
    t = measure(_Sleeper(0.002), np.zeros((4, 1, 2, 2), np.float32), warmup_s=0.01, max_seconds=0.5)
    assert 2.0 <= t.p50_ms < 10 and t.p50_ms <= t.p90_ms <= t.p99_ms and t.batch == 4
    assert t.throughput == pytest.approx(4 / t.mean_ms * 1e3) and t.iterations >= 20


def test_median_ci_and_pareto_front():
    assert median_ci_rel(np.full(100, 5.0)) == 0.0
    assert median_ci_rel(np.array([1.0, 2.0])) == float("inf")
    # (latency, accuracy): 1 is dominated by 0 (slower and less accurate); 3 is the slow but best one
    assert pareto_front([(1.0, 90.0), (2.0, 89.0), (0.5, 80.0), (5.0, 95.0)]) == [2, 0, 3]


def test_parsing_bench_options():
    assert parse_batches("1,8,64") == (1, 8, 64)
    assert parse_engines("all") == ("torch", "torch-compile", "ort", "trt", "openvino")
    for bad in ("0,1", "x", ""):
        with pytest.raises(UsageError):
            parse_batches(bad)
    with pytest.raises(UsageError, match="unknown engine"):
        parse_engines("torch,onnx")


def test_bench_cli(built_run):
    result = CliRunner().invoke(app, ["bench", str(built_run), "--engine", "ort,trt", "--batch", "2",
                                      "--device", "cpu", "--max-seconds", "0.2"])
    assert result.exit_code == 0, result.output
    assert "ort/cpu int8" in result.output and "bench.png" in result.output
    doc = json.loads((built_run / "bench.json").read_text())
    trt = [v for v in doc["variants"] if v["backend"] == "trt"]
    assert trt and trt[0]["status"] == "skipped"  # no TensorRT engine here: listed, not measured
    result = CliRunner().invoke(app, ["bench", str(built_run), "--engine", "tensorflow"])
    assert result.exit_code == 2 and "unknown engine" in result.output


def test_pipeline_runs_missing_stages_and_skips_fresh_ones(trained_run):
    from pcltool.stages.pipeline import run_pipeline
    from pcltool.stages.train import recipe_of_run

    recipe = recipe_of_run(RunDir.open(trained_run))
    # the gate is tested in test_build; here a 2-epoch model's int8 accuracy must not decide what is skipped
    opts = {"engines": ("ort",), "batches": (2,), "device": "cpu", "calib_images": 64, "max_top1_drop": 100.0,
            "min_agreement": 0.0}
    run_pipeline(recipe, trained_run, **opts)
    run = RunDir.open(trained_run)
    stages = run.read()["stages"]
    done = {k for k, v in stages.items() if v["status"] == "done"}
    candidate = next(k.split(":")[1] for k in done if k.startswith("export:"))
    assert {"train", "select", f"prune:{candidate}", f"export:{candidate}", f"build:ort-fp32:{candidate}",
            f"build:ort-int8:{candidate}", "bench"} <= done
    before = run.read()["stages"]
    run_pipeline(recipe, trained_run, **opts)  # nothing changed: every stage is skipped
    assert run.read()["stages"] == before
    # a changed input (the int8 engine's calibration size) re-runs that build and the bench, nothing else
    run_pipeline(recipe, trained_run, **{**opts, "calib_images": 128})
    after = run.read()["stages"]
    int8 = f"build:ort-int8:{candidate}"
    assert after[int8]["params"]["calib_images"] == 128
    # the bench re-runs exactly when the rebuilt engine differs, as the manifest records it (another calibration
    # set may still quantise a tiny model to the same bytes)
    engine_changed = after[int8]["outputs"]["engine"]["sha256"] != before[int8]["outputs"]["engine"]["sha256"]
    assert {k for k in after if after[k] != before[k]} == {int8} | ({"bench"} if engine_changed else set())
    # the command line: the same recipe (as --set overrides) and run; everything is up to date, the table is shown
    from tests.conftest import QUICKSTART, TINY_OVERRIDES

    sets = [f"--set={o}" for o in TINY_OVERRIDES + [f"output.runs_dir={recipe.output.runs_dir}"]]
    result = CliRunner().invoke(app, ["run", str(QUICKSTART), *sets, "--run", str(trained_run), "--engine", "ort",
                                      "--batch", "2", "--device", "cpu", "--calib-images", "128",
                                      "--max-top1-drop", "100", "--min-agreement", "0"])
    assert result.exit_code == 0, result.output
    assert "bench: up to date" in result.output and "ort/cpu int8" in result.output
    assert run.read()["stages"] == after


def _doc(threads: int, top1: dict[str, float]) -> dict:
    """A bench.json document with one variant per entry of ``top1`` at batch 1 and 64."""
    variants = [{"key": k, "model": "m", "role": "deployed", "backend": k.split()[0], "provider": "",
                 "precision": k.split()[1], "status": "ok", "top1": acc} for k, acc in top1.items()]
    results = [{"variant": k, "batch": b, "p50_ms": (i + 1) * b ** 0.5} for i, k in enumerate(top1) for b in (1, 64)]
    return {"candidate": "mean1", "split": "test", "settings": {"threads": threads},
            "hardware": {"cpu": {"model": "x86 CPU"}, "gpu": None}, "variants": variants, "results": results}


def test_plot_axes_title_and_dodge(tmp_path):
    from pcltool.stages.bench_plot import accuracy_limits, dodge, log_ticks, plot, title

    assert title(_doc(1, {})).endswith("1 thread") and title(_doc(2, {})).endswith("2 threads")
    assert accuracy_limits([99.2, 99.4]) == pytest.approx((98.2, 100.0))  # zoomed, never past 100
    assert accuracy_limits([3.0, 60.0]) == pytest.approx((0.0, 68.55))
    for lo, hi in ((0.02, 5.0), (0.3, 0.5), (1.0, 1e5), (40.0, 90.0)):
        ticks = log_ticks(lo, hi)
        assert len(ticks) >= 3 and all(lo <= t <= hi for t in ticks)
    offsets = dodge({"a": {"top1": 99.0}, "b": {"top1": 99.0}, "c": {"top1": 97.0}})
    assert offsets["c"] == 0 and offsets["a"] == -offsets["b"] != 0  # ties spread symmetrically, others stay
    plot(_doc(1, {"ort fp32": 99.0, "ort int8": 99.0, "torch fp32": 98.0}), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_floor_is_flagged_below_one_or_when_the_peak_moved(monkeypatch):
    from pcltool.runtime import hardware
    from pcltool.stages import bench
    from pcltool.stages.bench_table import bench_table

    def files(before: float, p50: float):
        v = bench.Variant("m", "deployed", "ort", "fp32", "cpu", None, params=1, flops=10**9)
        v.status, v.top1, v.size_bytes = "ok", 90.0, 10**6
        v.results = [{"batch": 1, "p50_ms": p50, "p90_ms": p50, "p99_ms": p50, "throughput": 1e3 / p50, "cv": 0.01,
                      "stable": True, "flop_floor_ms": 1.0, "x_floor": p50}]
        f = bench.BenchFiles.__new__(bench.BenchFiles)
        f.variants = [v]
        f.header = {"candidate": "m", "settings": {"threads": 2}, "split": "test",
                    "hardware": {"cpu": {"model": "cpu", "usable_cpus": 2}, "peak_fp32": {"measured": {"gflops": before}}}}
        return f

    monkeypatch.setattr(hardware, "measure_peak_fp32", lambda threads: {"gflops": 100.0})
    steady = files(before=95.0, p50=20.0)  # 1 GFLOP at 100 GFLOP/s: floor 10 ms, 2x: trustworthy
    bench._floor_after(steady, {"threads": 2})
    r, peak = steady.variants[0].results[0], steady.header["hardware"]["peak_fp32"]
    assert peak["stable"] and peak["measured"]["gflops"] == 100.0 and peak["measured"]["gflops_before"] == 95.0
    assert r["x_floor"] == pytest.approx(2.0) and not r["x_floor_suspect"]
    fast = files(before=95.0, p50=5.0)  # faster than the floor: flagged
    bench._floor_after(fast, {"threads": 2})
    assert fast.variants[0].results[0]["x_floor_suspect"]
    moved = files(before=60.0, p50=20.0)  # the two peaks 40 % apart: flagged although above 1
    bench._floor_after(moved, {"threads": 2})
    assert not moved.header["hardware"]["peak_fp32"]["stable"] and moved.variants[0].results[0]["x_floor_suspect"]

    from rich.console import Console

    doc = {**fast.header, "variants": [v.summary() for v in fast.variants],
           "results": [{"variant": v.key, **r} for v in fast.variants for r in v.results]}
    out = Console(width=250, record=True)
    out.print(bench_table(doc))
    text = out.export_text()
    assert "0.50 !" in text and "below 1" in text
