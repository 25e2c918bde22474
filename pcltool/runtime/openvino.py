"""OpenVINO (optional: ``pip install 'pcltool[openvino]'``): the exported model converted to OpenVINO IR and run
on the CPU plugin.

FP32 keeps FP32 arithmetic: OpenVINO would otherwise pick bf16 on CPUs that have it (``INFERENCE_PRECISION_HINT``)
and store the weights as FP16 (``compress_to_fp16``), and neither would pass the FP32 parity gate. INT8 reads the
same calibrated Q/DQ ONNX model that ``pcltool build --engine ort --precision int8`` makes; OpenVINO's
low-precision transformations turn its Q/DQ pairs into int8 kernels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcltool.errors import BackendUnavailableError, VerificationError
from pcltool.runtime import Engine

INSTALL_HINT = "OpenVINO is not installed: pip install 'pcltool[openvino]' (or pip install openvino)"


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(INSTALL_HINT) from None
    return openvino


def openvino_available() -> bool:
    try:
        import_openvino()
    except BackendUnavailableError:
        return False
    return True


def openvino_version() -> str | None:
    return import_openvino().__version__ if openvino_available() else None


def convert(src: Path, xml: Path) -> dict[str, Path]:
    """ONNX ``src`` -> OpenVINO IR ``xml`` (+ its ``.bin``), weights kept in their own precision."""
    ov = import_openvino()
    model = ov.Core().read_model(str(src))
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return {"engine": xml, "weights": xml.with_suffix(".bin")}


class OpenVinoEngine(Engine):
    """An OpenVINO IR (or ONNX) model compiled for the CPU plugin, one synchronous infer request."""

    backend = "openvino"

    def __init__(self, path: Path, precision: str = "fp32", threads: int | None = None, hint: str = "LATENCY"):
        ov = import_openvino()
        self.path, self.precision, self.device = Path(path), precision, "cpu"
        config = {"PERFORMANCE_HINT": hint, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        except Exception as err:
            raise VerificationError(f"OpenVINO cannot load {self.path}: {str(err).splitlines()[0]}") from None
        self.request = self.compiled.create_infer_request()
        self.input_dtype = self.compiled.input(0).get_element_type().to_dtype()  # float32, or uint8 (--raw-input)
        shape = self.compiled.input(0).get_partial_shape()
        if shape[0].is_static:
            self.min_batch = self.max_batch = shape[0].get_length()

    def prepare(self, images: np.ndarray):
        return np.ascontiguousarray(images, dtype=self.input_dtype)

    def run(self, prepared):
        self.request.infer({0: prepared}, share_inputs=True)
        return self.request.get_output_tensor(0).data

    def to_numpy(self, output) -> np.ndarray:
        return np.array(output, dtype=np.float32)  # a copy: the request's buffer is reused by the next call

    def close(self) -> None:
        self.request = self.compiled = None
