"""PyTorch eager (and ``torch.compile``) as an :class:`~pcltool.runtime.Engine`: the reference point for the
exported engines. The model is put in eval mode and run under ``torch.inference_mode``."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from pcltool.errors import BackendUnavailableError, UsageError
from pcltool.runtime import Engine

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchEngine(Engine):
    """``model`` maps (N, C, H, W) images to (N, K) logits. ``precision`` fp16/bf16 casts weights and inputs."""

    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32", compile: bool = False):
        if precision not in _DTYPES:
            raise UsageError(f"PyTorch runs fp32, fp16 or bf16, not {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError("--device cuda: PyTorch sees no CUDA GPU")
        if precision == "fp16" and not device.startswith("cuda"):
            raise UsageError("PyTorch fp16 inference needs a GPU (--device cuda); use fp32 or bf16 on the CPU")
        self.backend = "torch-compile" if compile else "torch"
        self.precision = precision
        self.device = device
        self.dtype = _DTYPES[precision]
        # a copy: casting or moving must not change the caller's module (other rows of a bench use it)
        self.model = copy.deepcopy(model).eval().to(device=device, dtype=self.dtype)
        self._call = torch.compile(self.model) if compile else self.model
        self._cuda = device.startswith("cuda")

    def prepare(self, images: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device, dtype=self.dtype)

    def run(self, prepared: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._call(prepared)

    def sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize(self.device)

    def to_numpy(self, output: torch.Tensor) -> np.ndarray:
        return output.float().cpu().numpy()
