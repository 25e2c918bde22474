"""Single-process and torchrun training entry points.

Under ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK in the environment) every rank builds the same model from the same
seed, takes every world_size-th sample of the shared epoch order (the device-resident dataset is sharded the same
way), and DistributedDataParallel averages gradients.

Global batch and learning rate: ``train.batch_size`` is the global batch (each of the N processes takes
batch_size / N, which must divide evenly) and ``train.lr`` is used unchanged, so a recipe means the same
optimisation on 1 or N GPUs. To use a larger global batch, raise ``train.batch_size`` and scale ``train.lr`` with it
(linear rule, with a few epochs of ``train.warmup_epochs``).

The temporal-mean network is updated from the identical live weights on every rank, so it stays identical; BatchNorm
statistics are made rank 0's at the end of every epoch. Only rank 0 writes (checkpoints, logs, manifest); on
``--resume`` rank 0 reads the checkpoint and sends it to the other ranks, so the nodes need not share a filesystem.

Multi-node is the same code under torchrun's rendezvous, e.g. two nodes of 8 GPUs (run on every node):
``torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB
-m pcltool train RECIPE``.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

from pcltool.errors import UsageError

DEFAULT_TIMEOUT_S = 600
_LOST_PEER = ("connection closed", "connection reset", "broken pipe", "read error", "timed out", "timeout", "nccl")


def _context():
    from pcltool.trainer import DistributedContext

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistributedContext(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def dist_timeout() -> dt.timedelta:
    """How long a collective waits for a silent rank before failing (``PCLTOOL_DIST_TIMEOUT`` seconds)."""
    return dt.timedelta(seconds=int(os.environ.get("PCLTOOL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def train_entry(recipe, run_path: Path | None, resume: bool, console):
    """Train in this process (rank 0 of 1, or one rank of a torchrun job). Returns the run directory on rank 0."""
    import torch.distributed as dist

    from pcltool.data import load_dataset
    from pcltool.stages.train import prepare_run, resolve_device, run_train

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
        dist.init_process_group(backend, timeout=dist_timeout())
    try:
        # before any run directory exists: bad data leaves nothing behind; a resumed run's data is checked
        data = load_dataset(recipe.data, _recorded_data(recipe, run_path) if resume else None)
        run, state = None, None
        if ctx.is_main:
            run, state = prepare_run(recipe, run_path, resume)
        if ctx.active:
            shared = [state]  # the checkpoint (CPU tensors) or None; other ranks need no access to the run dir
            dist.broadcast_object_list(shared, src=0)
            state = shared[0]
        try:
            run_train(recipe, data, device, run, state, ctx, console if ctx.is_main else None)
        finally:
            if run:
                run.release()
        if ctx.active:
            # Rank 0 still writes the manifest after the last collective; a rank that tore its process group down
            # meanwhile could abort in gloo's teardown ("terminate called without an active exception") when the
            # machine is loaded. All ranks leave together.
            dist.barrier()
        return run.path if run else None
    except Exception as err:
        if ctx.active:
            _record_for_torchrun(err)
            from pcltool.errors import PcltoolError

            if not isinstance(err, PcltoolError):
                raise RuntimeError(_rank_message(ctx, err)) from err
        raise
    finally:
        if ctx.active and dist.is_initialized():
            dist.destroy_process_group()


def _recorded_data(recipe, run_path: Path | None) -> dict | None:
    """What the run being resumed recorded about its data (None when there is no such run yet)."""
    from pcltool.errors import RunDirError
    from pcltool.manifest import RunDir
    from pcltool.stages.data import expected_data

    try:
        return expected_data(RunDir.open(run_path or RunDir.latest(Path(recipe.output.runs_dir))))
    except RunDirError:
        return None  # prepare_run reports the missing run


def _rank_message(ctx, err: BaseException) -> str:
    text = f"rank {ctx.rank}/{ctx.world_size}: {type(err).__name__}: {err}"
    if any(word in str(err).lower() for word in _LOST_PEER):
        text += ("\n(lost contact with another process: it probably failed or was killed first; its own error is "
                 "in torchrun's report. Continue from the last checkpoint with --resume.)")
    return text


def _record_for_torchrun(err: BaseException) -> None:
    """Write the error where torchrun's failure report picks it up (it names the failing rank)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(err)
    except Exception:  # reporting must never hide the original error
        pass


def worker_args(argv: list[str]) -> list[str]:
    """The command line each process runs: ``argv`` without ``--nproc``."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    return rest


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Run ``argv`` (a ``pcltool train`` command line) as ``nproc`` processes on this machine, like
    ``torchrun --standalone --nproc-per-node N -m pcltool ARGV`` with this process as torchrun's agent (the
    arguments bypass torchrun's option parser, which would take ``--run`` for its own ``--run-path``).

    A failing process makes the agent stop the others; the report names the rank, and a line says how to go on."""
    import torch

    if nproc < 1:
        raise UsageError("--nproc must be >= 1")
    wants_cpu = "cpu" in argv or any(a in ("device=cpu", "--device=cpu") for a in argv)
    if not wants_cpu and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UsageError(f"--nproc {nproc}: only {torch.cuda.device_count()} GPU(s) are visible; "
                         "use at most that many, or --device cpu for CPU processes")
    if not wants_cpu and not torch.cuda.is_available():
        raise UsageError("--nproc needs GPUs (none visible); add --device cpu to run CPU processes with gloo")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "pcltool"])
    args.training_script_args = worker_args(argv)
    try:
        run(args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"{err.format_msg()}\npcltool: the {nproc}-process training job failed: rank {rank} exited first "
              f"(exit code {failure.exitcode}); the other processes were stopped. Fix the cause, then continue from "
              "the last checkpoint with the same command plus --resume.", file=sys.stderr)
        return 1
    except SignalException as err:
        print(f"pcltool: interrupted ({err.sigval.name}); the training processes were stopped. Continue from the last "
              "checkpoint with the same command plus --resume.", file=sys.stderr)
        return 130
    return 0
