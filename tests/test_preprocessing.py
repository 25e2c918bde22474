"""One preprocessing contract from training to deployment, on a real image folder (several sizes and aspect
ratios, grey-scale and palette images): the run, the ONNX metadata, ``bench``, ``deploy/pcl_infer.py`` and the
Triton bundle all decode an image file the same way."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pcltool.config import load_recipe
from pcltool.data import load_dataset
from pcltool.data.preprocess import resize_and_crop
from pcltool.manifest import RunDir
from tests.conftest import QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "pcl_infer.py"
SIZES = [(16, 16), (18, 18), (24, 18), (18, 30), (40, 40), (33, 21), (17, 19), (64, 48)]
CLASSES = ("circle", "stripes", "plain")


def _pcl_infer():
    spec = importlib.util.spec_from_file_location("pcl_infer", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _draw(cls: int, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 60, (h, w, 3)).astype(np.float64)
    if cls == 0:
        base[(yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(w, h) / 3) ** 2] += 180
    elif cls == 1:
        base[(xx // 3) % 2 == 0] += 150
    else:
        base += np.array([120, 40, 160])
    return base.clip(0, 255).astype(np.uint8)


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> dict[str, list[Path]]:
    """``root/<split>/<class>/*`` with images of several sizes, in RGB, grey-scale (L) and palette (P) modes."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[Path]] = {}
    for split, count in per_class.items():
        out[split] = []
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img = Image.fromarray(_draw(c, SIZES[(i + c) % len(SIZES)], rng))
                mode = ("RGB", "L", "P")[i % 3]
                img = img.convert(mode) if mode != "P" else img.quantize(32)
                path = folder / f"{name}_{i:03d}.{'jpg' if (i % 4 == 3 and mode != 'P') else 'png'}"
                img.save(path)
                out[split].append(path)
    return out


def test_resize_and_crop_matches_the_deploy_module(tmp_path):
    infer = _pcl_infer()
    rng = np.random.default_rng(1)
    for w, h in SIZES + [(5, 90), (90, 5), (16, 17)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        for size in (8, 16, 18):
            a, b = resize_and_crop(img, size), infer._resize_and_crop(img, size)
            assert a.size == (size, size) and np.array_equal(np.asarray(a), np.asarray(b))
    same = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(resize_and_crop(same, 16)), np.asarray(same))  # at the size: not resampled


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A real image folder, trained for one short epoch, exported to FP32 ONNX."""
    from pcltool.distributed import train_entry
    from pcltool.stages.export import run_export

    base = tmp_path_factory.mktemp("folder-run")
    files = make_image_folder(base / "data", {"train": 10, "test": 8})
    recipe = load_recipe(QUICKSTART, [
        "data.dataset=image_folder", f"data.root={base / 'data'}", "data.image_size=16", "data.resize_size=18",
        "data.augment=crop_flip", "data.pad=2", "data.val_size=6", "data.workers=0", "model.backbone=resnet20",
        "train.epochs=1", "train.batch_size=8", "device=cpu", f"output.runs_dir={base / 'runs'}"])
    path = train_entry(recipe, base / "runs" / "folder", resume=False, console=None)
    run = RunDir.open(path)
    metrics = run_export(run, peer="mean1")
    return path, run.artifact(f"export:{metrics['candidate']}", "onnx"), files


def test_run_and_onnx_record_the_preprocessing(folder_run):
    from pcltool.runtime.ort import read_metadata

    path, onnx_path, _ = folder_run
    recorded = RunDir.open(path).read()["data"]
    pre = recorded["preprocessing"]
    assert pre["resize_size"] == 18 and pre["crop_size"] == 16 and pre["interpolation"] == "bilinear"
    assert pre["color"] == "RGB" and len(pre["mean"]) == 3
    assert recorded["fingerprint"]["files"] == 3 * (10 + 8) and recorded["fingerprint"]["content_sha256"]
    meta = read_metadata(onnx_path)
    assert meta["resize_size"] == 18 and meta["preprocessing"] == pre and meta["interpolation"] == "bilinear"


def test_deploy_gives_exactly_bench_top1(folder_run, tmp_path):
    from pcltool.runtime.ort import OrtEngine
    from pcltool.stages.bench import run_bench
    from pcltool.stages.build import load_run_data, split_arrays

    path, onnx_path, files = folder_run
    run = RunDir.open(path)
    doc = run_bench(run, engines="ort", batches=(1,), device="cpu", max_seconds=0.2)
    row = next(v for v in doc["variants"] if v["backend"] == "ort" and v["precision"] == "fp32"
               and v.get("role") == "deployed" and v.get("provider", "cpu") == "cpu")

    infer = _pcl_infer()
    model = infer.load_model(onnx_path)
    test_files = sorted(files["test"])  # pcltool's order: classes sorted by name, files sorted in each
    rows = infer.classify(model, test_files, top_k=1, batch=5)
    labels = np.array([sorted(CLASSES).index(Path(r["file"]).parent.name) for r in rows])
    predicted = np.array([r["predictions"][0]["index"] for r in rows])
    assert 100.0 * float((predicted == labels).mean()) == row["top1"]

    # per image: the same class as ONNX Runtime on pcltool's own evaluation input (test files in scan order)
    data = load_run_data(run, {})
    batches, bench_labels = split_arrays(data, data.test)
    reference = np.concatenate([OrtEngine(onnx_path).predict(b) for b in batches]).argmax(1)
    assert np.array_equal(bench_labels, labels)
    assert (predicted == reference).mean() == 1.0
    # and the same input pixels
    prep = infer.Preprocessing(model.meta)
    deploy_input = np.stack([prep.load(f) for f in test_files])
    np.testing.assert_allclose(deploy_input, np.concatenate(batches), rtol=0, atol=1e-6)


def test_triton_bundle_carries_the_preprocessing(folder_run, tmp_path):
    from pcltool.runtime.ort import read_metadata
    from pcltool.runtime.triton import write_repository

    _, onnx_path, _ = folder_run
    meta = read_metadata(onnx_path)
    target = write_repository(tmp_path, "m", "ort", onnx_path, meta, 8, [4], gpu=False)
    pre = json.loads((target / "preprocessing.json").read_text())
    assert pre["resize_size"] == 18 and pre["preprocessing"]["crop_size"] == 16


def test_later_stages_decode_from_the_cache(folder_run, monkeypatch):
    from pcltool.data import folder
    from pcltool.stages import data as run_data
    from pcltool.stages.train import recipe_of_run

    path, _, _ = folder_run
    run = RunDir.open(path)
    run_data._CACHE.clear()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(folder, "decode_all", no_decoding)
    data = run_data.load_data(recipe_of_run(run), run)
    assert len(data.test) == 3 * 8


def test_resize_follows_image_size_and_odd_ratios_are_caught(tmp_path):
    from pcltool.config import DataConfig
    from pcltool.errors import RecipeError

    make_image_folder(tmp_path, {"train": 4, "test": 2})
    cfg = dict(dataset="image_folder", root=str(tmp_path), val_size=2, workers=0)
    assert load_dataset(DataConfig(**cfg, image_size=16)).train.images.shape[-1] == 16
    assert load_dataset(DataConfig(**cfg, image_size=16, resize_ratio=1.25)).train.images.shape[-1] == 20
    with pytest.raises(RecipeError, match="data.resize_size=64 is 4.00x"):
        load_dataset(DataConfig(**cfg, image_size=16, resize_size=64))
    with pytest.raises(RecipeError, match="smaller than data.image_size"):
        load_dataset(DataConfig(**cfg, image_size=16, resize_size=12))
    bundle = load_dataset(DataConfig(**cfg, image_size=16, resize_size=28))
    assert any("1.75x" in w and "leave data.resize_size" in w for w in bundle.warnings)


def test_select_refuses_changed_data_with_one_clean_line(folder_run):
    from typer.testing import CliRunner

    from pcltool.cli import app
    from pcltool.stages import data as run_data

    path, _, files = folder_run
    extra = files["train"][0].parent / "added-later.png"
    extra.write_bytes(files["train"][0].read_bytes())
    run_data._CACHE.clear()
    try:
        result = CliRunner().invoke(app, ["select", str(path)])
    finally:
        extra.unlink()
        run_data._CACHE.clear()
    assert result.exit_code == 3, result.output
    assert "changed since this run was trained: 1 added (train/circle/added-later.png)" in result.output
    assert "PCLTOOL_ALLOW_DATA_CHANGE=1" in result.output and "Traceback" not in result.output


def test_run_from_before_fingerprints_still_loads_with_one_warning(trained_run_template, tmp_path, capsys):
    import shutil

    from pcltool.stages import data as run_data
    from pcltool.stages.train import recipe_of_run

    path = shutil.copytree(trained_run_template, tmp_path / "old")
    (path / ".lock").unlink(missing_ok=True)
    run = RunDir.open(path)
    manifest = run.read()
    assert manifest["data"]["fingerprint"]["kind"] == "digits"
    del manifest["data"]
    run._write(manifest)
    run_data._CACHE.clear()
    for _ in range(2):
        run_data._CACHE.clear()
        assert len(run_data.load_data(recipe_of_run(run), run).test) > 0
    assert capsys.readouterr().err.count("trained before pcltool recorded data fingerprints") == 1
