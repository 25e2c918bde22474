"""``pcltool run RECIPE``: train -> select -> prune -> export -> build (ONNX Runtime fp32 + int8) -> bench.

A stage is skipped when the manifest shows it finished with the same parameters and every input and output it
recorded still has its recorded sha256 (a re-trained checkpoint changes select's input, a re-exported model
changes build's input, and so on down the chain). Without ``--run``, the newest run under the recipe's runs
directory that was started from the same resolved recipe is continued; otherwise a new run is created.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.markup import escape

from pcltool.errors import RunDirError, StaleArtifactError
from pcltool.manifest import MANIFEST, RunDir, sha256_file
from pcltool.stages.bench import DEFAULT_BATCHES
from pcltool.stages.bench_table import print_table
from pcltool.stages.build import DEFAULT_MIN_AGREEMENT

PIPELINE_BUILDS = ("fp32", "int8")


def is_fresh(run: RunDir, key: str, params: dict | None = None) -> bool:
    """Finished, with ``params`` (a subset) as recorded, and every recorded input/output unchanged on disk."""
    rec = run.stage(key)
    if not rec or rec.get("status") != "done":
        return False
    if params and any(rec.get("params", {}).get(k) != v for k, v in params.items()):
        return False
    for art in [*rec.get("inputs", {}).values(), *rec.get("outputs", {}).values()]:
        path = run.resolve(art["path"])
        if not path.is_file() or path.stat().st_size != art["bytes"] or sha256_file(path) != art["sha256"]:
            return False
    return True


def find_run(recipe, run_path: Path | None) -> RunDir | None:
    """The run to continue: ``run_path`` if it holds one, else the newest run of the same recipe."""
    if run_path is not None:
        return RunDir.open(run_path) if (Path(run_path) / MANIFEST).is_file() else None
    resolved = recipe.resolved()
    found = []
    for manifest in Path(recipe.output.runs_dir).glob(f"*/{MANIFEST}"):
        try:
            doc = RunDir(manifest.parent).read()
        except (OSError, RunDirError):  # a damaged sibling is not this recipe's run
            continue
        if doc.get("recipe") == resolved:
            found.append((doc.get("created", ""), manifest.parent))
    return RunDir(max(found)[1]) if found else None


def run_pipeline(recipe, run_path: Path | None = None, peer: str = "mean", engines=("torch", "ort"),
                 batches=DEFAULT_BATCHES, device: str = "auto", calib_images: int = 512, max_top1_drop: float = 1.0,
                 console=None, min_agreement: float = DEFAULT_MIN_AGREEMENT) -> Path:
    """Run every stage that is not up to date; returns the run directory."""
    from pcltool.distributed import train_entry
    from pcltool.stages.bench import run_bench
    from pcltool.stages.build import run_build
    from pcltool.stages.export import resolve_candidate, run_export
    from pcltool.stages.prune import run_prune
    from pcltool.stages.select import run_select

    say = console.print if console is not None else (lambda *a, **k: None)
    run = find_run(recipe, run_path)
    if run is not None and run.recipe != recipe.resolved():
        raise RunDirError(f"{run.path} was started from a different recipe (or --set values); pass another --run "
                          "to start a new run")
    if run is not None and is_fresh(run, "train"):
        say(f"train: up to date in {escape(str(run.path))}")
    elif run is not None and (run.stage("train") or {}).get("status") == "done":
        raise StaleArtifactError(f"{run.path}: the training outputs changed since they were recorded; start a new "
                                 "run with --run NEW_DIR instead of editing artifacts by hand")
    else:
        resume = run is not None and run.stage("train") is not None
        run = RunDir.open(train_entry(recipe, run.path if run else run_path, resume, console))
    with run:
        if not is_fresh(run, "select"):
            run_select(run, console=console)
        else:
            say("select: up to date")
        candidate = resolve_candidate(run, peer)
        for stage, step in (("prune", run_prune), ("export", run_export)):
            if is_fresh(run, f"{stage}:{candidate}"):
                say(f"{stage}: up to date ({candidate})")
            else:
                step(run, peer=peer, console=console)
        for precision in PIPELINE_BUILDS:
            key = f"build:ort-{precision}:{candidate}"
            wanted = {"calib_images": calib_images} if precision == "int8" else {}
            if is_fresh(run, key, {**wanted, "max_top1_drop": max_top1_drop, "min_agreement": min_agreement}):
                say(f"build: {key} up to date")
            else:
                run_build(run, "ort", precision, peer=candidate, calib_images=calib_images,
                          max_top1_drop=max_top1_drop, console=console, min_agreement=min_agreement)
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        bench_params = {"engines": list(engines), "batches": list(batches), "candidate": candidate, "device": device}
        if is_fresh(run, "bench", bench_params):
            say("bench: up to date (inputs unchanged); results from bench.json")
            doc = json.loads((run.path / "bench.json").read_text())
        else:
            doc = run_bench(run, engines, batches, device, peer=candidate, console=console)
    if console is not None:
        print_table(console, doc)
        console.print(f"plot: {escape(str(run.path / 'bench.png'))}\nrun:  {escape(str(run.path))}")
    return run.path
