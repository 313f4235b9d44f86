"""The Lightning system: a bare student ``nn.Module`` plus an objective (the task's loss or distillation)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from compress.calls import batch_size, forward
from compress.config import FinetuneConfig
from compress.errors import TrainingDiverged
from compress.tasks import Task, build_task

__all__ = ["TaskObjective", "CrossEntropyObjective", "ClassificationSystem", "TrainingDiverged", "build_optimizer"]


class TaskObjective(nn.Module):
    """``objective(model, x, y) -> (loss, outputs, parts)``: the task's own loss on its targets."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task

    def forward(self, model: nn.Module, x: Any, y: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        outputs = forward(model, x)
        loss = self.task.loss(outputs, y)
        return loss, outputs, {"hard": loss.detach()}


class CrossEntropyObjective(TaskObjective):
    """Plain hard-label training: the ``classification`` task's objective."""

    def __init__(self) -> None:
        super().__init__(build_task(None))


def build_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    name = cfg.name
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {name}")  # the recipe validation catches this first


class ClassificationSystem(pl.LightningModule):
    """Holds ``model`` (the bare student, what Torch-Pruning traces), ``objective`` and ``task``.

    Metrics are logged under ``<tag>/`` (the stage's name), so every stage has its own curves: the
    loss, its parts, and the task's primary metric on the training batches (``acc`` for
    classification, as always; ``<primary>`` otherwise). Any task trains here, despite the name.
    """

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, objective: nn.Module | None = None, tag: str = "train",
                 task: Task | None = None):
        super().__init__()
        self.model = model
        self.task = task if task is not None else build_task(None)
        self.objective = objective if objective is not None else TaskObjective(self.task)
        self.cfg = cfg
        self.tag = tag
        self.train_metric: Any = None  # made on the first batch: its size is the model's output width
        self.metric_name = "acc" if self.task.name == "classification" else self.task.primary

    def forward(self, x: Any) -> Tensor:
        return forward(self.model, x)

    def training_step(self, batch: tuple[Any, Any], batch_idx: int) -> Tensor:
        x, y = batch
        loss, outputs, parts = self.objective(self.model, x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"{self.tag}: the training loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}; lower the learning rate ({self.cfg.optimizer.lr})")
        if self.train_metric is None:
            self.train_metric = self.task.metrics(self.task.width(outputs))[self.task.primary].to(outputs.device)
        with torch.no_grad():
            self.train_metric.update(*self.task.metric_inputs(outputs.detach(), y))
        n = batch_size(x)  # Lightning cannot infer it from a mapping of inputs
        self.log(f"{self.tag}/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{self.tag}/{self.metric_name}", self.train_metric, prog_bar=True, on_step=False, on_epoch=True,
                 batch_size=n)
        for name, value in parts.items():
            self.log(f"{self.tag}/loss_{name}", value, on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The RNG state too, so a resumed run draws what an uninterrupted one would (dropout, ...).
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = build_optimizer(params, self.cfg.optimizer)
        epochs = max(1, self.cfg.epochs)
        if self.cfg.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / epochs)))
        elif self.cfg.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(epochs * 0.5), int(epochs * 0.75)], 0.1)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
