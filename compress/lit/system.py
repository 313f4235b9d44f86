"""The Lightning system: a bare student ``nn.Module`` plus an objective (CE or distillation)."""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.calls import batch_size, forward
from compress.config import FinetuneConfig
from compress.errors import TrainingDiverged

__all__ = ["CrossEntropyObjective", "ClassificationSystem", "TrainingDiverged", "build_optimizer"]


class CrossEntropyObjective(nn.Module):
    """``objective(model, x, y) -> (loss, logits, parts)``: plain hard-label training."""

    def forward(self, model: nn.Module, x: Any, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        logits = forward(model, x)
        loss = F.cross_entropy(logits, y)
        return loss, logits, {"hard": loss.detach()}


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
    """Holds ``model`` (the bare student, what Torch-Pruning traces) and ``objective``.

    Metrics are logged under ``<tag>/`` (the stage's name), so every stage has its own curves.
    """

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, objective: nn.Module | None = None, tag: str = "train"):
        super().__init__()
        self.model = model
        self.objective = objective if objective is not None else CrossEntropyObjective()
        self.cfg = cfg
        self.tag = tag

    def forward(self, x: Any) -> Tensor:
        return forward(self.model, x)

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss, logits, parts = self.objective(self.model, x, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"{self.tag}: the training loss became {loss.item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}; lower the learning rate ({self.cfg.optimizer.lr})")
        acc = (logits.argmax(1) == y).float().mean()
        n = batch_size(x)  # Lightning cannot infer it from a mapping of inputs
        self.log(f"{self.tag}/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{self.tag}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
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
