"""`pcltool compare`: PCL and its baseline over seeds, reused and resumed runs, and the ledger's figures."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.config import load_recipe
from pcltool.errors import RunDirError, UsageError
from pcltool.manifest import RunDir
from pcltool.stages.compare import ledger, parse_seeds, plan, run_compare, summarize
from tests.conftest import QUICKSTART, TINY_OVERRIDES

COMPARE_OVERRIDES = TINY_OVERRIDES + ["train.epochs=1", "model.backbone=resnet8"]


def test_seeds_are_parsed_as_lists_and_ranges():
    assert parse_seeds("0,1,2") == [0, 1, 2]
    assert parse_seeds("3-5") == [3, 4, 5]
    assert parse_seeds("7, 0-1") == [7, 0, 1]
    for bad in ("", "a", "1,1", "-1", "5-3", "0-200"):
        with pytest.raises(UsageError):
            parse_seeds(bad)


def test_summary_uses_the_sample_standard_deviation():
    stat = summarize([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["std"] == 1.0 and stat["n"] == 3
    assert summarize([4.0])["std"] is None


def test_the_baseline_arm_is_the_same_recipe_without_pcl(tmp_path):
    recipe = load_recipe(QUICKSTART, COMPARE_OVERRIDES)
    arms = plan(recipe, [0, 5], tmp_path)
    assert [(a.kind, a.seed) for a in arms] == [("pcl", 0), ("baseline", 0), ("pcl", 5), ("baseline", 5)]
    for arm in arms:
        a, b = arm.recipe.resolved(), recipe.resolved()
        assert a["pcl"].pop("enabled") == (arm.kind == "pcl")
        assert a.pop("seed") == arm.seed
        b["pcl"].pop("enabled"), b.pop("seed")
        assert a == b  # nothing else differs: same data, schedule, augmentation, epochs
    with pytest.raises(UsageError, match="PCL recipe"):
        plan(load_recipe(QUICKSTART, ["pcl.enabled=false"]), [0], tmp_path)


def _result(kind, seed, deployed_top1, peer1, mean1):
    names = ["peer1", "mean1"] + (["peer2", "mean2", "ensemble", "mean-ensemble"] if kind == "pcl" else [])
    test = {n: 50.0 for n in names} | ({"mean2": deployed_top1} if kind == "pcl" else {"peer1": peer1, "mean1": mean1})
    return {"kind": kind, "seed": seed, "val_top1": dict(test), "test_top1": test,
            "deployed": "mean2" if kind == "pcl" else "mean1", "policy": "mean",
            "policies": {"best": "mean2" if kind == "pcl" else "mean1", "mean": "mean2" if kind == "pcl" else "mean1", "paper": "mean1"}, "deployed_test_top1": test["mean2" if kind == "pcl" else "mean1"],
            "wall_seconds": 100.0 if kind == "pcl" else 20.0, "params": 10}


def test_ledger_pairs_each_seed_and_reports_the_difference_per_seed():
    recipe = load_recipe(QUICKSTART, COMPARE_OVERRIDES)
    results = [_result("pcl", 0, 80.0, 0, 0), _result("baseline", 0, 0, 75.0, 77.0),
               _result("pcl", 1, 82.0, 0, 0), _result("baseline", 1, 0, 79.0, 78.0),
               _result("pcl", 2, 90.0, 0, 0)]  # seed 2 has no baseline yet: left out of every figure
    book = ledger(results, recipe, [0, 1, 2])
    h = book["headline"]
    assert book["seeds"] == [0, 1] and book["missing_seeds"] == [2]
    assert h["deployed_pcl"]["values"] == [80.0, 82.0] and h["deployed_pcl"]["chosen"] == ["mean2", "mean2"]
    assert h["baseline"]["values"] == [75.0, 79.0] and h["baseline_ema"]["values"] == [77.0, 78.0]
    assert h["deployed_minus_baseline"]["values"] == [5.0, 3.0]
    assert h["deployed_minus_baseline"]["mean"] == 4.0
    assert h["deployed_minus_baseline_ema"]["values"] == [3.0, 4.0]
    assert book["cost"]["pcl_over_baseline"] == 5.0


@pytest.mark.slow
def test_compare_trains_both_arms_then_reuses_resumes_and_refuses_foreign_runs(tmp_path):
    recipe = load_recipe(QUICKSTART, COMPARE_OVERRIDES + [f"output.runs_dir={tmp_path / 'runs'}"])
    out = tmp_path / "cmp"
    book = run_compare(recipe, [0, 1], out)
    for kind in ("pcl", "baseline"):
        for seed in (0, 1):
            run = RunDir.open(out / f"{kind}-seed{seed}")
            assert run.stage("train")["status"] == "done" and run.stage("select")["status"] == "done"
            assert run.recipe["seed"] == seed and run.recipe["pcl"]["enabled"] == (kind == "pcl")
    # The ledger's figures are the runs' own recorded figures.
    for i, seed in enumerate((0, 1)):
        pcl, base = RunDir.open(out / f"pcl-seed{seed}"), RunDir.open(out / f"baseline-seed{seed}")
        chosen = json.loads((pcl.path / "select.json").read_text())["policies"]["mean"]
        assert book["headline"]["deployed_pcl"]["values"][i] == pcl.stage("train")["metrics"]["test_top1"][chosen]
        assert book["headline"]["baseline"]["values"][i] == base.stage("train")["metrics"]["test_top1"]["peer1"]
    on_disk = json.loads((out / "ledger.json").read_text())
    assert on_disk["headline"] == book["headline"]
    assert "deployed PCL − baseline" in (out / "ledger.md").read_text()

    # A second call reuses every finished run (nothing retrained) ...
    ids = {p.name: RunDir.open(p).run_id for p in out.iterdir() if p.is_dir()}
    stamps = {p.name: (p / "checkpoints" / "last.pt").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    seen = []
    run_compare(recipe, [0, 1], out, on_arm=lambda arm, state: seen.append(state))
    assert seen == ["done"] * 4
    assert {p.name: RunDir.open(p).run_id for p in out.iterdir() if p.is_dir()} == ids
    assert {p.name: (p / "checkpoints" / "last.pt").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()} == stamps

    # ... an interrupted run is resumed in place ...
    with RunDir.open(out / "baseline-seed1") as run:
        run.update(lambda m: m["stages"]["train"].update(status="interrupted"))
    seen.clear()
    run_compare(recipe, [0, 1], out, on_arm=lambda arm, state: seen.append(state))
    assert seen == ["done", "done", "done", "interrupted"]

    # ... and a run made with another recipe is never overwritten.
    other = load_recipe(QUICKSTART, COMPARE_OVERRIDES + ["train.lr=0.05", f"output.runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(RunDirError, match=r"another recipe \(differs in train.lr\)"):
        run_compare(other, [0, 1], out)


def test_compare_command_refuses_a_folder_that_is_not_a_run(tmp_path):
    out = tmp_path / "cmp"
    (out / "pcl-seed0").mkdir(parents=True)
    (out / "pcl-seed0" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["compare", str(QUICKSTART), "--seeds", "0", "--out", str(out),
                                      *[a for o in COMPARE_OVERRIDES for a in ("--set", o)]])
    assert result.exit_code == 4
    assert "is not a pcltool run" in result.output
    assert (out / "pcl-seed0" / "notes.txt").read_text() == "mine"


def test_a_run_is_the_same_experiment_whatever_its_decoding_workers_or_how_its_data_path_was_written(
        tmp_path, monkeypatch):
    data = tmp_path / "cifar"
    data.mkdir()
    monkeypatch.chdir(tmp_path)
    stored = load_recipe(QUICKSTART, ["data.root=cifar", "data.workers=2", "output.runs_dir=elsewhere"]).resolved()
    wanted = load_recipe(QUICKSTART, [f"data.root={data}"])
    assert wanted.differences_from(stored) == []
    # ... but another folder, or another value that changes what is learned, is another experiment.
    assert load_recipe(QUICKSTART, [f"data.root={tmp_path}"]).differences_from(stored) == ["data.root"]
    assert load_recipe(QUICKSTART, ["data.root=cifar", "train.lr=0.05"]).differences_from(stored) == ["train.lr"]


def test_ledger_writes_the_sign_of_a_difference():
    from pcltool.stages.compare import _pm

    assert _pm({"mean": 0.08, "std": 0.58}, signed=True) == "+0.08 ± 0.58"
    assert _pm({"mean": -0.26, "std": None}, signed=True) == "-0.26"
    assert _pm({"mean": 74.96, "std": 0.36}) == "74.96 ± 0.36" and _pm(None) == "-"
