"""Top-1 accuracy and loss on the test split."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compress.batches import eval_mode, forward, to_device

__all__ = ["evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, float]:
    """``{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy}`` over the loader."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    loss_sum = 0.0
    with eval_mode(model):
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = to_device(x, device), y.to(device)
            logits = forward(model, x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1)}
