"""Inference backends behind one small interface: PyTorch eager / ``torch.compile``, ONNX Runtime, TensorRT.

Every backend is an :class:`Engine`: it takes the exported model's input — float32 NCHW images, already
normalised (``pcltool.input_format = "float32-nchw-normalized"``) — and returns float32 logits. For timing, the
input is moved to the engine's device once (:meth:`Engine.prepare`); :meth:`Engine.run` then launches one batch
and :meth:`Engine.sync` waits for the device, so a timed call is ``run`` + ``sync`` and nothing else.

Heavy libraries (onnxruntime, tensorrt) are imported by the modules that use them, on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pcltool.errors import UsageError

ENGINES = ("torch", "ort", "trt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


class Engine:
    """One loaded model on one device. Subclasses set the attributes and implement ``prepare``/``run``."""

    backend: str = "?"  # "torch", "torch-compile", "ort", "trt"
    precision: str = "fp32"
    device: str = "cpu"
    provider: str = ""  # ONNX Runtime execution provider, when there is one
    min_batch: int = 1
    max_batch: int | None = None  # None: any batch size

    @property
    def label(self) -> str:
        via = f"/{self.provider}" if self.provider else ""
        return f"{self.backend}{via} {self.precision} {self.device}"

    def check_batch(self, n: int) -> None:
        """A batch outside the engine's optimisation profile is a usage error, not a crash inside the runtime."""
        if n < self.min_batch or (self.max_batch is not None and n > self.max_batch):
            hi = "any" if self.max_batch is None else self.max_batch
            raise UsageError(f"batch {n} is outside this {self.label} engine's profile ({self.min_batch}..{hi}); "
                             "rebuild it with a wider --batch MIN,OPT,MAX")

    def prepare(self, images: np.ndarray) -> Any:
        """Move one float32 NCHW batch to where :meth:`run` reads it (done once, outside any timing)."""
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:
        """Launch the model on a prepared batch; may return before the device has finished."""
        raise NotImplementedError

    def sync(self) -> None:
        """Wait until the device has finished everything launched so far (no-op on CPU)."""

    def to_numpy(self, output: Any) -> np.ndarray:
        return np.asarray(output, dtype=np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Logits (N, K) float32 for a float32 NCHW batch."""
        self.check_batch(images.shape[0])
        out = self.run(self.prepare(images))
        self.sync()
        return self.to_numpy(out)

    def predict_all(self, batches) -> np.ndarray:
        """Logits of every image in an iterable of float32 batches, in order (chunked to the engine's max batch)."""
        outputs = []
        for images in batches:
            step = self.max_batch or images.shape[0]
            for start in range(0, images.shape[0], step):
                chunk = images[start : start + step]
                if chunk.shape[0] < self.min_batch:  # pad a short tail up to the profile's minimum
                    pad = np.repeat(chunk[-1:], self.min_batch - chunk.shape[0], axis=0)
                    outputs.append(self.predict(np.concatenate([chunk, pad]))[: chunk.shape[0]])
                else:
                    outputs.append(self.predict(chunk))
        return np.concatenate(outputs)

    def close(self) -> None:
        """Release the session / device memory."""
