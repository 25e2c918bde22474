"""Shared fixtures: tiny recipes on the embedded digits dataset and a session-wide trained run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pcltool.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.toml"

# A few seconds of training on CPU: enough to exercise every code path, not to reach good accuracy.
# The 2-epoch fixture model the export/build/bench tests share (~40 % top-1, many near-tied scores). Its views go
# through the trunk as one batch, as when these tests' gate figures were set: the INT8 and portability checks
# are judged on this model's own scores, and the per-view default (a training choice, tested in test_train.py
# and test_first_steps.py) gives another 2-epoch model whose INT8 top-1 moves by 2 points on 144 images.
TINY_OVERRIDES = ["train.epochs=2", "model.backbone=resnet20", "train.batch_size=128", "device=cpu", "train.log_every=5",
                  "train.batched_views=true"]


@pytest.fixture(autouse=True)
def _cpu_threads():
    torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _decoded_cache(tmp_path_factory):
    """Decoded image folders are cached under the session's temporary directory, never the user's cache."""
    import os

    os.environ["PCLTOOL_CACHE_DIR"] = str(tmp_path_factory.mktemp("decoded-cache"))


@pytest.fixture
def tiny_recipe(tmp_path):
    """A 2-epoch quickstart recipe whose runs go under tmp_path/runs."""
    return load_recipe(QUICKSTART, TINY_OVERRIDES + [f"output.runs_dir={tmp_path / 'runs'}"])


@pytest.fixture(scope="session")
def trained_run_template(tmp_path_factory) -> Path:
    """Train the tiny recipe once per session; tests copy the run directory before using it."""
    from pcltool.distributed import train_entry

    base = tmp_path_factory.mktemp("trained")
    recipe = load_recipe(QUICKSTART, TINY_OVERRIDES + [f"output.runs_dir={base / 'runs'}"])
    return train_entry(recipe, base / "runs" / "tiny", resume=False, console=None)


@pytest.fixture
def trained_run(trained_run_template, tmp_path) -> Path:
    """A private copy of a finished tiny training run (stages may write into it freely)."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run_template, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst
