"""``pcltool compare``: PCL against its plain baseline over several seeds, as a ledger a user can judge.

For every seed ``s`` two runs are made in the output folder: ``pcl-seed{s}`` (the recipe as given) and
``baseline-seed{s}`` (the same recipe with ``pcl.enabled = false``: one branch, plain cross-entropy, the same
schedule, data split, augmentation and epochs). A finished run whose recorded recipe is the requested one is
reused; an interrupted one is resumed; a run made with another recipe is refused (never overwritten). Each run is
then scored by ``select`` (validation split), so the deployed PCL model is chosen exactly as ``pcltool run`` would
(policy ``mean``: the best mean teacher on validation) and the test split only reports it.

The ledger (``ledger.json`` and ``ledger.md``) holds, over seeds, mean ± sample standard deviation of:
every branch's validation and test top-1; the deployed PCL model; the baseline's last weights (what plain training
ships) and its temporal mean (EMA, the stronger baseline); the ensemble teachers; the per-seed paired difference
deployed − baseline; and the training wall time of both, with the cost ratio.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pcltool.config import Recipe, recipe_from_dict
from pcltool.errors import RunDirError, UsageError
from pcltool.manifest import MANIFEST, RunDir, atomic_write_text

LEDGER_JSON = "ledger.json"
LEDGER_MD = "ledger.md"
ARMS = ("pcl", "baseline")
DEPLOY_POLICY = "mean"  # select's policy for the deployed network: the best mean teacher on validation
HEADLINE_ROWS = ("deployed_pcl", "pcl_best_single", "baseline", "baseline_ema", "pcl_ensemble", "pcl_mean_ensemble")


@dataclass(frozen=True, eq=False)
class Arm:
    """One training run of the comparison: ``kind`` ("pcl" or "baseline") at ``seed``."""

    kind: str
    seed: int
    recipe: Recipe
    path: Path


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; ``"0-4"`` -> [0, 1, 2, 3, 4]. Distinct non-negative integers, at least one."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                seeds.extend(range(lo, hi + 1))
            else:
                seeds.append(int(part))
        except ValueError:
            raise UsageError(f"--seeds {text!r}: expected integers separated by commas (0,1,2) or a range (0-2)") \
                from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: seeds must be distinct and non-negative")
    if len(seeds) > 100:
        raise UsageError(f"--seeds {text!r}: {len(seeds)} seeds is more than 100 training runs per arm")
    return seeds


def plan(recipe: Recipe, seeds: list[int], out: Path) -> list[Arm]:
    """The runs of the comparison, seed by seed (PCL first), so a partial ledger is still paired."""
    if not recipe.pcl.enabled:
        raise UsageError("compare needs a PCL recipe (pcl.enabled = true); the baseline is derived from it")
    data = recipe.resolved()
    arms = []
    for seed in seeds:
        for kind in ARMS:
            variant = {**data, "seed": seed, "pcl": {**data["pcl"], "enabled": kind == "pcl"}}
            arms.append(Arm(kind, seed, recipe_from_dict(variant), out / f"{kind}-seed{seed}"))
    return arms


def arm_state(arm: Arm) -> str:
    """``new`` (no run yet), ``done`` (trained with this recipe) or ``interrupted`` (to resume).

    Raises if the folder holds something else, or a run trained with another recipe."""
    if not (arm.path / MANIFEST).is_file():
        if arm.path.exists() and any(arm.path.iterdir()):
            raise RunDirError(f"{arm.path} exists and is not a pcltool run; choose another --out or remove it")
        return "new"
    run = RunDir.open(arm.path)
    diffs = arm.recipe.differences_from(run.recipe, source=str(run.manifest_path))
    if diffs:
        raise RunDirError(f"{arm.path} was trained with another recipe (differs in {', '.join(diffs)}); use another "
                          "--out for this comparison, or remove that run")
    record = run.stage("train") or {}
    return "done" if record.get("status") == "done" else "interrupted"


def train_arm(arm: Arm, state: str, console) -> None:
    from pcltool.distributed import train_entry

    train_entry(arm.recipe, arm.path, state == "interrupted", console)


def select_arm(arm: Arm, console) -> dict:
    """The arm's select table: recorded if ``select`` already scored the finished training, else made now."""
    from pcltool.stages.select import read_select_table, run_select

    run = RunDir.open(arm.path)
    record = run.stage("select") or {}
    train = run.stage("train") or {}
    fresh = (record.get("status") == "done"
             and record.get("inputs", {}).get("checkpoint", {}).get("sha256")
             == train.get("outputs", {}).get("checkpoint", {}).get("sha256"))
    if fresh:
        return read_select_table(run)
    if console is not None:
        console.print(f"scoring {arm.path} on the validation split (select)")
    return run_select(run)


