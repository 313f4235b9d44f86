"""The stage interface: a small class with a typed ``Config`` and ``apply(model, ctx)``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

from compress.errors import UserError
from compress.registry import Registry

__all__ = ["OptimizerConfig", "FinetuneConfig", "DistillConfig", "FeaturePairConfig", "Stage", "StageResult",
           "Context", "STAGES", "MISSING", "match_layers"]


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False


@dataclass
class FeaturePairConfig:
    student: str = MISSING  # module path in the student, e.g. "layer2.0"
    teacher: str = MISSING  # module path in the teacher
    kind: str = "hint"  # hint (FitNets, adapter + MSE) | attention (Zagoruyko & Komodakis)
    weight: float = 1.0


@dataclass
class DistillConfig:
    """Knowledge distillation as a fine-tuning objective (Hinton et al. 2015; FitNets)."""

    teacher: str = "self"  # self | a name under teachers/ | a checkpoint path
    T: float = 4.0
    alpha: float = 0.9  # weight of the soft (KD) term; (1 - alpha) on the hard labels
    features: list[FeaturePairConfig] = field(default_factory=list)


@dataclass
class FinetuneConfig:
    epochs: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_schedule: str = "cosine"  # none | cosine | step
    distill: DistillConfig | None = None
    limit_train_batches: float = 1.0  # fraction of the training batches per epoch (quick tests)


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
                 teachers_dir: str | Path = "teachers"):
        self.datamodule = datamodule
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.trainer = dict(trainer or {})
        self.seed = seed
        self.reference_model = reference_model  # the model before compression (``teacher: self``)
        self.loggers = list(loggers)
        self.stage_index = stage_index
        self.stage_name = stage_name
        self.teachers_dir = Path(teachers_dir)
        self.fits = 0  # fine-tuning runs so far in this stage (each has its own resumable checkpoint)

    def begin_stage(self, index: int, name: str) -> None:
        self.stage_index, self.stage_name, self.fits = index, name, 0

    def stage_checkpoint_dir(self, index: int | None = None) -> Path | None:
        """Where the Lightning checkpoints of a stage's fine-tuning runs live (None: not kept)."""
        if self.out_dir is None:
            return None
        return self.out_dir / "lightning" / f"stage-{self.stage_index if index is None else index}"

    def example_inputs(self, batch_size: int = 2):
        """A batch of real inputs (for tracing graphs), from the data module's test split."""
        from compress.data import example_batch

        if self.datamodule is None:
            raise UserError("this stage needs example inputs: pass Context(datamodule=...)")
        return example_batch(self.datamodule, batch_size)[0]

    def finetune(self, model: nn.Module, cfg: FinetuneConfig, callbacks: Sequence[Any] = (),
                 tag: str = "finetune") -> dict[str, float]:
        """Train ``model`` in place by ``cfg`` (Lightning); a no-op when ``cfg.epochs`` is 0."""
        if cfg.epochs <= 0:
            return {}
        if self.datamodule is None:
            raise UserError("finetune.epochs > 0 needs data: pass Context(datamodule=...)")
        from compress.lit.fit import fit

        return fit(model, self, cfg, callbacks=callbacks, tag=tag)


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
        if isinstance(values, DictConfig) and OmegaConf.is_readonly(values):
            return values
        """Merge ``values`` into the structured ``Config``; returns a read-only DictConfig."""
        from compress.recipe import merge_structured

        return merge_structured(cls.Config, values, key or cls.type_name or cls.__name__)

    def validate(self) -> None:
        """Checks beyond types (ranges, consistency); raise UserError naming the key."""

    def plan(self, model: nn.Module) -> list[str]:
        """Names of the layers this stage touches (for ``--dry-run``)."""
        return []

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:  # pragma: no cover
        raise NotImplementedError

    @property
    def finetune_config(self) -> FinetuneConfig:
        ft = self.config.get("finetune") if isinstance(self.config, DictConfig) else None
        return OmegaConf.to_object(ft) if ft is not None else FinetuneConfig()



def validate_finetune(cfg: Any, key: str) -> None:
    """Range checks for a FinetuneConfig-shaped block (types are checked by the schema)."""
    from compress.recipe import check_choice, check_range

    if cfg.epochs < 0:
        raise UserError(f"{key}.epochs: {cfg.epochs} must be >= 0")
    check_choice(cfg.optimizer.name, f"{key}.optimizer.name", ("sgd", "adam", "adamw"))
    if not cfg.optimizer.lr > 0:
        raise UserError(f"{key}.optimizer.lr: {cfg.optimizer.lr} must be > 0")
    check_range(cfg.optimizer.momentum, f"{key}.optimizer.momentum", 0.0, 1.0)
    if cfg.optimizer.weight_decay < 0:
        raise UserError(f"{key}.optimizer.weight_decay: {cfg.optimizer.weight_decay} must be >= 0")
    check_choice(cfg.lr_schedule, f"{key}.lr_schedule", ("none", "cosine", "step"))
    check_range(cfg.limit_train_batches, f"{key}.limit_train_batches", 0.0, 1.0, hi_open=False, lo_open=True)
    if cfg.distill is not None:
        check_range(cfg.distill.alpha, f"{key}.distill.alpha", 0.0, 1.0, hi_open=False)
        if not cfg.distill.T > 0:
            raise UserError(f"{key}.distill.T: {cfg.distill.T} must be > 0")


def match_layers(names: Sequence[str], patterns: Sequence[str] | dict[str, Any], key: str) -> dict[str, str]:
    """Map each layer name to the first pattern (exact name or glob) that matches it.

    A pattern that matches no layer is a recipe mistake: UserError naming ``key`` and the nearest name.
    """
    from fnmatch import fnmatchcase

    from compress.errors import nearest

    out: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            near = nearest(pattern, names)
            hint = f" (did you mean '{near}'?)" if near else ""
            raise UserError(f"{key}: '{pattern}' matches no layer{hint}; layers: {', '.join(names)}")
        for n in hits:
            out.setdefault(n, pattern)
    return out
