"""Recipes: YAML + ``key=value`` overrides, validated against typed schemas before any work starts.

A recipe names registry keys (model, data, stage types, hardware profiles); it is data, not code.
Every problem becomes one :class:`UserError` line naming the key path and what would be valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from compress.errors import UserError, suggest

__all__ = ["RecipeConfig", "TrainerConfig", "LoggerConfig", "WandbConfig", "EvalConfig", "Recipe",
           "load_recipe", "merge_structured", "build_stages"]


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
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    hardware: list[str] = field(default_factory=list)
    teachers_dir: str = "teachers"
    stages: list[Any] = field(default_factory=list)


WANDB_MODES = ("offline", "online", "disabled")
SCHEDULES_LR = ("none", "cosine", "step")
OPTIMIZERS = ("sgd", "adam", "adamw")


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _schema_error(e: OmegaConfBaseException, prefix: str) -> UserError:
    full_key = _join(prefix, str(getattr(e, "full_key", "") or ""))
    msg = str(getattr(e, "msg", e)).splitlines()[0]
    if isinstance(e, ConfigKeyError) and getattr(e, "parent_node", None) is not None:
        key = str(getattr(e, "key", ""))
        node = e.parent_node
        valid = list(node.keys()) if isinstance(node, DictConfig) else []
        if valid:
            return UserError(f"{full_key}: unknown key '{key}'; {suggest(key, valid)}")
    return UserError(f"{full_key}: {msg}")


def merge_structured(schema: type, values: Any, key: str = "") -> DictConfig:
    """``values`` (dict or DictConfig) merged into ``OmegaConf.structured(schema)``; read-only.

    Unknown keys, wrong types and missing required values raise one-line UserErrors naming
    ``key`` + the path inside.
    """
    if isinstance(values, DictConfig | ListConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{key}: expected a mapping, got {type(values).__name__} ({values!r})")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        raise _schema_error(e, key) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{_join(key, missing[0])}: required value is missing")
    _check_floats(cfg, key)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _check_floats(cfg: Any, key: str) -> None:
    """NaN/inf are never meaningful in a recipe (a NaN learning rate trains nothing)."""
    items = cfg.items() if isinstance(cfg, DictConfig) else enumerate(cfg) if isinstance(cfg, ListConfig) else []
    for k, v in items:
        path = _join(key, f"[{k}]" if isinstance(cfg, ListConfig) else str(k))
        if isinstance(v, DictConfig | ListConfig):
            _check_floats(v, path)
        elif isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{path}: {v} is not a finite number")


def check_range(value: float, key: str, lo: float, hi: float, hi_open: bool = True, lo_open: bool = False) -> None:
    """Raise a UserError unless ``lo <= value < hi`` (bounds as chosen)."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{key}: {value} is outside {interval}")


def check_choice(value: str, key: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}: '{value}' is not valid; {suggest(value, choices)}")


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found (run `ls recipes/` for the shipped ones)")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)  # safe: no executable tags
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
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        key = key.strip().lstrip("+")
        parts = key.split(".")
        node: Any = cfg
        for i, part in enumerate(parts[:-1]):  # lists must exist already: check indices
            if isinstance(node, ListConfig):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"override '{key}': '{'.'.join(parts[:i])}' has {len(node)} items; index '{part}' is out of range")
                node = node[int(part)]
            elif isinstance(node, DictConfig):
                node = node.get(part) if part in node else None
                if node is None:
                    break
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except OmegaConfBaseException as e:
            raise UserError(f"override '{key}': {str(e).splitlines()[0]}") from None


class Recipe:
    """A validated recipe: ``cfg`` (read-only DictConfig, interpolations resolved) and its stages."""

    def __init__(self, cfg: DictConfig, path: Path | None = None):
        self.path = path
        self.stages = build_stages(cfg.stages)
        # The resolved recipe shows every stage with its defaults filled in.
        full = OmegaConf.to_container(cfg, resolve=True)
        full["stages"] = [{"type": s.type_name, "name": s.name, **OmegaConf.to_container(s.config, resolve=True)}
                          for s in self.stages]
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
}


def build_stages(blocks: Any) -> list[Any]:
    """Stage objects for the recipe's ``stages`` list; each block validated by its stage's Config."""
    from compress.stages import STAGES

    stages = []
    names: set[str] = set()
    for i, block in enumerate(blocks or []):
        key = f"stages[{i}]"
        block = OmegaConf.to_container(block, resolve=True) if isinstance(block, DictConfig) else block
        if not isinstance(block, dict):
            raise UserError(f"{key}: a stage is a mapping with a 'type', got {block!r}")
        block = dict(block)
        stype = block.pop("type", None)
        if stype is None:
            raise UserError(f"{key}.type: required; {suggest('', STAGES.names())}")
        cls = STAGES.get(str(stype), f"{key}.type")
        name = block.pop("name", None) or f"{stype}"
        if name in names:  # stage names key metrics and checkpoints: keep them unique
            name = f"{name}-{i}"
        names.add(name)
        for earlier in stages:
            why = REFUSED_ORDERS.get((earlier.type_name, cls.type_name))
            if why:
                raise UserError(f"{key}.type: '{cls.type_name}' after '{earlier.type_name}' ({earlier.key}): {why}")
        stages.append(cls(block, key=key, name=name))
    return stages


def load_recipe(source: str | Path | dict[str, Any] | DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate. Raises UserError (one line) on any problem."""
    path = None
    if isinstance(source, str | Path):
        path = Path(source)
        raw = _read_yaml(path)
    else:
        raw = OmegaConf.create(source)
    apply_overrides(raw, list(overrides))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeConfig), raw)
    except OmegaConfBaseException as e:
        raise _schema_error(e, "") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or "?"
        raise UserError(f"{key}: interpolation does not resolve: {str(getattr(e, 'msg', e)).splitlines()[0]}") from None
    _check_floats(cfg, "")
    _validate_top(cfg)
    OmegaConf.set_readonly(cfg, True)
    return Recipe(cfg, path)


def check_index_bits(value: Any, key: str) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16):
        return
    raise UserError(f"{key}: {value!r} is not a width; use an integer in [1, 16] (the paper: 5) or 'auto'")


def _validate_top(cfg: DictConfig) -> None:
    from compress.data import DATAMODULES
    from compress.models import model_class

    if not isinstance(cfg.model, DictConfig) or "name" not in cfg.model:
        raise UserError("model.name: required (a zoo name such as lenet300, or import:pkg.module:Class)")
    model_class(str(cfg.model.name), "model.name")
    ckpt = cfg.model.get("checkpoint")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise UserError(f"model.checkpoint: file '{ckpt}' not found")
    if "name" not in cfg.data:
        raise UserError(f"data.name: required; {suggest('', DATAMODULES.names())}")
    DATAMODULES.get(str(cfg.data.name), "data.name")
    check_choice(cfg.logger.wandb.mode, "logger.wandb.mode", WANDB_MODES)
    if cfg.seed < 0:
        raise UserError(f"seed: {cfg.seed} must be >= 0")
    if cfg.eval.latency_repeats < 1:
        raise UserError(f"eval.latency_repeats: {cfg.eval.latency_repeats} must be >= 1")
    if not cfg.out_dir:
        raise UserError("out_dir: must not be empty")
    check_index_bits(cfg.encoding.index_bits, "encoding.index_bits")
    try:
        from compress.hardware import check_profiles
    except ImportError:  # the hardware package is optional at this point of the build
        check_profiles = None
    if check_profiles is not None:
        check_profiles(list(cfg.hardware), "hardware")
