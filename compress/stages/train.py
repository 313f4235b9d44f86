"""Stages ``train`` (from scratch or fine-tune) and ``evaluate`` (measure only)."""

from __future__ import annotations

from torch import nn

from compress.config import FinetuneConfig
from compress.stage_configs import EvaluateConfig, TrainConfig
from compress.stages.base import STAGES, Context, Stage, StageResult

__all__ = ["TrainStage", "EvaluateStage"]


@STAGES.register("train")
class TrainStage(Stage):
    """Train the model in place: ``{type: train, epochs: 10, optimizer: {name: sgd, lr: 0.1}}``."""

    Config = TrainConfig
    type_name = "train"

    @property
    def finetune_config(self) -> FinetuneConfig:
        return self.config

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        logged = ctx.finetune(model, self.config, tag=self.name)
        return StageResult(model, {"train": logged})


@STAGES.register("evaluate")
class EvaluateStage(Stage):
    """Leaves the model as it is; the pipeline measures it like after any stage."""

    Config = EvaluateConfig
    type_name = "evaluate"

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        return StageResult(model)
