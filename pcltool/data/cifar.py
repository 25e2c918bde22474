"""CIFAR-10/100 in the standard "python version" layout, read directly from the pickles.

The files are checked against the official release's md5 sums; a copy that differs (re-encoded file names, for
instance) still loads, with a warning, as long as the pixels and labels have the official shapes. Every file is
read with a restricted unpickler that admits only the numpy arrays, lists, dicts, strings and bytes of the standard
layout, so a planted file cannot run code whatever its md5 (a pickle's globals are the only way it can)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from pcltool.errors import DataError

# md5 sums of the official release (the same ones torchvision checks)
_LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "train": {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                  "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
                  "data_batch_5": "482c414d41f54cd18b22e5b47d7c57fb"},
        "test": {"test_batch": "40351d587109b95175f43aff81a1287e"},
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", "label_names"),
        "label_key": "labels",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": {"train": "16019d7e3df5f24257cddd939b257f8d"},
        "test": {"test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48", "fine_label_names"),
        "label_key": "fine_labels",
    },
}

MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_cifar_folder(name: str, root: str | Path) -> Path:
    """Accept either the batches folder itself or its parent."""
    folder = _LAYOUTS[name]["folder"]
    root = Path(root).expanduser()
    for candidate in (root, root / folder):
        if (candidate / _LAYOUTS[name]["meta"][0]).is_file():
            return candidate
    raise DataError(f"{name}: no {folder} found at {root} (expected {root / folder}/{_LAYOUTS[name]['meta'][0]}); "
                    f"point data.root at it, set data.download=true where the network allows, or for a folder "
                    f"of image files use data.dataset=\"image_folder\" (ROOT/train/<class>/*, ROOT/test/<class>/*)")


def download_cifar(name: str, root: str | Path) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive

    layout = _LAYOUTS[name]
    try:
        download_and_extract_archive(layout["url"], str(root), md5=layout["archive_md5"])
    except Exception as err:  # network errors come in many types
        raise DataError(f"{name}: download from {layout['url']} failed ({err}); copy the dataset to {root} instead") from None
    return find_cifar_folder(name, root)


# The only globals the standard layout's pickles reference (numpy arrays; ``_codecs.encode`` is how Python 3
# writes bytes at protocol 2). Each is a constructor of plain data: none can run anything else.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds only arrays, lists, "
                                         "dicts, strings and bytes")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"missing file {path}") from None
    except Exception as err:
        raise DataError(f"cannot read {path}: {err}; replace it with the official release's file") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict (the CIFAR python layout), got {type(obj).__name__}")
    return obj


def load_cifar(name: str, root: str | Path, download: bool = False, expected_md5: dict | None = None):
    """Return ``(train_images, train_labels, test_images, test_labels, class_names, warnings, md5s)``; images uint8
    NCHW; ``md5s`` maps each file of the layout to its md5 (the data's fingerprint)."""
    layout = _LAYOUTS[name]
    try:
        folder = find_cifar_folder(name, root)
    except DataError:
        if not download:
            raise
        folder = download_cifar(name, root)
    warnings = []
    official = {**layout["train"], **layout["test"], layout["meta"][0]: layout["meta"][1]}
    missing = [f for f in official if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{name} at {folder}: missing {', '.join(missing)}; copy the whole {layout['folder']} folder")
    md5s = {f: _md5(folder / f) for f in official}  # before anything is unpickled
    if expected_md5 is not None and expected_md5 != md5s:
        from pcltool.data.fingerprint import allow_data_change, changed_error

        changed = sorted(f for f in md5s if expected_md5.get(f) != md5s[f])
        if not allow_data_change():
            raise changed_error(str(folder), f"{', '.join(changed)} differ from the md5 sums recorded at training")
        warnings.append(f"{name} at {folder}: {', '.join(changed)} changed since training (allowed by the override)")
    mismatched = [f for f, md5 in official.items() if md5s[f] != md5]
    if mismatched:
        warnings.append(f"{name} at {folder}: {', '.join(mismatched)} differ from the official release's md5 sums; "
                        "loading anyway (shapes and labels are checked)")

    def read(files: dict) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for fname in files:
            batch = _unpickle(folder / fname)
            data = np.asarray(batch.get("data"))
            if data.dtype == object or data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
                raise DataError(f"{folder / fname}: 'data' must be an (N, 3072) uint8 array, got {data.shape} {data.dtype}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[layout["label_key"]], dtype=np.int64))
        return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))

    train_x, train_y = read(layout["train"])
    test_x, test_y = read(layout["test"])
    class_names = list(_unpickle(folder / layout["meta"][0])[layout["meta"][2]])
    for split, y in (("train", train_y), ("test", test_y)):
        if y.min() < 0 or y.max() >= len(class_names):
            raise DataError(f"{name} {split} labels outside 0..{len(class_names) - 1}")
    return train_x, train_y, test_x, test_y, class_names, warnings, md5s
