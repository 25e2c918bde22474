"""The run directory and its manifest: the only channel between stages.

``manifest.json`` holds the resolved recipe, the environment, and per stage its status, times, parameters,
inputs and outputs (path, sha256, size) and metrics. Every write is atomic (temp file + fsync + rename), a run
is locked by one process at a time, and an artifact is only handed to a later stage after its sha256 matches.

The lock is an ``flock`` on the run directory itself (POSIX): it cannot be deleted from under its holder the way a
lock file can. A stage recorded "running" whose run is not locked was interrupted (SIGKILL, power loss): ``status``
shows it as such and every stage may run again. The manifest is strict JSON: non-finite numbers are written as null.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from pcltool.errors import MissingArtifactError, RunDirError, RunLockedError, StaleArtifactError

MANIFEST = "manifest.json"
LOCK = ".lock"
SCHEMA_VERSION = 1

# What to run when a stage's output is missing (shown in MissingArtifactError).
PRODUCED_BY = {
    "train": "pcltool train RECIPE",
    "select": "pcltool select RUN",
    "prune": "pcltool prune RUN --peer NAME",
    "export": "pcltool export RUN --peer NAME",
    "build": "pcltool build RUN --engine ort|trt",
    "bench": "pcltool bench RUN",
}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename, on error it is removed.

    Readers therefore see the old file or the new one, never a partial one (also after SIGKILL)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with tmp_path.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _is_disk_full(error: BaseException) -> bool:
    import errno

    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def environment() -> dict[str, Any]:
    """Versions and device, recorded in every manifest."""
    import platform

    import torch

    import pcltool

    env = {
        "pcltool": pcltool.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_count"] = torch.cuda.device_count()
    return env


class _Artifact(BaseModel):
    model_config = ConfigDict(extra="allow")
    path: str
    sha256: str
    bytes: int


class _Stage(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: str
    outputs: dict[str, _Artifact] = {}
    pending_outputs: dict[str, _Artifact] = {}
    metrics: dict = {}
    params: dict = {}
    inputs: dict[str, _Artifact] = {}


class _Manifest(BaseModel):
    """The shape every command relies on (extra keys are kept)."""

    model_config = ConfigDict(extra="allow")
    run_id: str
    created: str
    recipe: dict
    stages: dict[str, _Stage]


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinite floats replaced by None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _lock_directory(path: Path):
    """An exclusive, non-blocking lock on the directory ``path``: an open descriptor, or None when it is held."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class _DirLock:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the flock


