"""Stage ``distill``: fine-tune the model with a teacher (Hinton et al. 2015; FitNets; AT).

Recipe block::

    - type: distill
      distill: {teacher: self, T: 4.0, alpha: 0.9,
                features: [{student: features.3, teacher: features.3, kind: hint, weight: 1.0}]}
      finetune: {epochs: 10, optimizer: {name: sgd, lr: 0.01}}

``teacher`` is ``self`` (the model before the compression stages), a name under ``teachers/``
or a checkpoint path. The same ``distill`` block can go in the ``finetune`` of any other stage.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf
from torch import nn

from compress.distill import FEATURE_LOSSES, check_feature_paths, resolve_teacher
from compress.stage_configs import DistillStageConfig
from compress.stages.base import STAGES, Context, Stage, StageResult

__all__ = ["DistillStage", "DistillStageConfig"]


@STAGES.register("distill")
class DistillStage(Stage):
    """Train the model in place on the distillation objective for ``finetune.epochs``."""

    Config = DistillStageConfig
    type_name = "distill"

    @property
    def distill_key(self) -> str:
        return f"{self.key}.distill"

    def validate(self) -> None:
        super().validate()
        c, key = self.config, self.distill_key
        for i, pair in enumerate(c.distill.features):
            FEATURE_LOSSES.get(pair.kind, f"{key}.features[{i}].kind")

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """Check the student's module paths (and the teacher's, for ``self``) before any training."""
        d = self.config.distill
        check_feature_paths(model, model if d.teacher == "self" else None, d.features, self.distill_key)
        lines = [f"teacher {d.teacher}, T={d.T:g}, alpha={d.alpha:g}"]
        lines += [f"{p.kind}: student {p.student} <- teacher {p.teacher} (weight {p.weight:g})" for p in d.features]
        return lines

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        key = self.distill_key
        cfg = self.finetune_config
        cfg.distill = OmegaConf.to_object(self.config.distill)
        spec = cfg.distill.teacher
        teacher = resolve_teacher(spec, ctx, f"{key}.teacher")
        check_feature_paths(model, teacher, cfg.distill.features, key)
        cfg.distill.teacher = teacher  # resolved once; build_objective accepts a module
        previous = getattr(ctx, "distill_key", None)
        ctx.distill_key = key  # so build_objective's errors name this block, not finetune.distill
        try:
            logged = ctx.finetune(model, cfg, tag=self.name)
        finally:
            ctx.distill_key = previous
        info = {"teacher": spec, "T": cfg.distill.T, "alpha": cfg.distill.alpha,
                "features": [f"{p.kind}:{p.student}<-{p.teacher}" for p in cfg.distill.features], "finetune": logged}
        return StageResult(model, info)
