"""``pcltool build``: ONNX Runtime FP32/INT8 engines, verification against the FP32 ONNX model, the precision gate,
and refusing what cannot be built (nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.errors import UsageError, VerificationError
from pcltool.manifest import RunDir
from pcltool.stages.build import compare_logits, gate, parse_batch, run_build, split_arrays

CANDIDATE = "mean1"


def record_export(run_path: Path, peer: str = CANDIDATE) -> Path:
    """select -> prune -> export ``peer`` in a trained run; the exported FP32 ONNX model's path."""
    from pcltool.stages.export import run_export

    run = RunDir.open(run_path)
    metrics = run_export(run, peer=peer)
    return run.artifact(f"export:{metrics['candidate']}", "onnx")


# The templates are made once per process: test_bench/test_deploy import these fixtures, and pytest would otherwise
# run a session fixture once per module that holds it.
_TEMPLATES: dict[str, Path] = {}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """Tiny models: one thread is as fast, and does not stall on a busy CPU."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def exported_template(trained_run_template, tmp_path_factory) -> Path:
    if "exported" not in _TEMPLATES:
        dst = _copy(trained_run_template, tmp_path_factory.mktemp("exported") / "run")
        record_export(dst)
        _TEMPLATES["exported"] = dst
    return _TEMPLATES["exported"]


@pytest.fixture
def exported_run(exported_template, tmp_path) -> Path:
    """A private copy of a tiny trained run with ``export:mean1`` recorded."""
    return _copy(exported_template, tmp_path / "exported")


@pytest.fixture(scope="session")
def int8_template(exported_template, tmp_path_factory) -> Path:
    """The exported run with ORT fp32 and int8 engines built (shared by the bench and deploy tests)."""
    if "built" not in _TEMPLATES:
        dst = _copy(exported_template, tmp_path_factory.mktemp("built") / "run")
        run = RunDir.open(dst)
        run_build(run, "ort", "fp32")
        # a 2-epoch model (30-45 % top-1) has small logit margins: INT8 agrees with FP32 on 86-98 % of the 144
        # validation images, and its top-1 moves by a few images (one image is 0.69 points) either way
        run_build(run, "ort", "int8", calib_images=256, max_top1_drop=5.0, min_agreement=80.0)
        _TEMPLATES["built"] = dst
    return _TEMPLATES["built"]


@pytest.fixture
def built_run(int8_template, tmp_path) -> Path:
    return _copy(int8_template, tmp_path / "built")


def test_ort_fp32_and_int8_engines_are_verified_and_recorded(int8_template):
    run = RunDir.open(int8_template)
    fp32 = run.require(f"build:ort-fp32:{CANDIDATE}")
    engine = run.artifact(f"build:ort-fp32:{CANDIDATE}", "engine")
    assert engine.name == f"{CANDIDATE}.ort-fp32.onnx.ort-only" and engine.parent.name == "engines"
    assert fp32["inputs"]["onnx"]["sha256"] == run.require(f"export:{CANDIDATE}")["outputs"]["onnx"]["sha256"]
    v = fp32["metrics"]["verification"]
    assert v["images"] > 100 and v["top1_agreement"] == 100.0 and v["max_abs_diff"] < 1e-3
    # the saved model keeps the preprocessing metadata and is a graph-optimised one (BatchNorm folded)
    proto = onnx.load(str(engine))
    assert {p.key for p in proto.metadata_props} >= {"pcltool.mean", "pcltool.std", "pcltool.input_size"}
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)

    int8 = run.require(f"build:ort-int8:{CANDIDATE}")
    calib = int8["metrics"]["calibration"]
    assert calib["images"] == 256 and calib["method"] == "minmax" and len(calib["sha256"]) == 64
    assert int8["params"]["quantization"]["activations"] == "u8" and int8["params"]["quantization"]["weights"] == "s8"
    v = int8["metrics"]["verification"]
    assert abs(v["top1_change"]) <= int8["params"]["max_top1_drop"] == 5.0
    assert v["top1_agreement"] >= int8["params"]["min_agreement"] == 80.0
    ops = {n.op_type for n in onnx.load(str(run.artifact(f"build:ort-int8:{CANDIDATE}", "engine"))).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_engine_files_say_whether_they_are_portable(int8_template):
    """The ORT-optimised FP32 model uses ONNX Runtime's own operators: named *.onnx.ort-only, portable=false. The
    INT8 Q/DQ model is standard ONNX: a plain ONNX implementation (onnx's reference evaluator) runs it and agrees
    with ONNX Runtime."""
    from onnx.reference import ReferenceEvaluator

    from pcltool.runtime.ort import OrtEngine, is_portable, read_metadata
    from pcltool.stages.build import load_run_data

    run = RunDir.open(int8_template)
    fp32 = run.artifact(f"build:ort-fp32:{CANDIDATE}", "engine")
    int8 = run.artifact(f"build:ort-int8:{CANDIDATE}", "engine")
    assert read_metadata(fp32)["portable"] == "false" and not is_portable(fp32)
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(fp32)).graph.node)
    assert int8.name == f"{CANDIDATE}.ort-int8.onnx" and read_metadata(int8)["portable"] == "true"
    assert is_portable(int8) and is_portable(run.artifact(f"export:{CANDIDATE}", "onnx"))

    data = load_run_data(run, read_metadata(int8))
    images = split_arrays(data, data.val)[0][0][:8]
    # this onnx release's reference evaluator implements DequantizeLinear from opset 19: convert, as any tool may
    reference = ReferenceEvaluator(onnx.version_converter.convert_version(onnx.load(str(int8)), 21)).run(
        None, {"images": images})[0]
    ort = OrtEngine(int8, precision="int8").predict(images)
    assert (reference.argmax(1) == ort.argmax(1)).mean() >= 0.75  # integer kernels round differently at a tie
    assert np.abs(reference - ort).max() <= 0.25 * max(1.0, np.abs(ort).max())


def test_calibration_hash_is_reproducible(exported_run):
    from pcltool.stages.build import calibration_set, load_run_data

    data = load_run_data(RunDir.open(exported_run), {})
    a, rec_a = calibration_set(data, 64, seed=0)
    b, rec_b = calibration_set(data, 64, seed=0)
    _, rec_c = calibration_set(data, 64, seed=1)
    assert np.array_equal(a, b) and rec_a["sha256"] == rec_b["sha256"] != rec_c["sha256"]


def _noisy_copy(src: Path, dst: Path, scale: float) -> None:
    """A deliberately bad engine: every Conv weight buried in noise."""
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    rng = np.random.default_rng(0)
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    for init in proto.graph.initializer:
        if init.name in conv_weights:
            w = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((w + scale * rng.standard_normal(w.shape)).astype(np.float32),
                                                  init.name))
    onnx.save(proto, str(dst))


def test_precision_gate_rejects_a_bad_engine(exported_run, tmp_path):
    from pcltool.runtime.ort import OrtEngine
    from pcltool.stages.build import load_run_data

    run = RunDir.open(exported_run)
    onnx_path = run.artifact(f"export:{CANDIDATE}", "onnx")
    data = load_run_data(run, {})
    batches, labels = split_arrays(data, data.val)
    reference = OrtEngine(onnx_path).predict_all(batches)
    _noisy_copy(onnx_path, tmp_path / "bad.onnx", scale=1.0)
    bad = compare_logits(reference, OrtEngine(tmp_path / "bad.onnx").predict_all(batches), labels)
    with pytest.raises(VerificationError, match="top-1 dropped"):
        gate(bad, "int8", max_top1_drop=1.0, reference_scale=float(np.abs(reference).max()))
    good = compare_logits(reference, OrtEngine(onnx_path).predict_all(batches), labels)
    gate(good, "int8", max_top1_drop=1.0, reference_scale=float(np.abs(reference).max()))
    assert good["top1_change"] == 0.0 and good["top1_agreement"] == 100.0


def test_gate_checks_fp32_tolerance_and_nan():
    labels = np.array([0, 1, 2, 0])
    ref = np.eye(3, dtype=np.float32)[labels] * 5
    off = ref + np.float32(0.1)
    with pytest.raises(VerificationError, match="fp32 logits differ"):
        gate(compare_logits(ref, off, labels), "fp32", 1.0, 5.0)
    gate(compare_logits(ref, off, labels), "fp16", 1.0, 5.0)  # same top-1: reduced precision passes
    nan = ref.copy()
    nan[0, 0] = np.nan
    with pytest.raises(VerificationError, match="NaN"):
        gate(compare_logits(ref, nan, labels), "fp16", 100.0, 5.0)


def test_failed_gate_writes_no_engine(exported_run, monkeypatch):
    import pcltool.stages.build as build

    def bad_int8(onnx_path, tmp, stem, precision, calib, method):
        _noisy_copy(onnx_path, tmp / f"{stem}.onnx", scale=1.0)
        return {"engine": tmp / f"{stem}.onnx"}

    monkeypatch.setattr(build, "_build_ort", bad_int8)
    run = RunDir.open(exported_run)
    with pytest.raises(VerificationError):
        run_build(run, "ort", "int8", calib_images=32)
    assert not [p for p in (exported_run / "engines").iterdir()], "a rejected engine must leave no file behind"
    record = run.stage(f"build:ort-int8:{CANDIDATE}")
    assert record["status"] == "failed" and "top-1 dropped" in record["error"]
    assert record["metrics"]["verification"]["top1_change"] < -1.0  # the numbers that failed are kept


def test_parse_batch():
    assert parse_batch("1,8,64") == (1, 8, 64)
    assert parse_batch("16") == (16, 16, 16)
    for bad in ("8,1,64", "0,1,2", "1,2"):
        with pytest.raises(UsageError):
            parse_batch(bad)


def test_cli_bad_input_exits_nonzero_and_writes_nothing(exported_run, trained_run):
    runner = CliRunner()
    result = runner.invoke(app, ["build", str(exported_run), "--engine", "onnx"])
    assert result.exit_code == 2 and "unknown engine" in result.output
    result = runner.invoke(app, ["build", str(exported_run), "--engine", "ort", "--precision", "int4"])
    assert result.exit_code == 2 and "precision" in result.output
    result = runner.invoke(app, ["build", str(trained_run), "--engine", "ort"])
    assert result.exit_code == 4 and "pcltool export" in result.output
    # a stale input: the exported model was edited after it was recorded
    onnx_path = exported_run / "exports" / f"{CANDIDATE}.onnx"
    onnx_path.write_bytes(onnx_path.read_bytes() + b"\0")
    result = runner.invoke(app, ["build", str(exported_run), "--engine", "ort"])
    assert result.exit_code == 4 and "changed since it was recorded" in result.output
    assert not (exported_run / "engines").exists() or not any((exported_run / "engines").iterdir())


@pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_cli_trt_without_tensorrt_says_how_to_install(exported_run):
    before = json.loads((exported_run / "manifest.json").read_text())
    result = CliRunner().invoke(app, ["build", str(exported_run), "--engine", "trt", "--precision", "fp16"])
    assert result.exit_code == 7
    assert "pip install tensorrt" in result.output and "pcltool[tensorrt]" in result.output
    assert json.loads((exported_run / "manifest.json").read_text()) == before
    assert not (exported_run / "engines").exists()


def test_raw_input_model_is_built_and_verified_on_uint8_pixels(exported_run):
    from pcltool.stages.export import run_export

    run = RunDir.open(exported_run)
    run_export(run, peer=CANDIDATE, raw_input=True)
    metrics = run_build(run, "ort", "int8", calib_images=64, max_top1_drop=100.0, min_agreement=0.0)
    assert metrics["verification"]["images"] > 100 and metrics["verification"]["top1_agreement"] > 80.0
    engine = run.artifact(f"build:ort-int8:{CANDIDATE}", "engine")
    from pcltool.runtime.ort import OrtEngine, read_metadata

    assert read_metadata(engine)["input_format"] == "uint8-nhwc"
    assert OrtEngine(engine).predict(np.zeros((2, 8, 8, 1), np.uint8)).shape == (2, 10)