class RunDir:
    """A run directory. Construct with :meth:`create` (new run) or :meth:`open` (existing run)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = None
        self._entered: list[bool] = []  # per open `with`: did that block take the lock?

    # --- creation and discovery -------------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_dir: Path, name: str, recipe: dict, explicit: Path | None = None) -> RunDir:
        """Make a new run directory ``runs_dir/name`` (then ``name-2``, ``name-3``...) or ``explicit``."""
        if explicit is not None:
            path = Path(explicit)
            if (path / MANIFEST).exists():
                raise RunDirError(f"{path} already holds a run; use --resume to continue it or choose another --run")
            path.mkdir(parents=True, exist_ok=True)
        else:
            runs_dir = Path(runs_dir)
            runs_dir.mkdir(parents=True, exist_ok=True)
            for i in range(1, 10_000):
                path = runs_dir / (name if i == 1 else f"{name}-{i}")
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover
                raise RunDirError(f"no free run directory name under {runs_dir}")
        run = cls(path)
        run.acquire()
        import uuid

        run._write({
            "schema": SCHEMA_VERSION,
            "run_id": uuid.uuid4().hex,
            "name": path.name,
            "created": now(),
            "recipe": recipe,
            "environment": environment(),
            "stages": {},
        })
        return run

    @classmethod
    def open(cls, path: Path) -> RunDir:
        path = Path(path)
        if not (path / MANIFEST).is_file():
            raise RunDirError(f"{path} is not a pcltool run (no {MANIFEST}); start one with `pcltool train RECIPE`")
        return cls(path)

    @staticmethod
    def latest(runs_dir: Path = Path("runs")) -> Path:
        """The most recently created run under ``runs_dir``."""
        candidates = []
        for manifest in Path(runs_dir).glob(f"*/{MANIFEST}"):
            with contextlib.suppress(OSError, RunDirError):  # a damaged sibling does not hide the others
                candidates.append((RunDir(manifest.parent).read()["created"], manifest.stat().st_mtime,
                                   manifest.parent))
        if not candidates:
            raise RunDirError(f"no runs found under {runs_dir}/; start one with `pcltool train RECIPE` or pass a RUN path")
        return max(candidates)[2]

    # --- locking ----------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the run's lock for the life of this process (released by :meth:`release` or at exit)."""
        if self._lock is not None:
            return
        busy = RunLockedError(f"{self.path} is in use by another pcltool process (lock {self.path / LOCK}); "
                              "wait for it to finish")
        if os.name == "posix":
            fd = _lock_directory(self.path)
            if fd is None:
                raise busy
            self._lock = _DirLock(fd)
            with contextlib.suppress(OSError):
                (self.path / LOCK).touch()  # where users look; the lock itself is on the directory
            return
        from filelock import FileLock, Timeout

        lock = FileLock(str(self.path / LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise busy from None
        self._lock = lock

    def is_locked(self) -> bool:
        """Whether a pcltool process (this one included) holds the run's lock now."""
        if self._lock is not None:
            return True
        if os.name != "posix":
            from filelock import FileLock, Timeout

            try:
                with FileLock(str(self.path / LOCK)).acquire(timeout=0):
                    return False
            except Timeout:
                return True
        fd = _lock_directory(self.path)
        if fd is None:
            return True
        os.close(fd)
        return False

    def status_of(self, key: str, manifest: dict | None = None) -> str | None:
        """A stage's status, with a "running" stage whose run nobody holds shown as "interrupted"."""
        record = (manifest or self.read())["stages"].get(key)
        if record is None:
            return None
        status = record.get("status")
        if status == "running" and not self.is_locked():
            return "interrupted"
        return status

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
        """Hold the lock for the block; a lock already held (by an enclosing block or by ``acquire``) stays held
        afterwards, so stages can nest (``pcltool run`` holds the lock while it calls each stage)."""
        already_held = self._lock is not None
        self.acquire()
        self._entered.append(not already_held)
        return self

    def __exit__(self, *exc) -> None:
        if self._entered.pop():
            self.release()

    # --- manifest I/O -----------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read(self) -> dict:
        try:
            manifest = json.loads(self.manifest_path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise RunDirError(f"{self.path} is not a pcltool run (no {MANIFEST})") from None
        except IsADirectoryError:
            raise RunDirError(f"{self.manifest_path} is a directory, not a pcltool manifest") from None
        except UnicodeDecodeError:
            raise RunDirError(f"{self.manifest_path} is not UTF-8 text; it was not written by pcltool") from None
        except json.JSONDecodeError as err:
            raise RunDirError(f"{self.manifest_path} is not valid JSON ({err}); it was not written by pcltool") from None
        try:
            _Manifest.model_validate(manifest)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise RunDirError(f"{self.manifest_path} is not a pcltool manifest ({where}: {first['msg']}); restore it "
                              "or start a new run") from None
        return manifest

    def _write(self, manifest: dict) -> None:
        text = json.dumps(_finite(manifest), indent=2, sort_keys=False, allow_nan=False)
        atomic_write_text(self.manifest_path, text + "\n")

    def update(self, change: Callable[[dict], None]) -> dict:
        if self._lock is None:
            raise RunDirError("internal: manifest update without holding the run lock")
        manifest = self.read()
        change(manifest)
        self._write(manifest)
        return manifest

    @property
    def recipe(self) -> dict:
        return self.read()["recipe"]

    @property
    def run_id(self) -> str:
        return self.read()["run_id"]

    # --- artifacts ----------------------------------------------------------------------------------------------
    def relative(self, path: Path) -> str:
        path = Path(path)
        with contextlib.suppress(ValueError):
            return str(path.resolve().relative_to(self.path.resolve()))
        return str(path.resolve())

    def resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else self.path / p

    def describe(self, path: Path) -> dict:
        path = Path(path)
        return {"path": self.relative(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}

    def verify(self, record: dict, what: str, pending: dict | None = None) -> Path:
        """Check an artifact record against the file on disk; return its path.

        ``pending``: the record of a replacement that :meth:`replace_outputs` was putting in place when the process
        died; a file matching it is the complete new artifact."""
        path = self.resolve(record["path"])
        redo = ("start a new run with `pcltool train RECIPE` (or restore the file from a backup); train's own "
                "outputs cannot be made again in this run" if what.split(":")[0].startswith("train")
                else "re-run the stage that made it")
        if not path.is_file():
            raise StaleArtifactError(f"{what}: {path} is missing; {redo}")
        digest = sha256_file(path)
        if digest != record["sha256"] and not (pending and pending.get("sha256") == digest
                                               and self.resolve(pending["path"]) == path):
            raise StaleArtifactError(f"{what}: {path} changed since it was recorded (sha256 mismatch); {redo} "
                                     "instead of editing artifacts by hand")
        return path

    def verify_output(self, key: str, name: str) -> Path:
        """The verified path of output ``name`` of stage ``key`` (whatever its status)."""
        record = self.read()["stages"][key]
        pending = record.get("pending_outputs", {}).get(name)
        current = record.get("outputs", {}).get(name) or pending  # killed while putting the first one in place
        if current is None:
            raise MissingArtifactError(f"stage '{key}' recorded no output '{name}'")
        return self.verify(current, f"{key}/{name}", pending)

    def settle_pending(self, key: str) -> None:
        """After a kill inside :meth:`replace_outputs`: record as current every pending output whose file is in
        place, and forget the pending records (the next kill then finds a consistent record)."""
        record = self.read()["stages"].get(key) or {}
        pending = record.get("pending_outputs") or {}
        if not pending:
            return
        landed = {name: rec for name, rec in pending.items()
                  if self.resolve(rec["path"]).is_file() and sha256_file(self.resolve(rec["path"])) == rec["sha256"]}

        def change(m: dict) -> None:
            m["stages"][key]["outputs"].update(landed)
            m["stages"][key].pop("pending_outputs", None)

        self.update(change)

    def replace_outputs(self, key: str, staged: dict[str, tuple[Path, Path]],
                        change: Callable[[dict], None] | None = None) -> None:
        """Move finished files into place (``name: (temporary, final)``) and record them as ``key``'s outputs in
        one recoverable step: their hashes are recorded as pending first, then the files are renamed, then the
        records are replaced. A kill at any point leaves every file matching its record or its pending record
        (:meth:`verify_output` accepts either), never an unresumable run."""
        pending = {name: {**self.describe(tmp), "path": self.relative(final)} for name, (tmp, final) in staged.items()}
        self.update(lambda m: m["stages"][key].__setitem__("pending_outputs", pending))
        for tmp, final in staged.values():
            os.replace(tmp, final)
            _fsync_dir(Path(final).parent)

        def commit(m: dict) -> None:
            rec = m["stages"][key]
            rec["outputs"].update(pending)
            rec.pop("pending_outputs", None)
            if change is not None:
                change(m)

        self.update(commit)

    # --- stages -----------------------------------------------------------------------------------------------
    def stage(self, key: str) -> dict | None:
        return self.read()["stages"].get(key)

    def require(self, key: str, hint: str | None = None) -> dict:
        """The record of a finished stage, or a typed error naming the command that produces it."""
        record = self.stage(key)
        if record is None or record.get("status") != "done":
            base = key.split(":")[0]
            status = self.status_of(key)
            state = ("has not run" if record is None else "was interrupted" if status == "interrupted"
                     else f"is {status}")
            command = hint or PRODUCED_BY.get(base, f"pcltool {base}")
            raise MissingArtifactError(f"stage '{key}' {state} in {self.path}; run `{command}` first")
        return record

    def artifact(self, key: str, name: str, hint: str | None = None) -> Path:
        record = self.require(key, hint)
        if name not in record.get("outputs", {}):
            raise MissingArtifactError(f"stage '{key}' recorded no output '{name}'")
        return self.verify(record["outputs"][name], f"{key}/{name}", record.get("pending_outputs", {}).get(name))

    def begin(self, key: str, params: dict | None = None, inputs: dict[str, Path] | None = None,
              keep_outputs: bool = False) -> None:
        """Mark a stage running. ``keep_outputs`` keeps what an interrupted earlier attempt recorded (resume)."""
        described = {k: self.describe(p) for k, p in (inputs or {}).items()}

        def change(m: dict) -> None:
            old = m["stages"].get(key, {}) if keep_outputs else {}
            m["stages"][key] = {"status": "running", "started": now(), "params": params or {}, "inputs": described,
                                "outputs": old.get("outputs", {}), "metrics": old.get("metrics", {})}

        self.update(change)

    def finish(self, key: str, outputs: dict[str, Path] | None = None, metrics: dict | None = None) -> None:
        described = {k: self.describe(p) for k, p in (outputs or {}).items()}

        def change(m: dict) -> None:
            rec = m["stages"][key]
            rec.update(status="done", finished=now(), outputs=described, metrics=metrics or {})
            rec.pop("error", None)

        self.update(change)

    def record_metrics(self, key: str, metrics: dict) -> None:
        self.update(lambda m: m["stages"][key]["metrics"].update(metrics))

    def fail(self, key: str, error: BaseException) -> None:
        """Record ``key`` as failed (or "interrupted" after Ctrl-C / SIGTERM). Best effort: when even this write
        fails (a full disk), the stage stays "running" and shows as interrupted once the lock is free."""
        interrupted = isinstance(error, KeyboardInterrupt)

        def change(m: dict) -> None:
            rec = m["stages"].setdefault(key, {"started": now(), "outputs": {}, "metrics": {}})
            rec.update(status="interrupted" if interrupted else "failed", finished=now(),
                       error=f"{type(error).__name__}: {error}")
            if not interrupted and type(error).__module__ != "pcltool.errors" and not _is_disk_full(error):
                rec["traceback"] = traceback.format_exception(type(error), error, error.__traceback__)[-3:]

        with contextlib.suppress(OSError):
            self.update(change)

    @contextlib.contextmanager
    def running(self, key: str, params: dict | None = None, inputs: dict[str, Path] | None = None):
        """Mark ``key`` running; on an exception (Ctrl-C included) mark it failed and re-raise."""
        self.begin(key, params, inputs)
        try:
            yield
        except BaseException as err:
            self.fail(key, err)
            raise
