"""``pcltool export``: the pruned candidate as one verified ONNX graph.

The graph has one input ``images`` and one output ``logits`` and is exported from eval mode with the TorchScript
exporter, without constant folding: BatchNorm stays a ``BatchNormalization`` node, so the graph's initialisers are
exactly the pruned network's parameters and BatchNorm buffers and the gate can prove it by value (ONNX Runtime
and TensorRT fold BatchNorm when they load the graph). ``simplify`` runs onnxscript's optimiser afterwards
(constant folding, BatchNorm folded into the convolutions); the initialiser check then runs on the graph before
simplification.

Inputs:
- default: ``images`` float32 (N, C, H, W), normalised with the card's mean/std (metadata ``pcltool.input_format``
  = ``float32-nchw-normalized``); the caller resizes/crops to H x W and normalises, exactly as training did.
- ``raw_input``: ``images`` uint8 (N, H, W, C) at the network's input size, the usual layout of decoded pixels;
  ``(x / 255 - mean) / std`` runs inside the graph (``uint8-nhwc``). For callers that hold raw pixels and want
  the preprocessing to travel with the model; resizing/cropping stays the caller's.

Metadata: ``pcltool.class_names``, ``pcltool.mean``, ``pcltool.std``, ``pcltool.input_size``, ``pcltool.resize_size``,
``pcltool.preprocessing`` (JSON: the whole preprocessing contract), ``pcltool.interpolation``, plus
``pcltool.candidate``, ``pcltool.arch``, ``pcltool.run_id``, ``pcltool.input_format``, ``pcltool.source``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pcltool.data.augment import ViewMaker
from pcltool.errors import UsageError
from pcltool.manifest import RunDir, atomic_path
from pcltool.onnx_gate import DEFAULT_ATOL, DEFAULT_RTOL, GATE_BATCH_SIZES, GateSpec, validate_onnx
from pcltool.stages.prune import load_pruned, run_prune
from pcltool.stages.select import (
    POLICIES,
    load_data,
    resolve_candidate,
    run_candidates,
    run_select,
)

EXPORT_DIR = "exports"
DEFAULT_OPSET = 17  # ONNX Runtime >= 1.12 and TensorRT >= 8.6 read it
FLOAT_FORMAT = "float32-nchw-normalized"
RAW_FORMAT = "uint8-nhwc"


class RawPixels(nn.Module):
    """uint8 (N, H, W, C) -> ``(x / 255 - mean) / std`` as float (N, C, H, W) -> ``model``: the same arithmetic,
    in the same order, as :func:`pcltool.data.augment.normalize`."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255.0  # (N, C, H, W)
        return self.model((x - self.mean) / self.std)


@dataclass(frozen=True)
class ExportOptions:
    opset: int
    batch: int | None  # None: dynamic batch axis "batch"
    simplify: bool
    raw_input: bool


def exporter_opsets() -> tuple[int, int]:
    """The opsets the installed TorchScript exporter and onnx package can both produce."""
    import onnx
    from torch.onnx import _constants

    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 17))
    return low, min(high, onnx.defs.onnx_opset_version())


def check_options(opset: int | None, dynamic_batch: bool, static_batch: int | None, simplify: bool,
                  raw_input: bool) -> ExportOptions:
    low, high = exporter_opsets()
    if opset is not None and not low <= opset <= high:
        raise UsageError(f"--opset {opset}: the installed exporter (torch {torch.__version__}) produces opsets "
                         f"{low}..{high}; the default is {DEFAULT_OPSET}")
    if static_batch is not None and static_batch < 1:
        raise UsageError(f"--static-batch {static_batch}: the batch size must be >= 1")
    batch = static_batch if static_batch is not None else (None if dynamic_batch else 1)
    return ExportOptions(opset if opset is not None else DEFAULT_OPSET, batch, simplify, raw_input)


