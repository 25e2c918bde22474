"""Engine commands: ``build``, ``bench``, ``run`` (the whole pipeline) and ``deploy triton``.

Only typer and the standard library are imported here; each command imports its stage when it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pcltool.commands.common import Device, RunArg, RunsDirOpt, console, escape, handle_errors, open_run

PeerOpt = Annotated[Optional[str], typer.Option("--peer", help="exported candidate to use (default: the run's only "
                                                                 "export), e.g. mean2")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", help="CPU threads for PyTorch and ONNX Runtime "
                                                                     "(default: PyTorch's, the physical cores)")]
MaxDropOpt = Annotated[float, typer.Option("--max-top1-drop", help="fail a reduced-precision engine whose top-1 on the "
                                                                   "validation split moves more than this many points "
                                                                   "from the FP32 ONNX model's (either direction)")]
MinAgreeOpt = Annotated[float, typer.Option("--min-agreement", help="fail an engine whose top-1 class is the FP32 ONNX "
                                                                    "model's on fewer than this % of validation "
                                                                    "images")]
CalibOpt = Annotated[int, typer.Option("--calib-images", help="int8: training images to calibrate on")]


@handle_errors
def build(
    run: RunArg = None,
    engine: Annotated[str, typer.Option("--engine", help="ort (ONNX Runtime), trt (TensorRT) or openvino "
                                                         "(OpenVINO, optional: pip install 'pcltool[openvino]')")] = "ort",
    precision: Annotated[str, typer.Option("--precision", help="fp32, int8, or fp16 (GPU execution; ort and trt)")] = "fp32",
    batch: Annotated[str, typer.Option("--batch", help="optimisation profile MIN,OPT,MAX (TensorRT; also Triton's "
                                                       "max batch)")] = "1,64,256",
    calib_images: CalibOpt = 512,
    calib_method: Annotated[str, typer.Option("--calib-method", help="int8 calibration: minmax, entropy or "
                                                                     "percentile")] = "minmax",
    max_top1_drop: MaxDropOpt = 1.0,
    min_agreement: MinAgreeOpt = 95.0,
    peer: PeerOpt = None,
    threads: ThreadsOpt = None,
    hardware_compat: Annotated[str, typer.Option("--hardware-compat", help="TensorRT: none (this GPU), ampere+ or "
                                                                           "same-cc")] = "none",
    trt_flags: Annotated[bool, typer.Option("--trt-flags", help="TensorRT 10 only: weakly typed network with the "
                                                                "FP16/INT8 builder flag instead of a strongly typed "
                                                                "FP16 / Q/DQ ONNX")] = False,
    workspace_gib: Annotated[float, typer.Option("--workspace-gib", help="TensorRT builder workspace")] = 4.0,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Build an engine from the exported model, verify it against the FP32 ONNX model on the validation split,
    and record it (engines/<candidate>.<engine>-<precision>.*)."""
    from pcltool.stages.build import run_build

    run_build(open_run(run, runs_dir), engine, precision, peer, batch, calib_images, calib_method, max_top1_drop,
              threads, hardware_compat, trt_flags, workspace_gib, console=console(), min_agreement=min_agreement)


@handle_errors
def bench(
    run: RunArg = None,
    engine: Annotated[str, typer.Option("--engine", help="torch, torch-compile, ort, trt, openvino or all "
                                                         "(comma-separated); "
                                                         "all adds torch.compile")] = "torch,ort,trt",
    batch: Annotated[str, typer.Option("--batch", help="batch sizes, comma-separated")] = "1,8,64,256",
    device: Annotated[Device, typer.Option("--device", help="where to run")] = Device.auto,
    threads: ThreadsOpt = None,
    peer: PeerOpt = None,
    max_seconds: Annotated[float, typer.Option("--max-seconds", help="time limit per measurement (it stops "
                                                                     "earlier once the median is stable)")] = 3.0,
    runs_dir: RunsDirOpt = Path("runs"),
):
    """Accuracy (test split) and latency of every available backend and precision, with the unpruned network and
    the ensemble teacher as reference points; writes bench.json, bench.csv and bench.png in the run."""
    from pcltool.stages.bench import run_bench
    from pcltool.stages.bench_table import print_table

    out = console()
    rd = open_run(run, runs_dir)
    doc = run_bench(rd, engine, batch, device.value, threads, peer, max_seconds, console=out)
    print_table(out, doc)
    out.print(f"results: {escape(rd.path / 'bench.json')}, {escape(rd.path / 'bench.csv')}\n"
              f"plot:    {escape(rd.path / 'bench.png')}")


@handle_errors
def run_pipeline(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file, e.g. recipes/quickstart.toml")],
    set_: Annotated[list[str], typer.Option("--set", help="override a recipe value: --set train.epochs=10 (repeatable)")] = [],  # noqa: B006
    run: Annotated[Optional[Path], typer.Option("--run-dir", "--run", help="run directory (default: continue the "
                                                                         "newest run of this recipe, or start "
                                                                         "runs/<name>[-N])")] = None,
    peer: Annotated[str, typer.Option("--peer", help="which candidate to deploy (as `pcltool export --peer`)")] = "mean",
    engine: Annotated[str, typer.Option("--engine", help="bench engines (as `pcltool bench --engine`)")] = "torch,ort",
    batch: Annotated[str, typer.Option("--batch", help="bench batch sizes")] = "1,8,64,256",
    device: Annotated[Device, typer.Option("--device", help="bench device")] = Device.auto,
    calib_images: CalibOpt = 512,
    max_top1_drop: MaxDropOpt = 1.0,
    min_agreement: MinAgreeOpt = 95.0,
):
    """Run the whole pipeline — train, select, prune, export, build (ONNX Runtime fp32 + int8), bench — skipping
    every stage whose inputs and outputs are unchanged in the manifest."""
    from pcltool.config import load_recipe
    from pcltool.stages.bench import parse_batches, parse_engines
    from pcltool.stages.pipeline import run_pipeline as pipeline

    cfg = load_recipe(recipe, list(set_))
    pipeline(cfg, run, peer, parse_engines(engine), parse_batches(batch), device.value, calib_images, max_top1_drop,
             console=console(), min_agreement=min_agreement)


@handle_errors
def triton(
    run: Annotated[Path, typer.Argument(help="run directory")],
    out: Annotated[Path, typer.Argument(help="model repository folder (created; the model goes in OUT/NAME)")],
    engine: Annotated[str, typer.Option("--engine", help="ort (onnxruntime backend) or trt (tensorrt backend)")] = "ort",
    precision: Annotated[str, typer.Option("--precision", help="fp32, int8 or fp16 (must be built)")] = "fp32",
    peer: PeerOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="model name (default <candidate>_<engine>_<precision>)")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="max_batch_size (default: the engine's "
                                                                         "profile maximum)")] = None,
    instances: Annotated[int, typer.Option("--instances", help="model instances (instance_group count)")] = 1,
    force: Annotated[bool, typer.Option("--force", help="replace OUT/NAME if it exists")] = False,
):
    """Write a Triton Inference Server model repository (config.pbtxt with dynamic batching + the model)."""
    from pcltool.stages.build import run_triton

    target = run_triton(open_run(run), out, engine, precision, peer, name, max_batch, instances, force)
    console().print(f"Triton model repository: {escape(target)}  (tritonserver --model-repository {escape(out)})")
