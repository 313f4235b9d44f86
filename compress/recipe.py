"""Recipes: YAML + ``key=value`` overrides, validated against typed schemas before any work starts.

A recipe names registry keys (model, data, stage types, hardware profiles); it is data, not code.
Every problem becomes one :class:`UserError` line naming the key path and what would be valid.
Keys, types and ranges (the stages' too, :mod:`compress.stage_configs`) are checked without torch,
so a mistake answers at once; the names are then looked up in the registries
(:mod:`compress.recipe_names`), which loads torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from compress.errors import UserError, suggest
from compress.schema import (
    check_choice,
    check_finite,
    check_index_bits,
    check_latency_batch,
    check_out_dir,
    load_yaml,
    read_yaml,
    schema_error,
)
from compress.stage_configs import STAGE_CONFIGS, check_stage_config, make_stage_config

__all__ = ["RecipeConfig", "TrainerConfig", "LoggerConfig", "WandbConfig", "EvalConfig", "Recipe",
           "load_recipe", "build_stages", "check_stage_blocks", "StageBlock"]


@dataclass
class TrainerConfig:
    """Passed to ``pytorch_lightning.Trainer`` (how the same recipe scales to GPUs and nodes)."""

    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "compress"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_model: bool = True  # the final model as an artifact


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    csv: bool = True


@dataclass
class EvalConfig:
    """How metrics are measured after every stage.

    ``latency_threads`` is the torch intra-op thread count set for every latency timing (and the
    ``cpu-local`` calibration) and restored after. One by default: a single thread gives figures
    comparable across machines and runs (no thread-pool start-up or hand-off in a tiny model's
    forward, no dependence on how many cores happen to be free), and edge deployments often run one
    inference stream per core anyway.
    """

    latency_repeats: int = 30
    latency_warmup: int = 10
    latency_batch_size: int | None = None  # default: data.batch_size
    latency_threads: int = 1
    max_batches: int | None = None  # cap on test batches for accuracy (None: the whole split)
    runtimes: list[str] = field(default_factory=list)  # where to also measure speed and accuracy: onnxruntime


@dataclass
class EncodingConfig:
    """How sizes are accounted and models exported (Deep Compression's storage format)."""

    index_bits: Any = 5  # relative-index width in bits (1-16), or "auto": the smallest file per layer


@dataclass
class RecipeConfig:
    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/${name}"
    model: dict[str, Any] = field(default_factory=lambda: {"name": "lenet300"})
    data: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    task: dict[str, Any] = field(default_factory=lambda: {"name": "classification"})  # compress.tasks: what judges
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    hardware: list[str] = field(default_factory=list)
    teachers_dir: str = "teachers"
    stages: list[Any] = field(default_factory=list)
    search: Any = None  # `run.py search`: validated by compress.search, ignored by a plain run


WANDB_MODES = ("offline", "online", "disabled")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found (run `ls recipes/` for the shipped ones)")
    try:
        data = read_yaml(path)  # safe: no executable tags; bounded: no alias bomb
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: a recipe is a mapping of keys (name, model, data, stages, ...), got {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: {str(e).splitlines()[0]}") from None


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> None:
    """``key=value`` pairs (value parsed as YAML); list items as ``stages.1.sparsity=0.9``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}': expected key=value, e.g. trainer.max_epochs=1")
        try:
            value = load_yaml(raw, f"override '{key.strip()}'") if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        key = key.strip().lstrip("+")
        parts = key.split(".")
        try:
            node: Any = cfg
            for i, part in enumerate(parts):  # list indices must exist already, the last one too (no appends)
                if isinstance(node, ListConfig):
                    if not part.isdigit() or int(part) >= len(node):
                        raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' has {len(node)} items; index '{part}' is out of range")
                    node = node[int(part)] if i < len(parts) - 1 else None
                elif isinstance(node, DictConfig) and part in node and i < len(parts) - 1:
                    node = node.get(part)  # the last value is replaced, never read (it may not resolve)
                else:
                    break
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise UserError(f"override '{key}': {str(e).splitlines()[0]}") from None


class Recipe:
    """A validated recipe: ``cfg`` (read-only DictConfig, interpolations resolved) and its stages."""

    def __init__(self, cfg: DictConfig, path: Path | None = None, stages: list[Any] | None = None):
        self.path = path
        self.stages = build_stages(cfg.stages) if stages is None else stages
        self.task = _names().build_recipe_task(cfg)
        # The resolved recipe shows every stage, and the task, with its defaults filled in.
        full = OmegaConf.to_container(cfg, resolve=True)
        if "task" in full:  # a Recipe made directly from a config without one keeps its sections as given
            full["task"] = OmegaConf.to_container(self.task.config, resolve=True)
        full["stages"] = [{"type": s.type_name, "name": s.name, **OmegaConf.to_container(s.config, resolve=True)}
                          for s in self.stages]
        if full.get("search") is None:  # only a search recipe shows the section
            full.pop("search", None)
        self.cfg = OmegaConf.create(full)
        OmegaConf.set_readonly(self.cfg, True)

    def to_container(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[return-value]

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.cfg, resolve=True)


# (earlier stage type, later stage type) -> why that order is refused before any work starts.
REFUSED_ORDERS = {
    ("share", "prune.structured"): "structured pruning after weight sharing would re-cluster nothing and break the "
                                   "codebooks; put prune.structured before share",
    ("quantize", "prune.structured"): "channels removed after quantisation would leave calibrated ranges and int8 "
                                      "scales of another network; put prune.structured before quantize",
    ("quantize", "prune.unstructured"): "masks set after quantisation change weights the int8 scales were fitted to; "
                                        "put prune.unstructured before quantize",
    ("quantize", "share"): "a codebook over int8 weights is not a format any runtime runs; choose share (Deep "
                           "Compression file) or quantize (int8 runtime)",
    ("share", "quantize"): "int8 over shared codebook weights is not a format any runtime runs; choose share (Deep "
                           "Compression file) or quantize (int8 runtime)",
    ("quantize", "quantize"): "the model is quantised already; use one quantize stage (mode: qat fine-tunes)",
}


@dataclass(frozen=True)
class StageBlock:
    """One checked stage block: where it sits, its type, its unique name and its config (read-only
    and checked for a built-in type; the block as given for a type registered from Python)."""

    key: str
    type_name: str
    name: str
    config: Any


def _check_order(earlier_blocks: list[StageBlock], key: str, stype: str) -> None:
    for earlier in earlier_blocks:
        why = REFUSED_ORDERS.get((earlier.type_name, stype))
        if why:
            raise UserError(f"{key}.type: '{stype}' after '{earlier.type_name}' ({earlier.key}): {why}")


def check_stage_blocks(blocks: Any) -> list[StageBlock]:
    """Keys, types and ranges of every stage block of a built-in type, and the order of the stages;
    no torch. A type not built in is left to :func:`compress.recipe_names.build_stages` (a stage
    registered from Python, or a misspelt type, answered there with the valid names). A block with
    ``enabled: false`` is checked and left out (so a search can choose whether a stage runs)."""
    checked: list[StageBlock] = []
    names: set[str] = set()
    for i, block in enumerate(blocks or []):
        key = f"stages[{i}]"
        block = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else block
        if not isinstance(block, dict):
            raise UserError(f"{key}: a stage is a mapping with a 'type', got {block!r}")
        block = dict(block)
        stype = block.pop("type", None)
        if stype is None:
            raise UserError(f"{key}.type: required; {suggest('', STAGE_CONFIGS.names())}")
        stype = str(stype)
        enabled = block.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise UserError(f"{key}.enabled: {enabled!r}; give true, or false to leave the stage out")
        name = block.pop("name", None) or stype
        if enabled:  # a stage left out takes no name and no place in the order
            while name in names:  # stage names key metrics and checkpoints: keep them unique
                name = f"{name}-{i}"
            names.add(name)
            _check_order(checked, key, stype)
        config: Any = block
        if stype in STAGE_CONFIGS:
            schema = STAGE_CONFIGS.get(stype)
            config = make_stage_config(schema, block, key)
            check_stage_config(schema, config, key)
        if enabled:  # a stage left out is still checked (a typo in it is a typo) but neither run nor shown
            checked.append(StageBlock(key, stype, name, config))
    return checked


def build_stages(blocks: Any) -> list[Any]:
    """Stage objects for the recipe's ``stages`` list; each block validated by its stage's Config."""
    return _stage_objects(check_stage_blocks(blocks))


def _names() -> Any:
    """:mod:`compress.recipe_names`, loaded when first needed."""
    from compress import (
        recipe_names,  # the stage classes, tasks and registries bring torch: after keys, types, ranges
    )

    return recipe_names


def _stage_objects(blocks: list[StageBlock], cfg: DictConfig | None = None) -> list[Any]:
    """Stage objects for checked blocks; with ``cfg``, the recipe's other names are looked up too."""
    return _names().build_stage_objects(blocks, cfg)


def load_recipe(source: str | Path | dict[str, Any] | DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises UserError (one line) on any problem."""
    path = None
    if isinstance(source, str | Path):
        path = Path(source)
        raw = _read_yaml(path)
    else:
        raw = OmegaConf.create(source)
    if not raw:
        raise UserError(f"{path or 'recipe'}: the recipe is empty; give at least model, data and stages "
                        "(recipes/quickstart.yaml is a complete example)")
    apply_overrides(raw, list(overrides))
    _check_lists(raw, RecipeConfig)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), raw)
    except OmegaConfBaseException as e:
        raise schema_error(e, "") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or _unresolved_key(cfg)
        raise UserError(f"{key}: interpolation does not resolve: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    check_finite(cfg, "")
    _validate_top(cfg)
    blocks = check_stage_blocks(cfg.stages)
    OmegaConf.set_readonly(cfg, True)
    return Recipe(cfg, path, _stage_objects(blocks, cfg))


def _unresolved_key(cfg: DictConfig) -> str:
    """The top-level key still holding an interpolation (a section given ``${seed}``: OmegaConf names no key)."""
    return next((str(k) for k in cfg if OmegaConf.is_interpolation(cfg, str(k))), "recipe")


def _check_lists(raw: DictConfig, schema: type, prefix: str = "") -> None:
    """A mapping or a scalar where the schema wants a list (``stages: {train: ...}``) is one line, not
    OmegaConf's TypeError without a key."""
    for f in dataclasses.fields(schema):
        try:
            value = raw.get(f.name) if isinstance(raw, DictConfig) else None
        except OmegaConfBaseException:  # an interpolation that does not resolve: reported with its key later
            continue
        key = f"{prefix}{f.name}"
        if value is None:
            continue
        default = f.default_factory() if callable(f.default_factory) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, DictConfig):  # else OmegaConf's merge fails with an empty key and "None"
                names = ", ".join(g.name for g in dataclasses.fields(default))
                raise UserError(f"{key}: expected a mapping (keys: {names}), got {value!r}")
            _check_lists(value, type(default), f"{key}.")
        elif str(f.type).startswith("list") and not isinstance(value, ListConfig):
            example = "- {type: train, epochs: 10}" if f.name == "stages" else "[a, b]"
            raise UserError(f"{key}: expected a list (YAML items like {example}), got "
                            f"{'a mapping' if isinstance(value, DictConfig) else repr(value)}")
        elif str(f.type).startswith("dict") and isinstance(value, ListConfig):  # else OmegaConf's TypeError
            raise UserError(f"{key}: expected a mapping (like {{name: ...}}), got a list")


def _validate_top(cfg: DictConfig) -> None:
    if not isinstance(cfg.model, DictConfig) or "name" not in cfg.model:
        raise UserError("model.name: required (a zoo name such as lenet300, or import:pkg.module:Class)")
    out = cfg.model.get("output")
    if out is not None and (not isinstance(out, str | int) or isinstance(out, bool)):
        raise UserError(f"model.output: {out!r} must be a field name (logits) or a tuple index (0)")
    ckpt = cfg.model.get("checkpoint")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise UserError(f"model.checkpoint: file '{ckpt}' not found")
    check_choice(cfg.logger.wandb.mode, "logger.wandb.mode", WANDB_MODES)
    if cfg.seed < 0:
        raise UserError(f"seed: {cfg.seed} must be >= 0")
    if cfg.eval.latency_repeats < 1:
        raise UserError(f"eval.latency_repeats: {cfg.eval.latency_repeats} must be >= 1")
    check_latency_batch(cfg.eval.latency_batch_size, "eval.latency_batch_size")
    if cfg.eval.latency_threads < 1:
        raise UserError(f"eval.latency_threads: {cfg.eval.latency_threads} must be >= 1 (torch intra-op threads)")
    if not cfg.out_dir:
        raise UserError("out_dir: must not be empty")
    check_out_dir(cfg.out_dir, "out_dir")
    check_index_bits(cfg.encoding.index_bits, "encoding.index_bits")
