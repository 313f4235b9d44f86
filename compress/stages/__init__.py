"""Stages: each a class with a typed Config and ``apply(model, ctx) -> StageResult``."""

from compress.stages.base import STAGES, Context, FinetuneConfig, Stage, StageResult

__all__ = ["STAGES", "Context", "FinetuneConfig", "Stage", "StageResult"]
