"""``pcltool select``: score every candidate branch on the validation split, rank them, record the table.

Candidates: ``peer1..peerM`` (live network), ``mean1..meanM`` (temporal-mean network), ``ensemble`` and
``mean-ensemble`` (the ensemble heads of both). Policies name a candidate through the recorded table:
``best`` (best single-branch candidate on val), ``mean`` (best mean teacher on val), ``paper`` (= ``mean1``, the
network the paper deploys). The test split is scored only after the choice, and only to report it.

This module also holds what ``prune`` and ``export`` share: loading a run's networks and naming candidates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pcltool.errors import MissingArtifactError, UsageError
from pcltool.evaluate import candidate_names, evaluate_networks
from pcltool.manifest import RunDir, atomic_write_text

SELECT_TABLE = "select.json"
POLICIES = {
    "best": "best single-branch candidate (peer or mean teacher) on the validation split",
    "mean": "best mean teacher on the validation split",
    "paper": "mean1: temporal-mean trunk + mean peer 1, the network the PCL paper deploys",
}
CHECKPOINT_OUTPUTS = {"last": "checkpoint", "best": "best_checkpoint"}
EVAL_BATCH = 256


# --- candidates -----------------------------------------------------------------------------------------------
def run_candidates(run: RunDir) -> list[str]:
    """The concrete candidate names of a run, from its recorded recipe."""
    from pcltool.stages.train import recipe_of_run

    recipe = recipe_of_run(run)
    return candidate_names(recipe.num_branches, recipe.pcl.enabled)


def parse_candidate(name: str) -> tuple[str, int | None]:
    """``peer3`` -> ("live", 2); ``mean1`` -> ("mean", 0); ``ensemble`` -> ("live", None); ``mean-ensemble`` ->
    ("mean", None). The name must be concrete (see :func:`resolve_candidate`)."""
    if name == "ensemble":
        return "live", None
    if name == "mean-ensemble":
        return "mean", None
    source = "live" if name.startswith("peer") else "mean"
    return source, int(name.removeprefix("peer").removeprefix("mean")) - 1


def is_ensemble(name: str) -> bool:
    return name in ("ensemble", "mean-ensemble")


def _unknown(name: str, names: list[str]) -> UsageError:
    return UsageError(f"unknown candidate {name!r}; valid names: {', '.join(names)}, "
                      f"or a policy: {', '.join(POLICIES)}")


def resolve_candidate(run: RunDir, name: str) -> str:
    """Map a candidate name or policy to a concrete candidate name of ``run``.

    ``best`` and ``mean`` read the table recorded by ``select`` (MissingArtifactError when it has not run,
    StaleArtifactError when the table changed on disk); ``paper`` is always ``mean1``."""
    names = run_candidates(run)
    if name in names:
        return name
    if name == "paper":
        return "mean1"
    if name in ("best", "mean"):
        return read_select_table(run)["policies"][name]
    raise _unknown(name, names)


def read_select_table(run: RunDir) -> dict:
    return json.loads(run.artifact("select", "table").read_text())


# --- loading a run ------------------------------------------------------------------------------------------------
@dataclass
class LoadedRun:
    """A finished training run's recipe, data and both networks (eval mode, on ``device``)."""

    recipe: object
    data: object
    live: nn.Module
    mean: nn.Module
    view_maker: object
    device: torch.device
    checkpoint: str
    checkpoint_path: Path

    def network(self, source: str) -> nn.Module:
        return self.mean if source == "mean" else self.live

    def candidate_logits(self, name: str):
        """``x -> logits`` of candidate ``name`` computed inside the multi-branch network."""
        source, index = parse_candidate(name)
        net = self.network(source)
        if index is None:
            return lambda x: net(x)[1]
        return lambda x: net(x)[0][index]


def load_data(recipe, run: RunDir | None = None):
    """The run's dataset, checked against the data ``train`` recorded (see :mod:`pcltool.stages.data`)."""
    from pcltool.stages.data import load_data as load_run_dataset

    return load_run_dataset(recipe, run)


def load_run(run: RunDir, checkpoint: str = "last", device: torch.device | None = None) -> LoadedRun:
    """Rebuild both networks of a finished ``train`` stage from a hash-verified checkpoint."""
    from pcltool.data.augment import ViewMaker
    from pcltool.stages.train import load_checkpoint, recipe_of_run, resolve_device
    from pcltool.trainer import build_networks

    if checkpoint not in CHECKPOINT_OUTPUTS:
        raise UsageError(f"--checkpoint {checkpoint!r}: use one of {', '.join(CHECKPOINT_OUTPUTS)}")
    record = run.require("train")
    output = CHECKPOINT_OUTPUTS[checkpoint]
    if output not in record.get("outputs", {}):
        raise MissingArtifactError(f"the train stage of {run.path} recorded no '{checkpoint}' checkpoint "
                                   "(trained with train.checkpoint_best = false?); use --checkpoint last")
    path = run.verify(record["outputs"][output], f"train/{output}")
    recipe = recipe_of_run(run)
    data = load_data(recipe, run)
    device = device or resolve_device("auto")
    state = load_checkpoint(path)
    live, mean = build_networks(recipe, data.num_classes, data.in_channels)
    live.load_state_dict(state["live"])
    mean.load_state_dict(state["mean"])
    return LoadedRun(recipe, data, live.to(device).eval(), mean.to(device).eval(),
                     ViewMaker.from_config(recipe.data, data, device), device, checkpoint, path)


# --- measuring ------------------------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_FLOPS_CACHE: dict[tuple, int] = {}


