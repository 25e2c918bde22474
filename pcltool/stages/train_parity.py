"""``pcltool bench-train --accuracy``: does the fast path reach the accuracy of the reference path?

Both paths train the recipe's whole schedule (shorten it with ``--set train.epochs=N``; milestones, ramp-up and
warm-up are the recipe's, so shorten those too) from the same initialisation and sample order: (a) pcltool's
trainer as the recipe configures it, (b) :class:`pcltool.reference.ReferenceTrainer`. Then every branch of both
is scored on the validation and the test split with the same un-augmented input (the fast path's own precision
for (a), fp32 for (b)). The figures that matter: the mean teacher chosen on validation (the network pcltool
deploys) and the ensemble, (a) minus (b) on the test split. Only one seed is trained per path, so a difference
within about ±0.3 points on CIFAR-10 (one seed's spread) is not a difference.
"""

from __future__ import annotations

import math
import time

import torch

from pcltool.config import Recipe
from pcltool.data.augment import ViewMaker
from pcltool.evaluate import evaluate_networks
from pcltool.stages.select import choose, rank_candidates


def _train(trainer, epochs: int, progress=None, label: str = "") -> tuple[float, list[dict]]:
    history = []
    start = time.perf_counter()
    while trainer.epoch < epochs:
        stats = trainer.train_epoch()
        history.append({"epoch": trainer.epoch, "seconds": round(stats["seconds"], 3),
                        "images_per_s": round(stats["images_per_s"], 1), "total_loss": round(stats["total"], 4)})
        if progress:
            progress(f"{label} epoch {trainer.epoch}/{epochs}: {stats['images_per_s']:.0f} img/s, "
                     f"loss {stats['total']:.3f}")
        if not math.isfinite(stats["total"]):
            break
    return time.perf_counter() - start, history


def _score(live, mean, data, view_maker, device, autocast_dtype) -> dict:
    val = evaluate_networks(live, mean, data.val, view_maker, device, autocast_dtype=autocast_dtype)
    test = evaluate_networks(live, mean, data.test, view_maker, device, autocast_dtype=autocast_dtype)
    # the candidate `pcltool select` names for the `mean` policy, by the same ranking
    chosen = choose(rank_candidates(val["top1"], val["top5"], list(val["top1"])))["mean"]
    return {"val_top1": val["top1"], "test_top1": test["top1"], "chosen_mean_teacher": chosen,
            "chosen_test_top1": test["top1"][chosen]}


def run_accuracy_parity(recipe: Recipe, data, device: torch.device, workers: int | None = None,
                        progress=None) -> dict:
    """Train (a) and (b) for ``recipe.train.epochs`` and score both; returns the JSON-able report."""
    from pcltool.reference import ReferenceTrainer, default_workers
    from pcltool.stages.bench_train import _device_name
    from pcltool.trainer import PCLTrainer

    epochs = recipe.train.epochs
    paths = {}
    fast = PCLTrainer(recipe, data, device)
    seconds, history = _train(fast, epochs, progress, "(a) pcltool")
    paths["pcltool"] = {"wall_seconds": round(seconds, 2), "epochs": history, "precision": str(fast.autocast_dtype),
                        **_score(fast.live, fast.mean, data, fast.view_maker, device, fast.autocast_dtype)}
    del fast
    ref = ReferenceTrainer(recipe, data, device, workers=workers)
    seconds, history = _train(ref, epochs, progress, "(b) reference")
    view_maker = ViewMaker.from_config(recipe.data, data, device)
    paths["reference"] = {"wall_seconds": round(seconds, 2), "epochs": history, "precision": "fp32",
                          **_score(ref.live, ref.mean, data, view_maker, device, None)}
    del ref
    a, b = paths["pcltool"], paths["reference"]
    delta = {k: a["test_top1"][k] - b["test_top1"][k] for k in a["test_top1"]}
    finite = all(math.isfinite(p["epochs"][-1]["total_loss"]) for p in paths.values() if p["epochs"])
    return {
        "recipe": recipe.name, "backbone": recipe.model.backbone, "peers": recipe.num_branches,
        "batch_size": recipe.train.batch_size, "dataset": recipe.data.dataset, "epochs": epochs,
        "device": _device_name(device), "torch": torch.__version__,
        "reference_workers": default_workers() if workers is None else workers,
        "train_images": len(data.train), "val_images": len(data.val), "test_images": len(data.test),
        "paths": paths,
        "test_top1_a_minus_b": delta,
        "chosen_test_top1_a_minus_b": a["chosen_test_top1"] - b["chosen_test_top1"],
        "speedup_a_over_b_wall": b["wall_seconds"] / max(a["wall_seconds"], 1e-9),
        "finite": finite,
        "recipe_resolved": recipe.resolved(),
    }


def accuracy_table(report: dict):
    """A rich table: every candidate's validation and test top-1 for (a) and (b), and (a) − (b) on test."""
    from rich.table import Table

    a, b = report["paths"]["pcltool"], report["paths"]["reference"]
    title = (f"bench-train --accuracy {report['recipe']}: {report['backbone']}, m={report['peers']}, "
             f"{report['epochs']} epochs, {report['device']} — (a) {a['wall_seconds']:.0f} s, "
             f"(b) {b['wall_seconds']:.0f} s")
    table = Table(title=title)
    for col in ("candidate", "(a) val", "(a) test", "(b) val", "(b) test", "(a)-(b) test"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for name in a["test_top1"]:
        marks = "".join(f" ←{p}" for p, r in (("a", a), ("b", b)) if r["chosen_mean_teacher"] == name)
        table.add_row(name + marks, f"{a['val_top1'][name]:.2f}", f"{a['test_top1'][name]:.2f}",
                      f"{b['val_top1'][name]:.2f}", f"{b['test_top1'][name]:.2f}",
                      f"{report['test_top1_a_minus_b'][name]:+.2f}")
    return table
