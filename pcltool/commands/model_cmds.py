"""``pcltool select``, ``prune`` and ``export``: from a trained run to a verified single-branch ONNX model."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from pcltool.commands.common import RunArg, RunsDirOpt, console, handle_errors, open_run

CANDIDATES_HELP = ("peer1..peerM, mean1..meanM, ensemble, mean-ensemble, or a policy: best (best single branch on "
                   "val), mean (best mean teacher on val), paper (= mean1)")
PeerOpt = Annotated[str, typer.Option("--peer", help=f"candidate to deploy: {CANDIDATES_HELP}")]


class Checkpoint(str, Enum):
    last = "last"
    best = "best"


CheckpointOpt = Annotated[Checkpoint, typer.Option("--checkpoint", help="which training checkpoint to read")]


@handle_errors
def select(
    run: RunArg = None,
    checkpoint: CheckpointOpt = Checkpoint.last,
    split: Annotated[str, typer.Option("--split", help="split to choose on (val only: the test split is reported "
                                                       "after the choice, never used to make it)")] = "val",
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Score every peer, mean teacher and ensemble head on the validation split; rank them and record the table."""
    from pcltool.stages.select import run_select

    run_select(open_run(run, runs_dir), checkpoint.value, split, console())


@handle_errors
def prune(
    run: RunArg = None,
    peer: PeerOpt = "mean",
    checkpoint: CheckpointOpt = Checkpoint.last,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Build the chosen branch as the plain backbone, prove its logits equal the branch's, save it (safetensors)."""
    from pcltool.stages.prune import run_prune

    run_prune(open_run(run, runs_dir), peer, checkpoint.value, console())


@handle_errors
def export(
    run: RunArg = None,
    peer: PeerOpt = "mean",
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default 17)")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch/--no-dynamic-batch",
                                                help="dynamic batch axis 'batch' (off: batch 1)")] = True,
    static_batch: Annotated[Optional[int], typer.Option("--static-batch", min=1,
                                                        help="fix the batch size at N instead")] = None,
    simplify: Annotated[bool, typer.Option("--simplify", help="fold constants and BatchNorm (onnxscript "
                                                              "optimiser)")] = False,
    raw_input: Annotated[bool, typer.Option("--raw-input", help="take uint8 NHWC pixels; normalisation runs "
                                                                "inside the graph")] = False,
    atol: Annotated[float, typer.Option("--atol", help="gate: absolute floor of the allowed max |logit difference| "
                                                       "(ONNX Runtime vs PyTorch)")] = 1e-4,
    rtol: Annotated[float, typer.Option("--rtol", help="gate: allowed difference relative to max |logit| (added to "
                                                       "--atol)")] = 1e-5,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Export the candidate to ONNX and gate it (checker; ONNX Runtime vs PyTorch on the whole validation split at
    batch 1, 7 and 64; initialisers = the pruned network's). Runs select and prune first when needed."""
    from pcltool.stages.export import run_export

    run_export(open_run(run, runs_dir), peer, opset, dynamic_batch, static_batch, simplify, raw_input, console(),
               atol=atol, rtol=rtol)