@torch.no_grad()
def count_flops(model: nn.Module, input_size: list[int] | tuple[int, ...], device=None) -> int:
    """FLOPs of one forward pass on one image, from torch's flop counter (a multiply-add counts 2).

    Remembered per structure (class, tensor names and shapes, input size): the live and the mean network, or a
    peer and its pruned copy, are counted once."""
    from torch.utils.flop_counter import FlopCounterMode

    key = (type(model).__qualname__, tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()),
           tuple(input_size))
    if key in _FLOPS_CACHE:
        return _FLOPS_CACHE[key]
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    _FLOPS_CACHE[key] = int(counter.get_total_flops())
    return _FLOPS_CACHE[key]


# --- the stage ------------------------------------------------------------------------------------------------------
def _kind(name: str) -> str:
    return {"ensemble": "ensemble head (live)", "mean-ensemble": "ensemble head (mean)"}.get(
        name, "peer" if name.startswith("peer") else "mean teacher")


def rank_candidates(top1: dict, top5: dict, order: list[str]) -> list[str]:
    """Best first: top-1, then top-5, then the order given (validation scores)."""
    return sorted(order, key=lambda n: (-top1[n], -top5[n], order.index(n)))


def choose(ranked: list[str]) -> dict[str, str]:
    """The policies' choices from a ranking (validation split only)."""
    singles = [n for n in ranked if not is_ensemble(n)]
    return {"best": singles[0], "mean": next(n for n in singles if n.startswith("mean")), "paper": "mean1"}


def run_select(run: RunDir, checkpoint: str = "last", split: str = "val", console=None) -> dict:
    """Score every candidate on ``split`` (only ``val``: the test split never chooses), rank them, record
    ``select.json`` and the stage ``select``; report the test accuracy of the chosen candidates afterwards."""
    from pcltool.models import create_backbone

    if split != "val":
        raise UsageError(f"--split {split!r}: candidates are chosen on the validation split only ('val'); "
                         "the test split is reported after the choice, never used to make it")
    with run:
        loaded = load_run(run, checkpoint)
        data, recipe = loaded.data, loaded.recipe
        input_size = [data.in_channels, data.image_size, data.image_size]
        with run.running("select", params={"checkpoint": checkpoint, "split": split},
                         inputs={"checkpoint": loaded.checkpoint_path}):
            val = evaluate_networks(loaded.live, loaded.mean, data.val, loaded.view_maker, loaded.device,
                                    batch_size=EVAL_BATCH)
            names = list(val["top1"])
            ranked = rank_candidates(val["top1"], val["top5"], names)
            policies = choose(ranked)
            # Only now, with the choice made, the test split is scored for the report.
            test = evaluate_networks(loaded.live, loaded.mean, data.test, loaded.view_maker, loaded.device,
                                     batch_size=EVAL_BATCH)
            plain = create_backbone(recipe.model.backbone, data.num_classes, data.in_channels)
            single = {"params": count_params(plain), "flops": count_flops(plain, input_size)}
            whole = {"params": count_params(loaded.live),
                     "flops": count_flops(loaded.live, input_size, loaded.device)}
            rows = []
            for rank, name in enumerate(ranked, 1):
                cost = whole if is_ensemble(name) else single
                rows.append({"rank": rank, "candidate": name, "kind": _kind(name), "top1": val["top1"][name],
                             "top5": val["top5"][name], **cost,
                             "policies": [p for p, c in policies.items() if c == name]})
            chosen = sorted(set(policies.values()), key=ranked.index)
            table = {
                "run_id": run.run_id, "checkpoint": checkpoint, "split": split, "images": val["images"],
                "num_classes": data.num_classes, "disagreement": val["disagreement"], "policies": policies,
                "candidates": rows,
                "test": {"images": test["images"],
                         **{n: {"top1": test["top1"][n], "top5": test["top5"][n]} for n in chosen}},
            }
            path = run.path / SELECT_TABLE
            atomic_write_text(path, json.dumps(table, indent=2) + "\n")
            metrics = {"policies": policies, "val_top1": {n: val["top1"][n] for n in chosen},
                       "test_top1": {n: test["top1"][n] for n in chosen}, "images": val["images"]}
            run.finish("select", {"table": path}, metrics)
    if console is not None:
        console.print(select_table_view(table))
    return table


def select_table_view(table: dict):
    """The ranked table as a rich renderable (top-5 shown where there are >= 100 classes)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    top5 = table["num_classes"] >= 100
    view = Table(title=f"candidates on the {table['split']} split ({table['images']} images, "
                       f"checkpoint {table['checkpoint']})")
    for col in ["#", "candidate", "kind", "top-1 %"] + (["top-5 %"] if top5 else []) + ["params (M)", "MFLOPs",
                                                                                          "policy"]:
        view.add_column(col, justify="right" if col not in ("candidate", "kind", "policy") else "left")
    for row in table["candidates"]:
        view.add_row(str(row["rank"]), row["candidate"], row["kind"], f"{row['top1']:.2f}",
                     *([f"{row['top5']:.2f}"] if top5 else []), f"{row['params'] / 1e6:.3f}",
                     f"{row['flops'] / 1e6:.1f}", ", ".join(row["policies"]))
    test = table["test"]
    chosen = ", ".join(f"{p} = {c}" for p, c in table["policies"].items())
    after = ", ".join(f"{n} {v['top1']:.2f}" for n, v in test.items() if n != "images")
    note = Text(f"chosen on {table['split']}: {chosen}\n"
                f"test top-1 % of the chosen ({test['images']} images, reported after the choice): {after}")
    return Group(view, note)