@contextlib.contextmanager
def _silenced_stdout():
    """Silence file descriptor 1 (libtorch prints the whole graph there when an export fails)."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def export_onnx(model: nn.Module, path: Path, card: dict, options: ExportOptions, metadata: dict[str, str]):
    """Write ``model`` (eval mode) to ``path``; returns the graph as exported (before any simplification)."""
    import onnx

    c, h, w = card["input_size"]
    module = RawPixels(model, card["mean"], card["std"]) if options.raw_input else model
    module.eval()
    example_batch = options.batch or 2
    if options.raw_input:
        example = torch.zeros(example_batch, h, w, c, dtype=torch.uint8)
    else:
        example = torch.zeros(example_batch, c, h, w)
    kwargs = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: reliable for these CNNs on torch 2.4 .. 2.x
    if options.batch is None:
        kwargs["dynamic_axes"] = {"images": {0: "batch"}, "logits": {0: "batch"}}
    # quiet: the legacy-exporter deprecation notice, constant-folding chatter, and the graph dump it prints
    # when it fails (the error below says what failed)
    with warnings.catch_warnings(), _silenced_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["logits"],
                              opset_version=options.opset, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.EVAL, export_params=True, **kwargs)
        except Exception as err:
            reason = (str(err).strip().splitlines() or [""])[0].split(" [Caused by")[0][:300].strip()
            raise UsageError(f"the installed exporter (torch {torch.__version__}) could not export "
                             f"{card['candidate']} at opset {options.opset}: {type(err).__name__}: {reason}; "
                             f"use the default --opset {DEFAULT_OPSET}") from None
    exported = onnx.load(str(path))
    final = exported
    if options.simplify:
        import onnxscript.optimizer

        final = onnxscript.optimizer.optimize(onnx.ModelProto.FromString(exported.SerializeToString()))
    if options.batch is not None:  # the exporter leaves the output's batch symbolic even for a fixed input
        for value in (*final.graph.input, *final.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = options.batch
    del final.metadata_props[:]
    for key, value in metadata.items():
        final.metadata_props.add(key=key, value=value)
    onnx.save(final, str(path))
    return exported


def _gate_chunks(split, view_maker, options: ExportOptions, image_size: int) -> Iterator[tuple]:
    """``(onnx_input, torch_input)`` chunks covering the whole split once. A chunk holds one cycle of the gate's
    batch sizes (a static graph: its batch); a short split or a static graph's last chunk is filled by repeating
    images, so every batch size runs."""
    from pcltool.data.augment import center_crop

    chunk = options.batch or sum(GATE_BATCH_SIZES)
    fill_all = options.batch is not None or len(split) < chunk
    for images, _ in split.batches(chunk, torch.device("cpu")):
        if fill_all and images.shape[0] < chunk:
            images = images[torch.arange(chunk) % images.shape[0]]
        torch_in = view_maker.eval_view(images)
        if options.raw_input:
            onnx_in = center_crop(images, image_size).permute(0, 2, 3, 1).contiguous().numpy()
        else:
            onnx_in = torch_in.numpy()
        yield onnx_in, torch_in


def preprocessing_metadata(data) -> dict[str, str]:
    """The run's preprocessing contract (:mod:`pcltool.data.preprocess`) as ONNX metadata: what
    ``deploy/pcl_infer.py``, the Triton bundle and ``bench`` apply to an image file."""
    pre = data.preprocessing.as_dict()
    return {"pcltool.resize_size": json.dumps(pre["resize_size"]), "pcltool.interpolation": pre["interpolation"],
            "pcltool.preprocessing": json.dumps(pre)}


def _done(record: dict | None) -> bool:
    return record is not None and record.get("status") == "done"


def _ensure_pruned(run: RunDir, peer: str, console) -> str:
    """The concrete candidate; ``select`` (for a policy) and ``prune`` run first when they have not.

    Prune reads the checkpoint ``select`` chose on (``last`` when select has not run). A candidate chosen by a
    policy is pruned again when its recorded pruning came from another checkpoint."""
    if peer not in run_candidates(run) and peer not in POLICIES:
        resolve_candidate(run, peer)  # raises the UsageError listing the valid names
    policy = peer in ("best", "mean")
    if policy and not _done(run.stage("select")):
        run_select(run, "last", console=console)
    select = run.stage("select")
    checkpoint = select["params"]["checkpoint"] if _done(select) else "last"
    candidate = resolve_candidate(run, peer)
    pruned = run.stage(f"prune:{candidate}")
    if not _done(pruned) or (policy and pruned["params"].get("checkpoint") != checkpoint):
        run_prune(run, peer, checkpoint, console)
    return candidate


def run_export(run: RunDir, peer: str = "mean", opset: int | None = None, dynamic_batch: bool = True,
               static_batch: int | None = None, simplify: bool = False, raw_input: bool = False,
               console=None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> dict:
    """Export candidate ``peer`` to ``exports/<candidate>.onnx``, gate it, record ``export:<candidate>``.

    ``static_batch`` fixes the batch size (``dynamic_batch=False`` alone fixes it at 1). Returns the metrics."""
    import onnx
    import onnxruntime

    from pcltool.stages.train import recipe_of_run

    options = check_options(opset, dynamic_batch, static_batch, simplify, raw_input)
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise UsageError(f"{flag} {value}: expected a finite number between 0 and 1")
    with run:
        candidate = _ensure_pruned(run, peer, console)
        weights = run.artifact(f"prune:{candidate}", "weights")
        card_path = run.artifact(f"prune:{candidate}", "card")
        card = json.loads(card_path.read_text())
        model = load_pruned(weights, card)
        recipe = recipe_of_run(run)
        data = load_data(recipe, run)
        view_maker = ViewMaker.from_config(recipe.data, data, torch.device("cpu"))
        c, h, w = card["input_size"]
        metadata = {
            "pcltool.class_names": json.dumps(card["class_names"]), "pcltool.mean": json.dumps(card["mean"]),
            "pcltool.std": json.dumps(card["std"]), "pcltool.input_size": json.dumps(card["input_size"]),
            "pcltool.candidate": candidate, "pcltool.arch": card["arch"], "pcltool.run_id": card["run_id"],
            "pcltool.input_format": RAW_FORMAT if raw_input else FLOAT_FORMAT, "pcltool.source": card["source"],
            **preprocessing_metadata(data),
        }
        spec = GateSpec(input_shape=[h, w, c] if raw_input else [c, h, w], num_classes=card["num_classes"],
                        input_dtype="uint8" if raw_input else "float32", batch=options.batch, metadata=metadata,
                        atol=atol, rtol=rtol)
        out = run.path / EXPORT_DIR / f"{candidate}.onnx"
        key = f"export:{candidate}"
        params = {"peer": peer, "candidate": candidate, "opset": options.opset, "dynamic_batch": options.batch is None,
                  "static_batch": options.batch, "simplify": simplify, "raw_input": raw_input,
                  "atol": atol, "rtol": rtol}
        with run.running(key, params=params, inputs={"weights": weights, "card": card_path}):
            with atomic_path(out) as tmp:
                exported = export_onnx(model, tmp, card, options, metadata)
                pre = RawPixels(nn.Identity(), card["mean"], card["std"])
                extra = [pre.mean.numpy(), pre.std.numpy()] if raw_input else []  # normalisation in the graph
                report = validate_onnx(tmp, model, spec, _gate_chunks(data.val, view_maker, options, h),
                                       example=torch.zeros(1, c, h, w), exported=exported if simplify else None,
                                       allowed_extra=extra)
                report.raise_if_failed(f"{run.relative(out)} ({candidate})")
            described = run.describe(out)
            values = report.figures["values"]
            metrics = {
                "candidate": candidate, "max_abs_diff": values["max_abs_diff"],
                "top1_agreement": values["top1_agreement"], "images": len(data.val), "compared": values["images"],
                "batch_sizes": values["batch_sizes"], "atol": values["atol"], "rtol": values["rtol"],
                "tolerance": values["tolerance"], "gate": report.figures,
                "opset": report.figures["opset"], "ir_version": report.figures["ir_version"],
                "input_format": metadata["pcltool.input_format"], "dynamic_batch": options.batch is None,
                "simplified": simplify,
                "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                             "torch": torch.__version__},
                "sha256": described["sha256"], "bytes": described["bytes"],
            }
            run.finish(key, {"onnx": out}, metrics)
    if console is not None:
        console.print(export_view(run.relative(out), metrics))
    return metrics


def export_view(path: str, metrics: dict):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    gate = metrics["gate"]
    init = gate["initialisers"]
    from rich.markup import escape

    table = Table(title=f"ONNX gate: {escape(path)} ({metrics['candidate']})")
    for col in ("check", "result"):
        table.add_column(col)
    table.add_row("onnx.checker", gate["checker"])
    table.add_row("input / output", f"{gate['input']} -> {gate['output']}")
    table.add_row("ONNX Runtime vs PyTorch",
                  f"{metrics['images']} val images at batch {'/'.join(map(str, metrics['batch_sizes']))}: "
                  f"max |Δlogit| {metrics['max_abs_diff']:.3g} (<= {metrics.get('tolerance', metrics['atol']):.3g}), "
                  f"top-1 agreement {metrics['top1_agreement']:.2f} %")
    table.add_row("initialisers", f"{init['graph_tensors']} float tensors = the pruned network's "
                                  f"{init['network_tensors']} ({init['network_elements']} values); "
                                  f"missing {init['missing']}, foreign {init['foreign']}")
    if "simplified_elements" in gate:
        s = gate["simplified_elements"]
        table.add_row("simplified", f"{s['graph']} float values (network: {s['network']})")
    v = metrics["versions"]
    note = Text(f"passed · opset {metrics['opset']} · IR {metrics['ir_version']} · {metrics['input_format']} · "
                f"{'dynamic batch' if metrics['dynamic_batch'] else 'static batch'} · {metrics['bytes'] / 1e6:.2f} MB "
                f"· sha256 {metrics['sha256'][:16]} · onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, "
                f"torch {v['torch']}")
    return Group(table, note)
