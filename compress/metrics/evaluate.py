"""Top-1 accuracy and loss on the test split, and how many outputs were not finite."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from compress.calls import eval_mode, forward, to_device

__all__ = ["evaluate_accuracy"]


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, Any]:
    """``{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy, "nonfinite_outputs": N}`` over the loader.

    ``nonfinite_outputs`` counts the inputs whose logits hold a NaN or an infinity; when there are
    any, ``"nonfinite"`` says which (``"NaN"``, else ``"inf"``): accuracy and loss of such a model
    measure its arithmetic failing, not what it learned, and the caller says so.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = nonfinite = nan = 0
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
            bad = ~torch.isfinite(logits).flatten(1).all(1)  # (B,)
            nonfinite += int(bad.sum())
            nan += int(torch.isnan(logits).sum())
    out: dict[str, Any] = {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1),
                           "nonfinite_outputs": nonfinite}
    if nonfinite:
        out["nonfinite"] = "NaN" if nan else "inf"
    return out
