"""Knowledge distillation: a frozen teacher's logits and features teach a (compressed) student.

* :class:`DistillationObjective` — ``objective(model, x, y) -> (loss, logits, parts)``; usable in
  the pipeline's Lightning system, in a user's own LightningModule or in a plain PyTorch loop
  (see its docstring for a ten-line loop).
* :func:`kd_loss` — Hinton et al. (2015) soft-target loss, ``T^2 * KL``, as a function.
* ``KD_LOSSES`` / ``FEATURE_LOSSES`` — registries of logit losses (``kd``) and feature-pair kinds
  (``hint``: FitNets with an adapter; ``attention``: attention transfer); register your own.
* :func:`capture_outputs` — forward-hook capture of named submodules, removed on exit.
* :func:`make_adapter` — 1x1 conv / linear adapters from observed shapes.
* :func:`resolve_teacher` — ``self``, named teachers under ``teachers/``, checkpoint paths
  (:func:`compress.teachers.train_teacher` trains a named one by its recipe).
* :func:`build_objective` — the objective for a recipe's ``distill`` block and a ``Context``.
"""

from compress.distill.adapters import ConvAdapter, LinearAdapter, make_adapter, resize_spatial
from compress.distill.hooks import capture_outputs, find_module
from compress.distill.losses import (
    FEATURE_LOSSES,
    KD_LOSSES,
    AttentionLoss,
    HintLoss,
    KDLoss,
    attention_map,
    kd_loss,
)
from compress.distill.objective import (
    DistillationObjective,
    build_objective,
    check_feature_paths,
    feature_pairs,
)
from compress.distill.teacher import (
    TeacherSpec,
    check_teacher,
    load_teacher_spec,
    record_teacher,
    resolve_teacher,
)

__all__ = [
    "AttentionLoss", "ConvAdapter", "DistillationObjective", "FEATURE_LOSSES", "HintLoss", "KDLoss", "KD_LOSSES",
    "LinearAdapter", "TeacherSpec", "attention_map", "build_objective", "capture_outputs", "check_feature_paths",
    "check_teacher", "feature_pairs", "find_module", "kd_loss", "load_teacher_spec", "make_adapter", "record_teacher",
    "resize_spatial", "resolve_teacher",
]
