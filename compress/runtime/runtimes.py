"""Named deployment runtimes: what ``eval.runtimes`` (and a latency target's ``latency_on``) refer to.

A runtime turns a model into something callable the way it ships: ``deploy(model, path, example,
calibration=..., threads=...)`` writes the deployable file and returns a callable session (logits
for a batch). Register another one (OpenVINO, TensorRT, a vendor NPU toolchain) with
``RUNTIMES.register("name", deploy)``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from compress.errors import UserError
from compress.registry import Registry
from compress.runtime.export import export_onnx
from compress.runtime.ort import OrtModel

__all__ = ["RUNTIMES", "check_runtimes", "deploy_onnxruntime", "RUNTIME_PACKAGES"]

RUNTIMES: Registry[Callable[..., Any]] = Registry("runtime")
RUNTIME_PACKAGES = {"onnxruntime": ("onnx", "onnxruntime")}  # what each shipped runtime imports


@RUNTIMES.register("onnxruntime")
def deploy_onnxruntime(model: nn.Module, path: str | Path, example: Tensor, *,
                       calibration: Iterable[Any] | None = None, check_inputs: Tensor | None = None,
                       check_targets: Any = None, task: Any = None, max_drop: float | None = None,
                       check: bool = True, threads: int = 1) -> OrtModel:
    """Export ``model`` to ONNX at ``path`` (int8 QDQ when it is quantised) and open it in ONNX Runtime;
    the int8 graph is checked by ``task`` on ``check_inputs`` labelled ``check_targets`` when given
    (``check=False``: not checked, where a caller has judged the graph already)."""
    export_onnx(model, path, example, calibration=calibration, check_inputs=check_inputs,
                check_targets=check_targets, task=task, max_drop=max_drop, check=check)
    return OrtModel(path, threads)


def check_runtimes(names: Sequence[str], key: str = "eval.runtimes") -> None:
    """Validate a recipe's runtime list before any work: known names, installed packages, no repeats."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        k = f"{key}[{i}]"
        RUNTIMES.get(str(name), k)
        if name in seen:
            raise UserError(f"{k}: runtime '{name}' is listed twice (metric keys are per runtime)")
        seen.add(name)
        for package in RUNTIME_PACKAGES.get(name, ()):
            if importlib.util.find_spec(package) is None:
                raise UserError(f"{k}: {name} needs the '{package}' package; pip install onnx onnxruntime "
                                f"(or remove {name} from {key})")
