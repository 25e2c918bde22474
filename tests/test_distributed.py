"""Multi-process training: 2 CPU processes with the gloo backend under torchrun.

After training the weights are identical on both ranks and match a single-process run with the same global batch
(whose BatchNorm normalises each rank's half of the batch on its own: SyncBatchNorm, which would remove that
difference, needs CUDA); validation covers the whole split; a rank that dies ends the job with a message naming it;
``--resume`` under torchrun continues the same training.

Run as a script (``torchrun ... tests/test_distributed.py OUT DIE_AFTER RUN -- pcltool-args``) this file is the worker:
it trains through the real CLI with a trainer that also saves each rank's weights and validation counts to OUT, and
(DIE_AFTER > 0) kills rank 1 once rank 0 has checkpointed epoch DIE_AFTER.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"
# augment=none: ranks draw their own augmentation, so only un-augmented views are comparable to one process
SETS = ["train.epochs=2", "model.backbone=resnet20", "train.batch_size=128", "device=cpu", "train.log_every=5",
        "data.augment=none", "data.val_size=718"]  # 720 training images: even shards drop none
LAUNCH_TIMEOUT_S = 120


def _worker(argv: list[str]) -> None:
    out, die_after, run_dir = Path(argv[0]), int(argv[1]), Path(argv[2])
    import pcltool.stages.train as train_stage
    from pcltool.trainer import PCLTrainer

    class ProbedTrainer(PCLTrainer):
        def train_epoch(self, on_log=None):
            if die_after and self.dist.rank == 1 and self.epoch == die_after:
                _wait_for_checkpoint(run_dir, die_after)
                os._exit(17)
            stats = super().train_epoch(on_log)
            torch.save({"live": self.live.state_dict(), "mean": self.mean.state_dict()},
                       out / f"rank{self.dist.rank}-epoch{self.epoch}.pt")
            return stats

        def evaluate(self, split):
            result = super().evaluate(split)
            if split is self.data.val:
                (out / f"rank{self.dist.rank}-val{self.epoch}.json").write_text(
                    json.dumps({"top1": result["top1"], "images": result["images"]}))
            return result

    train_stage.PCLTrainer = ProbedTrainer
    from pcltool.cli import main

    sys.argv = ["pcltool", *argv[argv.index("--") + 1:]]
    main()


def _wait_for_checkpoint(run_dir: Path, epoch: int) -> None:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            metrics = json.loads((run_dir / "manifest.json").read_text())["stages"]["train"]["metrics"]
            if metrics.get("epochs_done", 0) >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    _worker(sys.argv[1:])
    sys.exit(0)

import pytest  # noqa: E402

from pcltool.config import load_recipe  # noqa: E402
from pcltool.data import load_dataset  # noqa: E402
from pcltool.distributed import launch_torchrun, worker_args  # noqa: E402
from pcltool.errors import UsageError  # noqa: E402
from pcltool.pcl import ramp_up  # noqa: E402
from pcltool.trainer import DistributedContext, PCLTrainer  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # as torchrun's workers (OMP_NUM_THREADS=1), so the runs are comparable


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PCLTOOL_DIST_TIMEOUT="60", OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun_worker(out: Path, run: Path, die_after: int, cwd: Path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=0",
           str(Path(__file__)), str(out), str(die_after), str(run), "--",
           "train", str(QUICKSTART), *[a for s in SETS for a in ("--set", s)], "--run", str(run)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    return proc, time.perf_counter() - start


def _state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_states_equal(a: dict, b: dict) -> None:
    for net in ("live", "mean"):
        assert a[net].keys() == b[net].keys()
        for key in a[net]:
            torch.testing.assert_close(a[net][key], b[net][key], rtol=0, atol=0, msg=f"{net}.{key}")


def _assert_params_close(state: dict, reference: dict, rtol: float, atol: float) -> None:
    for net in ("live", "mean"):
        for key, value in reference[net].items():
            torch.testing.assert_close(state[net][key], value, rtol=rtol, atol=atol, msg=f"{net}.{key}")


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(QUICKSTART, SETS)


@pytest.fixture(scope="module")
def dead_rank_run(tmp_path_factory):
    """2 processes, 2 epochs; rank 1 dies once rank 0 has checkpointed epoch 1. Per-rank weights and validation
    counts of epoch 1 are in ``out``; the manifest and metrics log are read right after the job ended."""
    base = tmp_path_factory.mktemp("ddp")
    out, run = base / "out", base / "run"
    out.mkdir()
    proc, seconds = _torchrun_worker(out, run, 1, base)
    return {"proc": proc, "seconds": seconds, "out": out, "run": run,
            "manifest": json.loads((run / "manifest.json").read_text()),
            "metrics": (run / "metrics.jsonl").read_text()}


@pytest.fixture(scope="module")
def one_process(recipe):
    """One process over the same global batches, for 2 epochs; each step averages the gradients of the halves that
    rank 0 and rank 1 take (every 2nd image), so BatchNorm normalises each half on its own, as on 2 ranks.
    Returns the parameters after each epoch, and (key ``"losses"``) each step's loss parts averaged over the two
    halves, as the ranks log them."""
    torch.set_num_threads(1)
    trainer = PCLTrainer(recipe, load_dataset(recipe.data), CPU)
    init = {k: v.clone() for k, v in trainer.live.named_parameters()}
    snapshots, losses = [], []
    for _ in range(2):
        for i, (images, labels) in enumerate(trainer.epoch_batches()):
            epoch_float = trainer.epoch + i / trainer.steps_per_epoch
            trainer._rampup.fill_(ramp_up(epoch_float, recipe.pcl.rampup_epochs))
            grads, halves = [], []
            for rank in (0, 1):
                views = trainer._views(images[rank::2])
                total, parts = trainer._forward_loss(views, labels[rank::2], trainer._rampup)
                grads.append(torch.autograd.grad(total, list(trainer.live.parameters())))
                halves.append(parts)
            losses.append((halves[0] + halves[1]) / 2)
            for p, g0, g1 in zip(trainer.live.parameters(), *grads):
                p.grad = (g0 + g1) / 2
            trainer.optimizer.step()
            trainer.scheduler.step()
            trainer.update_mean()
            trainer.step += 1
        trainer.epoch += 1
        snapshots.append({name: {k: v.detach().clone() for k, v in net.named_parameters()}
                          for name, net in (("live", trainer.live), ("mean", trainer.mean))})
    moved = max((snapshots[0]["live"][k] - v).abs().max().item() for k, v in init.items())
    assert moved > 0.05  # the comparisons below have teeth: weights moved far more than their tolerance
    return {0: snapshots[0], 1: snapshots[1], "losses": torch.stack(losses)}


def test_ranks_hold_identical_weights_matching_one_process(dead_rank_run, one_process):
    out = dead_rank_run["out"]
    rank0, rank1 = _state(out / "rank0-epoch1.pt"), _state(out / "rank1-epoch1.pt")
    _assert_states_equal(rank0, rank1)  # BatchNorm statistics included
    _assert_params_close(rank0, one_process[0], rtol=1e-4, atol=1e-5)


def test_every_rank_logs_the_global_mean_loss(dead_rank_run, one_process):
    """The logged losses (and so the divergence rule, which every rank applies to them) are the mean over the
    ranks' shards, not rank 0's own: the same on every rank, equal to the one-process mean of the two halves."""
    from pcltool.trainer import LOSS_PARTS

    records = [json.loads(line) for line in dead_rank_run["metrics"].splitlines()]
    logged = [r for r in records if r["kind"] == "train" and r["epoch"] == 1]
    assert len(logged) >= 2 and logged[-1]["batch"] == logged[-1]["batches"]
    steps, previous = one_process["losses"], 0
    for rec in logged:  # each record averages the steps since the one before
        window = steps[previous:rec["step"]].mean(0)
        previous = rec["step"]
        for name, expected in zip(LOSS_PARTS, window.tolist()):
            assert rec[name] == pytest.approx(expected, rel=1e-4, abs=1e-5), (rec["batch"], name)


def test_validation_covers_the_whole_split(dead_rank_run, recipe):
    data = load_dataset(recipe.data)
    single = PCLTrainer(recipe, data, CPU)
    single.load_state_dict({**single.state_dict(), **_state(dead_rank_run["out"] / "rank0-epoch1.pt")})
    expected = single.evaluate(data.val)
    for rank in (0, 1):
        got = json.loads((dead_rank_run["out"] / f"rank{rank}-val1.json").read_text())
        assert got["images"] == len(data.val)
        for name, value in expected["top1"].items():
            assert got["top1"][name] == pytest.approx(value, abs=1e-9), name


def test_dead_rank_ends_the_job_with_a_message_naming_it(dead_rank_run):
    proc = dead_rank_run["proc"]
    assert proc.returncode != 0 and dead_rank_run["seconds"] < LAUNCH_TIMEOUT_S
    report = proc.stdout + proc.stderr
    assert "rank      : 1" in report and "exitcode  : 17" in report, report[-3000:]
    train = dead_rank_run["manifest"]["stages"]["train"]
    assert train["status"] != "done" and train["metrics"]["epochs_done"] == 1
    records = [json.loads(line) for line in dead_rank_run["metrics"].splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1]  # only rank 0 writes


def test_resume_under_torchrun_continues_the_same_training(dead_rank_run, one_process, monkeypatch, capfd):
    run = dead_rank_run["run"]
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(run.parent)
    argv = ["train", str(QUICKSTART), *[a for s in SETS for a in ("--set", s)], "--run", str(run), "--resume",
            "--nproc", "2"]
    assert launch_torchrun(2, argv) == 0, capfd.readouterr().err[-4000:]
    final = _state(run / "checkpoints" / "last.pt")
    assert final["epoch"] == 2
    _assert_params_close(final, one_process[1], rtol=1e-3, atol=1e-4)
    manifest = json.loads((run / "manifest.json").read_text())
    train = manifest["stages"]["train"]
    assert train["status"] == "done" and train["params"]["world_size"] == 2
    assert train["params"]["resumed_from_epoch"] == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "val"] == [1, 2]


def test_launcher_arguments_and_bad_requests():
    assert worker_args(["train", "r.toml", "--nproc", "2", "--run", "x", "--nproc=3"]) == ["train", "r.toml", "--run", "x"]
    with pytest.raises(UsageError, match="--nproc"):
        launch_torchrun(0, ["train", "r.toml", "--device", "cpu"])
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="needs GPUs"):
            launch_torchrun(2, ["train", "r.toml"])


def test_distributed_settings_rejected_with_a_reason(recipe):
    data = load_dataset(recipe.data)
    two = DistributedContext(rank=0, world_size=2)
    with pytest.raises(UsageError, match="SyncBatchNorm"):
        PCLTrainer(load_recipe(QUICKSTART, SETS + ["train.sync_batchnorm=true"]), data, CPU, two)
    with pytest.raises(UsageError, match="divisible"):
        PCLTrainer(load_recipe(QUICKSTART, SETS + ["train.batch_size=127"]), data, CPU, DistributedContext(0, 2))
