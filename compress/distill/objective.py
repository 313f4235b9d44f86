"""DistillationObjective: the loss of a student taught by a frozen teacher, logits and features."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from compress.calls import describe_inputs, eval_mode, first_tensor, forward, to_device
from compress.config import FeaturePairConfig
from compress.distill.hooks import capture_outputs, find_module
from compress.distill.losses import FEATURE_LOSSES, KD_LOSSES
from compress.distill.teacher import resolve_teacher
from compress.errors import UserError

__all__ = ["DistillationObjective", "build_objective", "feature_pairs", "check_feature_paths"]


def feature_pairs(features: Iterable[Any] | None) -> list[FeaturePairConfig]:
    """Normalise feature pairs given as configs, dicts or tuples ``(student, teacher[, kind[, weight]])``."""
    pairs = []
    for f in features or ():
        if isinstance(f, FeaturePairConfig):
            pairs.append(f)
        elif isinstance(f, Sequence) and not isinstance(f, str):
            pairs.append(FeaturePairConfig(*f))
        else:  # dict or DictConfig
            pairs.append(FeaturePairConfig(**{k: f[k] for k in ("student", "teacher", "kind", "weight") if k in f}))
    return pairs


def check_feature_paths(student: nn.Module, teacher: nn.Module | None, features: Iterable[Any] | None,
                        key: str = "distill") -> None:
    """UserError naming ``<key>.features[i].student|teacher|kind`` for a path or kind that does not exist.

    ``teacher`` None checks the student side only (e.g. before a named teacher is loaded).
    """
    for i, pair in enumerate(feature_pairs(features)):
        find_module(student, pair.student, f"{key}.features[{i}].student", "student")
        if teacher is not None:
            find_module(teacher, pair.teacher, f"{key}.features[{i}].teacher", "teacher")
        FEATURE_LOSSES.get(pair.kind, f"{key}.features[{i}].kind")


class DistillationObjective(nn.Module):
    """``objective(model, x, y) -> (loss, student_logits, parts)`` for a student taught by ``teacher``.

    ``loss = alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) * CE(student, y)
    + sum_i weight_i * feature_loss_i`` (Hinton et al. 2015; FitNets, Romero et al. 2015;
    attention transfer, Zagoruyko & Komodakis 2017). ``parts`` holds each term detached, for
    logging: ``hard``, ``soft`` and ``feat/<student path>``.

    The teacher runs in eval mode under ``no_grad`` on the same batch; its parameters are frozen
    and it is *not* a registered submodule (it stays out of ``parameters()``, optimizers and
    ``state_dict``); it follows the student's device on first use. Feature adapters *are*
    submodules: give ``objective.parameters()`` to the optimizer with the student's. They are
    created here, from one forward pass of ``example_inputs`` through both models (required when
    ``features`` is not empty), so an optimizer built afterwards sees them.

    Example (a plain PyTorch loop)::

        from compress.distill import DistillationObjective

        objective = DistillationObjective(student, teacher, T=4.0, alpha=0.9,
                                          features=[("layer2", "layer3", "hint", 1.0)],
                                          example_inputs=next(iter(loader))[0])
        opt = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.05, momentum=0.9)
        for x, y in loader:
            loss, logits, parts = objective(student, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        # after training, the adapters are no longer needed: drop the objective.

    Args:
        student: the model that will be trained (used here for path checks and the dry run;
            not stored).
        teacher: the teacher module (frozen in place: ``requires_grad_(False)``).
        T: softmax temperature of the soft targets.
        alpha: weight of the soft term; ``1 - alpha`` weighs the hard-label cross-entropy.
        features: pairs ``(student path, teacher path, kind, weight)`` as tuples, dicts or
            :class:`FeaturePairConfig`; ``kind`` is a key of ``FEATURE_LOSSES``.
        example_inputs: a batch of inputs for the dry run that observes feature shapes.
        logit_loss: a key of ``KD_LOSSES`` or a module with the same call signature.
        key: the recipe path for error messages (e.g. ``stages[2].finetune.distill``).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, *, T: float = 4.0, alpha: float = 0.9,
                 features: Iterable[Any] | None = None, example_inputs: Tensor | None = None,
                 logit_loss: str | nn.Module = "kd", key: str = "distill"):
        super().__init__()
        if teacher is student:
            raise UserError(f"{key}.teacher: the teacher is the student itself; use a copy "
                            "(teacher: self means the model as it was before compression)")
        # Stored outside nn.Module's registry: not a parameter owner, not in state_dict.
        object.__setattr__(self, "teacher", teacher)
        teacher.eval().requires_grad_(False)
        cls = KD_LOSSES.resolve(logit_loss, f"{key}.loss")
        self.logit_loss = cls(T=T, alpha=alpha) if isinstance(cls, type) else cls
        self.pairs = feature_pairs(features)
        self.key = key
        check_feature_paths(student, teacher, self.pairs, key)
        self.feature_losses = nn.ModuleList()
        if self.pairs and example_inputs is None:
            raise UserError(f"{key}.features: feature pairs need example_inputs (a batch) to create their adapters")
        if example_inputs is not None:
            self._dry_run(student, example_inputs)

    @property
    def student_paths(self) -> list[str]:
        return [p.student for p in self.pairs]

    @property
    def teacher_paths(self) -> list[str]:
        return [p.teacher for p in self.pairs]

    def _teacher_on(self, device: torch.device) -> nn.Module:
        teacher = self.teacher
        p = next(teacher.parameters(), None)
        if p is not None and p.device != device:
            teacher.to(device)
        return teacher.eval()

    @torch.no_grad()
    def _dry_run(self, student: nn.Module, x: Tensor) -> None:
        """One forward of both models on ``x``: check they fit together, create the feature losses."""
        device = next((p.device for p in student.parameters()), first_tensor(x).device)
        x = to_device(x, device)
        teacher = self._teacher_on(device)
        # eval: no BatchNorm statistics updated by this look-ahead
        with eval_mode(student):
            with capture_outputs(student, self.student_paths, role="student") as s_feats, \
                    capture_outputs(teacher, self.teacher_paths, role="teacher") as t_feats:
                s_logits = forward(student, x)
                try:
                    t_logits = forward(teacher, x)
                except (RuntimeError, TypeError) as e:
                    raise UserError(f"{self.key}.teacher: the teacher does not accept the student's inputs "
                                    f"{describe_inputs(x)}: {str(e).splitlines()[0][:160]}") from None
                if s_logits.shape != t_logits.shape:
                    raise UserError(f"{self.key}.teacher: the teacher's outputs have shape {tuple(t_logits.shape)}, "
                                    f"the student's {tuple(s_logits.shape)}; they must predict the same classes")
                for i, pair in enumerate(self.pairs):
                    factory = FEATURE_LOSSES.get(pair.kind, f"{self.key}.features[{i}].kind")
                    loss = factory(tuple(s_feats[pair.student].shape), tuple(t_feats[pair.teacher].shape),
                                   f"{self.key}.features[{i}]")
                    self.feature_losses.append(loss.to(device))

    def forward(self, model: nn.Module, x: Any, y: Any) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        teacher = self._teacher_on(first_tensor(x).device)
        with torch.no_grad(), capture_outputs(teacher, self.teacher_paths, role="teacher") as t_feats:
            t_logits = forward(teacher, x)
            t_feats = dict(t_feats)  # this step's features only: dropped when forward returns
        with capture_outputs(model, self.student_paths, role="student") as s_feats:
            s_logits = forward(model, x)
            loss, terms = self.logit_loss(s_logits, t_logits, y)
            parts = {name: value.detach() for name, value in terms.items()}
            for pair, feature_loss in zip(self.pairs, self.feature_losses, strict=True):
                term = feature_loss(s_feats[pair.student], t_feats[pair.teacher])
                loss = loss + pair.weight * term
                parts[f"feat/{pair.student}"] = term.detach()
        return loss, s_logits, parts

    def extra_repr(self) -> str:
        return f"teacher={type(self.teacher).__name__}"


