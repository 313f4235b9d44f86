"""Training configs shared by every layer that fine-tunes: optimizer, schedule, distillation objective.

Foundation layer: typed dataclasses (merged into OmegaConf structured configs) and their range checks.
Stages embed :class:`FinetuneConfig` as their ``finetune`` block; the Lightning loop reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from compress.errors import UserError
from compress.schema import check_choice, check_range

__all__ = ["OptimizerConfig", "FeaturePairConfig", "DistillConfig", "FinetuneConfig", "validate_finetune",
           "OPTIMIZERS", "LR_SCHEDULES"]

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("none", "cosine", "step")


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class FeaturePairConfig:
    student: str = MISSING  # module path in the student, e.g. "layer2.0"
    teacher: str = MISSING  # module path in the teacher
    kind: str = "hint"  # hint (FitNets, adapter + MSE) | attention (Zagoruyko & Komodakis)
    weight: float = 1.0


@dataclass
class DistillConfig:
    """Knowledge distillation as a fine-tuning objective (Hinton et al. 2015; FitNets)."""

    teacher: str = "self"  # self | a name under teachers/ | a checkpoint path
    T: float = 4.0
    alpha: float = 0.9  # weight of the soft (KD) term; (1 - alpha) on the hard labels
    features: list[FeaturePairConfig] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    epochs: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: str = "cosine"  # none | cosine | step
    distill: DistillConfig | None = None
    limit_train_batches: float = 1.0  # fraction of the training batches per epoch (quick tests)


def validate_finetune(cfg: Any, key: str) -> None:
    """Range checks for a FinetuneConfig-shaped block (types are checked by the schema)."""
    if cfg.epochs < 0:
        raise UserError(f"{key}.epochs: {cfg.epochs} must be >= 0")
    check_choice(cfg.optimizer.name, f"{key}.optimizer.name", OPTIMIZERS)
    if not cfg.optimizer.lr > 0:
        raise UserError(f"{key}.optimizer.lr: {cfg.optimizer.lr} must be > 0")
    check_range(cfg.optimizer.momentum, f"{key}.optimizer.momentum", 0.0, 1.0)
    if cfg.optimizer.weight_decay < 0:
        raise UserError(f"{key}.optimizer.weight_decay: {cfg.optimizer.weight_decay} must be >= 0")
    check_choice(cfg.lr_schedule, f"{key}.lr_schedule", LR_SCHEDULES)
    check_range(cfg.limit_train_batches, f"{key}.limit_train_batches", 0.0, 1.0, hi_open=False, lo_open=True)
    if cfg.distill is not None:
        check_range(cfg.distill.alpha, f"{key}.distill.alpha", 0.0, 1.0, hi_open=False)
        if not cfg.distill.T > 0:
            raise UserError(f"{key}.distill.T: {cfg.distill.T} must be > 0")
