"""Faults and bad input: gates that cannot be fooled (ties, INT8 scores, thresholds, tolerances), a run directory
that survives kills, full disks, signals and tampering, and one clear line instead of a traceback for bad recipes,
flags and manifests. Fuzzing (hypothesis) is bounded in examples and time so the suite stays fast on a busy CPU."""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.config import load_recipe
from pcltool.errors import (RecipeError, RunDirError, RunLockedError, StaleArtifactError, TrainingDivergedError,
                            UsageError, VerificationError)
from pcltool.manifest import RunDir
from pcltool.ranking import top_k_accuracy, top_k_indices, top_k_torch
from tests.conftest import QUICKSTART, TINY_OVERRIDES
from tests.test_build import _one_thread, exported_template, int8_template  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _strict_json(path: Path):
    """Parse like a strict JSON reader: NaN / Infinity are errors."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _run(tmp_path: Path, name: str = "r") -> RunDir:
    return RunDir.create(tmp_path / "runs", name, {"name": name})


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _sets(extra=()):
    out = []
    for item in list(TINY_OVERRIDES) + list(extra):
        out += ["--set", item]
    return out


def _one_line_error(result) -> None:
    """A refusal: non-zero exit, an ``error:`` message, no traceback."""
    text = result.output if hasattr(result, "output") else result.stdout + result.stderr
    assert result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert "Traceback" not in text and "error" in text.lower(), text[-2000:]
    if hasattr(result, "exception") and result.exception is not None:
        assert isinstance(result.exception, SystemExit), repr(result.exception)


# --- 1. one tie rule --------------------------------------------------------------------------------------------------
def _deploy_module():
    spec = importlib.util.spec_from_file_location("pcl_infer", ROOT / "deploy" / "pcl_infer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@FUZZ
@given(st.integers(1, 6), st.integers(2, 12), st.integers(1, 5), st.data())
def test_tie_rule_is_argmax_everywhere(rows, classes, k, data):
    # few distinct values: most rows tie, the case quantised scores produce
    scores = np.array(data.draw(st.lists(st.lists(st.integers(-2, 2), min_size=classes, max_size=classes),
                                         min_size=rows, max_size=rows)), dtype=np.float32)
    ours = top_k_indices(scores, k)
    assert (ours[:, 0] == scores.argmax(1)).all()
    assert (_deploy_module().top_k_indices(scores, k) == ours).all()
    assert (top_k_torch(torch.from_numpy(scores), k).numpy() == ours).all()
    for row, top in zip(scores, ours):  # best first, and among equals the lower index first
        for a, b in zip(top, top[1:]):
            assert row[a] > row[b] or (row[a] == row[b] and a < b)


def test_tied_top_score_counts_the_lowest_class():
    scores = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], dtype=np.float32)
    assert top_k_accuracy(scores, np.array([1, 0]), 1) == 100.0
    assert top_k_accuracy(scores, np.array([2, 1]), 1) == 0.0


def test_int8_engine_keeps_the_logits_in_float(int8_template):
    import onnx

    run = RunDir.open(int8_template)
    model = onnx.load(str(run.artifact("build:ort-int8:mean1", "engine")))
    producer = {out: node for node in model.graph.node for out in node.output}[model.graph.output[0].name]
    assert producer.op_type not in ("DequantizeLinear", "QuantizeLinear"), producer.op_type
    assert run.stage("build:ort-int8:mean1")["params"]["quantization"]["float_output"] is True


# --- 2-3. the reduced-precision gate and its thresholds ----------------------------------------------------------------
def _check(**kw):
    base = {"images": 1000, "top1_agreement": 99.0, "max_abs_diff": 0.1, "reference_top1": 50.0, "top1": 50.0,
            "top1_change": 0.0, "finite": True}
    return {**base, **kw}


def test_gate_rejects_low_agreement_even_when_accuracy_rises():
    from pcltool.stages.build import gate

    with pytest.raises(VerificationError, match="agrees with the FP32 model on 11.00%"):
        gate(_check(top1_agreement=11.0, top1=50.5, top1_change=0.5), "int8", 1.0, 5.0)
    with pytest.raises(VerificationError, match="rose 6.00 points"):
        gate(_check(top1=56.0, top1_change=6.0), "int8", 1.0, 5.0)
    with pytest.raises(VerificationError, match="dropped 2.00 points"):
        gate(_check(top1=48.0, top1_change=-2.0), "int8", 1.0, 5.0)
    gate(_check(top1=50.9, top1_change=0.9), "int8", 1.0, 5.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 100.5])
def test_gate_thresholds_must_be_finite_percentages(value):
    from pcltool.stages.build import check_thresholds, gate

    with pytest.raises(UsageError, match="between 0 and 100"):
        check_thresholds(value, 95.0)
    with pytest.raises(UsageError, match="between 0 and 100"):
        check_thresholds(1.0, value)
    with pytest.raises(UsageError):
        gate(_check(), "int8", value, 5.0)


@pytest.mark.parametrize("flag, value", [("--max-top1-drop", "nan"), ("--max-top1-drop", "-1"),
                                         ("--min-agreement", "inf"), ("--threads", "100000"), ("--threads", "0"),
                                         ("--batch", "abc"), ("--batch", "1,64,999999999"),
                                         ("--calib-images", "0")])
def test_build_flags_are_refused_before_anything_is_written(trained_run, flag, value):
    before = (trained_run / "manifest.json").read_bytes()
    result = CliRunner().invoke(app, ["build", str(trained_run), flag, value])
    assert result.exit_code == 2, result.output
    _one_line_error(result)
    assert (trained_run / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("args", [["--threads", "-1"], ["--max-seconds", "nan"], ["--max-seconds", "-3"],
                                  ["--batch", "0"], ["--batch", "x"]])
def test_bench_flags_are_refused(trained_run, args):
    result = CliRunner().invoke(app, ["bench", str(trained_run), *args])
    assert result.exit_code == 2, result.output
    _one_line_error(result)


@pytest.mark.parametrize("args", [["--max-batch", "-1"], ["--instances", "0"], ["--instances", "1000"]])
def test_triton_flags_are_refused(trained_run, tmp_path, args):
    result = CliRunner().invoke(app, ["deploy", "triton", str(trained_run), str(tmp_path / "repo"), *args])
    assert result.exit_code == 2, result.output
    _one_line_error(result)
    assert not (tmp_path / "repo").exists()


def test_triton_output_that_is_a_file_is_refused(trained_run, tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(app, ["deploy", "triton", str(trained_run), str(tmp_path / "file" / "repo")])
    assert result.exit_code == 2 and "is a file" in result.output, result.output


def test_manifest_stays_strict_json(tmp_path):
    run = _run(tmp_path)
    run.update(lambda m: m.update(bad={"nan": float("nan"), "inf": [float("inf"), -float("inf")], "ok": 1.5}))
    doc = _strict_json(run.manifest_path)
    assert doc["bad"] == {"nan": None, "inf": [None, None], "ok": 1.5}


# --- 4. the ONNX export gate's tolerance -------------------------------------------------------------------------------
def _linear_onnx(path: Path, weight: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "linear", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_gate_tolerance_follows_the_logits_scale(tmp_path):
    from pcltool.onnx_gate import GateReport, GateSpec, check_values

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10, bias=False))
    with torch.no_grad():
        model[1].weight.mul_(2e4)  # logits reach ~1e4, where float32 steps by ~1e-3
    _linear_onnx(tmp_path / "m.onnx", model[1].weight.detach().numpy().T.copy())
    x = torch.randn(72, 3, 4, 4)
    spec = GateSpec(input_shape=[3, 4, 4], num_classes=10)

    def run(spec):
        report = GateReport()
        check_values(tmp_path / "m.onnx", model, [(x.numpy(), x)], spec, report)
        return report

    report = run(spec)
    values = report.figures["values"]
    assert values["max_abs_logit"] > 1e3 and values["tolerance"] == pytest.approx(1e-4 + 1e-5 * values["max_abs_logit"])
    assert not [f for f in report.failures if "max abs logit diff" in f], report.failures
    if values["max_abs_diff"] > 0:  # the absolute floor alone would not pass these logits: the override is honoured
        strict = run(GateSpec(input_shape=[3, 4, 4], num_classes=10, atol=0.0, rtol=0.0))
        assert any("max abs logit diff" in f for f in strict.failures)


@pytest.mark.parametrize("flag, value", [("--atol", "nan"), ("--rtol", "-1"), ("--rtol", "inf")])
def test_export_tolerance_flags_are_validated(trained_run, flag, value):
    result = CliRunner().invoke(app, ["export", str(trained_run), flag, value])
    assert result.exit_code == 2, result.output
    _one_line_error(result)


# --- 5. the checkpoint and its record are one recoverable step ----------------------------------------------------------
KILL_AFTER_CHECKPOINT = """
import os, signal, sys
import pcltool.manifest as manifest
real = os.replace
def replace(src, dst, *a, **k):
    real(src, dst, *a, **k)
    if str(dst).endswith("last.pt"):  # the checkpoint is in place, its record not yet: the old window
        os.kill(os.getpid(), signal.SIGKILL)
