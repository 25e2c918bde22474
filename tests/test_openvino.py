"""``pcltool build --engine openvino`` and its bench rows (skipped where OpenVINO is not installed)."""

from __future__ import annotations

import pytest

from pcltool.manifest import RunDir
from pcltool.stages.bench import run_bench
from pcltool.stages.build import run_build
from tests.test_build import CANDIDATE, _one_thread, exported_run, exported_template  # noqa: F401  (fixtures)

pytest.importorskip("openvino")


def test_openvino_engines_are_verified_recorded_and_benched(exported_run):
    run = RunDir.open(exported_run)
    run_build(run, "openvino", "fp32")
    run_build(run, "openvino", "int8", calib_images=128)
    fp32 = run.require(f"build:openvino-fp32:{CANDIDATE}")
    xml = run.artifact(f"build:openvino-fp32:{CANDIDATE}", "engine")
    assert xml.name == f"{CANDIDATE}.openvino-fp32.xml" and xml.with_suffix(".bin").exists()
    assert set(fp32["outputs"]) == {"engine", "weights"}
    v = fp32["metrics"]["verification"]
    assert v["images"] > 100 and v["top1_agreement"] == 100.0 and v["max_abs_diff"] < 1e-3  # FP32 kept FP32
    int8 = run.require(f"build:openvino-int8:{CANDIDATE}")
    assert int8["metrics"]["calibration"]["images"] == 128 and int8["params"]["quantization"]["activations"] == "u8"
    assert int8["metrics"]["verification"]["finite"]
    # the INT8 IR is smaller: its weights are int8
    assert (run.artifact(f"build:openvino-int8:{CANDIDATE}", "weights").stat().st_size
            < 0.5 * run.artifact(f"build:openvino-fp32:{CANDIDATE}", "weights").stat().st_size)

    doc = run_bench(run, engines="torch,openvino", batches=(1, 8), device="cpu", max_seconds=0.2)
    rows = {(v["backend"], v["precision"], v["role"]): v for v in doc["variants"]}
    ov32, torch32 = rows[("openvino", "fp32", "deployed")], rows[("torch", "fp32", "deployed")]
    assert ov32["status"] == "ok" and rows[("openvino", "int8", "deployed")]["status"] == "ok"
    assert ov32["top1"] == torch32["top1"]  # the same network answers alike
    assert {r["batch"] for r in doc["results"] if r["variant"] == ov32["key"]} == {1, 8}


def test_openvino_build_refuses_fp16(exported_run):
    from pcltool.errors import UsageError

    with pytest.raises(UsageError, match="allowed: fp32, int8"):
        run_build(RunDir.open(exported_run), "openvino", "fp16")
    assert not (exported_run / "engines").exists() or not any((exported_run / "engines").iterdir())
