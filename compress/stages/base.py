"""The stage interface: a small class with a typed ``Config`` and ``apply(model, ctx)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from compress.config import (
    DistillConfig,
    FeaturePairConfig,
    FinetuneConfig,
    OptimizerConfig,
    validate_finetune,
)
from compress.distill import build_objective
from compress.errors import UserError
from compress.metrics.counting import listed_layers, untouched_note
from compress.registry import Registry
from compress.schema import match_layers
from compress.stage_configs import make_stage_config
from compress.tasks import Task, build_task

__all__ = ["OptimizerConfig", "FinetuneConfig", "DistillConfig", "FeaturePairConfig", "Stage", "StageResult",
           "Context", "STAGES", "MISSING", "match_layers", "validate_finetune", "untouched_notes",
           "listed_layers"]


@dataclass
class StageResult:
    """What a stage did: the (possibly new) model and a few facts for the report."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


class Context:
    """What a stage may use besides its own config: data, training, teacher, files.

    Every field is optional, so stages run from Python on a bare model: ``stage.apply(model)``.
    """

    def __init__(self, datamodule: Any = None, *, out_dir: str | Path | None = None,
                 trainer: dict[str, Any] | None = None, seed: int = 0, reference_model: nn.Module | None = None,
                 loggers: Sequence[Any] = (), stage_index: int = 0, stage_name: str = "stage",
                 teachers_dir: str | Path = "teachers", latency_batch: int | None = None,
                 latency_threads: int = 1, model_spec: dict[str, Any] | None = None,
                 trust_model_code: bool = False, task: Task | None = None):
        self.datamodule = datamodule
        self.task = task if task is not None else build_task(None)  # judges the model: loss, metrics, distillation
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.trainer = dict(trainer or {})
        self.seed = seed
        self.reference_model = reference_model  # the model before compression (``teacher: self``)
        self.loggers = list(loggers)
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.teachers_dir = Path(teachers_dir)
        self.latency_batch = latency_batch  # the batch latency is measured at (eval.latency_batch_size)
        self.latency_threads = latency_threads  # intra-op threads of every timing (eval.latency_threads)
        self.fits = 0  # fine-tuning runs so far in this stage (each has its own resumable checkpoint)
        self.model_spec = model_spec  # the recipe's model: a teacher checkpoint naming its code may be built
        self.trust_model_code = trust_model_code  # --trust-model-code: build any code a teacher file names

    def begin_stage(self, index: int, name: str) -> None:
        self.stage_index, self.stage_name, self.fits = index, name, 0

    def stage_checkpoint_dir(self, index: int | None = None) -> Path | None:
        """Where the Lightning checkpoints of a stage's fine-tuning runs live (None: not kept)."""
        if self.out_dir is None:
            return None
        return self.out_dir / "lightning" / f"stage-{self.stage_index if index is None else index}"

    def _data(self, what: str) -> Any:
        """The data package (its modules are Lightning classes, loaded when data is first used)."""
        if self.datamodule is None:
            raise UserError(f"this stage needs {what}: pass Context(datamodule=...)")
        import compress.data  # Lightning loads with the data, not when a recipe is validated

        return compress.data

    def example_inputs(self, batch_size: int = 2):
        """A batch of real inputs (for tracing graphs), from the data module's test split."""
        return self._data("example inputs").example_batch(self.datamodule, batch_size)[0]

    def training_inputs(self, batches: int) -> list:
        """The inputs of the first ``batches`` training batches (int8 calibration)."""
        return self._data("training data").training_inputs(self.datamodule, batches)

    def finetune(self, model: nn.Module, cfg: FinetuneConfig, callbacks: Sequence[Any] = (),
                 tag: str = "finetune", objective: nn.Module | None = None) -> dict[str, float]:
        """Train ``model`` in place by ``cfg`` (Lightning); a no-op when ``cfg.epochs`` is 0.

        The loss is ``objective`` when given, else the distillation objective of ``cfg.distill``
        (teacher resolved from this context), else the loss of the context's task.
        """
        if cfg.epochs <= 0:
            return {}
        if self.datamodule is None:
            raise UserError("finetune.epochs > 0 needs data: pass Context(datamodule=...)")
        from compress.lit.fit import (  # Lightning loads only when a stage trains (fast --help, recipe errors)
            begin_fit,
            fit,
        )

        begin_fit(self)
        if objective is None and cfg.distill is not None:
            objective = build_objective(model, cfg.distill, self)
        return fit(model, self, cfg, objective, callbacks=callbacks, tag=tag)


def untouched_notes(model: nn.Module, ctx: Context, can_touch: Any, example_inputs: Any = None) -> list[str]:
    """A note naming the share of parameters in layers a stage cannot touch (``can_touch``: names of the
    layers it can), found by what they compute (:func:`compress.metrics.counting.weight_readers`);
    none without example inputs (from Python with no data) or when every such layer can be touched."""
    if example_inputs is None:
        if getattr(ctx, "datamodule", None) is None:  # from Python on a bare model (or a stand-in context)
            return []
        example_inputs = ctx.example_inputs(batch_size=1)
    note = untouched_note(model, example_inputs, can_touch)
    return [note] if note else []


STAGES: Registry[type[Stage]] = Registry("stage type")


class Stage:
    """Base class. Subclasses set ``Config`` (a dataclass) and implement :meth:`apply`.

    ``Stage(**kwargs)`` or ``Stage(config)`` validates against ``Config`` the same way a recipe
    block does (wrong keys and types raise :class:`UserError` naming the key).
    """

    Config: ClassVar[type] = dataclass(type("Config", (), {}))
    type_name: ClassVar[str] = ""

    def __init__(self, config: Any = None, /, *, key: str = "", name: str = "", **kwargs: Any):
        self.key = key or self.type_name  # where the stage sits in the recipe, for error messages
        self.name = name or self.type_name
        self.config = self.make_config(config if config is not None else kwargs, self.key)
        if "finetune" in self.config:
            validate_finetune(self.config.finetune, f"{self.key}.finetune")
        self.validate()

    @classmethod
    def make_config(cls, values: Any, key: str = "") -> Any:
        """Merge ``values`` into the structured ``Config``; returns a read-only DictConfig."""
        return make_stage_config(cls.Config, values, key or cls.type_name or cls.__name__)

    def validate(self) -> None:
        """Checks beyond types (ranges, consistency); raise UserError naming the key.

        The base runs the ``Config``'s own ``check`` (:mod:`compress.stage_configs`: what a recipe's
        load checks before torch); subclasses add what needs a capability (registry names).
        """
        check = getattr(self.Config, "check", None)
        if check is not None:
            check(self.config, self.key)

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """Names of the layers this stage touches (for ``--dry-run``); ``example_inputs``: a real batch, if any."""
        return []

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:  # pragma: no cover
        raise NotImplementedError

    @property
    def finetune_config(self) -> FinetuneConfig:
        ft = self.config.get("finetune") if isinstance(self.config, DictConfig) else None
        return OmegaConf.to_object(ft) if ft is not None else FinetuneConfig()
