"""ONNX Runtime: sessions on the CPU / CUDA / TensorRT execution providers, offline graph optimisation, static
INT8 quantisation and FP16 conversion.

INT8 on x86 (measured on a 2-core Xeon with AVX-512 VNNI, ResNet-32 at batch 64; see ``CPU_INT8``): ONNX
Runtime's defaults — Q/DQ with *signed* int8 activations and weights, per-tensor — ran slower than FP32: the
VNNI instruction (``vpdpbusd``) multiplies unsigned by signed bytes, so s8 x s8 takes slower kernels. What is
fast: unsigned activations with signed, per-channel weights (U8S8), in Q/DQ format (ORT fuses it into
QLinearConv/QLinearAdd and runs the graph in NHWC), *and* Relu among the quantised operators. Left out, every
Conv -> Relu keeps a float DequantizeLinear -> QuantizeLinear pair between two scales; included, the Relu folds
into the uint8 zero point and the network stays in int8 from the first convolution to the pooling. TensorRT
instead needs symmetric signed Q/DQ with a float bias (``TRT_INT8``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pcltool.errors import BackendUnavailableError, UsageError, VerificationError
from pcltool.runtime import Engine

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
META_PREFIX = "pcltool."
JSON_KEYS = ("class_names", "mean", "std", "input_size", "resize_size", "preprocessing")

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


@dataclass(frozen=True)
class Int8Settings:
    """How a model is statically quantised (recorded in the manifest with the calibration set's hash)."""

    format: str = "qdq"  # "qdq" or "qoperator"
    activations: str = "u8"  # "u8" or "s8"
    weights: str = "s8"
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: only for CPUs without VNNI
    symmetric_activations: bool = False
    quantize_bias: bool = True
    op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul", "Add", "Relu", "Clip", "MaxPool", "AveragePool",
                                 "GlobalAveragePool", "Concat", "Slice", "Pad", "Flatten")
    preprocess: bool = True  # onnxruntime.quantization.quant_pre_process (shape inference + folding) first
    # The node that makes the logits stays in float: quantised, the scores take a few hundred values and the top
    # score ties on several % of images (then top-1 depends on tie-breaking); measured in BENCHMARKS.md.
    float_output: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


CPU_INT8 = Int8Settings()
TRT_INT8 = Int8Settings(activations="s8", symmetric_activations=True, quantize_bias=False,
                        op_types=("Conv", "Gemm", "MatMul", "Add"))


def import_ort():
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - a core dependency
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                      "(or onnxruntime-gpu for the CUDA/TensorRT providers)") from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(import_ort().get_available_providers())


def read_metadata(path: Path) -> dict:
    """The ``pcltool.*`` metadata of an exported model, JSON values decoded, prefix dropped."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise UsageError(f"{path} is not a readable ONNX model: {err}") from None
    meta = {}
    for prop in model.metadata_props:
        if prop.key.startswith(META_PREFIX):
            key = prop.key[len(META_PREFIX):]
            meta[key] = json.loads(prop.value) if key in JSON_KEYS else prop.value
    return meta


def session_options(threads: int | None = None, level: str = "all", optimized_path: Path | None = None):
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1")  # as the bench sets for PyTorch
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def provider_chain(device: str, provider: str | None = None) -> list[str]:
    """Execution providers in priority order for ``device`` ("cpu"/"cuda"), optionally starting with
    ``provider`` ("tensorrt"); a missing provider is a :class:`BackendUnavailableError` saying what to install."""
    have = available_providers()
    wanted = [PROVIDERS[provider]] if provider else []
    if device.startswith("cuda"):
        wanted.append(PROVIDERS["cuda"])
    for name in wanted:
        if name not in have:
            raise BackendUnavailableError(
                f"ONNX Runtime's {name} is not available (installed providers: {', '.join(have)}); "
                "install onnxruntime-gpu (`pip install pcltool[gpu]`) on a machine with an NVIDIA GPU")
    return wanted + [PROVIDERS["cpu"]]


class OrtEngine(Engine):
    """An ONNX model in an ONNX Runtime session (graph optimisations at ``level``, ``threads`` intra-op threads)."""

    backend = "ort"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "fp32", provider: str | None = None,
                 threads: int | None = None, level: str = "all"):
        ort = import_ort()
        self.path = Path(path)
        self.device = device
        self.precision = precision
        providers = provider_chain(device, provider)
        self.provider = {v: k for k, v in PROVIDERS.items()}[providers[0]]
        try:
            self.session = ort.InferenceSession(str(self.path), session_options(threads, level), providers=providers)
        except Exception as err:
            raise VerificationError(f"ONNX Runtime cannot load {self.path}: {err}") from None
        inp = self.session.get_inputs()[0]
        self.input_name, self.output_name = inp.name, self.session.get_outputs()[0].name
        self.input_dtype = {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8}.get(inp.type, np.float32)
        if isinstance(inp.shape[0], int):
            self.min_batch = self.max_batch = inp.shape[0]
        self._cuda = device.startswith("cuda")

    def prepare(self, images: np.ndarray):
        x = np.ascontiguousarray(images, dtype=self.input_dtype)
        if not self._cuda:
            return x
        ort = import_ort()
        binding = self.session.io_binding()
        binding.bind_ortvalue_input(self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
        binding.bind_output(self.output_name, "cuda")
        return binding

    def run(self, prepared):
        if self._cuda:
            self.session.run_with_iobinding(prepared)
            return prepared
        return self.session.run([self.output_name], {self.input_name: prepared})[0]

    def sync(self) -> None:
        pass  # Run() returns after the provider's stream has finished

    def to_numpy(self, output) -> np.ndarray:
        if self._cuda:
            output = output.get_outputs()[0].numpy()
        return np.asarray(output, dtype=np.float32)

    def close(self) -> None:
        self.session = None


def optimize(src: Path, dst: Path) -> None:
    """Save ``src`` with ONNX Runtime's graph optimisations applied (constant folding, Conv+BatchNorm/Add/Relu
    fusions...). Saved at the *extended* level, the portable one: the CPU-specific layout transform (NCHWc blocks
    sized for this CPU's vector width) is re-applied when a session loads the model at level *all*."""
    ort = import_ort()
    ort.InferenceSession(str(src), session_options(level="extended", optimized_path=dst), providers=[PROVIDERS["cpu"]])


PORTABLE_KEY = META_PREFIX + "portable"
ORT_ONLY_SUFFIX = ".ort-only"  # appended to a model that only ONNX Runtime can load: mean1.ort-fp32.onnx.ort-only


def is_portable(path: Path) -> bool:
    """Whether any ONNX runtime can load the model: it passes ``onnx.checker`` and every node is a standard ONNX
    operator (domain ``ai.onnx``). ONNX Runtime's saved graph optimisations add ``com.microsoft`` operators
    (``FusedConv``...) that only ONNX Runtime implements; the INT8 Q/DQ model keeps standard operators."""
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return False
    return all(node.domain in ("", "ai.onnx") for node in model.graph.node)


def label_portability(path: Path) -> Path:
    """Record ``pcltool.portable`` in the model's metadata; a model that loads only in ONNX Runtime is renamed
    ``<name>.onnx.ort-only`` so no tool takes it for a portable ``.onnx`` file. Returns the (new) path."""
    import onnx

    portable = is_portable(path)
    model = onnx.load(str(path))
    for prop in list(model.metadata_props):
        if prop.key == PORTABLE_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=PORTABLE_KEY, value="true" if portable else "false")
    dst = path if portable else path.with_name(path.name + ORT_ONLY_SUFFIX)
    onnx.save(model, str(dst))
    if dst != path:
        path.unlink()
    return dst


