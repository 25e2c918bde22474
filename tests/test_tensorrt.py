"""TensorRT engines: built, verified, fingerprinted, refused on a mismatch. Skipped without TensorRT and an
NVIDIA GPU — nothing here is mocked. The fingerprint comparison itself is plain logic and always runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pcltool.errors import EngineMismatchError, UsageError
from pcltool.manifest import RunDir
from pcltool.runtime.tensorrt import fingerprint_problems
from tests.test_build import CANDIDATE, _one_thread, exported_run, exported_template  # noqa: F401


def _gpu_and_tensorrt() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    import torch

    return torch.cuda.is_available()


needs_tensorrt = pytest.mark.skipif(not _gpu_and_tensorrt(), reason="needs TensorRT and an NVIDIA GPU")

ROOT = Path(__file__).resolve().parents[1]
HERE = {"tensorrt": "10.3.0", "gpu": "NVIDIA A100-SXM4-40GB", "compute_capability": "8.0"}


def test_fingerprint_matching_rules():
    assert fingerprint_problems({**HERE, "hardware_compatibility_level": "none"}, HERE) == []
    other_version = fingerprint_problems({**HERE, "tensorrt": "10.1.0"}, HERE)
    assert len(other_version) == 1 and "TensorRT 10.1.0" in other_version[0]
    other_gpu = {**HERE, "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert "built on NVIDIA H100" in fingerprint_problems(other_gpu, HERE)[0]
    # hardware-compatible engines: Ampere+ runs on any compute capability >= 8.0; same-cc on the same one
    assert fingerprint_problems({**other_gpu, "hardware_compatibility_level": "ampere+"}, HERE) == []
    assert fingerprint_problems({**other_gpu, "hardware_compatibility_level": "ampere+"},
                                {**HERE, "compute_capability": "7.5"})
    same_cc = {**HERE, "gpu": "NVIDIA A30", "hardware_compatibility_level": "same-cc"}
    assert fingerprint_problems(same_cc, HERE) == []
    assert fingerprint_problems({**same_cc, "compute_capability": "8.6"}, HERE)


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_trt_engine_is_built_verified_and_fingerprinted(exported_run, precision):
    import tensorrt as trt
    import torch

    from pcltool.runtime.tensorrt import TrtEngine
    from pcltool.stages.build import run_build

    run = RunDir.open(exported_run)
    metrics = run_build(run, "trt", precision, batch=(1, 8, 32), calib_images=128, min_agreement=80.0)
    key = f"build:trt-{precision}:{CANDIDATE}"
    plan = run.artifact(key, "engine")
    fingerprint = json.loads(run.artifact(key, "fingerprint").read_text())
    assert fingerprint["tensorrt"] == trt.__version__ and fingerprint["gpu"] == torch.cuda.get_device_name(0)
    assert fingerprint["precision"] == precision and fingerprint["strongly_typed"] is True
    assert fingerprint["metadata"]["input_size"] == [1, 8, 8]
    assert (exported_run / "engines" / "trt-timing.cache").stat().st_size > 0
    v = metrics["verification"]
    assert v["top1_agreement"] >= (99.0 if precision != "int8" else 90.0) and -v["top1_change"] <= 1.0

    engine = TrtEngine(plan)
    assert (engine.min_batch, engine.max_batch) == (1, 32)
    for n in (1, 7, 32):  # every batch inside the profile
        assert engine.predict(np.zeros((n, 1, 8, 8), np.float32)).shape == (n, 10)
    with pytest.raises(UsageError, match="outside"):
        engine.check_batch(33)


@pytest.mark.tensorrt
@needs_tensorrt
def test_trt_refuses_an_engine_from_another_machine(exported_run):
    from pcltool.runtime.tensorrt import TrtEngine, fingerprint_path
    from pcltool.stages.build import run_build

    run = RunDir.open(exported_run)
    run_build(run, "trt", "fp32", batch=(1, 4, 8))
    plan = run.artifact(f"build:trt-fp32:{CANDIDATE}", "engine")
    fp_file = fingerprint_path(plan)
    fp = json.loads(fp_file.read_text())
    fp_file.write_text(json.dumps({**fp, "gpu": "Some Other GPU", "compute_capability": "5.0"}))
    with pytest.raises(EngineMismatchError, match="rebuild it on this machine"):
        TrtEngine(plan)
    fp_file.write_text(json.dumps({**fp, "tensorrt": "0.0.1"}))
    with pytest.raises(EngineMismatchError, match="TensorRT 0.0.1"):
        TrtEngine(plan)
    fp_file.unlink()
    with pytest.raises(EngineMismatchError, match="no readable fingerprint"):
        TrtEngine(plan)


@pytest.mark.tensorrt
@needs_tensorrt
def test_deploy_runs_a_trt_engine_like_onnx_runtime(exported_run):
    from pcltool.stages.build import run_build

    run = RunDir.open(exported_run)
    run_build(run, "trt", "fp32", batch=(1, 16, 64))
    spec = importlib.util.spec_from_file_location("pcl_infer", ROOT / "deploy" / "pcl_infer.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    x = np.random.default_rng(0).standard_normal((20, 1, 8, 8)).astype(np.float32)
    trt_logits = deploy.load_model(run.artifact(f"build:trt-fp32:{CANDIDATE}", "engine"))(x)
    ort_logits = deploy.load_model(run.artifact(f"export:{CANDIDATE}", "onnx"))(x)
    np.testing.assert_allclose(trt_logits, ort_logits, atol=1e-2, rtol=1e-2)
