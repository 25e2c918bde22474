"""Image-folder datasets: ``ROOT/train/<class>/*`` and a held-out test split ``ROOT/<data.test_split>/`` (default
``test``, else ``val``), labelled by class folders or by an annotations file (``data.test_labels``: Tiny-ImageNet's
``val_annotations.txt``, or a CSV ``file,class``). pcltool's validation split is carved from train.

Images are decoded with Pillow as :mod:`pcltool.data.preprocess` defines (RGB, shorter side resized to
``resize_size``, centre-cropped square) and kept as uint8; the random-resized crop (training) or the centre crop
to ``image_size`` (evaluation) happens batched on the device. Splits that fit in ``IN_MEMORY_LIMIT`` bytes are
decoded once per data fingerprint and cached (:mod:`pcltool.data.fingerprint`), so later stages load arrays
instead of decoding; larger ones are streamed by DataLoader workers.

Unreadable files never stop decoding half-way: every failure is collected and reported in one message (count,
first files and reasons), or skipped and listed when ``data.skip_unreadable = true``."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcltool.data import fingerprint as fp
from pcltool.data.preprocess import INTERPOLATION, resize_and_crop
from pcltool.data.progress import ProgressLine
from pcltool.data.splits import ImageSplit, TensorSplit, epoch_order
from pcltool.errors import DataError

IN_MEMORY_LIMIT = 4 << 30
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif"}
SHOW_FAILURES = 5


# --- layout --------------------------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_folder(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of ``split_dir/<class>/*``; classes sorted by name (or the train split's, for a held-out
    split). An empty class folder of the train split is an error (the model would have an output never trained)."""
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    train = class_names is None
    if train:
        class_names = classes
        if not classes:
            raise DataError(f"{split_dir}: no class folders (expected {split_dir}/<class>/<image>)")
    elif unknown := sorted(set(classes) - set(class_names)):
        raise DataError(f"{split_dir}: classes {unknown[:5]} do not appear in the train split; if this split is "
                        "unlabelled or labelled by a file, choose another with data.test_split or give "
                        "data.test_labels (an annotations/CSV file)")
    files, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        folder = split_dir / name
        found = _images_in(folder) if folder.is_dir() else []
        if not found and train:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if empty:
        raise DataError(f"{split_dir}: {len(empty)} empty class folder(s) ({', '.join(empty[:5])}): add images or "
                        "remove the folders")
    if not files:
        raise DataError(f"{split_dir}: no images found (expected {split_dir}/<class>/<image>, "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    return files, labels, class_names


def read_annotations(path: Path, split_dir: Path, class_names: list[str]) -> tuple[list[Path], list[int]]:
    """Labels from a file: one line per image, ``file<TAB>class[<TAB>...]`` (Tiny-ImageNet's
    ``val_annotations.txt``) or ``file,class`` (CSV; a header line is skipped). Files are looked up in the split
    folder and in its ``images/`` subfolder."""
    if not path.is_file():
        raise DataError(f"data.test_labels: {path} does not exist")
    index = {name: i for i, name in enumerate(class_names)}
    files, labels, unknown = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        cols = [c.strip() for c in (line.split("\t") if "\t" in line else line.split(","))]
        if len(cols) < 2:
            raise DataError(f"{path}:{number}: expected 'file<TAB>class' or 'file,class', got {line!r}")
        name, cls = cols[0], cols[1]
        if cls not in index:
            if number == 1 and not (split_dir / name).exists():
                continue  # a CSV header
            unknown.append(f"{cls} (line {number})")
            continue
        candidates = [split_dir / name, split_dir / "images" / name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"{path}:{number}: {name} is in neither {split_dir} nor {split_dir / 'images'}")
        files.append(found)
        labels.append(index[cls])
    if unknown:
        raise DataError(f"{path}: {len(unknown)} labels name classes the train split does not have: "
                        f"{', '.join(unknown[:SHOW_FAILURES])}")
    if not files:
        raise DataError(f"{path}: no labelled images")
    return files, labels


def read_class_names(path: Path, ids: list[str]) -> list[str]:
    """Human names for class folder ids from ``id<TAB>name`` or ``id,name`` lines (Tiny-ImageNet's ``words.txt``);
    ids the file does not name keep their folder name."""
    if not path.is_file():
        raise DataError(f"data.class_names_file: {path} does not exist")
    wanted, names = set(ids), {}
    for line in path.read_text(errors="replace").splitlines():
        sep = "\t" if "\t" in line else ","
        key, _, name = line.partition(sep)
        if key.strip() in wanted and name.strip():
            names[key.strip()] = name.strip()
    return [names.get(i, i) for i in ids]


def held_out_dir(root: Path, choice: str | None) -> Path:
    if choice is not None:
        d = root / choice
        if not d.is_dir():
            raise DataError(f"data.test_split={choice!r}: {d} is not a folder")
        return d
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root}: expected an image-folder dataset with {root}/train/<class>/ and a held-out split "
                    f"{root}/test/<class>/ or {root}/val/<class>/ (choose it with data.test_split)")