manifest.os.replace = replace
sys.argv = ["pcltool"] + sys.argv[1:]
from pcltool.cli import app
app()
"""


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_kill_between_checkpoint_and_its_record_resumes_bit_exact(tmp_path):
    sets = _sets(["train.epochs=2"])
    full = subprocess.run([sys.executable, "-m", "pcltool", "train", str(QUICKSTART), *sets, "--run",
                           str(tmp_path / "full")], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert full.returncode == 0, full.stderr
    cut = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, "train", str(QUICKSTART), *sets, "--run",
                          str(tmp_path / "cut")], capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert cut.returncode == -signal.SIGKILL, cut.stderr[-2000:]
    status = subprocess.run([sys.executable, "-m", "pcltool", "status", str(tmp_path / "cut"), "--json"],
                            capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert json.loads(status.stdout)["stages"]["train"]["status"] == "interrupted"
    resumed = subprocess.run([sys.executable, "-m", "pcltool", "train", str(QUICKSTART), *sets, "--run",
                              str(tmp_path / "cut"), "--resume"], capture_output=True, text=True, cwd=tmp_path,
                             env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _state(tmp_path / "full" / "checkpoints" / "last.pt"), _state(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"]
    for net in ("live", "mean"):
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"
    train = RunDir.open(tmp_path / "cut").stage("train")
    assert train["status"] == "done" and "pending_outputs" not in train
    assert train["params"]["resumed_from_epoch"] == 1  # continued from the checkpoint written in the window


def test_a_pending_record_is_accepted_and_promoted(tmp_path):
    run = _run(tmp_path)
    run.begin("s")
    first, final = tmp_path / "a.tmp", run.path / "out.bin"
    first.write_bytes(b"one")
    run.replace_outputs("s", {"out": (first, final)})
    assert run.verify_output("s", "out") == final
    final.write_bytes(b"two")  # as if killed after the rename of a new version, before its record
    pending = {**run.describe(final), "path": "out.bin"}
    run.update(lambda m: m["stages"]["s"].__setitem__("pending_outputs", {"out": pending}))
    assert run.verify_output("s", "out") == final
    run.settle_pending("s")  # resume makes the landed file the record, so a second kill finds it consistent
    rec = run.stage("s")
    assert "pending_outputs" not in rec and rec["outputs"]["out"]["sha256"] == pending["sha256"]
    final.write_bytes(b"three")  # neither the record nor the pending record: tampering
    with pytest.raises(StaleArtifactError, match="sha256 mismatch"):
        run.verify_output("s", "out")


# --- 6. truncated logs, full disks --------------------------------------------------------------------------------------
def test_truncated_last_log_line_is_dropped_on_resume(tmp_path):
    from pcltool.stages.train import _MetricsLog

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"kind": "val", "epoch": 1}\n{"kind": "train", "epoch": 2}\n{"kind": "val", "ep')
    _MetricsLog(log, keep_epochs_below=1).close()
    assert log.read_text() == '{"kind": "val", "epoch": 1}\n'


def test_disk_full_is_one_clear_line_and_the_manifest_survives(trained_run, monkeypatch):
    import pcltool.manifest as manifest

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "select.json"))

    monkeypatch.setattr(manifest.RunDir, "finish", full)
    result = CliRunner().invoke(app, ["select", str(trained_run)])
    assert result.exit_code == 1 and "no space left on the device" in result.output, result.output
    _one_line_error(result)
    rec = RunDir.open(trained_run).stage("select")
    assert rec["status"] == "failed" and "traceback" not in rec
    _strict_json(trained_run / "manifest.json")


# --- 7. SIGTERM and stale "running" stages -------------------------------------------------------------------------------
def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pcltool", "train", str(QUICKSTART), *_sets(["train.epochs=50"]),
                             "--run", str(tmp_path / "r")], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    manifest = tmp_path / "r" / "manifest.json"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if json.loads(manifest.read_text())["stages"]["train"]["status"] == "running":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    # recorded as interrupted (a signal landing in the few instructions before that record is possible: then the
    # stage is still "running" on disk with a free lock, which status also reports as interrupted)
    assert json.loads(manifest.read_text())["stages"]["train"]["status"] in ("interrupted", "running")
    status = subprocess.run([sys.executable, "-m", "pcltool", "status", str(tmp_path / "r"), "--json"],
                            capture_output=True, text=True, cwd=tmp_path, env=_env())
    assert json.loads(status.stdout)["stages"]["train"]["status"] == "interrupted"


def test_running_stage_without_a_lock_holder_shows_as_interrupted(tmp_path):
    run = _run(tmp_path)
    run.begin("build:ort-int8:mean1")
    assert run.status_of("build:ort-int8:mean1") == "running"  # this process holds the run
    run.release()
    assert run.status_of("build:ort-int8:mean1") == "interrupted"
    result = CliRunner().invoke(app, ["status", str(run.path), "--json"])
    assert json.loads(result.output)["stages"]["build:ort-int8:mean1"]["status"] == "interrupted"
    table = CliRunner().invoke(app, ["status", str(run.path)])
    assert "interrupted" in table.output
    with pytest.raises(RunDirError, match="was interrupted"):
        run.require("build:ort-int8:mean1")


# --- 8. the lock cannot be deleted from under its holder ----------------------------------------------------------------
def test_deleting_the_lock_file_does_not_let_a_second_process_in(tmp_path):
    run = _run(tmp_path)  # this process holds the run
    (run.path / ".lock").unlink(missing_ok=True)
    code = ("from pcltool.manifest import RunDir\nfrom pcltool.errors import RunLockedError\n"
            f"try:\n    RunDir.open({str(run.path)!r}).acquire()\nexcept RunLockedError:\n    print('LOCKED')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.stdout.strip() == "LOCKED", out.stderr
    with pytest.raises(RunLockedError):
        RunDir.open(run.path).acquire()  # another holder in this process is refused too


# --- 9. divergence ---------------------------------------------------------------------------------------------------
def test_divergence_rule():
    from pcltool.stages.train import DIVERGENCE_FACTOR, check_divergence

    check_divergence(9.0, None, 1, 1, None)
    check_divergence(9.0 * DIVERGENCE_FACTOR * 0.99, 9.0, 1, 5, None)
    with pytest.raises(TrainingDivergedError, match="rose to 1.7e\\+17"):
        check_divergence(1.7e17, 9.0, 1, 5, None)
    with pytest.raises(TrainingDivergedError, match="NaN or infinite"):
        check_divergence(float("nan"), 9.0, 1, 5, None)


def test_exploding_but_finite_training_stops(tmp_path):
    from pcltool.distributed import train_entry

    recipe = load_recipe(QUICKSTART, TINY_OVERRIDES + ["train.lr=20", "train.epochs=3", "train.log_every=1",
                                                       f"output.runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(TrainingDivergedError, match="diverged"):
        train_entry(recipe, tmp_path / "runs" / "lr20", resume=False, console=None)
    assert RunDir.open(tmp_path / "runs" / "lr20").stage("train")["status"] == "failed"


# --- 10. manifests of the wrong shape -------------------------------------------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3), max_leaves=8)


@FUZZ
@given(JSON_VALUES, st.sampled_from(["whole", "stages", "stage", "outputs", "recipe"]))
def test_manifest_shapes_never_crash(tmp_path_factory, value, where):
    base = tmp_path_factory.mktemp("shape")
    good = RunDir.create(base / "runs", "good", {"name": "good"})
    good.release()
    bad = RunDir.create(base / "runs", "bad", {"name": "bad"})
    bad.begin("select")
    bad.release()
    doc = json.loads(bad.manifest_path.read_text())
    if where == "whole":
        doc = value
    elif where == "stages":
        doc["stages"] = value
    elif where == "stage":
        doc["stages"]["select"] = value
    elif where == "outputs":
        doc["stages"]["select"]["outputs"] = value
    else:
        doc["recipe"] = value
    bad.manifest_path.write_text(json.dumps(doc))
    try:
        bad.read()
    except RunDirError:
        pass
    result = CliRunner().invoke(app, ["status", str(bad.path)])
    assert result.exit_code in (0, 4), result.output
    if result.exit_code:
        _one_line_error(result)
    # a damaged sibling never breaks the commands that look for the newest run
    os.utime(bad.manifest_path)
    assert RunDir.latest(base / "runs") in (good.path, bad.path)


@pytest.mark.parametrize("content", [b"[]", b"{}", b'{"stages": null}', b"\xff\xfe\x00garbage", b"null"])
def test_bad_manifest_is_one_line(tmp_path, content):
    run = _run(tmp_path)
    run.release()
    run.manifest_path.write_bytes(content)
    result = CliRunner().invoke(app, ["status", str(run.path)])
    assert result.exit_code == 4, result.output
    _one_line_error(result)


# --- 11. paths are not markup ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["[exp1]", "a[b]c", "x[/c]y"])
def test_paths_with_brackets_are_printed_as_they_are(tmp_path, name):
    run = RunDir.create(tmp_path / "runs", name.replace("/", "_"), {"name": "n"})
    run.release()
    result = CliRunner().invoke(app, ["status", str(run.path)])
    assert result.exit_code == 0, result.output
    assert run.path.name in result.output.replace("\n", "")


# --- 12. recipes: strict types and values ------------------------------------------------------------------------------
@pytest.mark.parametrize("override", [
    "data.val_size=1.5", "data.val_size=inf", "data.val_size=nan", "data.std=[inf, 1.0, 1.0]",
    "data.mean=[0.5, 0.5]", "pcl.rampup_epochs=inf", "train.epochs=\"2\"", "pcl.enabled=\"yes\"", "pcl.enabled=yes",
    "seed=100000000000000000000000", "seed=-1", "train.batch_size=1000000000000", "train.epochs=10000000",
    "train.lr=1e300", "pcl.temperature=inf", "train.epochs=2.0", "pcl.peers=3.5",
])
def test_bad_recipe_values_are_refused(override):
    with pytest.raises(RecipeError):
        load_recipe(QUICKSTART, [override])


def test_all_loss_weights_zero_is_refused():
    zero = ["pcl.ce_weight=0", "pcl.ensemble_ce_weight=0", "pcl.kd_ensemble_weight=0", "pcl.kd_mean_weight=0"]
    with pytest.raises(RecipeError, match="nothing would learn"):
        load_recipe(QUICKSTART, zero)
    with pytest.raises(RecipeError, match="nothing would learn"):
        load_recipe(QUICKSTART, ["pcl.enabled=false", "pcl.ce_weight=0"])


KEYS = ["seed", "device", "data.val_size", "data.val_seed", "data.std", "data.scale", "data.pad", "data.augment",
        "pcl.enabled", "pcl.peers", "pcl.temperature", "pcl.rampup_epochs", "pcl.ema_decay", "pcl.ce_weight",
        "train.epochs", "train.batch_size", "train.lr", "train.milestones", "train.warmup_epochs", "train.precision",
        "model.backbone", "name"]
RAW_VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e400", "\"2\"", "yes", "true", "0", "-1", "1.5", "[]", "[inf]",
                     "[1, 2]", "{a = 1}", "\"\"", "99999999999999999999999", "0.0", "[0.1, 0.2, 0.3]", "1,2"]),
    st.integers(-10**20, 10**20).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10).filter(lambda t: "\n" not in t and "\r" not in t))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(KEYS), RAW_VALUES), min_size=1, max_size=3))
def test_set_values_fuzz_validate_or_refuse(pairs):
    try:
        recipe = load_recipe(QUICKSTART, [f"{k}={v}" for k, v in pairs])
    except RecipeError as err:
        assert str(err).strip()
        return
    # accepted: every value is finite, of its declared type and in range (no silent coercion)
    def finite(v):
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, (list, tuple)):
            return all(finite(x) for x in v)
        if isinstance(v, dict):
            return all(finite(x) for x in v.values())
        return True

    resolved = recipe.resolved()
    assert finite(resolved)
    assert isinstance(resolved["train"]["epochs"], int) and isinstance(resolved["pcl"]["enabled"], bool)
    vs = recipe.data.val_size
    assert 0 < vs < 1 or vs == int(vs)


@FUZZ
@given(st.dictionaries(st.sampled_from(["train", "pcl", "data", "seed", "name", "model"]), JSON_VALUES, max_size=3))
def test_recipe_documents_fuzz_validate_or_refuse(tmp_path_factory, doc):
    import tomli_w

    path = tmp_path_factory.mktemp("recipe") / "r.toml"
    try:
        path.write_text(tomli_w.dumps(doc))
    except (TypeError, ValueError):
        return  # not expressible in TOML
    try:
        load_recipe(path)
    except RecipeError:
        pass


# --- 13-14. checkpoints refused by weights_only; train's own outputs ------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_refused_by_weights_only_is_one_line(trained_run):
    from pcltool.stages.train import load_checkpoint

    bad = trained_run / "checkpoints" / "last.pt"
    torch.save({"live": _Payload()}, bad)
    with pytest.raises(RunDirError, match="not a checkpoint pcltool can load safely") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "weights_only=False" not in str(err.value)
    run = RunDir.open(trained_run)
    run.acquire()
    run.update(lambda m: m["stages"]["train"]["outputs"].__setitem__("checkpoint", run.describe(bad)))
    run.release()
    result = CliRunner().invoke(app, ["select", str(trained_run)])
    assert result.exit_code == 4 and "last.pt" in result.output, result.output
    _one_line_error(result)
    assert len(result.output.strip().splitlines()) <= 3


def test_changed_train_output_says_what_to_do(trained_run):
    with (trained_run / "checkpoints" / "last.pt").open("ab") as f:
        f.write(b"x")
    with pytest.raises(StaleArtifactError, match="start a new run"):
        RunDir.open(trained_run).artifact("train", "checkpoint")
