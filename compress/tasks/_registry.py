"""The task registries, apart from the tasks and losses that register into them.

* ``TASKS``: task classes by recipe name (``task.name``); ``import:pkg.mod:Name`` for a user's own.
* ``LOSSES``: training losses by recipe name (``task.loss``), called ``loss(outputs, targets) -> scalar``
  on what the task prepares; ``import:`` for a user's callable.
* ``DISTILL_FORMS``: output-distillation terms by recipe name (``task.distill``), called
  ``soft(student_rows, teacher_rows, T) -> scalar`` on the task's rows of logits (or values).
"""

from __future__ import annotations

from collections.abc import Callable

from compress.registry import Registry

__all__ = ["TASKS", "LOSSES", "DISTILL_FORMS"]

TASKS: Registry[type] = Registry("task", allow_import=True)
LOSSES: Registry[Callable] = Registry("loss", allow_import=True)
DISTILL_FORMS: Registry[Callable] = Registry("distillation form")
