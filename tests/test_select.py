"""``select``: scoring and ranking every candidate on val, candidate-name resolution, manifest records, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from pcltool.cli import app
from pcltool.errors import MissingArtifactError, StaleArtifactError, UsageError
from pcltool.manifest import RunDir, sha256_file
from pcltool.models import create_backbone
from pcltool.stages.select import choose, count_params, resolve_candidate, run_select

NAMES = ["peer1", "peer2", "peer3", "mean1", "mean2", "mean3", "ensemble", "mean-ensemble"]


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """Tiny tensors: one thread is as fast, and does not stall on a busy CPU."""
    torch.set_num_threads(1)


def test_resolve_concrete_names_and_paper_without_select(trained_run):
    run = RunDir.open(trained_run)
    for name in NAMES:
        assert resolve_candidate(run, name) == name
    assert resolve_candidate(run, "paper") == "mean1"
    with pytest.raises(MissingArtifactError, match="pcltool select"):
        resolve_candidate(run, "best")


@pytest.mark.parametrize("bad", ["peer4", "mean0", "teacher", "Mean1", ""])
def test_unknown_candidate_lists_the_valid_names(trained_run, bad):
    with pytest.raises(UsageError) as err:
        resolve_candidate(RunDir.open(trained_run), bad)
    for name in NAMES + ["best", "mean", "paper"]:
        assert name in str(err.value)


def test_choose_policies_from_a_ranking():
    ranked = ["ensemble", "peer2", "mean-ensemble", "mean3", "peer1", "mean1"]
    assert choose(ranked) == {"best": "peer2", "mean": "mean3", "paper": "mean1"}


def test_select_ranks_every_candidate_and_records_the_table(trained_run):
    run = RunDir.open(trained_run)
    table = run_select(run)

    rows = table["candidates"]
    assert sorted(r["candidate"] for r in rows) == sorted(NAMES)
    assert [r["rank"] for r in rows] == list(range(1, len(NAMES) + 1))
    assert [r["top1"] for r in rows] == sorted((r["top1"] for r in rows), reverse=True)
    plain = count_params(create_backbone("resnet20", 10, 1))
    by_name = {r["candidate"]: r for r in rows}
    assert by_name["peer1"]["params"] == by_name["mean2"]["params"] == plain
    assert by_name["ensemble"]["params"] > 2 * plain
    assert by_name["ensemble"]["flops"] > by_name["peer1"]["flops"] > 0

    singles = [r for r in rows if r["candidate"] not in ("ensemble", "mean-ensemble")]
    assert table["policies"]["best"] == singles[0]["candidate"]
    assert table["policies"]["mean"] == next(r["candidate"] for r in singles if r["candidate"].startswith("mean"))
    assert table["policies"]["paper"] == "mean1"
    # the test split is reported for the chosen candidates only
    assert set(table["test"]) - {"images"} == set(table["policies"].values())

    record = run.stage("select")
    assert record["status"] == "done"
    assert record["params"] == {"checkpoint": "last", "split": "val"}
    out = record["outputs"]["table"]
    assert out["path"] == "select.json" and out["sha256"] == sha256_file(trained_run / "select.json")
    assert record["inputs"]["checkpoint"]["sha256"] == sha256_file(trained_run / "checkpoints" / "last.pt")
    assert json.loads((trained_run / "select.json").read_text()) == table
    assert record["metrics"]["policies"] == table["policies"]
    for policy in ("best", "mean"):
        assert resolve_candidate(run, policy) == table["policies"][policy]


def test_select_never_chooses_on_the_test_split(trained_run):
    with pytest.raises(UsageError, match="validation split"):
        run_select(RunDir.open(trained_run), split="test")
    assert RunDir.open(trained_run).stage("select") is None


def test_select_needs_a_finished_train_stage(trained_run):
    manifest = json.loads((trained_run / "manifest.json").read_text())
    manifest["stages"]["train"]["status"] = "failed"
    (trained_run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MissingArtifactError, match="pcltool train"):
        run_select(RunDir.open(trained_run))
    assert not (trained_run / "select.json").exists()


def test_select_refuses_a_changed_checkpoint(trained_run):
    with (trained_run / "checkpoints" / "last.pt").open("ab") as f:
        f.write(b"edited")
    with pytest.raises(StaleArtifactError, match="sha256"):
        run_select(RunDir.open(trained_run))
    assert RunDir.open(trained_run).stage("select") is None


def test_a_changed_select_table_is_refused(trained_run):
    run = RunDir.open(trained_run)
    run_select(run)
    table = json.loads((trained_run / "select.json").read_text())
    table["policies"]["best"] = "peer3"
    (trained_run / "select.json").write_text(json.dumps(table))
    with pytest.raises(StaleArtifactError):
        resolve_candidate(run, "best")


def test_select_cli(trained_run):
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["select", str(trained_run), "--checkpoint", "best"])
    assert result.exit_code == 0, result.output
    assert "mean-ensemble" in result.output and "reported after the choice" in result.output
    assert RunDir.open(trained_run).stage("select")["params"]["checkpoint"] == "best"

    result = runner.invoke(app, ["prune", str(trained_run), "--peer", "peer9"])
    assert result.exit_code == UsageError.exit_code
    assert "peer1" in result.output and "mean-ensemble" in result.output
