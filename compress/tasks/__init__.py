"""Tasks: what a model is judged by (loss, metrics and their direction, distillation), by recipe name.

``build_task(recipe.task)`` gives a :class:`Task`; built in: ``classification`` (the default),
``multilabel``, ``regression``, ``language-model``; ``import:pkg.mod:Name`` for a user's subclass.
Register a task, a loss or a distillation form from Python with ``TASKS``, ``LOSSES`` or
``DISTILL_FORMS``.
"""

from __future__ import annotations

from compress.tasks import classification, language_model, losses, multilabel, regression  # noqa: F401  (registrations)
from compress.tasks._registry import DISTILL_FORMS, LOSSES, TASKS
from compress.tasks.base import (
           MetricSpec,
           Task,
           TaskConfig,
           TaskDistillLoss,
           build_task,
           evaluate_model,
           resolve_metric,
)
from compress.tasks.classification import ClassificationTask
from compress.tasks.language_model import LanguageModelTask
from compress.tasks.multilabel import MultilabelTask, label_targets
from compress.tasks.regression import RegressionTask

__all__ = ["TASKS", "LOSSES", "DISTILL_FORMS", "Task", "TaskConfig", "MetricSpec", "TaskDistillLoss", "build_task",
           "evaluate_model", "resolve_metric", "ClassificationTask", "MultilabelTask", "RegressionTask",
           "LanguageModelTask", "label_targets"]
