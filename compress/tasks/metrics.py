"""Metric classes the tasks add to torchmetrics' (this module imports torchmetrics: load it lazily).

A recipe names them as it names torchmetrics' own (``metrics: {rpa50: RawPitchAccuracy}``): this
module is searched after torchmetrics' (``compress.tasks.base``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.text import Perplexity

__all__ = ["SequencePerplexity", "RawPitchAccuracy"]

_DECODES = ("argmax", "weighted")
_WINDOW = 4  # bins either side of the argmax that CREPE's weighted average reads


class SequencePerplexity(Perplexity):
    """torchmetrics' Perplexity fed class-first logits ``(B, V, T)``, as every metric of the
    ``language-model`` task is (its loss and accuracy take that form)."""

    def update(self, preds: Tensor, target: Tensor) -> None:
        super().update(preds.movedim(1, -1), target)


class RawPitchAccuracy(Metric):
    """Raw pitch accuracy (RPA, Salamon et al. 2014; CREPE's headline figure): the share of frames whose
    estimated pitch is within ``cents`` of the true one.

    ``preds`` are ``(N, K)`` scores over pitch bins ``cents_per_bin`` apart (probabilities for
    ``decode: weighted``). The estimate is the argmax bin, or with ``decode: weighted`` CREPE's
    average of the bins within 4 of the argmax weighted by their probabilities (Kim et al. 2018,
    eq. 2). ``target`` is the true pitch in (fractional) bins ``(N,)``, or ``(N, K)`` one-hot,
    multi-hot or soft rows whose argmax is the nearest bin: for the argmax estimate the two give the
    same figure (an integer bin is within 2.5 bins of the pitch exactly when it is within 2 of the
    nearest bin); a weighted estimate against a nearest bin is off by up to half a bin.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, cents: float = 50.0, cents_per_bin: float = 20.0, decode: str = "argmax", **kwargs):
        super().__init__(**kwargs)
        if decode not in _DECODES:
            raise ValueError(f"decode '{decode}' is not one of {', '.join(_DECODES)}")
        if not cents > 0 or not cents_per_bin > 0:
            raise ValueError(f"cents ({cents}) and cents_per_bin ({cents_per_bin}) must be > 0")
        self.tolerance_bins, self.decode = cents / cents_per_bin, decode
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def estimate(self, preds: Tensor) -> Tensor:
        """The estimated pitch of each row of ``preds``, in (fractional) bins: ``(N, K) -> (N,)``."""
        best = preds.argmax(1)
        if self.decode == "argmax":
            return best.to(torch.float64)
        bins = torch.arange(preds.shape[1], device=preds.device)
        near = (bins[None, :] - best[:, None]).abs() <= _WINDOW  # (N, K)
        weights = torch.where(near, preds.to(torch.float64), 0.0)
        return (weights * bins).sum(1) / weights.sum(1).clamp(min=1e-12)

    def update(self, preds: Tensor, target: Tensor) -> None:
        truth = target.argmax(1) if target.dim() == 2 else target
        error = (self.estimate(preds) - truth.to(torch.float64)).abs()
        self.correct += (error <= self.tolerance_bins).sum()
        self.total += error.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total
