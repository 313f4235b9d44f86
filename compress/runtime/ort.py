"""ONNX Runtime sessions: a callable model, and a task's test metrics measured by the runtime."""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress.errors import UserError
from compress.tasks import Task, build_task

__all__ = ["require", "OrtModel", "ort_accuracy", "ort_evaluate"]


def require(name: str) -> ModuleType:
    """Import ``onnx``/``onnxruntime`` (and their submodules) lazily, or raise a one-line :class:`UserError`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name.split('.')[0]} is not installed; pip install onnx onnxruntime") from None


class OrtModel:
    """An ONNX file in an ONNX Runtime CPU session; call it on a batch to get logits.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; inter-op is 1 and execution sequential, as the eager timing.
    """

    def __init__(self, path: str | Path, threads: int = 1):
        ort = require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # warnings about hardware-specific optimised graphs are noise here
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own Fail/InvalidGraph types
            raise UserError(f"{self.path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
        self.input_name = self.session.get_inputs()[0].name
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for a float32 batch ``(B, ...)``, or for a mapping of the graph's inputs by name."""
        if isinstance(x, Mapping):
            return self.session.run(None, dict(x))[0]
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: Tensor | np.ndarray | Mapping[str, Any]) -> Tensor | np.ndarray:
        """Logits as a CPU tensor for a tensor (or mapping of tensors) input, as an array for an array input."""
        if isinstance(x, Tensor | Mapping):
            return torch.from_numpy(self.run(feeds(x, self.input_name)))
        return self.run(x)


def feeds(x: Any, name: str = "input") -> dict[str, np.ndarray]:
    """ONNX Runtime's input feed for a batch: ``{name: float32 array}`` for a tensor, ``{key: array}``
    for a mapping of tensors (integer token ids stay integers, in a mapping or alone)."""
    if isinstance(x, list | tuple):
        x = x[0]
    if isinstance(x, Mapping):
        return {str(k): _array(v) for k, v in x.items()}
    array = _array(x)
    return {name: np.ascontiguousarray(array, dtype=np.float32 if array.dtype.kind == "f" else array.dtype)}


def _array(t: Any) -> np.ndarray:
    if isinstance(t, Tensor):
        t = t.detach().cpu()
        return (t.float() if t.is_floating_point() else t).numpy()
    return np.asarray(t)


def ort_evaluate(model_or_path: OrtModel | str | Path, dataloader: Iterable[Any], task: Task,
                 max_batches: int | None = None, threads: int = 1) -> dict[str, float]:
    """``task``'s scores (:meth:`compress.tasks.Task.evaluate`) of the outputs ONNX Runtime computes
    over ``(inputs, targets)`` batches: the judge of the eager model judges the deployed graph."""
    model = model_or_path if isinstance(model_or_path, OrtModel) else OrtModel(model_or_path, threads)
    try:
        return task.evaluate(lambda x: model(x if isinstance(x, Mapping) else torch.as_tensor(x)), dataloader,
                             max_batches)
    except UserError as e:
        raise UserError(f"runtime metrics: {e}") from None


def ort_accuracy(model_or_path: OrtModel | str | Path, dataloader: Iterable[Any], max_batches: int | None = None,
                 threads: int = 1) -> float:
    """Top-1 accuracy computed by ONNX Runtime over ``(inputs, targets)`` batches (the classification task's)."""
    return ort_evaluate(model_or_path, dataloader, build_task(None), max_batches, threads)["accuracy"]
