"""The ONNX validation gate: checks an exported graph and collects every failure before raising.

1. ``onnx.checker`` full check (with shape inference);
2. names: one input ``images``, one output ``logits``; then shapes and dtypes (batch axis named or fixed);
3. metadata_props carry the expected keys and values;
4. the graph's float tensors (initialisers and Constant nodes) are exactly the network's tensors that its output
   depends on: nothing missing, nothing foreign (no trace of other branches);
5. values: ONNX Runtime (CPU) against PyTorch on every given image, at several batch sizes: max abs logit
   difference <= ``atol + rtol * max |PyTorch logit|`` and top-1 agreement 100 %. The relative part follows the
   logits' scale (float32 steps by about 1e-3 at 1e4); the absolute floor covers logits near 0.

onnx and onnxruntime are imported inside the functions (``pcltool --help`` stays instant).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pcltool.errors import VerificationError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5
GATE_BATCH_SIZES = (64, 7, 1)
ONNX_DTYPES = {1: "float32", 2: "uint8", 10: "float16"}


@dataclass
class GateSpec:
    """What the graph must look like. ``batch`` None means a dynamic batch axis named ``batch_axis``."""

    input_shape: list[int]  # per image: [C, H, W] (float32) or [H, W, C] (uint8 raw pixels)
    num_classes: int
    input_dtype: str = "float32"
    batch: int | None = None
    batch_axis: str = "batch"
    input_name: str = "images"
    output_name: str = "logits"
    metadata: dict[str, str] = field(default_factory=dict)
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def tolerance(self, scale: float) -> float:
        """The allowed max |logit difference| when the reference logits reach ``scale``."""
        return self.atol + self.rtol * scale


@dataclass
class GateReport:
    figures: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_if_failed(self, what: str) -> None:
        if self.failures:
            lines = "\n  - ".join(self.failures)
            raise VerificationError(f"ONNX gate failed for {what} ({len(self.failures)} failure(s)):\n  - {lines}")


# --- structure ------------------------------------------------------------------------------------------------------
def _dims(value_info) -> list:
    return [d.dim_param if d.dim_param else d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_checker(path: Path, report: GateReport) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        report.figures["checker"] = "passed (full check)"
    except Exception as err:  # onnx raises several types (ValidationError, InferenceError)
        report.failures.append(f"onnx.checker (full check): {type(err).__name__}: {str(err).strip()[:500]}")


def check_structure(proto, spec: GateSpec, report: GateReport) -> None:
    """Input/output names, then dtypes and shapes, then metadata."""
    graph = proto.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializer_names]
    in_names, out_names = [i.name for i in inputs], [o.name for o in graph.output]
    if in_names != [spec.input_name]:
        report.failures.append(f"input names: expected [{spec.input_name!r}], got {in_names}")
    if out_names != [spec.output_name]:
        report.failures.append(f"output names: expected [{spec.output_name!r}], got {out_names}")
    batch = spec.batch if spec.batch is not None else spec.batch_axis
    if inputs:
        dtype = ONNX_DTYPES.get(inputs[0].type.tensor_type.elem_type, str(inputs[0].type.tensor_type.elem_type))
        if dtype != spec.input_dtype:
            report.failures.append(f"input {in_names[0]!r} dtype: expected {spec.input_dtype}, got {dtype}")
        dims = _dims(inputs[0])
        if dims != [batch, *spec.input_shape]:
            report.failures.append(f"input {in_names[0]!r} shape: expected {[batch, *spec.input_shape]}, got {dims}")
    if graph.output:
        dims = _dims(graph.output[0])
        if dims != [batch, spec.num_classes]:
            report.failures.append(f"output {out_names[0]!r} shape: expected {[batch, spec.num_classes]}, got {dims}")
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in spec.metadata.items():
        if props.get(key) != value:
            report.failures.append(f"metadata_props[{key!r}]: expected {value!r}, got {props.get(key)!r}")
    report.figures["input"] = f"{spec.input_name} {[batch, *spec.input_shape]} {spec.input_dtype}"
    report.figures["output"] = f"{spec.output_name} {[batch, spec.num_classes]} float32"


# --- initialisers ---------------------------------------------------------------------------------------------------
def _fingerprint(array: np.ndarray) -> tuple:
    array = np.ascontiguousarray(array)
    return str(array.dtype), tuple(array.shape), hashlib.sha256(array.tobytes()).hexdigest()


def graph_float_tensors(proto) -> dict[tuple, str]:
    """Fingerprint -> name of every float tensor stored in the graph: initialisers and Constant node values."""
    from onnx import numpy_helper

    found = {}
    for t in proto.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.dtype.kind == "f":
            found[_fingerprint(array)] = t.name
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    array = numpy_helper.to_array(attr.t)
                    if array.dtype.kind == "f":
                        found.setdefault(_fingerprint(array), f"Constant {node.output[0]}")
    return found


def used_tensors(model: nn.Module, example: torch.Tensor) -> set[str]:
    """State-dict names the output depends on: parameters that receive a gradient, plus the buffers of modules
    with such a parameter (or with none). An ensemble teacher's peer classifiers, for instance, are not used."""
    params = dict(model.named_parameters())
    flags = [p.requires_grad for p in params.values()]
    try:
        with torch.enable_grad():
            for p in params.values():
                p.requires_grad_(True)
            grads = torch.autograd.grad(model(example).float().sum(), list(params.values()), allow_unused=True)
    finally:
        for p, flag in zip(params.values(), flags):
            p.requires_grad_(flag)
    used = {name for name, g in zip(params, grads) if g is not None}
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if not own or any(n in used for n in own):
            used.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False))
    return used


