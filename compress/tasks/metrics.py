"""Metric classes the tasks add to torchmetrics' (this module imports torchmetrics: load it lazily)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.text import Perplexity

__all__ = ["SequencePerplexity"]


class SequencePerplexity(Perplexity):
    """torchmetrics' Perplexity fed class-first logits ``(B, V, T)``, as every metric of the
    ``language-model`` task is (its loss and accuracy take that form)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds.movedim(1, -1), target)
