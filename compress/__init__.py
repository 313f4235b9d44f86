"""compress: a recipe-driven compression pipeline for PyTorch models.

From Python::

    from compress import UnstructuredPruningStage, Context, build_datamodule
    UnstructuredPruningStage(sparsity=0.8).apply(model)            # masks only
    ctx = Context(build_datamodule({"name": "digits"}))
    UnstructuredPruningStage(sparsity=0.8, finetune={"epochs": 3}).apply(model, ctx)

From a recipe: ``python run.py recipes/quickstart.yaml key=value ...`` or
``Pipeline(load_recipe("recipes/quickstart.yaml")).run()``.
"""

from compress.checkpoint import load_model, save_checkpoint
from compress.data import DATAMODULES, build_datamodule
from compress.encoding import model_storage, read_compressed, write_compressed
from compress.errors import UserError
from compress.models import MODELS, build_model
from compress.pipeline import Pipeline, measure
from compress.recipe import load_recipe
from compress.registry import Registry
from compress.stages import (
    STAGES,
    Context,
    DistillStage,
    EvaluateStage,
    FinetuneConfig,
    ShareStage,
    Stage,
    StageResult,
    StructuredPruningStage,
    TrainStage,
    UnstructuredPruningStage,
)

__all__ = [
    "Context", "DATAMODULES", "DistillStage", "EvaluateStage", "FinetuneConfig", "MODELS", "Pipeline", "Registry",
    "STAGES", "ShareStage", "Stage", "StageResult", "StructuredPruningStage", "TrainStage", "UnstructuredPruningStage",
    "UserError", "build_datamodule", "build_model", "load_model", "load_recipe", "measure", "model_storage",
    "read_compressed", "save_checkpoint", "write_compressed",
]
