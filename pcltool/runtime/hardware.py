"""What a benchmark ran on (CPU, GPU, driver, library versions) and the CPU's peak FP32 rate for the FLOP floor."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import time
from pathlib import Path

# x86 features that decide which kernels ONNX Runtime / PyTorch can use
_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    info = {"model": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count()}
    with contextlib.suppress(OSError, AttributeError):
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            info["model"] = m.group(1).strip()
        if m := re.search(r"^cpu MHz\s*:\s*([\d.]+)$", text, re.M):
            info["mhz"] = float(m.group(1))
        cores = {(p, c) for p, c in re.findall(r"^physical id\s*:\s*(\d+)\n(?:.*\n)*?core id\s*:\s*(\d+)", text, re.M)}
        if cores:
            info["physical_cores"] = len(cores)
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            flags = set(m.group(1).split())
            info["isa"] = [f for f in _ISA if f in flags]
    return info


def gpu_info() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / (1 << 30), 1), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["driver"] = out.stdout.strip().splitlines()[0]
    return info


def library_versions() -> dict:
    import numpy
    import onnx
    import onnxruntime
    import torch

    import pcltool

    versions = {"pcltool": pcltool.__version__, "python": platform.python_version(), "torch": torch.__version__,
                "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                "onnxruntime_providers": onnxruntime.get_available_providers(), "platform": platform.platform()}
    with contextlib.suppress(ImportError):
        import tensorrt

        versions["tensorrt"] = tensorrt.__version__
    return versions


def measure_peak_fp32(threads: int, n: int = 1024, repeats: int = 30) -> dict:
    """The CPU's achievable FP32 rate: the fastest of ``repeats`` timed ``torch.mm`` of two n x n float32 matrices
    (2n³ FLOPs each, MKL/oneDNN sgemm) on ``threads`` threads. Many short calls, keeping the fastest, so that a
    busy machine's interruptions do not lower the estimate."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {"gflops": 2 * n**3 / best / 1e9, "method": f"fastest of {repeats} torch.mm {n}x{n}x{n} float32 (sgemm) "
                                                        f"on {threads} thread(s)"}


def nominal_peak_fp32(cpu: dict, threads: int) -> dict | None:
    """cores x reported clock x FLOPs/cycle, assuming two FMA units per core (512-bit with AVX-512, else 256-bit).
    The reported clock is often the base clock; turbo can put the measured rate above this figure."""
    if "mhz" not in cpu or "isa" not in cpu:
        return None
    lanes = 16 if "avx512f" in cpu["isa"] else 8 if "fma" in cpu["isa"] else 4
    per_cycle = 2 * 2 * lanes  # 2 FMA units x 2 FLOPs per FMA x lanes
    cores = min(threads, cpu.get("physical_cores") or threads)
    return {"gflops": cores * cpu["mhz"] / 1e3 * per_cycle,
            "method": f"{cores} cores x {cpu['mhz']:.0f} MHz x {per_cycle} FLOP/cycle (2 FMA units x {lanes} fp32 lanes)"}
