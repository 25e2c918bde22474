"""``prune``: pruned == branch for every backbone, the saved model, its records, and refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pcltool.errors import StaleArtifactError, UsageError, VerificationError
from pcltool.manifest import RunDir, sha256_file
from pcltool.models import PCLNetwork, available_backbones, create_backbone
from pcltool.stages import prune as prune_stage
from pcltool.stages.prune import load_pruned, prune_candidate, run_prune
from pcltool.stages.select import count_params, load_run, run_select

CARD_KEYS = {"arch", "num_classes", "class_names", "in_channels", "input_size", "mean", "std", "candidate", "source",
             "run_id", "params", "flops"}


@pytest.fixture(autouse=True)
def _one_thread(_cpu_threads):
    """Tiny tensors: one thread is as fast, and does not stall on a busy CPU."""
    torch.set_num_threads(1)


SIZE = 16  # the smallest input every registered backbone takes (VGG-16 halves it four times)


def _tiny_network(backbone: str) -> PCLNetwork:
    """2 peers whose BatchNorm statistics are not the initial ones (each peer saw its own view in train mode)."""
    torch.manual_seed(0)
    net = PCLNetwork(backbone, num_classes=5, num_peers=2, in_channels=3)
    with torch.no_grad():
        net.train()(torch.randn(2, 2, 3, SIZE, SIZE))
    return net.eval()


@pytest.mark.parametrize("backbone", available_backbones())
def test_pruned_branch_equals_the_branch_for_every_backbone(backbone):
    net = _tiny_network(backbone)
    loaded = SimpleNamespace(network=lambda source: net, device=torch.device("cpu"))
    pruned = prune_candidate(loaded, "peer2")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x)[0][1], atol=1e-5, rtol=0)
    assert type(pruned).__name__ == "SplitBackbone" and not pruned.training
    plain = sum(p.numel() for p in net.trunk.parameters()) + sum(p.numel() for p in net.peers[1].parameters())
    assert count_params(pruned) == plain
    # copies of peer 2's tensors, nothing of peer 1's or of the ensemble head
    state = pruned.state_dict()
    assert {t.data_ptr() for t in state.values()}.isdisjoint(t.data_ptr() for t in net.state_dict().values())
    conv = next(k for k, v in pruned.branch.state_dict().items() if v.dim() == 4)
    assert torch.equal(state[f"branch.{conv}"], net.peers[1].branch.state_dict()[conv])
    assert not torch.equal(state[f"branch.{conv}"], net.peers[0].branch.state_dict()[conv])
    head = next(k for k, v in pruned.classifier.state_dict().items() if k.endswith("weight"))
    assert not torch.equal(state[f"classifier.{head}"], net.peers[0].classifier.state_dict()[head])


def test_pruned_candidates_pick_the_right_network_and_head():
    live, mean = _tiny_network("resnet20"), _tiny_network("resnet20")
    with torch.no_grad():
        for p in mean.parameters():
            p.mul_(0.9)
    loaded = SimpleNamespace(network=lambda source: mean if source == "mean" else live, device=torch.device("cpu"))
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        (live_peers, live_ens), (mean_peers, mean_ens) = live(x), mean(x)
        for name, want in [("peer1", live_peers[0]), ("mean2", mean_peers[1]), ("ensemble", live_ens),
                           ("mean-ensemble", mean_ens)]:
            pruned = prune_candidate(loaded, name)
            torch.testing.assert_close(pruned(x), want, atol=1e-5, rtol=0)
            assert count_params(pruned) == count_params(live if "ensemble" in name else create_backbone("resnet20", 5))


def test_prune_mean_runs_select_first_and_records_everything(trained_run):
    run = RunDir.open(trained_run)
    metrics = run_prune(run, "mean")

    chosen = run.stage("select")["metrics"]["policies"]["mean"]
    assert metrics["candidate"] == chosen and chosen.startswith("mean")
    record = run.stage(f"prune:{chosen}")
    assert record["status"] == "done"
    assert record["params"] == {"peer": "mean", "candidate": chosen, "checkpoint": "last"}
    assert set(record["inputs"]) == {"checkpoint", "select_table"}
    weights, card_path = trained_run / "pruned" / chosen / "model.safetensors", trained_run / "pruned" / chosen / "model.json"
    assert record["outputs"]["weights"]["sha256"] == sha256_file(weights)
    assert record["outputs"]["card"]["sha256"] == sha256_file(card_path)

    card = json.loads(card_path.read_text())
    assert CARD_KEYS <= set(card)
    assert (card["arch"], card["num_classes"], card["in_channels"], card["input_size"]) == ("resnet20", 10, 1, [1, 8, 8])
    assert card["candidate"] == chosen and card["source"] == "mean" and card["run_id"] == run.run_id
    assert card["class_names"] == [str(i) for i in range(10)] and len(card["mean"]) == len(card["std"]) == 1

    plain = count_params(create_backbone("resnet20", 10, 1))
    assert card["params"] == metrics["params"] == metrics["plain_params"] == plain
    assert metrics["multi_branch_params"] > 2 * plain
    assert metrics["multi_branch_flops"] > metrics["flops"] > 0
    assert metrics["multi_branch_bytes"] > metrics["bytes"] == weights.stat().st_size
    assert metrics["parity_max_abs_diff"] <= 1e-5 and metrics["parity_top1_agreement"] == 100.0
    assert metrics["parity_images"] > 100

    # the weights load without code, into the plain backbone, and give the branch's logits
    assert all(not k.startswith(("peers", "ensemble")) for k in load_file(str(weights)))
    model = load_pruned(weights, card)
    assert type(model).__name__ == "SplitBackbone"
    loaded = load_run(run)
    images, _ = next(loaded.data.val.batches(64, "cpu"))
    x = loaded.view_maker.eval_view(images)
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded.candidate_logits(chosen)(x), atol=1e-5, rtol=0)


def test_prune_ensemble_keeps_the_whole_teacher(trained_run):
    run = RunDir.open(trained_run)
    metrics = run_prune(run, "mean-ensemble")
    card = json.loads((trained_run / "pruned" / "mean-ensemble" / "model.json").read_text())
    assert card["kind"] == "ensemble" and card["num_peers"] == 3 and card["source"] == "mean"
    assert metrics["params"] == metrics["multi_branch_params"]
    assert metrics["parity_max_abs_diff"] <= 1e-5
    assert run.stage("select") is None  # a concrete name needs no selection


def test_prune_failing_parity_writes_nothing(trained_run, monkeypatch):
    real = prune_stage.prune_candidate

    def perturbed(loaded, candidate):
        model = real(loaded, candidate)
        with torch.no_grad():
            model.classifier.bias[0] += 1e-3
        return model

    monkeypatch.setattr(prune_stage, "prune_candidate", perturbed)
    run = RunDir.open(trained_run)
    with pytest.raises(VerificationError, match="max abs diff"):
        run_prune(run, "peer2")
    assert not (trained_run / "pruned").exists()
    record = run.stage("prune:peer2")
    assert record["status"] == "failed" and record["outputs"] == {}


def test_prune_refuses_a_changed_checkpoint(trained_run):
    with (trained_run / "checkpoints" / "last.pt").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(StaleArtifactError):
        run_prune(RunDir.open(trained_run), "peer1")
    assert not (trained_run / "pruned").exists()


def test_prune_unknown_candidate_and_checkpoint_mismatch(trained_run):
    run = RunDir.open(trained_run)
    with pytest.raises(UsageError, match="mean-ensemble"):
        run_prune(run, "peer7")
    run_select(run, checkpoint="best")
    with pytest.raises(UsageError, match="--checkpoint best"):
        run_prune(run, "mean", checkpoint="last")
    assert not (trained_run / "pruned").exists()