def arm_result(arm: Arm, table: dict, policy: str = DEPLOY_POLICY) -> dict:
    """What the ledger needs from one finished, selected run (``policy``: the select policy that deploys)."""
    run = RunDir.open(arm.path)
    metrics = run.stage("train")["metrics"]
    val = {row["candidate"]: row["top1"] for row in table["candidates"]}
    deployed = table["policies"][policy]
    return {
        "kind": arm.kind, "seed": arm.seed, "run": str(arm.path), "run_id": run.run_id,
        "val_top1": val, "test_top1": metrics["test_top1"], "deployed": deployed, "policy": policy,
        "policies": table["policies"],
        "deployed_test_top1": metrics["test_top1"][deployed], "deployed_val_top1": val[deployed],
        "wall_seconds": metrics.get("wall_seconds"), "epochs": metrics.get("epochs_done"),
        "params": next(r["params"] for r in table["candidates"] if r["candidate"] == deployed),
    }


def summarize(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1; ``None`` for a single value) of ``values``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def ledger(results: list[dict], recipe: Recipe, seeds: list[int]) -> dict:
    """Mean ± std over seeds per branch and the headline comparisons, from the per-run results."""
    pcl = {r["seed"]: r for r in results if r["kind"] == "pcl"}
    base = {r["seed"]: r for r in results if r["kind"] == "baseline"}
    paired = [s for s in seeds if s in pcl and s in base]
    if not paired:
        raise UsageError("no seed has both a finished PCL run and a finished baseline run")

    def over(arm: dict, split: str, name: str) -> dict:
        return summarize([arm[s][split][name] for s in paired])

    branches = {f"pcl/{n}": {"val": over(pcl, "val_top1", n), "test": over(pcl, "test_top1", n)}
                for n in pcl[paired[0]]["test_top1"]}
    branches.update({f"baseline/{n}": {"val": over(base, "val_top1", n), "test": over(base, "test_top1", n)}
                     for n in base[paired[0]]["test_top1"]})
    deployed = summarize([pcl[s]["deployed_test_top1"] for s in paired])
    policy = pcl[paired[0]]["policy"]
    best = summarize([pcl[s]["test_top1"][pcl[s]["policies"]["best"]] for s in paired])
    plain = summarize([base[s]["test_top1"]["peer1"] for s in paired])
    plain_ema = summarize([base[s]["test_top1"]["mean1"] for s in paired])
    pcl_wall = [pcl[s]["wall_seconds"] for s in paired if pcl[s]["wall_seconds"] is not None]
    base_wall = [base[s]["wall_seconds"] for s in paired if base[s]["wall_seconds"] is not None]
    headline = {
        "deployed_pcl": {**deployed, "what": f"PCL deployed: select policy '{policy}' on validation",
                         "chosen": [pcl[s]["deployed"] for s in paired]},
        "pcl_best_single": {**best, "what": "PCL best single branch on validation (policy 'best')",
                            "chosen": [pcl[s]["policies"]["best"] for s in paired]},
        "baseline": {**plain, "what": "plain training, last weights (peer1)"},
        "baseline_ema": {**plain_ema, "what": "plain training, temporal mean of the weights (mean1)"},
        "pcl_ensemble": {**branches["pcl/ensemble"]["test"], "what": "PCL ensemble teacher (all peers; m x cost)"},
        "pcl_mean_ensemble": {**branches["pcl/mean-ensemble"]["test"], "what": "PCL temporal-mean ensemble"},
        "deployed_minus_baseline": summarize([pcl[s]["deployed_test_top1"] - base[s]["test_top1"]["peer1"]
                                              for s in paired]),
        "deployed_minus_baseline_ema": summarize([pcl[s]["deployed_test_top1"] - base[s]["test_top1"]["mean1"]
                                                  for s in paired]),
    }
    cost = {"pcl_wall_seconds": summarize(pcl_wall) if pcl_wall else None,
            "baseline_wall_seconds": summarize(base_wall) if base_wall else None,
            "pcl_over_baseline": (statistics.fmean(pcl_wall) / statistics.fmean(base_wall))
            if pcl_wall and base_wall else None,
            "deployed_params": pcl[paired[0]]["params"], "baseline_params": base[paired[0]]["params"]}
    return {"recipe": recipe.resolved(), "seeds": paired, "missing_seeds": [s for s in seeds if s not in paired],
            "metric": "top-1 % (test split unless marked val); mean and sample std over seeds",
            "headline": headline, "branches": branches, "cost": cost, "runs": results}