def calibration_hash(images: np.ndarray) -> str:
    """sha256 of the calibration set as the uint8 images it was drawn from (shape included)."""
    h = hashlib.sha256(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, settings: Int8Settings = CPU_INT8,
                  method: str = "minmax", batch: int = 32) -> None:
    """Static INT8 quantisation of ``src`` into ``dst``, calibrated on ``calibration`` (float32 NCHW, normalised)."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(range(0, len(calibration), batch))

        def get_next(self):
            start = next(self._batches, None)
            return None if start is None else {INPUT_NAME: calibration[start : start + batch]}

    types = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UsageError(f"unknown calibration method {method!r}; allowed: {', '.join(methods)}")
    with tempfile.TemporaryDirectory(prefix="pcltool-quant-") as tmp:
        model_in = str(src)
        if settings.preprocess:
            model_in = os.path.join(tmp, "pre.onnx")
            quant_pre_process(str(src), model_in, skip_symbolic_shape=True)
        exclude: list[str] = []
        if settings.float_output:
            model_in, exclude = output_nodes(model_in, tmp)
        quantize_static(
            model_in, str(dst), Reader(),
            quant_format=QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
            activation_type=types[settings.activations], weight_type=types[settings.weights],
            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            op_types_to_quantize=list(settings.op_types), calibrate_method=methods[method],
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": settings.symmetric_activations, "WeightSymmetric": True,
                           "QuantizeBias": settings.quantize_bias,
                           "CalibTensorRangeSymmetric": settings.symmetric_activations},
            calibration_providers=[PROVIDERS["cpu"]],
        )
    _copy_metadata(src, dst)


def output_nodes(path: str, tmp: str) -> tuple[str, list[str]]:
    """The model (a named copy in ``tmp`` if the exporter left them unnamed) and the names of the nodes that write
    the graph's outputs."""
    import onnx

    model = onnx.load(path)
    outputs = {o.name for o in model.graph.output}
    names, renamed = [], False
    for i, node in enumerate(model.graph.node):
        if outputs.intersection(node.output):
            if not node.name:
                node.name, renamed = f"pcltool_output_{i}", True
            names.append(node.name)
    if renamed:
        path = os.path.join(tmp, "named.onnx")
        onnx.save(model, path)
    return path, names


def to_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and activations, float32 inputs and outputs (a strongly typed FP16 network for TensorRT and
    the CUDA provider)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    _copy_metadata(src, dst)


def _copy_metadata(src: Path, dst: Path) -> None:
    """Keep the exported model's ``pcltool.*`` metadata (preprocessing, class names) on a derived model."""
    import onnx

    source = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
    model = onnx.load(str(dst))
    present = {p.key for p in model.metadata_props}
    for key, value in source.items():
        if key not in present:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(dst))

