"""Datasets (CIFAR, image folders, the embedded digits) and batched on-device augmentation."""

from __future__ import annotations

import os

from pcltool.data.splits import DatasetBundle, ImageSplit, TensorSplit, carve_validation, validation_count

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
LEGACY_RESIZE_RATIO = 8 / 7  # image folders' decode size before runs recorded their preprocessing


def _channel_stats(split: TensorSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = split.images.double().div(255.0)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist())


def default_workers() -> int:
    """Decoding processes when ``data.workers`` is unset: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus))


def _digits_fingerprint(*arrays) -> dict:
    import hashlib

    import sklearn

    h = hashlib.sha256()
    for a in arrays:
        h.update(a.contiguous().numpy().tobytes())
    return {"kind": "digits", "sklearn": sklearn.__version__, "arrays_sha256": h.hexdigest()}


def load_dataset(data_cfg, expected: dict | None = None) -> DatasetBundle:
    """Build train/val/test splits from a recipe's ``[data]`` section. The validation split is carved from the
    training data with ``data.val_seed``; the test split is never used to choose anything.

    ``expected`` is what a run recorded about its data (``manifest["data"]`` plus the folder listing): the data is
    checked against its fingerprint before it is decoded, and decoded with the run's recorded resize size."""
    from pcltool.data.fingerprint import allow_data_change, changed_error
    from pcltool.data.preprocess import check_resize, default_resize

    warnings: list[str] = []
    name = data_cfg.dataset
    image_size = data_cfg.image_size
    resize_size, listing, skipped = None, None, []
    recorded = (expected or {}).get("fingerprint")
    if name == "digits":
        from pcltool.data.digits import load_digits_dataset

        tx, ty, sx, sy, classes = load_digits_dataset(data_cfg.test_size)
        validation_count(len(ty), data_cfg.val_size)
        full_train, test = TensorSplit(tx, ty), TensorSplit(sx, sy)
        image_size = 8
        stats = None
        fingerprint = _digits_fingerprint(tx, ty, sx, sy)
        if recorded and recorded.get("arrays_sha256") != fingerprint["arrays_sha256"]:
            if not allow_data_change():
                raise changed_error("scikit-learn's digits", f"scikit-learn {recorded.get('sklearn')} at training, "
                                    f"{fingerprint['sklearn']} now, with other pixels")
            warnings.append("the embedded digits changed since training (allowed by the override)")
    elif name in ("cifar10", "cifar100"):
        from pcltool.data.cifar import MEAN_STD, load_cifar

        root = data_cfg.root or "data"
        tx, ty, sx, sy, classes, warnings, md5s = load_cifar(
            name, root, data_cfg.download, expected_md5=(recorded or {}).get("md5"))
        validation_count(len(ty), data_cfg.val_size)
        full_train, test = TensorSplit(tx, ty), TensorSplit(sx, sy)
        image_size = 32
        stats = MEAN_STD[name]
        fingerprint = {"kind": name, "md5": md5s}
    else:
        from pcltool.data.folder import load_image_folder

        if expected is not None and "preprocessing" in expected:
            resize_size = int(expected["preprocessing"]["resize_size"])
        elif expected is not None and data_cfg.resize_size is None:  # a run from before the contract was recorded
            resize_size = int(round(image_size * LEGACY_RESIZE_RATIO))
        else:
            resize_size = default_resize(image_size, data_cfg.resize_size, data_cfg.resize_ratio)
            if warning := check_resize(image_size, resize_size):
                warnings.append(warning)
        workers = default_workers() if data_cfg.workers is None else data_cfg.workers
        folder_expected = expected if recorded else None
        if folder_expected is not None and allow_data_change():
            folder_expected = None
            warnings.append(f"data fingerprint not checked ({'PCLTOOL_ALLOW_DATA_CHANGE'}=1)")
        loaded = load_image_folder(data_cfg, resize_size, workers, folder_expected,
                                   check_sizes=lambda n: validation_count(n, data_cfg.val_size))
        full_train, test, classes = loaded.train, loaded.test, loaded.class_names
        warnings += loaded.warnings
        fingerprint, listing, skipped = loaded.fingerprint, loaded.listing, loaded.skipped
        stats = IMAGENET_MEAN_STD
    train_idx, val_idx = carve_validation(len(full_train), data_cfg.val_size, data_cfg.val_seed)
    train, val = full_train.subset(train_idx), full_train.subset(val_idx)
    if data_cfg.mean is not None:
        stats = (tuple(data_cfg.mean), tuple(data_cfg.std))
    elif stats is None:
        stats = _channel_stats(train)
    in_channels = int(train.images.shape[1]) if isinstance(train, TensorSplit) else 3
    if len(stats[0]) != in_channels:
        from pcltool.errors import RecipeError

        raise RecipeError(f"data.mean/std have {len(stats[0])} values but the images have {in_channels} channels")
    return DatasetBundle(name, train, val, test, list(classes), stats[0], stats[1], in_channels, image_size, warnings,
                         resize_size, fingerprint, listing, skipped)


__all__ = ["DatasetBundle", "ImageSplit", "TensorSplit", "carve_validation", "load_dataset"]