def take_subset(files: list[Path], labels: list[int], subset: float | None, seed: int):
    """A seeded draw per class: ``subset`` < 1 is a fraction of each class, otherwise a count per class."""
    if subset is None:
        return files, labels
    gen = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    keep = []
    for y in sorted(by_class):
        idx = by_class[y]
        n = max(1, int(round(subset * len(idx)))) if subset < 1 else min(int(subset), len(idx))
        keep += [idx[int(j)] for j in torch.randperm(len(idx), generator=gen)[:n]]
    keep.sort()
    return [files[i] for i in keep], [labels[i] for i in keep]


# --- decoding ------------------------------------------------------------------------------------------------------
def decode_file(path: Path, size: int) -> tuple[np.ndarray | None, str, str | None]:
    """``(uint8 (3, size, size) or None, sha256 of the file, error or None)``; never raises."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = path.read_bytes()
    except OSError as err:
        return None, "", f"{type(err).__name__}: {err.strerror or err}"
    digest = hashlib.sha256(raw).hexdigest()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img = resize_and_crop(img.convert("RGB"), size)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy(), digest, None
    except Exception as err:  # Pillow raises many types for damaged files; each becomes one line of the report
        if isinstance(err, UnidentifiedImageError):
            return None, digest, "UnidentifiedImageError: not an image format Pillow can decode"
        return None, digest, f"{type(err).__name__}: {err}"


def decode_image(path: Path, size: int) -> torch.Tensor:
    """One file as uint8 (3, size, size); raises :class:`DataError` naming the file."""
    pixels, _, error = decode_file(path, size)
    if error is not None:
        raise DataError(f"cannot read image {path}: {error}")
    return torch.from_numpy(pixels)


@dataclass
class _Decoder(torch.utils.data.Dataset):
    files: list[Path]
    labels: list[int]
    size: int

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        pixels, digest, error = decode_file(self.files[i], self.size)
        return i, pixels, digest, error


def _keep_list(items):
    return items


def failures_message(failures: list[tuple[Path, str]], total: int) -> str:
    shown = "; ".join(f"{p}: {why}" for p, why in failures[:SHOW_FAILURES])
    more = f" (and {len(failures) - SHOW_FAILURES} more)" if len(failures) > SHOW_FAILURES else ""
    return (f"{len(failures)} of {total} images could not be read: {shown}{more}. Remove or replace them, or set "
            "data.skip_unreadable = true to train without them (they are listed in the manifest)")


@dataclass
class Decoded:
    images: torch.Tensor
    labels: torch.Tensor
    digests: list[str]
    failures: list[tuple[Path, str]] = field(default_factory=list)


def decode_all(files: list[Path], labels: list[int], size: int, workers: int, what: str = "decoding") -> Decoded:
    """Decode every file (in ``workers`` processes), collecting failures instead of stopping at the first."""
    images = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    digests, ok = [""] * len(files), torch.zeros(len(files), dtype=torch.bool)
    failures = []
    loader = torch.utils.data.DataLoader(_Decoder(files, labels, size), batch_size=64, num_workers=workers,
                                         collate_fn=_keep_list)
    progress = ProgressLine(what, len(files))
    done = 0
    for batch in loader:
        for i, pixels, digest, error in batch:
            digests[i] = digest
            if error is None:
                images[i] = torch.from_numpy(pixels)
                ok[i] = True
            else:
                failures.append((files[i], error))
        done += len(batch)
        progress.update(done)
    progress.close()
    keep = ok.nonzero().flatten()
    return Decoded(images[keep], torch.tensor(labels, dtype=torch.long)[keep], digests, failures)


class StreamingFolderSplit(ImageSplit):
    """A split decoded on the fly by DataLoader workers (for datasets too large to hold in memory). A file that
    fails here is reported with its path and reason as a :class:`DataError`, not a worker traceback."""

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
            pin_memory=str(device).startswith("cuda"), persistent_workers=False, collate_fn=_keep_list)
        for batch in loader:
            bad = [(self.decoder.files[i], err) for i, _, _, err in batch if err is not None]
            if bad:
                raise DataError(failures_message(bad, len(batch)))
            images = torch.from_numpy(np.stack([pixels for _, pixels, _, _ in batch]))
            labels = torch.tensor([self.decoder.labels[i] for i, _, _, _ in batch], dtype=torch.long)
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


# --- the dataset ---------------------------------------------------------------------------------------------------
@dataclass
class FolderData:
    train: ImageSplit
    test: ImageSplit
    class_names: list[str]
    fingerprint: dict
    listing: list[str]
    warnings: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def load_image_folder(cfg, resize_size: int, workers: int, expected: dict | None = None,
                      check_sizes=None) -> FolderData:
    """Scan, check, then decode (or load from the cache) ``cfg.root``'s train and held-out splits.

    ``expected`` is a run's recorded ``{"fingerprint", "listing"}``: the files are compared with it before anything
    is decoded. ``check_sizes(num_train_files)`` validates counts (``data.val_size``) before decoding too."""
    root = Path(cfg.root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DataError(f"{root}: expected an image-folder dataset with {root}/train/<class>/ and "
                        f"{root}/test/<class>/ (or {root}/val/<class>/)")
    test_dir = held_out_dir(root, cfg.test_split)
    train_files, train_labels, ids = scan_folder(train_dir)
    if cfg.test_labels:
        labels_path = Path(cfg.test_labels).expanduser()
        if not labels_path.is_absolute() and not labels_path.exists():
            labels_path = test_dir / cfg.test_labels
        test_files, test_labels = read_annotations(labels_path, test_dir, ids)
    else:
        test_files, test_labels, _ = scan_folder(test_dir, ids)
    class_names = read_class_names(Path(cfg.class_names_file).expanduser(), ids) if cfg.class_names_file else ids
    warnings = []
    if missing := sorted(set(range(len(ids))) - set(test_labels)):
        warnings.append(f"the held-out split {test_dir} has no images of {len(missing)} class(es) "
                        f"({', '.join(ids[i] for i in missing[:5])}); its accuracy covers the others only")
    train_files, train_labels = take_subset(train_files, train_labels, cfg.subset, cfg.subset_seed)
    test_files, test_labels = take_subset(test_files, test_labels, cfg.subset, cfg.subset_seed)
    if check_sizes is not None:
        check_sizes(len(train_files))

    files = train_files + test_files
    listing = fp.listing_lines(files, root)
    state = "new"
    if expected is not None:
        state = fp.compare_listing(expected["fingerprint"], expected.get("listing"), listing)
    fingerprint = {"kind": "image_folder", "root": str(root), "files": len(files), "train_files": len(train_files),
                   "test_files": len(test_files), "bytes": sum(int(line.split("\t")[1]) for line in listing),
                   "listing_sha256": fp.sha256_lines(listing),
                   "paths_sizes_sha256": fp.sha256_lines([line.rsplit("\t", 1)[0] for line in listing]),
                   "policy": "listing (path, size, mtime) checked by every stage; content sha256 when mtimes differ"}

    total_bytes = len(files) * 3 * resize_size * resize_size
    if total_bytes > IN_MEMORY_LIMIT:
        fingerprint["content_sha256"] = None  # streamed: never read whole; the listing is the fingerprint
        return FolderData(StreamingFolderSplit(train_files, train_labels, resize_size, workers),
                          StreamingFolderSplit(test_files, test_labels, resize_size, workers), class_names,
                          fingerprint, listing, warnings)

    # the cache is keyed by the listing (mtimes included) and the decoding; the content hash is stored with it
    key = fp.cache_key(str(root), fingerprint["listing_sha256"], train_labels, test_labels, resize_size,
                       INTERPOLATION, bool(cfg.skip_unreadable))
    cached = fp.cache_load(key)
    if cached is None:
        train = decode_all(train_files, train_labels, resize_size, workers, f"decoding {train_dir}")
        test = decode_all(test_files, test_labels, resize_size, workers, f"decoding {test_dir}")
        failures = train.failures + test.failures
        if failures and not cfg.skip_unreadable:
            raise DataError(failures_message(failures, len(files)))
        content = fp.sha256_lines(train.digests + test.digests)
        skipped = [{"file": str(p.relative_to(root)), "reason": why} for p, why in failures]
        cached = {"train_images": train.images, "train_labels": train.labels, "test_images": test.images,
                  "test_labels": test.labels, "content_sha256": content, "skipped": skipped}
        fp.cache_save(key, cached)
    fingerprint["content_sha256"] = cached["content_sha256"]
    if state == "mtime" and cached["content_sha256"] != expected["fingerprint"].get("content_sha256"):
        raise fp.changed_error(str(root), fp.describe_changes(expected.get("listing") or [], listing))
    skipped = list(cached["skipped"])
    if skipped:
        warnings.append(f"skipped {len(skipped)} unreadable file(s) (data.skip_unreadable): "
                        f"{', '.join(s['file'] for s in skipped[:SHOW_FAILURES])}")
    for name, images in (("train", cached["train_images"]), ("test", cached["test_images"])):
        if len(images) == 0:
            raise DataError(f"{root}: no readable images left in the {name} split")
    return FolderData(TensorSplit(cached["train_images"], cached["train_labels"]),
                      TensorSplit(cached["test_images"], cached["test_labels"]), class_names, fingerprint, listing,
                      warnings, skipped)
