"""``deploy/``: the standalone inference module (numpy + Pillow + onnxruntime, no torch, no pcltool) on an image
folder, and ``pcltool deploy triton``'s model repository."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.errors import MissingArtifactError, UsageError
from pcltool.manifest import RunDir
from pcltool.stages.build import load_run_data, run_triton, split_arrays
from tests.test_build import (  # noqa: F401  (fixtures)
    CANDIDATE, _one_thread, built_run, exported_run, exported_template, int8_template)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "pcl_infer.py"
# Run the deploy command with torch and pcltool made unimportable: it must not need them.
NO_TRAINING_STACK = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['pcltool'] = None; "
                     f"sys.argv = ['pcl_infer.py'] + sys.argv[1:]; runpy.run_path({str(DEPLOY)!r}, run_name='__main__')")


def _image_folder(run_path: Path, folder: Path, count: int = 24) -> tuple[list[Path], np.ndarray]:
    """The first test images of the run's dataset as PNG files (8x8 grey digits), and their labels."""
    run = RunDir.open(run_path)
    data = load_run_data(run, {})
    images, labels = next(data.test.batches(count, "cpu"))
    files = []
    for i, img in enumerate(images.numpy()):
        path = folder / f"{labels[i].item()}" / f"img{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0]).save(path)
        files.append(path)
    return files, labels.numpy()


def _deploy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TRAINING_STACK, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("engine", ["export", "ort-int8", "ort-fp32"])  # ort-fp32: the *.onnx.ort-only file
def test_deploy_classifies_a_folder_like_pcltool(built_run, tmp_path, engine):
    from pcltool.runtime.ort import OrtEngine

    run = RunDir.open(built_run)
    model = (run.artifact(f"export:{CANDIDATE}", "onnx") if engine == "export"
             else run.artifact(f"build:{engine}:{CANDIDATE}", "engine"))
    files, _ = _image_folder(built_run, tmp_path / "images")
    result = _deploy(str(model), str(tmp_path / "images"), "--json", "--top-k", "3", "--batch", "5")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["file"]) for r in rows] == sorted(files)
    # pcltool's own preprocessing (the dataset's eval view) and ONNX Runtime give the same classes
    data = load_run_data(run, {})
    batches, _ = split_arrays(data, data.test)
    expected = OrtEngine(model).predict(batches[0][: len(files)]).argmax(1)
    by_file = {Path(r["file"]).name: r for r in rows}
    for i, f in enumerate(files):
        preds = by_file[f.name]["predictions"]
        assert len(preds) == 3 and preds[0]["index"] == expected[i]
        assert preds[0]["class"] == data.class_names[expected[i]]
        assert preds[0]["probability"] >= preds[1]["probability"] >= preds[2]["probability"]


def test_deploy_resizes_other_images_and_reports_errors(exported_run, tmp_path):
    onnx_path = RunDir.open(exported_run).artifact(f"export:{CANDIDATE}", "onnx")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    result = _deploy(str(onnx_path), str(tmp_path / "x.jpg"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(tmp_path / "x.jpg")) and "(" in result.stdout
    (tmp_path / "empty").mkdir()
    result = _deploy(str(onnx_path), str(tmp_path / "empty"))
    assert result.returncode == 1 and "no images" in result.stderr
    result = _deploy(str(tmp_path / "x.jpg"), str(tmp_path))
    assert result.returncode == 1 and "expected an ONNX model" in result.stderr


def _config_value(text: str, key: str) -> str:
    return re.search(rf"^\s*{key}:\s*(.+)$", text, re.M).group(1).strip()


def test_triton_repository_layout(built_run, tmp_path):
    run = RunDir.open(built_run)
    target = run_triton(run, tmp_path / "repo", "ort", "int8")
    assert target == tmp_path / "repo" / f"{CANDIDATE}_ort_int8"
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "1/model.onnx", "config.pbtxt", "labels.txt", "preprocessing.json"]
    assert (target / "1" / "model.onnx").read_bytes() == run.artifact(f"build:ort-int8:{CANDIDATE}",
                                                                      "engine").read_bytes()
    config = (target / "config.pbtxt").read_text()
    assert _config_value(config, "name") == f'"{target.name}"'
    assert _config_value(config, "platform") == '"onnxruntime_onnx"'
    assert _config_value(config, "max_batch_size") == "256"  # the build's MIN,OPT,MAX default 1,64,256
    assert "dynamic_batching" in config and _config_value(config, "preferred_batch_size") == "[ 64, 256 ]"
    assert _config_value(config, "dims") == "[ 1, 8, 8 ]"  # digits: 1x8x8, no batch axis
    assert "KIND_CPU" in config and 'label_filename: "labels.txt"' in config
    assert (target / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert json.loads((target / "preprocessing.json").read_text())["input_size"] == [1, 8, 8]

    with pytest.raises(UsageError, match="already exists"):
        run_triton(run, tmp_path / "repo", "ort", "int8")
    run_triton(run, tmp_path / "repo", "ort", "int8", max_batch=32, force=True)
    assert _config_value((target / "config.pbtxt").read_text(), "max_batch_size") == "32"
    with pytest.raises(UsageError, match="outside the engine's profile"):
        run_triton(run, tmp_path / "repo", "ort", "int8", max_batch=1024, force=True)
    with pytest.raises(MissingArtifactError, match="--engine trt"):
        run_triton(run, tmp_path / "repo", "trt", "fp16")
    assert not list((tmp_path / "repo").glob(".*")), "no half-written repository left behind"


def test_triton_cli(built_run, tmp_path):
    result = CliRunner().invoke(app, ["deploy", "triton", str(built_run), str(tmp_path / "repo"), "--name", "digits"])
    assert result.exit_code == 0, result.output
    config = (tmp_path / "repo" / "digits" / "config.pbtxt").read_text()
    assert _config_value(config, "name") == '"digits"' and (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()
    result = CliRunner().invoke(app, ["deploy", "triton", str(built_run), str(tmp_path / "repo"), "--engine", "tvm"])
    assert result.exit_code == 2 and "allowed engines" in result.output


def test_preprocessing_follows_the_recorded_input_format(tmp_path):
    spec = importlib.util.spec_from_file_location("pcl_infer", DEPLOY)
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    Image.fromarray(np.full((40, 30, 3), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    meta = {"input_size": [3, 8, 8], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    x = deploy.Preprocessing(meta).load(tmp_path / "white.png")
    assert x.shape == (3, 8, 8) and x.dtype == np.float32 and np.allclose(x, 2.0)  # (1 - 0.5) / 0.25
    raw = deploy.Preprocessing({**meta, "input_format": "uint8-nhwc"}).load(tmp_path / "white.png")
    assert raw.shape == (8, 8, 3) and raw.dtype == np.uint8 and (raw == 255).all()
    with pytest.raises(ValueError, match="pcltool export"):
        deploy.Preprocessing({"input_size": [3, 8, 8]})
