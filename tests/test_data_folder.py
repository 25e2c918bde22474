"""Data a user brings: CIFAR files that must not run code, image folders with bad files, empty or missing
classes, other layouts (Tiny-ImageNet), subsets, fingerprints that catch changed data, progress lines."""

from __future__ import annotations

import io
import os
import pickle

import pytest
from PIL import Image

from pcltool.config import DataConfig
from pcltool.data import default_workers, load_dataset
from pcltool.errors import DataError, RecipeError
from tests.test_data import _fake_cifar
from tests.test_preprocessing import make_image_folder


def _cfg(root, **kw) -> DataConfig:
    return DataConfig(**{"dataset": "image_folder", "root": str(root), "image_size": 16, "val_size": 2,
                         "workers": 0, **kw})


class _Planted:
    """Unpickling this calls os.mkdir(marker): what a crafted CIFAR batch could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_cifar_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    folder = _fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _Planted(marker), "labels": []}, protocol=2))
    with pytest.raises(DataError, match="refused to load posix.mkdir"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=10))
    assert not marker.exists()


def test_cifar_fingerprint_and_not_found_message(tmp_path):
    _fake_cifar(tmp_path)
    bundle = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=10))
    assert set(bundle.fingerprint["md5"]) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes() + b"\0")
    with pytest.raises(DataError, match="data_batch_2 differ from the md5 sums recorded"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=10),
                     {"fingerprint": bundle.fingerprint})
    with pytest.raises(DataError, match='data.dataset="image_folder"'):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path / "nowhere")))


def test_bad_images_one_message_with_count_and_reasons_under_workers(tmp_path):
    make_image_folder(tmp_path, {"train": 4, "test": 2})
    for i in range(7):
        (tmp_path / "train" / "circle" / f"broken{i}.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        load_dataset(_cfg(tmp_path, workers=2))
    text = str(err.value)
    assert "7 of 25 images could not be read" in text and "broken0.png: UnidentifiedImageError" in text
    assert "(and 2 more)" in text and "data.skip_unreadable" in text and "Traceback" not in text

    bundle = load_dataset(_cfg(tmp_path, skip_unreadable=True))
    assert len(bundle.train) + len(bundle.val) == 12 and len(bundle.skipped) == 7
    assert bundle.skipped[0]["file"] == "train/circle/broken0.png" and bundle.record()["skipped"] == bundle.skipped


def test_empty_class_is_an_error_missing_test_class_a_warning(tmp_path):
    make_image_folder(tmp_path, {"train": 4, "test": 2})
    for f in (tmp_path / "test" / "plain").iterdir():
        f.unlink()
    bundle = load_dataset(_cfg(tmp_path))
    assert any("no images of 1 class(es) (plain)" in w for w in bundle.warnings)
    assert bundle.record()["warnings"] == bundle.warnings
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"1 empty class folder\(s\) \(empty\)"):
        load_dataset(_cfg(tmp_path))


def test_val_size_is_checked_before_decoding(tmp_path, monkeypatch):
    from pcltool.data import folder

    make_image_folder(tmp_path, {"train": 2, "test": 1})
    monkeypatch.setattr(folder, "decode_all", lambda *a, **k: pytest.fail("decoded before checking val_size"))
    with pytest.raises(RecipeError, match="data.val_size=50"):
        load_dataset(_cfg(tmp_path, val_size=50))


def _tiny_imagenet(root):
    """The real Tiny-ImageNet layout: train/<wnid>/images/*, val/images/* + val_annotations.txt, unlabelled test/."""
    ids = ["n01443537", "n01629819"]
    lines = []
    for c, wnid in enumerate(ids):
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (20, 20), (100 * c, 50, 20 * i)).save(d / f"{wnid}_{i}.JPEG")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    (root / "val" / "images").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (20, 20), (100 * (i % 2), 50, 0)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{ids[i % 2]}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(root / "test" / "images" / "test_0.JPEG")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                                    "n99999999\tunused\n")


def test_tiny_imagenet_layout(tmp_path):
    _tiny_imagenet(tmp_path)
    with pytest.raises(DataError, match="data.test_split"):
        load_dataset(_cfg(tmp_path))  # test/ is unlabelled
    bundle = load_dataset(_cfg(tmp_path, test_split="val", test_labels="val_annotations.txt",
                               class_names_file=str(tmp_path / "words.txt")))
    assert bundle.class_names == ["goldfish, Carassius auratus", "European fire salamander"]
    assert len(bundle.test) == 4 and bundle.test.labels.tolist() == [0, 1, 0, 1]
    assert len(bundle.train) + len(bundle.val) == 8


def test_csv_labels_with_header(tmp_path):
    make_image_folder(tmp_path, {"train": 3})
    held = tmp_path / "holdout"
    held.mkdir()
    Image.new("RGB", (16, 16), (200, 0, 0)).save(held / "a.png")
    Image.new("L", (20, 16), 30).save(held / "b.png")
    (held / "labels.csv").write_text("file,label\na.png,plain\nb.png,circle\n")
    bundle = load_dataset(_cfg(tmp_path, test_split="holdout", test_labels="labels.csv"))
    assert bundle.test.labels.tolist() == [sorted(["circle", "plain", "stripes"]).index("plain"), 0]
    (held / "labels.csv").write_text("a.png,zebra\n")
    with pytest.raises(DataError, match="zebra"):
        load_dataset(_cfg(tmp_path, test_split="holdout", test_labels="labels.csv"))


def test_seeded_subset_per_class(tmp_path):
    make_image_folder(tmp_path, {"train": 6, "test": 4})
    a = load_dataset(_cfg(tmp_path, subset=3))
    b = load_dataset(_cfg(tmp_path, subset=3))
    assert len(a.train) + len(a.val) == 9 and len(a.test) == 9
    assert a.fingerprint["listing_sha256"] == b.fingerprint["listing_sha256"]
    assert len(load_dataset(_cfg(tmp_path, subset=0.5)).test) == 6
    assert a.fingerprint["listing_sha256"] != load_dataset(_cfg(tmp_path, subset=3, subset_seed=1)).fingerprint[
        "listing_sha256"]


def test_changed_folder_is_refused_naming_the_files(tmp_path, monkeypatch):
    from pcltool.data.fingerprint import ALLOW_ENV

    make_image_folder(tmp_path, {"train": 4, "test": 2})
    bundle = load_dataset(_cfg(tmp_path))
    expected = {"fingerprint": bundle.fingerprint, "listing": bundle.listing,
                "preprocessing": bundle.preprocessing.as_dict()}
    assert load_dataset(_cfg(tmp_path), expected).fingerprint == bundle.fingerprint

    # same content, new modification time (a copy without -p): the content hash decides, accepted
    touched = tmp_path / "train" / "plain" / "plain_000.png"
    os.utime(touched, ns=(1, 1))
    assert load_dataset(_cfg(tmp_path), expected).fingerprint["content_sha256"] == bundle.fingerprint["content_sha256"]

    # same size, other pixels: refused
    img = Image.open(touched).convert("RGB")
    img.putpixel((0, 0), (255, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    touched.write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="changed since this run was trained: .*plain_000.png"):
        load_dataset(_cfg(tmp_path), expected)

    # added files: refused before decoding, named
    (tmp_path / "train" / "circle" / "new.png").write_bytes(touched.read_bytes())
    with pytest.raises(DataError, match=r"1 added \(train/circle/new.png\)"):
        load_dataset(_cfg(tmp_path), expected)
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert any(ALLOW_ENV in w for w in load_dataset(_cfg(tmp_path), expected).warnings)


def test_workers_default_to_the_machine():
    assert DataConfig().workers is None
    assert 0 <= default_workers() <= 8 and default_workers() <= (os.cpu_count() or 1)


def test_progress_lines_when_not_a_terminal():
    from pcltool.data.progress import ProgressLine

    out = io.StringIO()
    progress = ProgressLine("decoding x", 100, every_s=0.0, stream=out)
    for i in range(1, 101, 25):
        progress.update(i)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4 and lines[0].startswith("decoding x: 1/100") and "\r" not in out.getvalue()


def test_training_prints_lines_when_not_a_terminal(monkeypatch):
    from rich.console import Console

    from pcltool.stages import report

    monkeypatch.setattr(report, "LINE_EVERY_S", 0.0)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    rec = {"epoch": 1, "batch": 5, "batches": 10, "total": 1.5, "lr": 0.1, "images_per_s": 100.0, "ce_peers": 1.0,
           "ce_ensemble": 1.0, "kd_ensemble": 0.0, "kd_mean": 0.0, "lambda": 0.0}
    with report.TrainReporter(console, epochs=3) as reporter:
        reporter.update(rec)
        reporter.update({**rec, "batch": 10})
    assert out.getvalue().splitlines() == ["epoch 1/3 step 5/10  loss 1.500  lr 0.1  100 img/s",
                                           "epoch 1/3 step 10/10  loss 1.500  lr 0.1  100 img/s"]
