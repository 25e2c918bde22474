"""Datasets and batched augmentation."""

import pickle

import numpy as np
import pytest
import torch

from pcltool.config import DataConfig
from pcltool.data import carve_validation, load_dataset
from pcltool.data.augment import ViewMaker, random_crop, random_flip, random_resized_crop
from pcltool.errors import DataError


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_and_resized_crop_shapes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 40, 40)
    flipped = random_flip(x, g)
    assert all(torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1)) for i in range(16))
    out = random_resized_crop(x, 24, (0.3, 1.0), g)
    assert out.shape == (16, 3, 24, 24) and torch.isfinite(out).all()


def test_every_peer_gets_its_own_view():
    g = torch.Generator().manual_seed(0)
    vm = ViewMaker("crop_flip", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cpu", pad=4, image_size=32)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    views = vm.views(images, 3, g)
    assert views.shape == (3, 8, 3, 32, 32) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    # normalisation: (x/255 - mean)/std on the un-augmented view
    torch.testing.assert_close(vm.eval_view(images), (images.float() / 255 - 0.5) / 0.25)


def test_validation_is_carved_from_train_and_disjoint():
    train, val = carve_validation(100, 0.2, seed=3)
    assert len(val) == 20 and len(train) == 80
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(carve_validation(100, 20, seed=3)[1], val)  # count == fraction


def test_digits_embedded_dataset():
    bundle = load_dataset(DataConfig(dataset="digits", val_size=0.1))
    assert bundle.num_classes == 10 and bundle.in_channels == 1 and bundle.image_size == 8
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 1797
    assert bundle.train.images.dtype == torch.uint8


def _fake_cifar(root, n=20):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n)),
                 "filenames": [f"{i}.png" for i in range(n)], "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}, protocol=2))
    return folder


def test_cifar_copy_with_other_checksums_loads_with_warning(tmp_path):
    _fake_cifar(tmp_path)
    bundle = load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), val_size=10))
    assert len(bundle.train) == 90 and len(bundle.val) == 10 and len(bundle.test) == 20
    assert bundle.warnings and "md5" in bundle.warnings[0]
    assert bundle.class_names[0] == "airplane"


def test_cifar_missing_gives_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset(DataConfig(dataset="cifar10", root=str(tmp_path)))


def _image_folder(root):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                mode = "L" if i % 2 else "RGB"  # grey-scale images must work too
                Image.new(mode, (20 + i, 18), color=40 * i).save(d / f"{i}.png")


def test_image_folder_with_grey_images(tmp_path):
    _image_folder(tmp_path)
    bundle = load_dataset(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=16, val_size=4,
                                     workers=0, augment="random_resized_crop_flip"))
    assert bundle.class_names == ["cat", "dog"] and bundle.in_channels == 3
    assert len(bundle.train) == 8 and len(bundle.test) == 12
    assert bundle.train.images.shape[1:] == (3, 16, 16)  # decoded at resize_size = image_size (no zoom)


def test_image_folder_corrupt_file_is_named(tmp_path):
    _image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(DataConfig(dataset="image_folder", root=str(tmp_path), image_size=16, val_size=4, workers=0))
