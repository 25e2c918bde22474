"""``pcltool bench-train``: the variant plan per device, and one tiny end-to-end run through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.config import load_recipe
from pcltool.errors import UsageError
from pcltool.stages.bench_train import PIECES, plan_variants
from tests.conftest import QUICKSTART

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _plan(sets, device=CPU, skip=()):
    return {v.name: v for v in plan_variants(load_recipe(QUICKSTART, sets), device, skip)}


def test_plan_lists_a_b_and_every_piece_with_reasons_for_what_cannot_apply():
    plan = _plan(["device=cpu"])
    assert list(plan)[:2] == ["pcltool", "reference"] and len(plan) == 2 + len(PIECES)
    assert "host memory" in plan["without data on device"].skipped
    assert "cpu_fast_path" in plan["without bf16 autocast"].skipped
    for name in ("with batched views", "without channels_last", "without fused optimizer",
                 "without foreach EMA", "with compile"):
        assert plan[name].skipped is None, name
    assert plan["with compile"].overrides == ("train.compile=true",)

    fast = _plan(["device=cpu", "train.cpu_fast_path=true", "train.compile=true"], skip=("foreach_ema",))
    assert _plan(["device=cpu", "train.channels_last=false"])["without channels_last"].skipped == "off in the recipe"
    assert plan["with batched views"].overrides == ("train.batched_views=true",)  # per view is the default
    batched = _plan(["device=cpu", "train.batched_views=true"])
    assert batched["without batched views"].overrides == ("train.batched_views=false",)
    assert fast["without bf16 autocast"].overrides == ("train.precision=fp32",)
    assert fast["without compile"].overrides == ("train.compile=false",)
    assert fast["without foreach EMA"].skipped == "--skip"
    with pytest.raises(UsageError, match="unknown"):
        _plan(["device=cpu"], skip=("warp_drive",))


def test_cuda_plan_runs_every_piece():
    plan = _plan([], device=torch.device("cuda", 0))
    assert all(v.skipped is None for v in plan.values())


def test_bench_train_cli_writes_report(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench-train", str(QUICKSTART), "--device", "cpu", "--steps", "2", "--warmup", "1", "--threads", "1",
        "--skip", "compile", "--skip", "batched_views", "--skip", "channels_last", "--set", "train.batch_size=32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "(a)/(b)" in result.output
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["variants"]}
    a, b = rows["pcltool"], rows["reference"]
    assert report["speedup_a_over_b"] == pytest.approx(a["images_per_s"] / b["images_per_s"])
    assert report["reference_workers"] >= 1 and report["steps"] == 2 and report["batch_size"] == 32
    measured = [r for r in report["variants"] if "skipped" not in r]
    assert {r["name"] for r in measured} == {"pcltool", "reference", "without fused optimizer", "without foreach EMA"}
    for r in measured:
        assert r["images_per_s"] > 0 and r["step_ms"] > 0 and r["peak_memory_mb"] is None and r["compile_s"] is None
        assert r["mean_loss"] == pytest.approx(r["mean_loss"]) and 0 < r["mean_loss"] < 100  # finite, sane
    assert rows["with compile"]["skipped"] == "--skip"


def test_accuracy_parity_trains_both_paths_to_the_end_and_scores_every_branch(tmp_path):
    """``--accuracy``: (a) and (b) each train the whole (shortened) schedule, then every branch is scored."""
    out = tmp_path / "acc.json"
    result = CliRunner().invoke(app, [
        "bench-train", str(QUICKSTART), "--accuracy", "--device", "cpu", "--threads", "1", "--workers", "1",
        "--set", "train.epochs=2", "--set", "pcl.rampup_epochs=1", "--set", "model.backbone=resnet20",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "deployed mean teacher, test top-1" in result.output
    report = json.loads(out.read_text())
    a, b = report["paths"]["pcltool"], report["paths"]["reference"]
    names = {"peer1", "peer2", "peer3", "mean1", "mean2", "mean3", "ensemble", "mean-ensemble"}
    for path in (a, b):
        assert [e["epoch"] for e in path["epochs"]] == [1, 2]  # the whole schedule, not a few steps
        assert set(path["test_top1"]) == set(path["val_top1"]) == names
        assert path["chosen_mean_teacher"] in {"mean1", "mean2", "mean3"}
        chosen = path["chosen_mean_teacher"]
        assert path["val_top1"][chosen] == max(path["val_top1"][f"mean{j}"] for j in (1, 2, 3))
        assert path["chosen_test_top1"] == path["test_top1"][chosen]
        assert path["test_top1"]["ensemble"] > 30  # both learned (10 classes: chance is 10 %)
    assert report["test_images"] == 359 and report["finite"]  # the whole test split
    for name in names:
        assert report["test_top1_a_minus_b"][name] == pytest.approx(a["test_top1"][name] - b["test_top1"][name])
    assert report["chosen_test_top1_a_minus_b"] == pytest.approx(a["chosen_test_top1"] - b["chosen_test_top1"])


def test_a_batch_larger_than_the_data_is_refused_not_looped_on(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench-train", str(QUICKSTART), "--device", "cpu", "--steps", "1",
                                      "--set", "train.batch_size=4096", "--out", str(out)])
    assert result.exit_code == 2
    assert "larger than the training split" in result.output
    assert not out.exists()
