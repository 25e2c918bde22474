"""The run directory: atomic manifest writes, the lock, artifact hashes, typed errors for missing stages."""

import json
import subprocess
import sys

import pytest

from pcltool.errors import MissingArtifactError, RunDirError, RunLockedError, StaleArtifactError
from pcltool.manifest import RunDir, atomic_path, atomic_write_text


def _run(tmp_path, name="exp"):
    return RunDir.create(tmp_path / "runs", name, {"name": name})


def test_create_picks_free_names(tmp_path):
    a, b, c = _run(tmp_path), _run(tmp_path), _run(tmp_path)
    assert [r.path.name for r in (a, b, c)] == ["exp", "exp-2", "exp-3"]
    manifest = c.read()
    assert manifest["recipe"] == {"name": "exp"} and manifest["environment"]["torch"]
    assert RunDir.latest(tmp_path / "runs") == c.path


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp file left behind


def test_stage_lifecycle_and_hashes(tmp_path):
    run = _run(tmp_path)
    art = run.path / "model.bin"
    art.write_bytes(b"weights")
    with run.running("prune:mean1", params={"peer": "mean1"}):
        pass
    run.finish("prune:mean1", {"weights": art}, {"params": 7})
    rec = run.require("prune:mean1")
    assert rec["status"] == "done" and rec["outputs"]["weights"]["path"] == "model.bin"
    import hashlib
    assert rec["outputs"]["weights"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert run.artifact("prune:mean1", "weights") == art
    art.write_bytes(b"tampered")
    with pytest.raises(StaleArtifactError, match="sha256"):
        run.artifact("prune:mean1", "weights")


def test_failed_stage_is_recorded(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ValueError):
        with run.running("select"):
            raise ValueError("boom")
    rec = run.stage("select")
    assert rec["status"] == "failed" and "boom" in rec["error"]
    with pytest.raises(MissingArtifactError, match="pcltool select"):
        run.require("select")


def test_missing_stage_names_the_command(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(MissingArtifactError, match="pcltool train RECIPE"):
        run.require("train")


def test_second_process_gets_lock_error(tmp_path):
    run = _run(tmp_path)  # this process holds the lock
    code = (f"from pcltool.manifest import RunDir\n"
            f"from pcltool.errors import RunLockedError\n"
            f"try:\n    RunDir.open({str(run.path)!r}).acquire()\nexcept RunLockedError as e:\n    print('LOCKED', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert out.startswith("LOCKED") and "in use by another pcltool process" in out
    run.release()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "LOCKED" not in out


def test_update_without_lock_is_refused(tmp_path):
    run = _run(tmp_path)
    run.release()
    with pytest.raises(RunDirError):
        RunDir.open(run.path).update(lambda m: None)


def test_not_a_run_and_corrupt_manifest(tmp_path):
    with pytest.raises(RunDirError, match="not a pcltool run"):
        RunDir.open(tmp_path)
    run = _run(tmp_path)
    run.manifest_path.write_text("{broken")
    with pytest.raises(RunDirError, match="not valid JSON"):
        run.read()


def test_manifest_is_valid_json_after_many_updates(tmp_path):
    run = _run(tmp_path)
    for i in range(20):
        run.update(lambda m, i=i: m.setdefault("counter", []).append(i))
    assert json.loads(run.manifest_path.read_text())["counter"] == list(range(20))


def test_nested_with_blocks_keep_the_outer_lock(tmp_path):
    run = _run(tmp_path)
    run.release()
    with run:
        with run:  # a stage called from `pcltool run` enters the lock again
            pass
        assert run._lock is not None  # the inner block did not release the outer one
    assert run._lock is None
    run.acquire()
    with run:
        pass
    assert run._lock is not None  # a lock taken by acquire() outlives the block