def default_key(ctx: Any) -> str:
    """The recipe path of the distillation block of the current stage's fine-tuning."""
    explicit = getattr(ctx, "distill_key", None)
    if explicit:
        return explicit
    index = getattr(ctx, "stage_index", 0)
    return f"stages[{index - 1}].finetune.distill" if index and index > 0 else "distill"


def build_objective(student: nn.Module, cfg: Any, ctx: Any, key: str | None = None) -> DistillationObjective:
    """The objective for a ``DistillConfig`` (dataclass or DictConfig) in a pipeline context.

    Resolves ``cfg.teacher`` (``self`` -> ``ctx.reference_model``, a name under
    ``ctx.teachers_dir``, a checkpoint path) and runs the dry forward on ``ctx.example_inputs()``.
    The output term is the task's (``ctx.task``: softmax KL for classes, softened sigmoids for
    labels, token-level KL for a language model, MSE for values); Hinton et al.'s KD without one.
    """
    key = key or default_key(ctx)
    teacher = resolve_teacher(cfg.teacher, ctx, f"{key}.teacher")
    example = ctx.example_inputs(8) if getattr(ctx, "datamodule", None) is not None else None
    task = getattr(ctx, "task", None)
    logit_loss = task.distill_loss(float(cfg.T), float(cfg.alpha)) if task is not None else "kd"
    return DistillationObjective(student, teacher, T=float(cfg.T), alpha=float(cfg.alpha),
                                 features=list(cfg.features or ()), example_inputs=example, key=key,
                                 logit_loss=logit_loss)
