"""``Task``: what a model is judged by — its loss, its metrics and their direction, its distillation.

A task owns every judgement the pipeline makes about a model's outputs (house style 12): code outside
a task never writes ``cross_entropy`` or ``argmax(1) == y``. The same task object judges eager
PyTorch, ONNX Runtime outputs and the export gate, through :meth:`Task.evaluate`.

A task is built from the recipe's ``task:`` section (:func:`build_task`): ``name`` picks the class in
``TASKS``; the other keys are its typed ``Config`` (a :class:`TaskConfig` subclass), each overriding
the task's default: ``loss``, ``metrics``, ``primary``, ``higher_is_better``, ``distill``.

A user's task is ``name: import:pkg.mod:Name``, a subclass of :class:`Task`::

    class PitchTask(Task):
        default_loss = "bce"
        default_primary = "rpa50"
        default_distill = "bce"

        def default_metrics(self):
            return {"rpa50": MetricSpec(RawPitchAccuracy)}

torchmetrics loads when metrics are first built (it imports much of the ecosystem: seconds), so
building a task to validate a recipe stays cheap; a recipe naming metrics loads it to check them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from compress.calls import batch_size, eval_mode, forward, to_device
from compress.errors import UserError, nearest, suggest
from compress.registry import IMPORT_PREFIX, import_object
from compress.schema import merge_structured
from compress.tasks._registry import DISTILL_FORMS, LOSSES, TASKS

if TYPE_CHECKING:
    import torchmetrics

__all__ = ["TaskConfig", "MetricSpec", "Task", "TaskDistillLoss", "build_task", "resolve_metric", "evaluate_model"]

# Where a metric class named in a recipe is looked up, in order: torchmetrics', then the tasks' own.
_METRIC_MODULES = ("torchmetrics", "torchmetrics.classification", "torchmetrics.regression", "torchmetrics.text",
                   "compress.tasks.metrics")
# Constructor arguments filled from the model's output width when the recipe does not give them.
_WIDTH_ARGS = ("num_classes", "num_labels")


@dataclass
class TaskConfig:
    """The recipe's ``task:`` section; every key but ``name`` overrides the task's default."""

    name: str = "classification"  # a key of TASKS or import:pkg.mod:Name
    loss: str | None = None  # a key of LOSSES or import:pkg.mod:callable, (outputs, targets) -> scalar
    # name -> torchmetrics class name | import:pkg.mod:Metric | {name: <that>, <its kwargs>}
    metrics: dict[str, Any] | None = None
    primary: str | None = None  # the metric that decides (stage `metric`, max_accuracy_drop, Pareto fronts)
    higher_is_better: bool | None = None  # default: the primary metric's own attribute
    distill: str | None = None  # kl | bce | mse | none: the output term of distillation


@dataclass
class MetricSpec:
    """A torchmetrics class (or ``"module:Name"``, imported when first needed) and its kwargs.

    ``min_width`` skips it for models with fewer outputs; ``higher_is_better`` states the class's own
    direction where naming it by string should not import it to ask (a test keeps the two equal).
    """

    cls: type | str
    kwargs: dict[str, Any] = field(default_factory=dict)
    min_width: int = 0
    higher_is_better: bool | None = None

    @property
    def metric_class(self) -> type:
        if isinstance(self.cls, str):
            module, _, name = self.cls.partition(":")
            self.cls = getattr(importlib.import_module(module), name)
        return self.cls

    @property
    def direction(self) -> bool | None:
        """True when a higher value is better; None when neither the spec nor the class says."""
        return self.higher_is_better if self.higher_is_better is not None else self.metric_class.higher_is_better

    def build(self, width: int | None) -> torchmetrics.Metric:
        kwargs = dict(self.kwargs)
        params = inspect.signature(self.metric_class.__init__).parameters
        for name in _WIDTH_ARGS:
            if name in params and name not in kwargs and width is not None:
                kwargs[name] = width
        return self.metric_class(**kwargs)


def resolve_metric(value: Any, key: str) -> MetricSpec:
    """A recipe's metric entry (a class name, ``import:``, or ``{name: ..., kwargs}``) -> MetricSpec."""
    import torchmetrics  # here, not at module level: seconds to import, needed only when a recipe names metrics

    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    kwargs: dict[str, Any] = {}
    if isinstance(value, Mapping):
        kwargs = dict(value)
        value = kwargs.pop("name", None)
        key = f"{key}.name"
        if value is None:
            raise UserError(f"{key}: required value is missing (a torchmetrics class name or import:pkg.mod:Metric)")
    if not isinstance(value, str):
        raise UserError(f"{key}: expected a torchmetrics class name or import:pkg.mod:Metric, got {value!r}")
    if value.startswith(IMPORT_PREFIX):
        cls = import_object(value, key)
    else:
        found = [getattr(importlib.import_module(m), value, None) for m in _METRIC_MODULES]
        cls = next((c for c in found if c is not None), None)
        if cls is None:
            near = nearest(value, [n for n in dir(torchmetrics) if isinstance(getattr(torchmetrics, n), type)])
            hint = f"did you mean '{near}'?" if near else "give a class name such as MeanAbsoluteError or import:pkg.mod:Metric"
            raise UserError(f"{key}: torchmetrics has no metric '{value}'; {hint}")
    if not (isinstance(cls, type) and issubclass(cls, torchmetrics.Metric)):
        raise UserError(f"{key}: '{value}' is not a torchmetrics.Metric class")
    return MetricSpec(cls, kwargs)


