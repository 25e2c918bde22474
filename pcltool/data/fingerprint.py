"""What data a run trained on, and whether a later stage still sees the same data.

Policy for image folders (the manifest's ``data.fingerprint``):

- ``listing_sha256``: sha256 of the sorted ``relative path, size, mtime`` lines of every file the dataset uses. A
  later stage stats the files (no reading) and compares: equal listings mean unchanged data, which is what lets
  the decoded cache be trusted without reading a single image.
- ``content_sha256``: sha256 over the files' own sha256 sums, computed while the files are decoded (their bytes
  are read anyway, so it costs nothing extra). When only modification times differ (a copy made without
  preserving them, a ``touch``), the files are decoded again and the content hash decides: same content is
  accepted with a note; anything else is refused.
- Added, removed or resized files are refused before anything is decoded, naming the first ones.

CIFAR's fingerprint is its files' md5 sums (computed before unpickling); the embedded digits', a hash of the arrays.
``PCLTOOL_ALLOW_DATA_CHANGE=1`` lets a stage go on with changed data; the stage records that it did."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pcltool.errors import DataError

ALLOW_ENV = "PCLTOOL_ALLOW_DATA_CHANGE"
CACHE_ENV = "PCLTOOL_CACHE_DIR"
DECODER_VERSION = 1  # bump when decoding changes: cached arrays from another version are not reused


def allow_data_change() -> bool:
    return os.environ.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def listing_lines(files: list[Path], root: Path) -> list[str]:
    """``relative path\\tsize\\tmtime_ns`` per file, in the dataset's order."""
    lines = []
    for path in files:
        try:
            st = path.stat()
        except OSError as err:
            raise DataError(f"cannot stat {path}: {err}") from None
        lines.append(f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}")
    return lines


def sha256_lines(lines: list[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def _strip_mtime(lines: list[str]) -> list[str]:
    return [line.rsplit("\t", 1)[0] for line in lines]


def describe_changes(old: list[str], new: list[str], limit: int = 3) -> str:
    """'2 added (a, b), 1 removed (c)' between two listings (path\\tsize\\tmtime lines)."""
    old_map = dict(line.split("\t", 1) for line in old)
    new_map = dict(line.split("\t", 1) for line in new)
    added = [p for p in new_map if p not in old_map]
    removed = [p for p in old_map if p not in new_map]
    resized = [p for p in new_map if p in old_map and new_map[p].split("\t")[0] != old_map[p].split("\t")[0]]
    touched = [p for p in new_map if p in old_map and p not in resized and new_map[p] != old_map[p]]
    parts = []
    for label, items in (("added", added), ("removed", removed), ("changed size", resized),
                         ("modified (same size)", touched)):
        if items:
            shown = ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")
            parts.append(f"{len(items)} {label} ({shown})")
    return "; ".join(parts) or "the file order changed"


def compare_listing(recorded: dict, recorded_lines: list[str] | None, lines: list[str]) -> str:
    """``"same"``, ``"mtime"`` (only modification times differ: the content hash must decide) or raises."""
    if sha256_lines(lines) == recorded.get("listing_sha256"):
        return "same"
    if sha256_lines(_strip_mtime(lines)) == recorded.get("paths_sizes_sha256"):
        return "mtime"
    what = describe_changes(recorded_lines, lines) if recorded_lines is not None else \
        f"{recorded.get('files')} files recorded, {len(lines)} now"
    raise changed_error(recorded.get("root", "the dataset"), what)


def changed_error(root: str, what: str) -> DataError:
    return DataError(f"the data at {root} changed since this run was trained: {what}. A changed dataset also "
                     "changes the validation split carved from it; restore the data, train a new run on it, or set "
                     f"{ALLOW_ENV}=1 to go on anyway (recorded in the manifest)")


# --- the decoded cache -------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                       "pcltool")
    return Path(base) / "decoded"


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([DECODER_VERSION, *parts], sort_keys=True).encode()).hexdigest()


def cache_load(key: str):
    """The cached object under ``key`` or None (a damaged entry is ignored and decoded again)."""
    import torch

    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: decode again
        return None


def cache_save(key: str, obj) -> None:
    """Best effort: a read-only or full cache disk only costs the next stage a decode."""
    import torch

    from pcltool.manifest import atomic_path

    path = cache_dir() / f"{key}.pt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError:
        pass
