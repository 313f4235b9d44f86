"""Stages: each a class with a typed Config and ``apply(model, ctx) -> StageResult``.

Usable without a recipe: ``UnstructuredPruningStage(sparsity=0.8).apply(model)``.
"""

from compress.stages.base import STAGES, Context, FinetuneConfig, Stage, StageResult
from compress.stages.distill import DistillStage
from compress.stages.prune_structured import StructuredPruningStage
from compress.stages.prune_unstructured import UnstructuredPruningStage
from compress.stages.quantize import QuantizeStage
from compress.stages.share import ShareStage
from compress.stages.train import EvaluateStage, TrainStage

__all__ = ["STAGES", "Context", "FinetuneConfig", "Stage", "StageResult", "TrainStage", "EvaluateStage",
           "UnstructuredPruningStage", "StructuredPruningStage", "DistillStage", "ShareStage", "QuantizeStage"]
