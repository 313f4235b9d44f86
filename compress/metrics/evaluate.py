"""Top-1 accuracy and loss on the test split (the classification task's scores)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from compress.tasks import build_task, evaluate_model

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(model: nn.Module, loader: DataLoader, max_batches: int | None = None) -> dict[str, Any]:
    """``{"accuracy": top-1 in [0, 1], "loss": mean cross-entropy, "nonfinite_outputs": N}`` over the loader:
    the ``classification`` task's judgement (:func:`compress.tasks.evaluate_model` for any task).

    ``nonfinite_outputs`` counts the inputs whose logits hold a NaN or an infinity; when there are
    any, ``"nonfinite"`` says which (``"NaN"``, else ``"inf"``).
    """
    scores = evaluate_model(build_task(None), model, loader, max_batches)
    return {k: scores[k] for k in ("accuracy", "loss", "nonfinite_outputs", "nonfinite") if k in scores}
