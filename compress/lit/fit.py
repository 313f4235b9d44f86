"""fit(): one fine-tuning run of a bare model through a Lightning Trainer."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch import nn

from compress.lit.system import ClassificationSystem
from compress.stages.base import Context, FinetuneConfig

__all__ = ["fit", "make_trainer"]

for _name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def make_trainer(ctx: Context, epochs: int, callbacks: Sequence[Any] = (), **overrides: Any) -> pl.Trainer:
    """A Trainer from the recipe's ``trainer`` block (accelerator, devices, strategy, precision...)."""
    t = dict(ctx.trainer)
    show_bar = bool(t.pop("progress_bar", True)) and sys.stderr.isatty()
    kwargs: dict[str, Any] = dict(
        max_epochs=epochs,
        accelerator=t.get("accelerator", "cpu"),
        devices=t.get("devices", 1),
        num_nodes=t.get("num_nodes", 1),
        strategy=t.get("strategy", "auto"),
        precision=t.get("precision", "32-true"),
        gradient_clip_val=t.get("gradient_clip_val"),
        log_every_n_steps=t.get("log_every_n_steps", 10),
        logger=list(ctx.loggers) or False,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=show_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(ctx.out_dir) if ctx.out_dir else None,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def fit(model: nn.Module, ctx: Context, cfg: FinetuneConfig, callbacks: Sequence[Any] = (),
        tag: str = "finetune") -> dict[str, float]:
    """Train ``model`` in place for ``cfg.epochs``; returns the last logged metrics.

    With ``cfg.distill`` set, the loss is the distillation objective (teacher resolved from
    the context); its adapters train with the student and are dropped afterwards.
    """
    objective = None
    if cfg.distill is not None:
        from compress.distill import build_objective

        objective = build_objective(model, cfg.distill, ctx)
    pl.seed_everything(ctx.seed + ctx.stage_index, workers=True, verbose=False)
    system = ClassificationSystem(model, cfg, objective, tag=tag)
    trainer = make_trainer(ctx, cfg.epochs, callbacks, limit_train_batches=cfg.limit_train_batches)
    was_training = model.training
    trainer.fit(system, datamodule=ctx.datamodule)
    model.train(was_training)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