class Task:
    """Loss, metrics and distillation of one kind of model output. Subclasses set the defaults and
    the three views of a batch: :meth:`loss_inputs`, :meth:`metric_inputs`, :meth:`distill_rows`."""

    Config: ClassVar[type] = TaskConfig
    default_loss: ClassVar[str] = "mse"
    default_primary: ClassVar[str] = ""
    default_distill: ClassVar[str] = "mse"
    has_classes: ClassVar[bool] = False  # outputs are one score per class: the data's class count must match

    def __init__(self, config: Any = None, key: str = "task"):
        if not (isinstance(config, DictConfig) and OmegaConf.is_readonly(config)):
            config = merge_structured(type(self).Config, config, key)
        self.config, self.key = config, key
        c = config
        loss = LOSSES.get(c.loss or self.default_loss, f"{key}.loss")
        self.loss_fn: Callable[[Any, Any], Tensor] = loss() if isinstance(loss, type) else loss
        if not callable(self.loss_fn):
            raise UserError(f"{key}.loss: '{c.loss}' is not callable; give a function (outputs, targets) -> scalar")
        self.distill_form = c.distill or self.default_distill
        DISTILL_FORMS.get(self.distill_form, f"{key}.distill")
        if c.metrics is not None:
            if not c.metrics:
                raise UserError(f"{key}.metrics: no metric given; name at least one (name: torchmetrics class)")
            self.specs = {str(n): resolve_metric(v, f"{key}.metrics.{n}") for n, v in c.metrics.items()}
        else:
            self.specs = self.default_metrics()
        self.primary = c.primary or (self.default_primary if self.default_primary in self.specs else next(iter(self.specs)))
        if self.primary not in self.specs:
            raise UserError(f"{key}.primary: '{self.primary}' is not one of the task's metrics; "
                            f"{suggest(self.primary, self.specs)}")
        hib = c.higher_is_better if c.higher_is_better is not None else self.specs[self.primary].direction
        if hib is None:
            raise UserError(f"{key}.higher_is_better: the metric '{self.primary}' does not say its direction; "
                            "set task.higher_is_better: true or false")
        self.higher_is_better = bool(hib)

    @property
    def name(self) -> str:
        return str(self.config.name)

    # -- what a subclass defines ------------------------------------------------------------------
    def default_metrics(self) -> dict[str, MetricSpec]:
        """The task's metrics when the recipe names none."""
        raise NotImplementedError(f"{type(self).__name__} defines no default metrics; give task.metrics")

    def width(self, outputs: Any) -> int | None:
        """Outputs per sample that metrics are sized by (classes, labels, vocabulary); None if none."""
        return None

    def loss_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """``(outputs, targets)`` as the loss takes them."""
        return outputs, targets

    def metric_inputs(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        """``(preds, target)`` as every metric's ``update`` takes them."""
        return self.loss_inputs(outputs, targets)

    def distill_rows(self, outputs: Tensor) -> Tensor:
        """``(N, K)`` rows the distillation form compares, student against teacher."""
        return outputs.flatten(1)

    # -- what every task does ---------------------------------------------------------------------
    def loss(self, outputs: Any, targets: Any) -> Tensor:
        return self.loss_fn(*self.loss_inputs(outputs, targets))

    def metrics(self, width: int | None = None) -> dict[str, torchmetrics.Metric]:
        """Fresh metric objects, sized by ``width`` (the model's outputs per sample)."""
        return {name: spec.build(width) for name, spec in self.specs.items()
                if width is None or spec.min_width <= width}

    def drop(self, before: float, after: float) -> float:
        """How much worse ``after`` is than ``before`` (positive: worse), in the primary metric's units."""
        return before - after if self.higher_is_better else after - before

    def better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def distill_loss(self, T: float = 4.0, alpha: float = 0.9) -> TaskDistillLoss:
        return TaskDistillLoss(self, T, alpha)

    @torch.no_grad()
    def evaluate(self, predict: Callable[[Any], Tensor], batches: Iterable[Any],
                 max_batches: int | None = None) -> dict[str, float]:
        """Scores of ``predict`` (inputs -> outputs) over ``(inputs, targets)`` batches.

        ``{"metric": the primary value, "loss": the mean loss per sample, "metrics/<name>": each}``.
        """
        metrics: dict[str, torchmetrics.Metric] | None = None
        loss_sum, total = 0.0, 0
        for i, (x, y) in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            outputs = predict(x)
            y = to_device(y, outputs.device)
            if metrics is None:
                # float64 results: a reported fraction is k / n exactly as before (float32 rounds it at 1e-8)
                metrics = {k: m.to(outputs.device).set_dtype(torch.float64)
                           for k, m in self.metrics(self.width(outputs)).items()}
            n = batch_size(y)
            loss_sum += float(self.loss(outputs, y)) * n
            total += n
            preds, target = self.metric_inputs(outputs, y)
            for m in metrics.values():
                m.update(preds, target)
        if metrics is None:
            raise UserError("data: the test data loader yielded no batches to evaluate on")
        scores = {name: float(m.compute()) for name, m in metrics.items()}
        return {"metric": scores[self.primary], "loss": loss_sum / total,
                **{f"metrics/{name}": v for name, v in scores.items()}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(primary={self.primary}, higher_is_better={self.higher_is_better})"


class TaskDistillLoss(nn.Module):
    """``alpha * T^2-form(student, teacher) + (1 - alpha) * task loss``: Hinton et al.'s mix in the task's form.

    Called as the distillation objective's logit loss: ``(student_out, teacher_out, targets) ->
    (loss, {"hard": ..., "soft": ...})``. With form ``none`` the loss is the task loss alone.
    """

    def __init__(self, task: Task, T: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if not T > 0:
            raise ValueError(f"T must be > 0, got {T}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.task, self.T, self.alpha = task, float(T), float(alpha)
        self.soft_fn = DISTILL_FORMS.get(task.distill_form)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any) -> tuple[Tensor, dict[str, Tensor]]:
        hard = self.task.loss(student, targets)
        soft = self.soft_fn(self.task.distill_rows(student), self.task.distill_rows(teacher), self.T)
        if self.task.distill_form == "none":
            return hard, {"hard": hard, "soft": soft}
        return self.alpha * soft + (1.0 - self.alpha) * hard, {"hard": hard, "soft": soft}

    def extra_repr(self) -> str:
        return f"form={self.task.distill_form}, T={self.T:g}, alpha={self.alpha:g}"


def build_task(cfg: Any = None, key: str = "task") -> Task:
    """The task of a recipe's ``task:`` section (None or {}: classification, today's behaviour)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg or {})
    if not isinstance(cfg.get("name", "classification"), str):
        raise UserError(f"{key}.name: expected a task name, got {cfg['name']!r}; {suggest('', TASKS.names())}")
    cls = TASKS.get(cfg.get("name", "classification"), f"{key}.name")
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise UserError(f"{key}.name: '{cfg['name']}' is not a compress.tasks.Task subclass")
    return cls(cfg, key)


def evaluate_model(task: Task, model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> dict[str, Any]:
    """:meth:`Task.evaluate` of an eager model (eval mode for the pass, its mode restored after).

    Also ``nonfinite_outputs``: how many inputs gave an output holding a NaN or an infinity; when
    there are any, ``"nonfinite"`` says which (``"NaN"``, else ``"inf"``): the scores of such a model
    measure its arithmetic failing, not what it learned, and the caller says so.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = {"nonfinite": 0, "nan": 0}

    def predict(x: Any) -> Tensor:
        out = forward(model, to_device(x, device))
        per_input = out.detach().reshape(out.shape[0], -1) if out.dim() else out.detach().reshape(1, 1)
        seen["nonfinite"] += int((~torch.isfinite(per_input).all(1)).sum())  # (B,) -> count
        seen["nan"] += int(torch.isnan(per_input).any())
        return out

    with eval_mode(model):
        scores: dict[str, Any] = task.evaluate(predict, batches, max_batches)
    scores["nonfinite_outputs"] = seen["nonfinite"]
    if seen["nonfinite"]:
        scores["nonfinite"] = "NaN" if seen["nan"] else "inf"
    return scores