def _pm(stat: dict | None, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` (the mean alone for one seed); ``signed`` writes a difference's sign either way (+0.08)."""
    if stat is None:
        return "-"
    mean = f"{stat['mean']:{'+' if signed else ''}.{digits}f}"
    return mean if stat["std"] is None else f"{mean} ± {stat['std']:.{digits}f}"


def ledger_markdown(book: dict) -> str:
    """The ledger as a markdown report (headline, then every branch, then the cost)."""
    h, cost = book["headline"], book["cost"]
    ratio = "-" if cost["pcl_over_baseline"] is None else f"{cost['pcl_over_baseline']:.2f}x"
    seeds = ", ".join(str(s) for s in book["seeds"])
    title = (f"# PCL vs plain training: {book['recipe']['name']} ({book['recipe']['model']['backbone']}, "
             f"{book['recipe']['train']['epochs']} epochs), seeds {seeds}")
    lines = [title, "",
             f"{book['metric']}.", "", "| model | test top-1 % | per seed |", "|---|---|---|"]
    for key in HEADLINE_ROWS:
        row = h[key]
        lines.append(f"| {row['what']} | {_pm(row)} | {', '.join(f'{v:.2f}' for v in row['values'])} |")
    for key, what in (("deployed_minus_baseline", "deployed PCL − baseline (paired, points)"),
                      ("deployed_minus_baseline_ema", "deployed PCL − baseline EMA (paired, points)")):
        row = h[key]
        lines.append(f"| **{what}** | **{_pm(row, signed=True)}** | {', '.join(f'{v:+.2f}' for v in row['values'])} |")
    lines += ["", f"Deployed choices: {', '.join(h['deployed_pcl']['chosen'])}; best single branch: "
              f"{', '.join(h['pcl_best_single']['chosen'])}.", "",
              "| branch | val top-1 % | test top-1 % |", "|---|---|---|"]
    for name, row in book["branches"].items():
        lines.append(f"| {name} | {_pm(row['val'])} | {_pm(row['test'])} |")
    lines += ["", "| cost | value |", "|---|---|",
              f"| PCL training wall time (s) | {_pm(cost['pcl_wall_seconds'], 0)} |",
              f"| baseline training wall time (s) | {_pm(cost['baseline_wall_seconds'], 0)} |",
              f"| PCL / baseline training time | {ratio} |",
              f"| deployed parameters (PCL / baseline) | {cost['deployed_params']:,} / {cost['baseline_params']:,} |"]
    if book["missing_seeds"]:
        lines += ["", f"Not yet paired (missing a finished run): seeds {book['missing_seeds']}."]
    return "\n".join(lines) + "\n"


def ledger_view(book: dict):
    """The headline as a rich table."""
    from rich.table import Table

    h = book["headline"]
    view = Table(title=f"PCL vs plain training over seeds {', '.join(map(str, book['seeds']))} (test top-1 %)")
    for col in ("model", "mean ± std", "per seed"):
        view.add_column(col, justify="left" if col == "model" else "right")
    for key in HEADLINE_ROWS:
        row = h[key]
        view.add_row(row["what"], _pm(row), ", ".join(f"{v:.2f}" for v in row["values"]))
    for key, what in (("deployed_minus_baseline", "deployed − baseline (points)"),
                      ("deployed_minus_baseline_ema", "deployed − baseline EMA (points)")):
        row = h[key]
        view.add_row(f"[bold]{what}[/]", f"[bold]{_pm(row, signed=True)}[/]",
                     ", ".join(f"{v:+.2f}" for v in row["values"]))
    ratio = book["cost"]["pcl_over_baseline"]
    if ratio is not None:
        view.caption = f"PCL training took {ratio:.2f}x the baseline's wall time; the deployed model has the " \
                       f"baseline's size ({book['cost']['deployed_params']:,} parameters)"
    return view


def run_compare(recipe: Recipe, seeds: list[int], out: Path, console=None,
                on_arm: Callable[[Arm, str], None] | None = None, policy: str = DEPLOY_POLICY) -> dict:
    """Train (or reuse/resume) every arm, select each, and write the ledger into ``out``."""
    from pcltool.stages.select import POLICIES

    if policy not in POLICIES:
        raise UsageError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    arms = plan(recipe, seeds, out)
    states = [arm_state(arm) for arm in arms]  # refuse a foreign run before training anything
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for arm, state in zip(arms, states):
        if on_arm is not None:
            on_arm(arm, state)
        if state != "done":
            train_arm(arm, state, console)
        results.append(arm_result(arm, select_arm(arm, console), policy if arm.kind == "pcl" else DEPLOY_POLICY))
    book = ledger(results, recipe, seeds)
    atomic_write_text(out / LEDGER_JSON, json.dumps(book, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / LEDGER_MD, ledger_markdown(book))
    return book