def check_initializers(proto, model: nn.Module, example: torch.Tensor, report: GateReport,
                       allowed_extra: Iterable[np.ndarray] = (), label: str = "initialisers") -> None:
    """The graph's float tensors must be exactly the network's tensors that its output uses.

    Compared by value (dtype, shape, bytes) because the exporter renames and de-duplicates initialisers.
    Scalars (op constants) and ``allowed_extra`` (e.g. preprocessing mean/std) are not counted as foreign."""
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items() if v.is_floating_point()}
    used = used_tensors(model, example)
    expected = {_fingerprint(v): k for k, v in state.items() if k in used}
    everything = {_fingerprint(v) for v in state.values()}
    allowed = {_fingerprint(np.asarray(a)) for a in allowed_extra}
    graph = graph_float_tensors(proto)
    missing = sorted(expected[f] for f in expected.keys() - graph.keys())
    foreign = sorted((name, f[1]) for f, name in graph.items()
                     if f not in everything and f not in allowed and int(np.prod(f[1])) > 1)
    report.figures[label] = {
        "graph_tensors": len(graph), "network_tensors": len(expected),
        "network_elements": int(sum(state[k].size for k in set(expected.values()))),
        "unused_network_tensors": len(state) - len([k for k in state if k in used]),
        "missing": len(missing), "foreign": len(foreign),
    }
    if missing:
        report.failures.append(f"{label}: {len(missing)} tensor(s) of the network are not in the graph: "
                               f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if foreign:
        shown = ", ".join(f"{n} {list(s)}" for n, s in foreign[:8])
        report.failures.append(f"{label}: {len(foreign)} float tensor(s) in the graph are not the network's: "
                               f"{shown}{' ...' if len(foreign) > 8 else ''}")


def check_element_budget(proto, model: nn.Module, report: GateReport) -> None:
    """For a simplified graph (BatchNorm folded into convolutions): no more float elements than the network."""
    from onnx import numpy_helper

    total = sum(numpy_helper.to_array(t).size for t in proto.graph.initializer if t.data_type in (1, 10, 11))
    budget = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
    report.figures["simplified_elements"] = {"graph": int(total), "network": int(budget)}
    if total > budget:
        report.failures.append(f"simplified graph holds {total} float elements, more than the network's {budget}")


# --- values ---------------------------------------------------------------------------------------------------------
def _schedule(n: int, sizes: tuple[int, ...], offset: int) -> list[tuple[int, int]]:
    """Cut ``n`` images into runs whose batch sizes cycle through ``sizes`` (continuing at ``offset``)."""
    runs, start, i = [], 0, offset
    while start < n:
        b = min(sizes[i % len(sizes)], n - start)
        runs.append((start, b))
        start, i = start + b, i + 1
    return runs


@torch.no_grad()
def check_values(path: Path, model: nn.Module, chunks: Iterable[tuple[np.ndarray, torch.Tensor]],
                 spec: GateSpec, report: GateReport, batch_sizes: tuple[int, ...] = GATE_BATCH_SIZES) -> None:
    """ONNX Runtime (CPU) against ``model`` (PyTorch, fp32, eval) on every chunk ``(onnx_input, torch_input)``.

    Each chunk is cut into runs cycling through ``batch_sizes`` (a static graph gets chunks of its batch size)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:
        report.failures.append(f"onnxruntime could not load the graph: {type(err).__name__}: {str(err)[:500]}")
        return
    model.eval()
    worst, worst_at, agree, images, runs, scale = 0.0, None, 0, 0, 0, 0.0
    by_batch: dict[int, float] = {}
    shape_failures = set()
    sizes = (spec.batch,) if spec.batch is not None else batch_sizes
    for onnx_in, torch_in in chunks:
        reference = model(torch_in).float().cpu().numpy()
        scale = max(scale, float(np.abs(reference).max(initial=0.0)))
        for start, b in _schedule(len(onnx_in), sizes, runs):
            try:
                (got,) = session.run([spec.output_name], {spec.input_name: onnx_in[start:start + b]})
            except Exception as err:
                report.failures.append(f"onnxruntime failed at batch {b}: {type(err).__name__}: {str(err)[:300]}")
                return
            runs += 1
            want = reference[start:start + b]
            if got.shape != want.shape:
                shape_failures.add(f"output shape at batch {b}: expected {list(want.shape)}, got {list(got.shape)}")
                continue
            diff = np.abs(got.astype(np.float64) - want)
            diff = np.where(np.isnan(diff), np.inf, diff)
            d = float(diff.max()) if diff.size else 0.0
            by_batch[b] = max(by_batch.get(b, 0.0), d)
            if d > worst or worst_at is None:
                flat = int(diff.argmax()) if diff.size else 0
                worst, worst_at = d, (images + flat // spec.num_classes, flat % spec.num_classes, b)
            agree += int((got.argmax(1) == want.argmax(1)).sum())
            images += b
    report.failures.extend(sorted(shape_failures))
    agreement = 100.0 * agree / max(images, 1)
    report.figures["values"] = {"images": images, "runs": runs, "batch_sizes": sorted(by_batch, reverse=True),
                                "max_abs_diff": worst, "max_abs_diff_by_batch": {str(k): v for k, v in by_batch.items()},
                                "top1_agreement": agreement, "atol": spec.atol, "rtol": spec.rtol,
                                "tolerance": spec.tolerance(scale), "max_abs_logit": scale}
    if images == 0:
        report.failures.append("values: no images were compared")
    if not worst <= spec.tolerance(scale):
        image, cls, b = worst_at
        resolution = float(np.spacing(np.float32(scale)))
        report.failures.append(f"values: max abs logit diff {worst:.3g} > {spec.tolerance(scale):.3g} = atol "
                               f"{spec.atol:g} + rtol {spec.rtol:g} x {scale:.4g} (ONNX Runtime vs PyTorch; image "
                               f"{image}, class {cls}, batch {b}; logits reach {scale:.4g}, where float32 steps by "
                               f"{resolution:.2g}); loosen with --atol/--rtol only if that is expected")
    if agree != images:
        report.failures.append(f"values: top-1 agreement {agreement:.2f} % ({images - agree} of {images} images "
                               "differ), 100 % required")
    if spec.batch is None:
        untried = [b for b in batch_sizes if b not in by_batch]
        if untried:
            report.failures.append(f"values: batch size(s) {untried} were never run")


def validate_onnx(path: Path, model: nn.Module, spec: GateSpec, chunks: Iterable[tuple[np.ndarray, torch.Tensor]],
                  example: torch.Tensor, exported=None, allowed_extra: Iterable[np.ndarray] = ()) -> GateReport:
    """Run the whole gate on the graph at ``path`` against ``model`` (what it was exported from).

    ``exported``: the graph as the exporter wrote it, when ``path`` holds a simplified version of it; the
    initialiser check then runs on ``exported`` and the simplified graph must not hold more float elements."""
    import onnx

    report = GateReport()
    check_checker(path, report)
    proto = onnx.load(str(path))
    report.figures["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    report.figures["ir_version"] = proto.ir_version
    check_structure(proto, spec, report)
    check_initializers(exported if exported is not None else proto, model, example, report, allowed_extra)
    if exported is not None:
        check_element_budget(proto, model, report)
    check_values(path, model, chunks, spec, report)
    return report
