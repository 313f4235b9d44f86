"""Deployment runtimes: ONNX export (fp32 and int8 QDQ) and ONNX Runtime sessions.

``onnx`` and ``onnxruntime`` are imported when an export or a session starts, so importing this
package is cheap and a missing install is a one-line error naming ``pip install onnx onnxruntime``.
"""

from __future__ import annotations

from compress.runtime.export import (
    DEFAULT_MAX_ACCURACY_DROP,
    FP32_TOLERANCE,
    INT8_AGREEMENT,
    export_onnx,
    int8_accuracy_gate,
)
from compress.runtime.ort import OrtModel, feeds, ort_accuracy, ort_evaluate, require
from compress.runtime.runtimes import RUNTIMES, check_runtimes

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "FP32_TOLERANCE", "INT8_AGREEMENT", "int8_accuracy_gate", "OrtModel",
           "RUNTIMES", "check_runtimes", "export_onnx", "feeds", "ort_accuracy", "ort_evaluate", "require"]
