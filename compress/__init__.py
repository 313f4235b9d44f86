"""compress: a recipe-driven compression pipeline for PyTorch models.

From Python::

    from compress import UnstructuredPruningStage, Context, build_datamodule
    UnstructuredPruningStage(sparsity=0.8).apply(model)            # masks only
    ctx = Context(build_datamodule({"name": "digits"}))
    UnstructuredPruningStage(sparsity=0.8, finetune={"epochs": 3}).apply(model, ctx)

From a recipe: ``python run.py recipes/quickstart.yaml key=value ...`` or
``Pipeline(load_recipe("recipes/quickstart.yaml")).run()``.

The public API is the top layer: each name loads its module on first use (PEP 562), so
``import compress`` and ``python run.py --help`` stay fast and Lightning loads only when a run
needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_API = {
    "Context": "compress.stages", "DistillStage": "compress.stages", "EvaluateStage": "compress.stages",
    "FinetuneConfig": "compress.stages", "ShareStage": "compress.stages", "Stage": "compress.stages",
    "StageResult": "compress.stages", "STAGES": "compress.stages", "StructuredPruningStage": "compress.stages",
    "TrainStage": "compress.stages", "UnstructuredPruningStage": "compress.stages", "QuantizeStage": "compress.stages",
    "DATAMODULES": "compress.data", "build_datamodule": "compress.data",
    "MODELS": "compress.models", "build_model": "compress.models",
    "load_model": "compress.checkpoint", "save_checkpoint": "compress.checkpoint",
    "model_storage": "compress.encoding", "read_compressed": "compress.encoding",
    "write_compressed": "compress.encoding",
    "UserError": "compress.errors", "Registry": "compress.registry",
    "export_onnx": "compress.runtime", "OrtModel": "compress.runtime",
    "Pipeline": "compress.pipeline", "measure": "compress.measurement",
    "load_recipe": "compress.recipe",
    "set_output": "compress.calls", "logits_of": "compress.calls",
    "Task": "compress.tasks", "TASKS": "compress.tasks", "build_task": "compress.tasks",
    "evaluate_model": "compress.tasks",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'compress' has no attribute '{name}'")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
