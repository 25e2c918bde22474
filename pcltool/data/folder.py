"""Image-folder datasets in the ImageNet layout: ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*`` (or
``ROOT/val/<class>/*``, used as the held-out test split; pcltool's validation split is carved from train).

Images are decoded with Pillow (grey-scale and palette images are converted to RGB), resized so the shorter side
is ``resize_size`` and centre-cropped to a square, and kept as uint8. The random-resized crop (training) or the
centre crop to ``image_size`` (evaluation) then happens batched on the training device. Splits that fit in
``IN_MEMORY_LIMIT`` bytes are decoded once and held in memory; larger ones are streamed by DataLoader workers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pcltool.data.splits import ImageSplit, TensorSplit, epoch_order
from pcltool.errors import DataError

IN_MEMORY_LIMIT = 4 << 30
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}


def scan_folder(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of ``split_dir/<class>/*``; classes sorted by name (or the given list, for test splits)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if class_names is None:
        class_names = classes
    elif unknown := sorted(set(classes) - set(class_names)):
        raise DataError(f"{split_dir}: classes {unknown} do not appear in the train split")
    files, labels = [], []
    for label, name in enumerate(class_names):
        folder = split_dir / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                files.append(path)
                labels.append(label)
    if not files:
        raise DataError(f"{split_dir}: no images found (expected {split_dir}/<class>/<image>)")
    return files, labels, class_names


def decode_image(path: Path, size: int) -> torch.Tensor:
    """Decode one file to uint8 (3, size, size): RGB, shorter side resized to ``size``, centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
            return TF.pil_to_tensor(img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


@dataclass
class _Decoder(torch.utils.data.Dataset):
    files: list[Path]
    labels: list[int]
    size: int

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return decode_image(self.files[i], self.size), self.labels[i]


class StreamingFolderSplit(ImageSplit):
    """A split decoded on the fly by DataLoader workers (for datasets too large to hold in memory)."""

    def __init__(self, files: list[Path], labels: list[int], size: int, workers: int):
        self.decoder = _Decoder(files, labels, size)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.workers = workers

    def subset(self, index: torch.Tensor) -> StreamingFolderSplit:
        idx = index.tolist()
        return StreamingFolderSplit([self.decoder.files[i] for i in idx], [self.decoder.labels[i] for i in idx],
                                    self.decoder.size, self.workers)

    def batches(self, batch_size, device, shuffle=False, generator=None, drop_last=False, shard=(0, 1),
                even_shards=False):
        order = epoch_order(len(self), shuffle, generator, shard, even_shards).tolist()
        loader = torch.utils.data.DataLoader(
            self.decoder, batch_size=batch_size, sampler=order, drop_last=drop_last, num_workers=self.workers,
            pin_memory=str(device).startswith("cuda"), persistent_workers=False)
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def decode_all(files: list[Path], labels: list[int], size: int, workers: int) -> TensorSplit:
    loader = torch.utils.data.DataLoader(_Decoder(files, labels, size), batch_size=256, num_workers=workers)
    images, ys = zip(*loader)
    return TensorSplit(torch.cat(images), torch.cat(ys).long())


def load_image_folder(root: str | Path, resize_size: int, workers: int):
    """Return ``(train_split, test_split, class_names)``."""
    root = Path(root).expanduser()
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(f"{root}: expected an image-folder dataset with {root}/train/<class>/ and "
                        f"{root}/test/<class>/ (or {root}/val/<class>/)")
    train_files, train_labels, class_names = scan_folder(train_dir)
    test_files, test_labels, _ = scan_folder(test_dir, class_names)
    total_bytes = (len(train_files) + len(test_files)) * 3 * resize_size * resize_size
    if total_bytes <= IN_MEMORY_LIMIT:
        return (decode_all(train_files, train_labels, resize_size, workers),
                decode_all(test_files, test_labels, resize_size, workers), class_names)
    return (StreamingFolderSplit(train_files, train_labels, resize_size, workers),
            StreamingFolderSplit(test_files, test_labels, resize_size, workers), class_names)
