"""Datasets (CIFAR, image folders, the embedded digits) and batched on-device augmentation."""

from __future__ import annotations

from pcltool.data.splits import DatasetBundle, ImageSplit, TensorSplit, carve_validation

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _channel_stats(split: TensorSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = split.images.double().div(255.0)
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp(min=1e-3).tolist())


def load_dataset(data_cfg) -> DatasetBundle:
    """Build train/val/test splits from a recipe's ``[data]`` section. The validation split is carved from the
    training data with ``data.val_seed``; the test split is never used to choose anything."""
    warnings: list[str] = []
    name = data_cfg.dataset
    image_size = data_cfg.image_size
    if name == "digits":
        from pcltool.data.digits import load_digits_dataset

        tx, ty, sx, sy, classes = load_digits_dataset(data_cfg.test_size)
        full_train, test = TensorSplit(tx, ty), TensorSplit(sx, sy)
        image_size = 8
        stats = None
    elif name in ("cifar10", "cifar100"):
        from pcltool.data.cifar import MEAN_STD, load_cifar

        root = data_cfg.root or "data"
        tx, ty, sx, sy, classes, warnings = load_cifar(name, root, data_cfg.download)
        full_train, test = TensorSplit(tx, ty), TensorSplit(sx, sy)
        image_size = 32
        stats = MEAN_STD[name]
    else:
        from pcltool.data.folder import load_image_folder

        resize = data_cfg.resize_size or int(round(image_size * 8 / 7))
        full_train, test, classes = load_image_folder(data_cfg.root, resize, data_cfg.workers)
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
    return DatasetBundle(name, train, val, test, list(classes), stats[0], stats[1], in_channels, image_size, warnings)


__all__ = ["DatasetBundle", "ImageSplit", "TensorSplit", "carve_validation", "load_dataset"]
