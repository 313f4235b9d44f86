"""Top-1 accuracy and loss on the test split (the classification task's scores)."""

from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader

from compress.tasks import build_task, evaluate_model

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, float]:
    """``{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy}`` over the loader: the
    ``classification`` task's judgement (:func:`compress.tasks.evaluate_model` for any task)."""
    scores = evaluate_model(build_task(None), model, loader, max_batches)
    return {"accuracy": scores["accuracy"], "loss": scores["loss"]}
