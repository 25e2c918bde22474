"""Single-process and torchrun training entry points.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every rank builds the same model from the same
seed, takes every world_size-th sample of the shared epoch order, and DistributedDataParallel averages gradients.
The global batch is ``train.batch_size`` (each rank takes batch_size / world_size) and the learning rate is the
recipe's, unchanged, so a recipe means the same optimisation on 1 or N GPUs. The temporal-mean network is updated
from the (identical) live weights on every rank, so it stays identical too. Only rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

from pcltool.errors import UsageError

DEFAULT_TIMEOUT_S = 600


def _context():
    from pcltool.trainer import DistributedContext

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def train_entry(recipe, run_path: Path | None, resume: bool, console):
    """Train in this process (rank 0 of 1, or one rank of a torchrun job). Returns the run directory on rank 0."""
    import torch.distributed as dist

    from pcltool.data import load_dataset
    from pcltool.stages.train import load_checkpoint, prepare_run, resolve_device, run_train

    ctx = _context()
    device = resolve_device(recipe.device, ctx)
    if ctx.active:
        import torch

        if device.type == "cuda":
            if ctx.local_rank >= torch.cuda.device_count():
                raise UsageError(f"rank {ctx.rank} needs GPU {ctx.local_rank} but only {torch.cuda.device_count()} "
                                 "are visible; lower --nproc-per-node")
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = dt.timedelta(seconds=int(os.environ.get("PCLTOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend, timeout=timeout)
    try:
        data = load_dataset(recipe.data)  # before any run directory exists: bad data leaves nothing behind
        run, state = None, None
        if ctx.is_main:
            run, state = prepare_run(recipe, run_path, resume)
        if ctx.active:
            shared = [str(run.path) if run else None, state is not None]
            dist.broadcast_object_list(shared, src=0)
            if not ctx.is_main and shared[1]:
                from pcltool.manifest import RunDir

                rd = RunDir.open(Path(shared[0]))
                state = load_checkpoint(rd.resolve(rd.stage("train")["outputs"]["checkpoint"]["path"]))
        try:
            run_train(recipe, data, device, run, state, ctx, console if ctx.is_main else None)
        finally:
            if run:
                run.release()
        return run.path if run else None
    except Exception as err:
        if ctx.active:
            from pcltool.errors import PcltoolError

            if not isinstance(err, PcltoolError):
                raise RuntimeError(f"rank {ctx.rank}/{ctx.world_size}: {type(err).__name__}: {err}") from err
        raise
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """``pcltool train ... --nproc N`` -> ``python -m torch.distributed.run --nproc-per-node N -m pcltool train ...``."""
    import torch

    if nproc < 1:
        raise UsageError("--nproc must be >= 1")
    wants_cpu = "cpu" in argv or any(a in ("device=cpu", "--device=cpu") for a in argv)
    if not wants_cpu and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) are visible; "
                         "use at most that many, or --device cpu for CPU processes")
    if not wants_cpu and not torch.cuda.is_available():
        raise UsageError("--nproc needs GPUs (none visible); add --device cpu to run CPU processes with gloo")
    rest = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pcltool", *rest]
    return subprocess.call(cmd)
