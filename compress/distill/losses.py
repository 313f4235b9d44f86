"""Distillation losses on logits (Hinton et al. 2015) and on intermediate features (FitNets, AT).

Two registries, so a user adds a loss from Python and names it in a recipe:

* ``KD_LOSSES``: logit losses. ``KD_LOSSES.get(name)(T=..., alpha=...)`` is a module called as
  ``loss(student_logits, teacher_logits, target) -> (loss, {"hard": ..., "soft": ...})``.
* ``FEATURE_LOSSES``: feature-pair losses, the ``kind`` of a pair in a recipe.
  ``FEATURE_LOSSES.get(kind)(student_shape, teacher_shape, key)`` is a module (it may own
  parameters, e.g. an adapter, which then train with the student) called as
  ``loss(student_features, teacher_features) -> scalar``.

Example of a user-registered feature loss::

    from compress.distill import FEATURE_LOSSES

    @FEATURE_LOSSES.register("cosine")
    class CosineFeatureLoss(nn.Module):
        def __init__(self, student_shape, teacher_shape, key=""):
            super().__init__()
            self.adapter = make_adapter(student_shape, teacher_shape, key)

        def forward(self, s, t):
            return 1 - F.cosine_similarity(self.adapter(s).flatten(1), t.flatten(1)).mean()
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from compress.distill.adapters import make_adapter, resize_spatial
from compress.errors import UserError
from compress.registry import Registry
from compress.tasks.losses import kd_loss

__all__ = ["KD_LOSSES", "FEATURE_LOSSES", "kd_loss", "KDLoss", "HintLoss", "AttentionLoss", "attention_map"]

KD_LOSSES: Registry[type[nn.Module]] = Registry("distillation loss")
FEATURE_LOSSES: Registry[type[nn.Module]] = Registry("feature distillation kind")


@KD_LOSSES.register("kd")
class KDLoss(nn.Module):
    """``alpha * kd_loss(T) + (1 - alpha) * cross_entropy(student, labels)`` (Hinton et al. 2015)."""

    def __init__(self, T: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if not T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.T, self.alpha = float(T), float(alpha)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        soft = kd_loss(student_logits, teacher_logits, self.T)
        hard = F.cross_entropy(student_logits, target)
        return self.alpha * soft + (1.0 - self.alpha) * hard, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return f"T={self.T:g}, alpha={self.alpha:g}"


@FEATURE_LOSSES.register("hint")
class HintLoss(nn.Module):
    """FitNets hint loss (Romero et al. 2015, eq. 2): ``MSE(adapter(student), teacher)``.

    The adapter (FitNets' "regressor") maps the student's features to the teacher's shape; it is
    created here from the observed shapes and trains with the student.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], key: str = ""):
        super().__init__()
        self.adapter = make_adapter(student_shape, teacher_shape, key)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.mse_loss(self.adapter(student), teacher.detach())


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of Zagoruyko & Komodakis (2017), eq. 1-2: ``mean_c |A_c|^p``, (B, 1, H, W)."""
    return features.abs().pow(p).mean(1, keepdim=True)


@FEATURE_LOSSES.register("attention")
class AttentionLoss(nn.Module):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017, eq. 2 with p = 2).

    ``mean((Q_s/||Q_s|| - Q_t/||Q_t||)^2)`` over the flattened, L2-normalised attention maps,
    as in the authors' reference code (their beta is this pair's ``weight``). Channel counts may
    differ (the maps average over channels); a student map of another spatial size is resized to
    the teacher's. No parameters.
    """

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int], key: str = "", p: float = 2.0):
        super().__init__()
        for role, shape in (("student", student_shape), ("teacher", teacher_shape)):
            if len(shape) != 4:
                raise UserError(f"{key}: attention transfer needs conv feature maps (B, C, H, W); the {role}'s "
                                f"module gives shape {tuple(shape)}; use kind 'hint' for vectors")
        self.p = p
        self.size = tuple(teacher_shape[2:])

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        a_s = resize_spatial(attention_map(student, self.p), self.size).flatten(1)  # (B, H*W)
        a_t = attention_map(teacher.detach(), self.p).flatten(1)  # (B, H*W)
        return (F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)).pow(2).mean()
