"""TensorRT through its Python API (10.x and 11.x): build a serialized engine from ONNX, load it, run it.

Reduced precision the way both major versions accept: a *strongly typed* network whose types come from the ONNX
itself — an FP16 ONNX for fp16, an INT8 Q/DQ ONNX for int8 (TensorRT 11 removed ``BuilderFlag.FP16/INT8`` and
the INT8 calibrators). The weakly typed flag path is offered only where the installed TensorRT still has the flag.

A fingerprint (TensorRT version, GPU, compute capability, hardware-compatibility level) is saved beside every
engine; loading an engine on a machine that does not match it is refused with a rebuild hint. Device buffers are
PyTorch CUDA tensors (no pycuda).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pcltool.errors import BackendUnavailableError, EngineMismatchError, UsageError, VerificationError
from pcltool.manifest import atomic_path, atomic_write_text
from pcltool.runtime import Engine

INSTALL_HINT = (
    "TensorRT is not installed. On a machine with an NVIDIA GPU and driver, install NVIDIA's wheels with "
    "`pip install tensorrt` (from https://pypi.nvidia.com, e.g. `pip install --extra-index-url "
    "https://pypi.nvidia.com tensorrt`) or `pip install 'pcltool[tensorrt]'`; see "
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/installing-tensorrt/installing.html")

# --hardware-compat choices -> tensorrt.HardwareCompatibilityLevel members
HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}


def tensorrt_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def import_tensorrt():
    """``import tensorrt``, or a :class:`BackendUnavailableError` saying how to install it / that a GPU is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is installed but PyTorch sees no CUDA GPU; "
                                      "TensorRT engines are built and run on an NVIDIA GPU")
    return trt


def fingerprint_path(plan: Path) -> Path:
    return Path(plan).with_suffix(".json")


def machine_fingerprint(trt, device: int = 0) -> dict:
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def fingerprint_problems(saved: dict, here: dict) -> list[str]:
    """Why an engine built on ``saved`` cannot run on ``here`` (empty: it can)."""
    problems = []
    if saved.get("tensorrt") != here["tensorrt"]:
        problems.append(f"built with TensorRT {saved.get('tensorrt')}, this machine has {here['tensorrt']}")
    level = saved.get("hardware_compatibility_level", "none")
    built_cc, cc = saved.get("compute_capability", "?"), here["compute_capability"]
    if level == "ampere+":
        if float(cc) < 8.0:
            problems.append(f"built for Ampere and newer GPUs, this GPU ({here['gpu']}) has compute capability {cc}")
    elif level == "same-cc":
        if built_cc != cc:
            problems.append(f"built for compute capability {built_cc}, this GPU ({here['gpu']}) has {cc}")
    elif saved.get("gpu") != here["gpu"] or built_cc != cc:
        problems.append(f"built on {saved.get('gpu')} (compute capability {built_cc}), this machine has "
                        f"{here['gpu']} ({cc})")
    return problems


def check_fingerprint(plan: Path, trt) -> dict:
    """The fingerprint saved beside ``plan``; :class:`EngineMismatchError` if it does not match this machine."""
    fp_file = fingerprint_path(plan)
    precision = "PRECISION"
    try:
        saved = json.loads(fp_file.read_text())
        precision = saved.get("precision", precision)
    except (OSError, ValueError):
        saved = None
    hint = f"rebuild it on this machine: `pcltool build RUN --engine trt --precision {precision}`"
    if saved is None:
        raise EngineMismatchError(f"{plan} has no readable fingerprint ({fp_file}), so it cannot be checked against "
                                  f"this GPU and TensorRT version; {hint}")
    problems = fingerprint_problems(saved, machine_fingerprint(trt))
    if problems:
        raise EngineMismatchError(f"{plan} does not match this machine: {'; '.join(problems)}. "
                                  f"TensorRT engines only run where they were built; {hint}")
    return saved


