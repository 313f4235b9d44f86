"""``regression``: real-valued outputs against real-valued targets."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from compress.tasks._registry import TASKS
from compress.tasks.base import MetricSpec, Task

__all__ = ["RegressionTask"]


@TASKS.register("regression")
class RegressionTask(Task):
    """MSE (``loss: l1`` for L1); ``mae`` deciding (lower is better) and ``r2``; distilled by output MSE.

    Outputs ``(N, 1)`` against targets ``(N,)`` are squeezed; several outputs per sample are scored
    as ``(N, d)`` (R2 averaged over them).
    """

    default_loss: ClassVar[str] = "mse"
    default_primary: ClassVar[str] = "mae"
    default_distill: ClassVar[str] = "mse"

    def default_metrics(self) -> dict[str, MetricSpec]:
        return {"mae": MetricSpec("torchmetrics.regression:MeanAbsoluteError", higher_is_better=False),
                "r2": MetricSpec("torchmetrics.regression:R2Score", higher_is_better=True)}

    def loss_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if outputs.dim() == targets.dim() + 1 and outputs.shape[-1] == 1:
            outputs = outputs.squeeze(-1)
        return outputs, targets.to(outputs.dtype)

    def metric_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        outputs, targets = self.loss_inputs(outputs, targets)
        if outputs.dim() > 2:
            outputs, targets = outputs.flatten(1), targets.flatten(1)
        return outputs, targets
