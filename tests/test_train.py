"""The training stage: end to end on the embedded data, bit-exact resume after SIGKILL, NaN handling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import QUICKSTART, TINY_OVERRIDES

from pcltool.config import load_recipe
from pcltool.errors import TrainingDivergedError
from pcltool.manifest import RunDir


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pcltool", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _sets(extra=()):
    out = []
    for item in list(TINY_OVERRIDES) + list(extra):
        out += ["--set", item]
    return out


def test_trained_run_manifest_and_checkpoint(trained_run):
    run = RunDir.open(trained_run)
    m = run.read()
    rec = m["stages"]["train"]
    assert rec["status"] == "done"
    assert set(rec["outputs"]) >= {"checkpoint", "best_checkpoint", "metrics_log"}
    metrics = rec["metrics"]
    assert metrics["epochs_done"] == 2
    names = {"peer1", "peer2", "peer3", "mean1", "mean2", "mean3", "ensemble", "mean-ensemble"}
    assert set(metrics["val_top1"]) == names and set(metrics["test_top1"]) == names
    assert m["environment"]["torch"] == torch.__version__
    ckpt = run.artifact("train", "checkpoint")
    state = torch.load(ckpt, weights_only=True)  # loads without executing code
    assert {"live", "mean", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "recipe"} <= set(state)
    assert state["epoch"] == 2 and state["recipe"] == m["recipe"]
    kinds = [json.loads(line)["kind"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("val") == 2 and kinds[-1] == "test" and "train" in kinds


def test_cli_train_and_status(tmp_path):
    proc = _cli("train", QUICKSTART, *_sets(["train.epochs=1"]), "--run", tmp_path / "r", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    status = _cli("status", tmp_path / "r", "--json", cwd=tmp_path)
    assert status.returncode == 0
    assert json.loads(status.stdout)["stages"]["train"]["status"] == "done"
    table = _cli("status", tmp_path / "r", cwd=tmp_path)
    assert "train" in table.stdout and "done" in table.stdout
    # an existing run is not overwritten
    again = _cli("train", QUICKSTART, *_sets(["train.epochs=1"]), "--run", tmp_path / "r", cwd=tmp_path)
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    sets = _sets(["train.epochs=4"])
    full = _cli("train", QUICKSTART, *sets, "--run", tmp_path / "full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "pcltool", "train", str(QUICKSTART), *sets, "--run",
                             str(tmp_path / "cut")], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = tmp_path / "cut" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            done = json.loads(manifest.read_text())["stages"]["train"]["metrics"].get("epochs_done", 0)
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cut = json.loads(manifest.read_text())["stages"]["train"]
    assert cut["status"] == "running" and cut["metrics"]["epochs_done"] < 4  # really interrupted

    resumed = _cli("train", QUICKSTART, *sets, "--run", tmp_path / "cut", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    for net in ("live", "mean"):
        assert a[net].keys() == b[net].keys()
        for key in a[net]:
            assert torch.equal(a[net][key], b[net][key]), f"{net}.{key} differs after resume"
    assert a["step"] == b["step"]
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["kind"] == "val" for x in lines) == 4  # no duplicated epochs in the log


def test_resume_refuses_a_different_recipe(tmp_path):
    assert _cli("train", QUICKSTART, *_sets(["train.epochs=1"]), "--run", tmp_path / "r", cwd=tmp_path).returncode == 0
    proc = _cli("train", QUICKSTART, *_sets(["train.epochs=1", "train.lr=0.5"]), "--run", tmp_path / "r", "--resume",
                cwd=tmp_path)
    assert proc.returncode != 0 and "train.lr" in proc.stderr


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import pcltool.trainer as trainer_mod
    from pcltool.distributed import train_entry

    real_loss = trainer_mod.pcl_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        parts = real_loss(*args, **kwargs)
        if calls["n"] > 11:  # the tiny run has 11 steps per epoch: epoch 2 diverges
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(trainer_mod, "pcl_loss", poisoned)
    recipe = load_recipe(QUICKSTART, TINY_OVERRIDES + ["train.epochs=3"])
    with pytest.raises(TrainingDivergedError, match="NaN or infinite"):
        train_entry(recipe, tmp_path / "r", resume=False, console=None)
    run = RunDir.open(tmp_path / "r")
    rec = run.stage("train")
    assert rec["status"] == "failed" and "TrainingDivergedError" in rec["error"]
    state = torch.load(run.verify(rec["outputs"]["checkpoint"], "ckpt"), weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["live"].values() if v.is_floating_point())


@pytest.mark.parametrize("stats, extra, applied", [
    ("own", [], "own"),
    ("ema", [], "ema"),
    ("own", ["pcl.enabled=false"], "ema"),  # the plain baseline never runs its mean network
    ("own", ["pcl.kd_mean=false"], "ema"),
], ids=["own", "ema", "baseline", "no-mean-teachers"])
def test_mean_network_batchnorm_statistics(stats, extra, applied):
    """``own``: the mean network's running statistics come from its own forwards (with batched views a trunk
    layer's momentum is raised for one update per step instead of m), and the temporal-mean update leaves them
    alone; ``ema`` (and wherever training never runs the mean network): momentum 0, and they are the temporal
    mean of the live network's."""
    from pcltool.data import load_dataset
    from pcltool.reference import ReferenceTrainer
    from pcltool.trainer import PCLTrainer

    recipe = load_recipe(QUICKSTART, ["device=cpu", "model.backbone=resnet20", f"pcl.mean_bn_stats={stats}",
                                      "train.batched_views=true", *extra])  # per view: the test below
    data = load_dataset(recipe.data)
    trainer = PCLTrainer(recipe, data, torch.device("cpu"))
    bn = trainer.mean.trunk[0][1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert bn.momentum == pytest.approx(0.271 if applied == "own" else 0.0)
    if extra:  # the reference path's mean network likewise follows the live statistics when never run
        ref = ReferenceTrainer(recipe, data, torch.device("cpu"), workers=0)
        views, labels = next(ref.epoch_batches())
        ref.train_step(views, labels, 0.0)
        torch.testing.assert_close(ref.mean.trunk[0][1].running_var, ref.live.trunk[0][1].running_var)
    live_bn = trainer.live.trunk[0][1]
    assert live_bn.momentum == pytest.approx(0.271 if trainer.live.num_peers == 3 else 0.1)
    batches = trainer.epoch_batches()
    before = bn.running_var.clone()
    images, labels = next(batches)
    trainer.train_step(images, labels, 0.0)
    if applied == "own":
        # steps 1-2 run the mean network with the live weights (alpha = 0 copies them after step 1), so its
        # statistics equal the live ones; from step 3 its weights are an average, and so are its own statistics
        for _ in range(2):
            images, labels = next(batches)
            trainer.train_step(images, labels, 0.0)
        assert not torch.equal(bn.running_var, before) and not torch.equal(bn.running_var, live_bn.running_var)
    else:
        torch.testing.assert_close(bn.running_var, live_bn.running_var)


@pytest.mark.parametrize("batched", [True, False], ids=["batched-views", "per-view"])
def test_batchnorm_horizon_matches_the_reproduction_layer_by_layer(batched):
    """Count the running-statistics updates every BatchNorm layer takes in one step of the reference path (the
    reproduction's calls: the trunk once per view, peer k of the mean network on view k only), in the live and the
    mean network; pcltool's momentum for that layer must give the horizon of that many updates of 0.1."""
    from pcltool.data import load_dataset
    from pcltool.pcl import mean_bn_momentum
    from pcltool.reference import ReferenceTrainer
    from pcltool.trainer import PCLTrainer

    recipe = load_recipe(QUICKSTART, ["device=cpu", "model.backbone=resnet8", "pcl.peers=3",
                                      f"train.batched_views={str(batched).lower()}"])
    data = load_dataset(recipe.data)
    ref = ReferenceTrainer(recipe, data, torch.device("cpu"), workers=0)
    before = {(net, name): b.clone() for net in ("live", "mean")
              for name, b in getattr(ref, net).named_buffers() if name.endswith("num_batches_tracked")}
    views, labels = next(ref.epoch_batches())
    ref.train_step(views, labels, 0.0)
    fast = PCLTrainer(recipe, data, torch.device("cpu"))
    updates_seen = set()
    for net in ("live", "mean"):
        buffers = dict(getattr(ref, net).named_buffers())
        modules = dict(getattr(fast, net).named_modules())
        for (which, name), old in before.items():
            if which != net:
                continue
            updates = int(buffers[name] - old)
            updates_seen.add((name.startswith("trunk"), updates))
            momentum = modules[name.removesuffix(".num_batches_tracked")].momentum
            expected = mean_bn_momentum(0.1, updates) if batched else 0.1
            assert momentum == pytest.approx(expected), (net, name, updates)
    assert updates_seen == {(True, 3), (False, 1)}  # trunk layers: m = 3 updates, peers' layers: 1


def test_mean_teachers_of_a_short_run_are_not_left_at_chance():
    """Two epochs (42 steps): the temporal mean moves fast (alpha = 1 - 1/(step + 1)), and BatchNorm statistics
    that lag behind it left every mean teacher near chance (10 %) while the peers reached 40-60 %."""
    from pcltool.data import load_dataset
    from pcltool.trainer import PCLTrainer

    recipe = load_recipe(QUICKSTART, ["device=cpu", "train.epochs=2", "pcl.rampup_epochs=1"])
    data = load_dataset(recipe.data)
    trainer = PCLTrainer(recipe, data, torch.device("cpu"))
    for _ in range(2):
        trainer.train_epoch()
    top1 = trainer.evaluate(data.val)["top1"]
    best_peer = max(top1[f"peer{j}"] for j in (1, 2, 3))
    best_mean = max(top1[f"mean{j}"] for j in (1, 2, 3))
    assert best_peer > 30
    assert best_mean > 0.6 * best_peer, top1


def test_fp16_never_gets_the_fused_optimizer():
    """With the gradient scaler, a first step that overflows leaves the fused kernel's momentum uninitialised."""
    from pcltool.optim import build_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    cuda = torch.device("cuda", 0)  # only the choice is checked here: no step runs
    fp16 = load_recipe(QUICKSTART, ["train.precision=fp16"]).train
    opt = build_optimizer(params, fp16, cuda)
    assert not opt.defaults.get("fused") and opt.defaults.get("foreach")
    bf16 = load_recipe(QUICKSTART, ["train.precision=bf16", "train.fused_optimizer=false"]).train
    assert not build_optimizer(params, bf16, cuda).defaults.get("fused")


def test_resume_refuses_a_recipe_that_trains_something_else_but_not_a_new_worker_count(tmp_path):
    from pcltool.errors import RunDirError
    from pcltool.stages.train import prepare_run

    recipe = load_recipe(QUICKSTART, [f"output.runs_dir={tmp_path / 'runs'}"])
    run, _ = prepare_run(recipe, tmp_path / "runs" / "r", resume=False)
    run.release()
    before = run.manifest_path.read_bytes()
    other = load_recipe(QUICKSTART, [f"output.runs_dir={tmp_path / 'runs'}", "train.lr=0.05"])
    with pytest.raises(RunDirError, match=r"recipe differs .*\(train.lr\)"):
        prepare_run(other, run.path, resume=True)
    assert run.manifest_path.read_bytes() == before
    same = load_recipe(QUICKSTART, [f"output.runs_dir={tmp_path / 'elsewhere'}", "data.workers=1"])
    resumed, state = prepare_run(same, run.path, resume=True)
    assert state is None  # no checkpoint yet: training starts from scratch in the same directory
    resumed.release()