def build_engine(onnx_path: Path, plan: Path, batch: tuple[int, int, int], precision: str,
                 weak_flag: str | None = None, hardware_compat: str = "none", workspace_gib: float = 4.0,
                 timing_cache: Path | None = None, metadata: dict | None = None) -> dict:
    """Build ``plan`` (+ its fingerprint) from ``onnx_path`` with one optimisation profile ``batch = (min, opt, max)``.

    ``weak_flag`` ("FP16"/"INT8") builds a weakly typed network with that builder flag (TensorRT 10 only);
    otherwise the network is strongly typed and its precision is the ONNX model's own. ``metadata`` (the model's
    preprocessing and class names) is saved in the fingerprint file for deployment. Returns the fingerprint."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    major = int(trt.__version__.split(".")[0])
    if weak_flag is None and major < 11:  # TensorRT 11: always strongly typed (the flag is ignored or gone)
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly_typed is None:
            raise BackendUnavailableError(f"TensorRT {trt.__version__} has no strongly typed networks; install "
                                          "TensorRT 10 or newer")
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VerificationError(f"TensorRT cannot parse {onnx_path}: {errors}")
    inp = network.get_input(0)
    dims = tuple(inp.shape)
    if dims[0] != -1 and not batch[0] == batch[2] == dims[0]:
        raise UsageError(f"{onnx_path} has a fixed batch of {dims[0]}; export it with a dynamic batch axis or "
                         f"build with --batch {dims[0]},{dims[0]},{dims[0]}")
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (batch[0], *dims[1:]), (batch[1], *dims[1:]), (batch[2], *dims[1:]))
    config = builder.create_builder_config()
    config.add_optimization_profile(profile)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if weak_flag is not None:
        flag = getattr(trt.BuilderFlag, weak_flag, None)
        if flag is None:
            raise UsageError(f"TensorRT {trt.__version__} has no BuilderFlag.{weak_flag} (TensorRT 11 removed the "
                             "precision flags); build without --trt-flags: the strongly typed network from the "
                             "FP16 / INT8 Q/DQ ONNX works on TensorRT 10 and 11")
        config.set_flag(flag)
    if hardware_compat != "none":
        level = getattr(trt.HardwareCompatibilityLevel, HARDWARE_LEVELS[hardware_compat], None)
        if level is None:
            raise UsageError(f"TensorRT {trt.__version__} does not support --hardware-compat {hardware_compat}")
        config.hardware_compatibility_level = level
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    config.set_timing_cache(config.create_timing_cache(cache_bytes), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VerificationError(f"TensorRT could not build an engine from {onnx_path} (see its messages above)")
    fingerprint = {**machine_fingerprint(trt), "hardware_compatibility_level": hardware_compat,
                   "precision": precision, "strongly_typed": weak_flag is None, "batch": list(batch),
                   "metadata": metadata or {}}
    with atomic_path(plan) as tmp:
        tmp.write_bytes(memoryview(serialized))
    atomic_write_text(fingerprint_path(plan), json.dumps(fingerprint, indent=2) + "\n")
    if timing_cache is not None:
        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return fingerprint


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8}
    for name in ("bfloat16", "uint8"):  # not in every TensorRT version
        if hasattr(trt, name):
            table[getattr(trt, name)] = getattr(torch, name)
    return table[dtype]


class TrtEngine(Engine):
    """A serialized TensorRT engine whose fingerprint matches this machine, run on PyTorch's current CUDA stream."""

    backend = "trt"

    def __init__(self, plan: Path, precision: str = "fp32"):
        import torch

        trt = import_tensorrt()
        self.trt, self.torch = trt, torch
        self.plan = Path(plan)
        self.fingerprint = check_fingerprint(self.plan, trt)
        self.precision = self.fingerprint.get("precision", precision)
        self.device = "cuda"
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialize {self.plan}; rebuild it with "
                                      f"`pcltool build RUN --engine trt --precision {self.precision}`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        self.input_name, self.output_name = inputs[0], outputs[0]
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.input_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.input_name))
        self.output_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output_name))

    def prepare(self, images: np.ndarray):
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images)).to("cuda", dtype=self.input_dtype)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.output_dtype, device="cuda")
        return x, y

    def run(self, prepared):
        x, y = prepared
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        if not self.context.execute_async_v3(self.torch.cuda.current_stream().cuda_stream):
            raise VerificationError(f"TensorRT failed to execute {self.plan}")
        return y

    def sync(self) -> None:
        self.torch.cuda.synchronize()

    def to_numpy(self, output) -> np.ndarray:
        return output.float().cpu().numpy()

    def close(self) -> None:
        self.context = self.engine = self.runtime = None
