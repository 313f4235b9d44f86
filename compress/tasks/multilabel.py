"""``multilabel``: independent labels per sample (taggers, pitch bins), sigmoid outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.errors import UserError
from compress.schema import check_choice
from compress.tasks._registry import TASKS
from compress.tasks.base import MetricSpec, Task, TaskConfig

__all__ = ["MultilabelConfig", "MultilabelTask", "label_targets"]

_EPS = 1e-6  # probabilities are clipped to [eps, 1 - eps] before their logit (|logit| <= 13.8)


@dataclass
class MultilabelConfig(TaskConfig):
    outputs: str = "logits"  # logits | probabilities (the model ends in a sigmoid)
    # Class-index targets become Gaussians over neighbouring labels (std in labels; CREPE: 1.25 bins)
    label_smoothing_sigma: float | None = None


def label_targets(targets: Tensor, width: int, sigma: float | None = None) -> Tensor:
    """Float targets ``(N, width)`` from multi-hot or soft ``(N, width)`` ones or class indices ``(N,)``.

    A class index (an integer, or a fractional position such as an exact pitch between two bins) is
    one-hot at its nearest label, or with ``sigma`` a Gaussian ``exp(-(j - c)^2 / (2 sigma^2))`` over
    the labels ``j`` (CREPE's training targets, Kim et al. 2018).
    """
    if targets.dim() == 2:
        return targets.float()
    centre = targets.float()[:, None]  # (N, 1)
    labels = torch.arange(width, device=targets.device, dtype=torch.float32)[None, :]  # (1, width)
    if sigma:
        return torch.exp(-((labels - centre) ** 2) / (2 * sigma * sigma))
    return F.one_hot(centre[:, 0].round().long().clamp(0, width - 1), width).float()


@TASKS.register("multilabel")
class MultilabelTask(Task):
    """BCE over independent labels; ``f1`` (micro, threshold 0.5) and ``map`` (micro average precision),
    ``map`` deciding; distilled by softened sigmoids (``bce``) or logit MSE (``distill: mse``)."""

    Config: ClassVar[type] = MultilabelConfig
    default_loss: ClassVar[str] = "bce"
    default_primary: ClassVar[str] = "map"
    default_distill: ClassVar[str] = "bce"
    has_classes: ClassVar[bool] = True

    def __init__(self, config: Any = None, key: str = "task"):
        super().__init__(config, key)
        check_choice(self.config.outputs, f"{key}.outputs", ("logits", "probabilities"))
        sigma = self.config.label_smoothing_sigma
        if sigma is not None and not sigma > 0:
            raise UserError(f"{key}.label_smoothing_sigma: {sigma} must be > 0 (a std in labels)")

    def default_metrics(self) -> dict[str, MetricSpec]:
        # micro averages: a tagger or a pitch model has many labels with no positive in a test set,
        # whose macro AP would be 0 whatever the model does
        return {"f1": MetricSpec("torchmetrics.classification:MultilabelF1Score", {"average": "micro"},
                                 higher_is_better=True),
                "map": MetricSpec("torchmetrics.classification:MultilabelAveragePrecision", {"average": "micro"},
                                  higher_is_better=True)}

    def width(self, outputs: Tensor) -> int:
        return int(outputs.shape[1])

    def logits(self, outputs: Tensor) -> Tensor:
        if self.config.outputs == "probabilities":
            return torch.logit(outputs.clamp(_EPS, 1 - _EPS))
        return outputs

    def loss_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return self.logits(outputs), label_targets(targets, outputs.shape[1], self.config.label_smoothing_sigma)

    def metric_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        probs = outputs if self.config.outputs == "probabilities" else torch.sigmoid(outputs)
        hard = label_targets(targets, outputs.shape[1]) if targets.dim() == 1 else targets
        return probs, (hard >= 0.5).long()

    def distill_rows(self, outputs: Tensor) -> Tensor:
        return self.logits(outputs).flatten(1)
