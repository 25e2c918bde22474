"""``export`` and the ONNX gate: a good graph passes, a broken one fails with every failure listed, records and
metadata, dynamic and static batch, raw-pixel input, the ensemble, and refusals that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.errors import MissingArtifactError, StaleArtifactError, UsageError, VerificationError
from pcltool.manifest import RunDir, sha256_file
from pcltool.onnx_gate import GateSpec, validate_onnx
from pcltool.stages import export as export_stage
from pcltool.stages.export import run_export
from pcltool.stages.prune import load_pruned


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """Tiny tensors: one thread is as fast, and does not stall on a busy CPU."""
    torch.set_num_threads(1)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _exported(run_path, candidate):
    return onnx.load(str(run_path / "exports" / f"{candidate}.onnx"))


def test_export_mean_straight_after_train(trained_run):
    run = RunDir.open(trained_run)
    metrics = run_export(run, "mean")

    candidate = run.stage("select")["metrics"]["policies"]["mean"]
    assert metrics["candidate"] == candidate
    for key in ("select", f"prune:{candidate}", f"export:{candidate}"):
        assert run.stage(key)["status"] == "done"
    record = run.stage(f"export:{candidate}")
    path = trained_run / "exports" / f"{candidate}.onnx"
    assert record["outputs"]["onnx"]["path"] == f"exports/{candidate}.onnx"
    assert record["outputs"]["onnx"]["sha256"] == sha256_file(path) == metrics["sha256"]
    assert metrics["bytes"] == path.stat().st_size
    assert record["inputs"]["weights"]["sha256"] == run.stage(f"prune:{candidate}")["outputs"]["weights"]["sha256"]
    assert set(metrics["versions"]) == {"onnx", "onnxruntime", "torch"}
    assert metrics["opset"] == 17 and metrics["ir_version"] >= 7
    assert metrics["max_abs_diff"] <= 1e-4 and metrics["top1_agreement"] == 100.0
    assert metrics["batch_sizes"] == [64, 7, 1] and metrics["compared"] >= metrics["images"] > 100
    init = metrics["gate"]["initialisers"]
    assert init["missing"] == init["foreign"] == 0 and init["network_elements"] > 0

    model = _exported(trained_run, candidate)
    assert [i.name for i in model.graph.input] == ["images"] and [o.name for o in model.graph.output] == ["logits"]
    assert not [n for n in model.graph.node if "peers" in "".join(n.input)]
    props = {p.key: p.value for p in model.metadata_props}
    card = json.loads((trained_run / "pruned" / candidate / "model.json").read_text())
    assert json.loads(props["pcltool.class_names"]) == card["class_names"]
    assert json.loads(props["pcltool.mean"]) == card["mean"] and json.loads(props["pcltool.std"]) == card["std"]
    assert json.loads(props["pcltool.input_size"]) == [1, 8, 8]
    assert props["pcltool.candidate"] == candidate and props["pcltool.run_id"] == run.run_id
    assert props["pcltool.arch"] == "resnet20" and props["pcltool.input_format"] == "float32-nchw-normalized"

    # dynamic batch: any batch size runs and matches PyTorch
    pruned = load_pruned(trained_run / "pruned" / candidate / "model.safetensors", card)
    session = _session(path)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 1, 8, 8)
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, pruned(x).numpy(), atol=1e-4, rtol=0)


def _gate_inputs(trained_run, candidate):
    run = RunDir.open(trained_run)
    run_export(run, candidate)
    card = json.loads((trained_run / "pruned" / candidate / "model.json").read_text())
    model = load_pruned(trained_run / "pruned" / candidate / "model.safetensors", card)
    spec = GateSpec(input_shape=[1, 8, 8], num_classes=10)
    x = torch.randn(80, 1, 8, 8)
    return run, model, spec, [(x.numpy(), x)]


def test_gate_fails_on_a_perturbed_weight(trained_run, tmp_path):
    run, model, spec, chunks = _gate_inputs(trained_run, "mean2")
    path = trained_run / "exports" / "mean2.onnx"
    example = torch.zeros(1, 1, 8, 8)
    good = validate_onnx(path, model, spec, chunks, example)
    assert good.passed, good.failures

    # 1. the graph holds a perturbed weight
    graph = onnx.load(str(path))
    target = next(t for t in graph.graph.initializer if len(t.dims) == 4)
    weight = numpy_helper.to_array(target).copy()
    weight.flat[0] += 0.5
    target.CopyFrom(numpy_helper.from_array(weight, target.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(graph, str(broken))
    report = validate_onnx(broken, model, spec, chunks, example)
    text = "\n".join(report.failures)
    assert "max abs logit diff" in text
    assert "not in the graph" in text and "not the network's" in text
    with pytest.raises(VerificationError, match="failure"):
        report.raise_if_failed("broken.onnx")

    # 2. the network the graph claims to be differs (one classifier weight)
    with torch.no_grad():
        model.classifier.weight[3, 5] += 1e-3
    report = validate_onnx(path, model, spec, chunks, example)
    assert any("max abs logit diff" in f for f in report.failures)
    assert any("classifier.weight" in f for f in report.failures)

    # 3. wrong names and a wrong shape are listed, each of them
    wrong = GateSpec(input_shape=[1, 8, 8], num_classes=10, output_name="scores", batch=4,
                     metadata={"pcltool.candidate": "peer1"})
    report = validate_onnx(path, load_pruned(trained_run / "pruned" / "mean2" / "model.safetensors",
                                             json.loads((trained_run / "pruned" / "mean2" / "model.json").read_text())),
                           wrong, chunks, example)
    text = "\n".join(report.failures)
    assert "output names" in text and "input 'images' shape" in text and "pcltool.candidate" in text


def test_failing_gate_leaves_nothing_and_exits_nonzero(trained_run, monkeypatch):
    real = export_stage.export_onnx

    def export_with_a_stray_tensor(model, path, card, options, metadata):
        exported = real(model, path, card, options, metadata)
        graph = onnx.load(str(path))
        target = next(t for t in graph.graph.initializer if t.name.startswith("classifier"))
        value = numpy_helper.to_array(target) * 1.01
        target.CopyFrom(numpy_helper.from_array(value, target.name))
        onnx.save(graph, str(path))
        return exported

    monkeypatch.setattr(export_stage, "export_onnx", export_with_a_stray_tensor)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["export", str(trained_run), "--peer", "mean3"])
    assert result.exit_code == VerificationError.exit_code, result.output
    assert "ONNX gate failed" in result.output and "not the network's" in result.output
    assert list((trained_run / "exports").iterdir()) == []
    record = RunDir.open(trained_run).stage("export:mean3")
    assert record["status"] == "failed" and record["outputs"] == {}
    assert RunDir.open(trained_run).stage("prune:mean3")["status"] == "done"


def test_static_batch(trained_run):
    metrics = run_export(RunDir.open(trained_run), "mean1", static_batch=4)
    graph = _exported(trained_run, "mean1")
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4
    assert metrics["batch_sizes"] == [4] and not metrics["dynamic_batch"]
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_value == 4
    session = _session(trained_run / "exports" / "mean1.onnx")
    with pytest.raises(Exception):
        session.run(["logits"], {"images": np.zeros((3, 1, 8, 8), np.float32)})


def test_raw_pixel_input(trained_run):
    run = RunDir.open(trained_run)
    metrics = run_export(run, "mean1", raw_input=True)
    assert metrics["input_format"] == "uint8-nhwc"
    graph = _exported(trained_run, "mean1")
    tensor_type = graph.graph.input[0].type.tensor_type
    assert tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in tensor_type.shape.dim] == ["batch", 8, 8, 1]
    assert {p.key: p.value for p in graph.metadata_props}["pcltool.input_format"] == "uint8-nhwc"


def test_ensemble_exports_the_whole_teacher(trained_run):
    # the 2-epoch live network of the fixture has logits in the thousands, beyond float32's 1e-4 resolution:
    # the temporal-mean network's ensemble is the well-conditioned one
    metrics = run_export(RunDir.open(trained_run), "mean-ensemble")
    init = metrics["gate"]["initialisers"]
    assert init["missing"] == init["foreign"] == 0
    assert init["unused_network_tensors"] == 6  # the 3 peer classifiers (weight, bias): the head reads features
    assert metrics["max_abs_diff"] <= 1e-4


def test_simplify_folds_batchnorm_and_still_passes(trained_run):
    metrics = run_export(RunDir.open(trained_run), "mean3", simplify=True)
    ops = {n.op_type for n in _exported(trained_run, "mean3").graph.node}
    assert "BatchNormalization" not in ops and metrics["simplified"]
    budget = metrics["gate"]["simplified_elements"]
    assert budget["graph"] < budget["network"]


def test_bad_inputs_leave_nothing_behind(trained_run):
    run = RunDir.open(trained_run)
    with pytest.raises(UsageError, match="mean-ensemble"):
        run_export(run, "peer0")
    with pytest.raises(UsageError, match="opset"):
        run_export(run, "peer1", opset=99)
    assert set(run.read()["stages"]) == {"train"} and not (trained_run / "exports").exists()

    run_export(run, "mean1")
    with (trained_run / "pruned" / "mean1" / "model.safetensors").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleArtifactError, match="sha256"):
        run_export(run, "mean1", opset=16)
    assert run.stage("export:mean1")["params"]["opset"] == 17


def test_export_needs_a_finished_train_stage(trained_run):
    manifest = json.loads((trained_run / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = "running"
    (trained_run / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(app, ["export", str(trained_run), "--peer", "mean"])
    assert result.exit_code == MissingArtifactError.exit_code
    assert "pcltool train" in result.output
    assert set(RunDir.open(trained_run).read()["stages"]) == {"train"}
