"""Built-in training losses and output-distillation forms, registered by their recipe names.

Losses see what a task prepares (:meth:`compress.tasks.Task.loss_inputs`): class logits ``(N, C, ...)``
and class indices for ``cross_entropy``; logits and float targets of the same shape for ``bce``;
outputs and targets of the same shape for ``mse``, ``l1`` and ``smooth_l1``.

Distillation forms see rows ``(N, K)`` of the student's and the teacher's logits (values, for
regression); the teacher's are detached here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from compress.tasks._registry import DISTILL_FORMS, LOSSES

__all__ = ["IGNORE_INDEX", "kd_loss", "cross_entropy", "bce", "mse", "l1", "smooth_l1", "soft_kl", "soft_bce", "soft_mse",
           "soft_none"]

IGNORE_INDEX = -100  # the target id no loss or metric counts (PyTorch's and Hugging Face's convention)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, T: float) -> Tensor:
    """Soft-target loss of Hinton et al. (2015), section 2: ``T^2 * KL(p_T || q_T)``.

    ``p_T = softmax(teacher_logits / T)``, ``q_T = softmax(student_logits / T)``, KL averaged over
    the batch. The ``T^2`` factor keeps the gradient magnitude independent of ``T`` (the soft
    gradients scale as ``1/T^2``), so the mix with the hard loss need not be re-tuned per ``T``.
    """
    log_q = F.log_softmax(student_logits / T, dim=1)  # (B, K)
    p = F.softmax(teacher_logits.detach() / T, dim=1)  # (B, K)
    return F.kl_div(log_q, p, reduction="batchmean") * (T * T)


@LOSSES.register("cross_entropy")
def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets, ignore_index=IGNORE_INDEX)


def _on_output_dtype(fn: Callable[[Tensor, Tensor], Tensor], name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``fn(outputs, targets)`` with integer targets (multi-hot labels, counts) cast to the outputs' dtype."""

    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        return fn(outputs, targets.to(outputs.dtype))

    loss.__name__ = name
    return LOSSES.register(name, loss)


bce = _on_output_dtype(F.binary_cross_entropy_with_logits, "bce")  # on logits: stable where sigmoid saturates
mse = _on_output_dtype(F.mse_loss, "mse")
l1 = _on_output_dtype(F.l1_loss, "l1")
smooth_l1 = _on_output_dtype(F.smooth_l1_loss, "smooth_l1")


@DISTILL_FORMS.register("kl")
def soft_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Hinton et al.'s ``T^2 KL(softmax(t/T) || softmax(s/T))`` per row (a sample, or a token)."""
    return kd_loss(student, teacher, T)


@DISTILL_FORMS.register("bce")
def soft_bce(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Softened sigmoids: ``T^2 BCE(sigmoid(s/T), sigmoid(t/T))`` per output, for independent labels.

    The softmax of a multi-label model's outputs is nearly flat (a KL over it teaches nothing); each
    sigmoid is its own two-class distribution, softened by ``T`` and ``T^2``-scaled as in Hinton et al.
    """
    target = torch.sigmoid(teacher.detach() / T)
    return F.binary_cross_entropy_with_logits(student / T, target) * (T * T)


@DISTILL_FORMS.register("mse")
def soft_mse(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """The outputs themselves matched (logit matching, Ba & Caruana 2014; values, for regression)."""
    return F.mse_loss(student, teacher.detach())


@DISTILL_FORMS.register("none")
def soft_none(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """No output term (feature pairs, if any, still teach)."""
    return student.new_zeros(())
