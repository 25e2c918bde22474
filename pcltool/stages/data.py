"""A run's data: recorded once by ``train`` (``manifest["data"]``: fingerprint, preprocessing, sizes, skipped
files, warnings; image folders also ``data_listing.txt``, the file listing the fingerprint hashes), loaded by every
later stage against that record (changed data refused before decoding, the run's own resize used)."""

from __future__ import annotations

import json
import sys

from pcltool.manifest import RunDir, atomic_write_text

LISTING = "data_listing.txt"
_warned: set[str] = set()
_CACHE: dict[str, object] = {}


def record_data(run: RunDir, data) -> None:
    """Store ``data.record()`` in the manifest (and the folder listing beside it)."""
    record = data.record()
    if data.listing is not None:
        path = run.path / LISTING
        atomic_write_text(path, "".join(line + "\n" for line in data.listing))
        record["listing"] = run.describe(path)
    run.update(lambda m: m.__setitem__("data", record))


def expected_data(run: RunDir) -> dict | None:
    """What ``train`` recorded about the run's data (with the listing read back), or None for a run made before
    data was recorded (a warning, once per run, says its data cannot be checked)."""
    manifest = run.read()
    record = manifest.get("data")
    if record is None:
        key = str(run.path)
        if key not in _warned:
            _warned.add(key)
            print(f"warning: {run.path} was trained before pcltool recorded data fingerprints; its data is not "
                  "checked for changes", file=sys.stderr)
        return {} if manifest.get("stages", {}).get("train") else None
    expected = dict(record)
    listing = record.get("listing")
    if listing:
        path = run.resolve(listing["path"])
        expected["listing"] = path.read_text().splitlines() if path.is_file() else None
    return expected


def load_data(recipe, run: RunDir | None = None):
    """The run's dataset, checked against what ``train`` recorded (cached per process: select, prune and export
    in one command load it once; the decoded images are also cached on disk per data fingerprint)."""
    from pcltool.data import load_dataset
    from pcltool.data.fingerprint import ALLOW_ENV, allow_data_change

    expected = expected_data(run) if run is not None else None
    key = json.dumps([recipe.data.model_dump(mode="json"), str(run.path) if run else None], sort_keys=True)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_dataset(recipe.data, expected)
        if run is not None and expected and allow_data_change() and run._lock is not None:
            run.update(lambda m: m.setdefault("data", {}).setdefault("overrides", []).append(
                f"{ALLOW_ENV}=1: data not checked against the fingerprint"))
    return _CACHE[key]
