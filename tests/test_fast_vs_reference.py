"""Same losses: on a fixed seed pcltool's training step and the reference path (pcltool.reference: PIL views,
per-view trunk and mean-network calls, Python EMA loop) agree for the first steps on CPU.

``data.augment = "none"`` gives both paths the same views (their augmentations draw from different generators);
the sample order, initialisation, schedule and EMA formulas are shared, so fp32 losses agree to rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcltool.config import load_recipe
from pcltool.data import load_dataset
from pcltool.reference import ReferenceTrainer, reference_losses
from pcltool.trainer import LOSS_PARTS, PCLTrainer

from tests.conftest import QUICKSTART

STEPS = 4
BASE = ["device=cpu", "model.backbone=resnet20", "train.batch_size=64", "data.augment=none", "pcl.rampup_epochs=1"]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine


@pytest.fixture(scope="module")
def data():
    return load_dataset(load_recipe(QUICKSTART, BASE).data)


def fast_losses(recipe, data, steps: int = STEPS) -> np.ndarray:
    trainer = PCLTrainer(recipe, data, CPU)
    out = []
    for i, (images, labels) in enumerate(trainer.epoch_batches()):
        out.append(trainer.train_step(images, labels, i / trainer.steps_per_epoch).numpy())
        if len(out) == steps:
            break
    return np.stack(out)


@pytest.mark.parametrize("switches, tolerance", [
    # the fast path (batched views, channels_last): with identical views the joint BatchNorm statistics equal
    # the per-view ones and NHWC convolutions compute the same sums, in exact arithmetic; in float32 they round
    # differently, and each SGD step at lr 0.1 on this small model multiplies such differences by about ten
    # (1e-7 after step 1, 9e-4 after step 4 with torch 2.14), so this case gets 2e-3 over four steps. A
    # different method differs by well over 1e-2 (test_a_different_method_does_not_match).
    ([], 2e-3),
    # the reference's own loops and layout: the same arithmetic, equal to rounding
    (["train.batched_views=false", "train.channels_last=false", "train.foreach_ema=false",
      "train.fused_optimizer=false"], 1e-5),
], ids=["fast-path", "per-view-loops"])
def test_fp32_losses_match_reference_step_for_step(data, switches, tolerance):
    recipe = load_recipe(QUICKSTART, BASE + switches)
    ref = reference_losses(recipe, data, CPU, STEPS)
    fast = fast_losses(recipe, data)
    np.testing.assert_allclose(fast, ref, rtol=tolerance, atol=tolerance)
    kd_mean = LOSS_PARTS.index("kd_mean")
    assert (ref[1:, kd_mean] > 0).all()  # the mean teachers diverge from the live peers after the first step
    assert ref[-1, 0] < ref[0, 0] - 0.5  # and training moved: optimiser, schedule and EMA were all exercised


def test_bf16_channels_last_fast_path_within_bf16_tolerance(data):
    recipe = load_recipe(QUICKSTART, BASE + ["train.cpu_fast_path=true", "train.precision=bf16"])
    trainer = PCLTrainer(recipe, data, CPU)
    assert trainer.autocast_dtype is torch.bfloat16 and trainer.channels_last
    ref = reference_losses(recipe, data, CPU, STEPS)
    fast = fast_losses(recipe, data)
    np.testing.assert_allclose(fast[:, 0], ref[:, 0], rtol=2e-2)
    np.testing.assert_allclose(fast, ref, atol=0.15)


def test_a_different_method_does_not_match(data):
    """The comparison can fail: a reference whose temporal mean moves differently gives other losses."""
    recipe = load_recipe(QUICKSTART, BASE + ["train.batched_views=false"])
    ref = reference_losses(load_recipe(QUICKSTART, BASE + ["pcl.ema_decay=0.5"]), data, CPU, STEPS)
    fast = fast_losses(recipe, data)
    kd_mean = LOSS_PARTS.index("kd_mean")
    assert np.abs(fast[2:, kd_mean] - ref[2:, kd_mean]).max() > 1e-2


def test_reference_views_come_from_pil_transforms_in_workers(data):
    recipe = load_recipe(QUICKSTART, BASE + ["data.augment=crop"])
    trainer = ReferenceTrainer(recipe, data, CPU, workers=2)
    views, labels = next(trainer.epoch_batches())
    assert len(views) == 3 and views[0].shape == (64, 1, 8, 8) and labels.shape == (64,)
    assert views[0].is_contiguous() and views[0].dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # each peer its own random crop
    parts = trainer.train_step(views, labels, 0.0)
    assert parts.shape == (len(LOSS_PARTS),) and torch.isfinite(parts).all()
