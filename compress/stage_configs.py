"""Every built-in stage's typed ``Config`` and its range checks, registered by stage type; no torch.

A recipe's stage blocks are checked here (unknown keys, wrong types, values out of range, via
OmegaConf structured configs) before torch loads, so a misspelt key answers at once. The stage
classes (:mod:`compress.stages`) take their ``Config`` from here and add the checks that need a
capability: registry names (importance criteria, feature losses, latency targets, bit widths).
Each ``Config`` has ``check(cfg, key)``: the range checks of a merged, read-only config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf

from compress.config import DistillConfig, FinetuneConfig, validate_finetune
from compress.errors import UserError
from compress.registry import Registry
from compress.schema import check_choice, check_latency_batch, check_range, merge_structured

__all__ = ["STAGE_CONFIGS", "make_stage_config", "check_stage_config", "TrainConfig", "EvaluateConfig",
           "UnstructuredConfig", "StructuredConfig", "RegularizeConfig", "ShareConfig", "DistillStageConfig",
           "QuantizeConfig", "LAYER_TYPES"]

STAGE_CONFIGS: Registry[type] = Registry("stage type")

# share's `types` keys -> the module classes they cover
LAYER_TYPES = {"conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d"), "linear": ("Linear", "Conv1D")}  # Conv1D: Hugging Face GPT-2's linear layers


def make_stage_config(config: type, values: Any, key: str) -> DictConfig:
    """``values`` merged into ``config`` (read-only; a read-only DictConfig is taken as merged already).

    A recipe key that cannot be a field name (``global``) is read as the field ``config.RECIPE_KEYS``
    maps it to.
    """
    if isinstance(values, DictConfig) and OmegaConf.is_readonly(values):
        return values
    renamed: dict[str, str] = getattr(config, "RECIPE_KEYS", {})
    if renamed and isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if renamed and isinstance(values, dict):
        values = dict(values)
        for recipe_key, name in renamed.items():
            if recipe_key in values:
                if name in values:
                    raise UserError(f"{key}.{recipe_key}: give `{recipe_key}` or `{name}`, not both")
                values[name] = values.pop(recipe_key)
    return merge_structured(config, values, key)


def check_stage_config(config: type, cfg: DictConfig, key: str) -> None:
    """The range checks of a merged stage config: its ``finetune`` block, then ``config.check``."""
    if "finetune" in cfg:
        validate_finetune(cfg.finetune, f"{key}.finetune")
    check = getattr(config, "check", None)
    if check is not None:
        check(cfg, key)


@STAGE_CONFIGS.register("train")
@dataclass
class TrainConfig(FinetuneConfig):
    """``train``: the fine-tuning block itself (epochs, optimizer, schedule, distill)."""

    @staticmethod
    def check(c: Any, key: str) -> None:
        validate_finetune(c, key)


@STAGE_CONFIGS.register("evaluate")
@dataclass
class EvaluateConfig:
    pass


@STAGE_CONFIGS.register("prune.unstructured")
@dataclass
class UnstructuredConfig:
    sparsity: float | None = None  # target fraction of zero weights (per layer, or overall if global)
    layers: dict[str, float] = field(default_factory=dict)  # name/glob -> sparsity, overrides `sparsity`
    scope: str = "layer"  # layer | global
    criterion: str = "magnitude"  # magnitude | std (Han et al.: |w| < quality * std(w))
    quality: float = 1.0  # the std criterion's multiplier
    schedule: str = "oneshot"  # oneshot | iterative | agp
    steps: int = 0  # pruning steps of a gradual schedule (0: one per ramp epoch)
    ramp: float = 0.75  # fraction of the fine-tuning over which a gradual schedule reaches its target
    ignore: list[str] = field(default_factory=list)  # layer names/globs left dense
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @staticmethod
    def check(c: Any, key: str) -> None:
        check_choice(c.scope, f"{key}.scope", ("layer", "global"))
        check_choice(c.criterion, f"{key}.criterion", ("magnitude", "std"))
        check_choice(c.schedule, f"{key}.schedule", ("oneshot", "iterative", "agp"))
        if c.criterion == "magnitude" and c.sparsity is None and not c.layers:
            raise UserError(f"{key}.sparsity: required (a fraction in [0, 1)), or give per-layer targets in {key}.layers")
        if c.sparsity is not None:
            check_range(c.sparsity, f"{key}.sparsity", 0.0, 1.0)
        for pattern, s in c.layers.items():
            check_range(s, f"{key}.layers.{pattern}", 0.0, 1.0)
        if c.criterion == "std" and not c.quality > 0:
            raise UserError(f"{key}.quality: {c.quality} must be > 0")
        if c.steps < 0:
            raise UserError(f"{key}.steps: {c.steps} must be >= 0")
        check_range(c.ramp, f"{key}.ramp", 0.0, 1.0, hi_open=False, lo_open=True)


@dataclass
class RegularizeConfig:
    """Sparsity-inducing training before pruning (off unless ``kind`` is set and epochs > 0)."""

    kind: str = "none"  # none | group_norm | bn_scale
    reg: float = 1e-4  # regularisation coefficient
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@STAGE_CONFIGS.register("prune.structured")
@dataclass
class StructuredConfig:
    RECIPE_KEYS: ClassVar[dict[str, str]] = {"global": "global_pruning"}  # `global` is a Python keyword

    importance: str = "l2"  # l1 | l2 | bn_scale | taylor | lamp | random | a name registered from Python
    ratio: float | None = None  # fraction of channels removed (per group; overall when global)
    layer_ratios: dict[str, float] = field(default_factory=dict)  # layer name/glob -> ratio (others: `ratio` or 0)
    mac_speedup: float | None = None  # instead of ratios: prune until base MACs / MACs reaches this
    global_pruning: bool = False  # recipe key `global`: rank channels of all layers together
    latency_speedup: float | None = None  # instead: prune until input latency / latency reaches this
    latency_on: str = "onnxruntime"  # where latency_speedup is taken: onnxruntime | torch | a hardware profile
    latency_batch: int | None = None  # batch size it is taken at (default: the pipeline's latency batch)
    latency_tolerance: float = 0.05  # a latency target counts as reached at target * (1 - this)
    iterative_steps: int = 1  # pruning steps, `finetune` after each
    round_to: int | str | None = "auto"  # channel counts multiples of this; auto: what the latency target rewards
    ignore: list[str] = field(default_factory=list)  # layers (names/globs) whose outputs are kept
    max_layer_ratio: float = 0.9  # no layer loses more than this fraction of its channels
    heads: str = "prune"  # attention: prune (whole heads) | dims (dims of every head) | keep (neither)
    drop_layers: list[str] = field(default_factory=list)  # whole blocks removed first: items of a ModuleList
    head_ratio: float | None = None  # heads: prune: fraction of each module's heads removed (default: its ratio)
    taylor_batches: int = 4  # training batches whose gradients the taylor importance uses
    search_steps: int = 200  # resolution of the mac_speedup search (fine pruning steps)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @staticmethod
    def check(c: Any, key: str) -> None:
        has_ratio = c.ratio is not None or bool(c.layer_ratios)
        given = [has_ratio, c.mac_speedup is not None, c.latency_speedup is not None]
        if sum(given) != 1:
            raise UserError(f"{key}: give either ratio/layer_ratios (fraction of channels) or mac_speedup or "
                            f"latency_speedup, {'not both' if sum(given) > 1 else 'one of them'}")
        if c.ratio is not None:
            check_range(c.ratio, f"{key}.ratio", 0.0, 1.0)
        for pattern, r in c.layer_ratios.items():
            check_range(r, f"{key}.layer_ratios.{pattern}", 0.0, 1.0)
        if c.mac_speedup is not None and not c.mac_speedup > 1.0:
            raise UserError(f"{key}.mac_speedup: {c.mac_speedup} must be > 1 (base MACs / pruned MACs)")
        if c.latency_speedup is not None:
            if not c.latency_speedup > 1.0:
                raise UserError(f"{key}.latency_speedup: {c.latency_speedup} must be > 1 (input latency / "
                                "pruned latency)")
            if c.global_pruning:
                raise UserError(f"{key}.global: a latency_speedup target ranks layers by latency saved per "
                                "importance lost itself; leave global out")
            check_latency_batch(c.latency_batch, f"{key}.latency_batch")
            check_range(c.latency_tolerance, f"{key}.latency_tolerance", 0.0, 0.5)
        if c.iterative_steps < 1:
            raise UserError(f"{key}.iterative_steps: {c.iterative_steps} must be >= 1")
        if isinstance(c.round_to, str) and c.round_to != "auto":
            raise UserError(f"{key}.round_to: '{c.round_to}' is not valid; give an integer, auto or null")
        if isinstance(c.round_to, int) and c.round_to < 1:
            raise UserError(f"{key}.round_to: {c.round_to} must be >= 1")
        check_range(c.max_layer_ratio, f"{key}.max_layer_ratio", 0.0, 1.0, lo_open=True)
        if c.head_ratio is not None:
            check_range(c.head_ratio, f"{key}.head_ratio", 0.0, 1.0)
            if c.heads != "prune" or c.ratio is None and not c.layer_ratios:
                raise UserError(f"{key}.head_ratio: only with heads: prune and ratio/layer_ratios (with a speedup "
                                "target, heads are removed in step with the channels)")
        if c.taylor_batches < 1:
            raise UserError(f"{key}.taylor_batches: {c.taylor_batches} must be >= 1")
        if c.search_steps < 2:
            raise UserError(f"{key}.search_steps: {c.search_steps} must be >= 2")
        if not c.regularize.reg > 0:
            raise UserError(f"{key}.regularize.reg: {c.regularize.reg} must be > 0")


@STAGE_CONFIGS.register("share")
@dataclass
class ShareConfig:
    bits: int = 5  # codebook bits for every layer not set otherwise
    types: dict[str, int] = field(default_factory=dict)  # conv | linear -> bits (the paper: conv 8, fc 5)
    layers: dict[str, int] = field(default_factory=dict)  # name/glob -> bits (wins over types)
    init: str = "linear"  # linear | density | random
    ignore: list[str] = field(default_factory=list)  # layers left unshared (names/globs)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @staticmethod
    def check(c: Any, key: str) -> None:
        check_choice(c.init, f"{key}.init", ("linear", "density", "random"))
        for k, bits in [("bits", c.bits), *((f"types.{t}", b) for t, b in c.types.items()),
                        *((f"layers.{n}", b) for n, b in c.layers.items())]:
            if not 1 <= bits <= 16:
                raise UserError(f"{key}.{k}: {bits} bits is outside [1, 16]")
        for t in c.types:
            check_choice(t, f"{key}.types", tuple(LAYER_TYPES))


@STAGE_CONFIGS.register("distill")
@dataclass
class DistillStageConfig:
    distill: DistillConfig = field(default_factory=DistillConfig)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=10))

    @staticmethod
    def check(c: Any, key: str) -> None:
        if c.finetune.epochs < 1:
            raise UserError(f"{key}.finetune.epochs: {c.finetune.epochs}; a distill stage needs at least 1 epoch")
        if c.finetune.distill is not None:
            raise UserError(f"{key}.finetune.distill: a distill stage takes its teacher from {key}.distill; "
                            "remove finetune.distill")
        check_range(c.distill.alpha, f"{key}.distill.alpha", 0.0, 1.0, hi_open=False)
        if not c.distill.T > 0:
            raise UserError(f"{key}.distill.T: {c.distill.T} must be > 0")


@STAGE_CONFIGS.register("quantize")
@dataclass
class QuantizeConfig:
    mode: str = "ptq"  # ptq | qat
    bits: int = 8
    calibration_batches: int = 8  # training batches that set activation ranges
    ignore: list[str] = field(default_factory=list)  # layers kept in float (names/globs)
    max_accuracy_drop: float | None = None  # layers go back to float until the runtime primary metric is within it
    max_metric_drop: float | None = None  # the same, by the name that fits a task whose metric is not accuracy
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @staticmethod
    def check(c: Any, key: str) -> None:
        check_choice(c.mode, f"{key}.mode", ("ptq", "qat"))
        if c.calibration_batches < 1:
            raise UserError(f"{key}.calibration_batches: {c.calibration_batches} must be >= 1")
        if c.mode == "qat" and c.finetune.epochs < 1:
            raise UserError(f"{key}.finetune.epochs: {c.finetune.epochs}; mode qat fine-tunes through fake "
                            "quantisation: set finetune.epochs >= 1, or use mode: ptq")
        if c.mode == "ptq" and c.finetune.epochs > 0:
            raise UserError(f"{key}.finetune.epochs: mode ptq does not train; use mode: qat to fine-tune")
        if c.max_accuracy_drop is not None and c.max_metric_drop is not None:
            raise UserError(f"{key}.max_metric_drop: also given as max_accuracy_drop (its alias); keep one")
        if c.max_accuracy_drop is not None:
            check_range(c.max_accuracy_drop, f"{key}.max_accuracy_drop", 0.0, 1.0)
        if c.max_metric_drop is not None and c.max_metric_drop < 0:
            raise UserError(f"{key}.max_metric_drop: {c.max_metric_drop} must be >= 0 (a drop of the task's primary metric)")
