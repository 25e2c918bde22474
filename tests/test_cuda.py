"""The GPU fast path: device-resident data, no host synchronisation inside the step, bf16 and compiled steps
against the fp32 reference path, and a whole CLI run trained on the GPU and exported on the CPU.

Marked ``cuda``: every test here skips without an NVIDIA GPU (``pytest -m cuda`` runs only these).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcltool.config import load_recipe
from pcltool.data import load_dataset
from pcltool.reference import reference_losses
from pcltool.trainer import LOSS_PARTS, PCLTrainer
from tests.conftest import QUICKSTART

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

STEPS = 4
BASE = ["device=cuda", "model.backbone=resnet20", "train.batch_size=64", "data.augment=none", "pcl.rampup_epochs=1"]


@pytest.fixture(scope="module")
def cuda():
    return torch.device("cuda", 0)


@pytest.fixture(scope="module")
def data():
    return load_dataset(load_recipe(QUICKSTART, BASE).data)


def _fast_losses(trainer: PCLTrainer, steps: int = STEPS) -> np.ndarray:
    out = []
    for i, (images, labels) in enumerate(trainer.epoch_batches()):
        out.append(trainer.train_step(images, labels, i / trainer.steps_per_epoch).cpu().numpy())
        if len(out) == steps:
            break
    return np.stack(out)


def test_dataset_and_views_live_on_the_gpu(data, cuda):
    trainer = PCLTrainer(load_recipe(QUICKSTART, BASE + ["data.augment=crop"]), data, cuda)
    images, labels = next(trainer.epoch_batches())
    assert images.device.type == "cuda" and images.dtype == torch.uint8 and labels.device.type == "cuda"
    views = trainer._views(images)
    assert views.device.type == "cuda" and views.shape[:2] == (3, 64)
    assert views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(views[0], views[1])  # every peer its own crop


def test_no_host_synchronisation_inside_the_bf16_step(data, cuda):
    """The step never waits for the GPU: PyTorch's sync debug mode turns any synchronising call into an error."""
    trainer = PCLTrainer(load_recipe(QUICKSTART, BASE + ["data.augment=crop_flip", "train.precision=bf16"]),
                         data, cuda)
    batches = trainer.epoch_batches()
    images, labels = next(batches)
    trainer.train_step(images, labels, 0.0)  # first step: allocator and cuDNN warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(3):
            images, labels = next(batches)
            parts = trainer.train_step(images, labels, (i + 1) / trainer.steps_per_epoch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(parts).all()


@pytest.fixture
def deterministic_cudnn():
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


def test_fp32_per_view_path_on_gpu_matches_the_reference(data, cuda, deterministic_cudnn):
    """The reference's loops and layout on the GPU: the same arithmetic as the reference path. (Deterministic
    cuDNN: atomics in some backward kernels would otherwise add run-to-run noise that SGD at lr 0.1 amplifies
    about tenfold per step, as the CPU test describes.)"""
    switches = ["train.precision=fp32", "train.batched_views=false", "train.channels_last=false",
                "train.foreach_ema=false", "train.fused_optimizer=false"]
    recipe = load_recipe(QUICKSTART, BASE + switches)
    ref = reference_losses(recipe, data, cuda, STEPS)
    fast = _fast_losses(PCLTrainer(recipe, data, cuda))
    np.testing.assert_allclose(fast, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("switches", [
    ["train.precision=bf16"],
    ["train.precision=bf16", "train.compile=true", "train.compile_mode=reduce-overhead"],  # CUDA graphs
], ids=["bf16", "bf16-compiled-cuda-graphs"])
def test_fast_path_on_gpu_within_bf16_tolerance_of_fp32_reference(data, cuda, switches):
    recipe = load_recipe(QUICKSTART, BASE + switches)
    ref = reference_losses(load_recipe(QUICKSTART, BASE + ["train.precision=fp32"]), data, cuda, STEPS)
    trainer = PCLTrainer(recipe, data, cuda)
    fast = _fast_losses(trainer)
    np.testing.assert_allclose(fast[:, 0], ref[:, 0], rtol=2e-2)
    np.testing.assert_allclose(fast, ref, atol=0.15)
    kd_mean = LOSS_PARTS.index("kd_mean")
    assert (fast[1:, kd_mean] > 0).all()
    if trainer.compiled:
        assert trainer.compile_seconds is not None and trainer.compile_seconds > 0


def test_fp16_with_gradient_scaler_trains(data, cuda):
    """fp16 autocast with the scaler: the first loss (before any update) is the fp32 one, and training moves.
    (Later steps are not compared: the scaler may skip a step whose scaled gradients overflowed.)"""
    ref = reference_losses(load_recipe(QUICKSTART, BASE + ["train.precision=fp32"]), data, cuda, 1)
    trainer = PCLTrainer(load_recipe(QUICKSTART, BASE + ["train.precision=fp16"]), data, cuda)
    assert trainer.scaler.is_enabled()
    fast = _fast_losses(trainer, steps=8)
    assert np.isfinite(fast).all()
    np.testing.assert_allclose(fast[0, 0], ref[0, 0], rtol=2e-2)
    assert fast[-1, 0] < fast[0, 0] - 0.5


def test_train_on_gpu_then_export_on_cpu(tmp_path):
    """A run trained on the GPU goes through select, prune and export (CPU) with every gate passing."""
    import json
    import subprocess
    import sys

    runs = tmp_path / "runs"
    sets = ["--set", "train.epochs=2", "--set", "model.backbone=resnet20", "--set", f"output.runs_dir={runs}"]
    proc = subprocess.run([sys.executable, "-m", "pcltool", "train", str(QUICKSTART), "--device", "cuda",
                           "--run", str(runs / "gpu"), *sets], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pcltool", "export", str(runs / "gpu"), "--peer", "mean"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((runs / "gpu" / "manifest.json").read_text())
    assert manifest["stages"]["train"]["params"]["device"] == "cuda:0"
    assert all(manifest["stages"][s]["status"] == "done" for s in ("train", "select", "prune", "export"))
