"""``language-model``: next-token prediction over sequences (a causal LM's ``(B, T, V)`` logits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from compress.tasks._registry import TASKS
from compress.tasks.base import MetricSpec, Task, TaskConfig
from compress.tasks.classification import MULTICLASS_ACCURACY
from compress.tasks.losses import IGNORE_INDEX

__all__ = ["LanguageModelConfig", "LanguageModelTask"]


@dataclass
class LanguageModelConfig(TaskConfig):
    shift: bool = True  # targets are the input ids (Hugging Face's labels): position t predicts t + 1


@TASKS.register("language-model")
class LanguageModelTask(Task):
    """Next-token cross-entropy; ``perplexity`` deciding (lower is better) and token ``accuracy``;
    distilled by token-level softmax KL. Targets ``-100`` (padding) count nowhere."""

    Config: ClassVar[type] = LanguageModelConfig
    default_loss: ClassVar[str] = "cross_entropy"
    default_primary: ClassVar[str] = "perplexity"
    default_distill: ClassVar[str] = "kl"

    def default_metrics(self) -> dict[str, MetricSpec]:
        return {"perplexity": MetricSpec("compress.tasks.metrics:SequencePerplexity", {"ignore_index": IGNORE_INDEX},
                                         higher_is_better=False),
                "accuracy": MetricSpec(MULTICLASS_ACCURACY, {"average": "micro", "ignore_index": IGNORE_INDEX},
                                       higher_is_better=True)}

    def width(self, outputs: Tensor) -> int:
        return int(outputs.shape[-1])

    def loss_inputs(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.config.shift:
            outputs, targets = outputs[:, :-1], targets[:, 1:]
        return outputs.movedim(-1, 1), targets  # (B, V, T), (B, T): cross_entropy's class-first form

    def distill_rows(self, outputs: Tensor) -> Tensor:
        return outputs.reshape(-1, outputs.shape[-1])  # (B * T, V): KL per token
