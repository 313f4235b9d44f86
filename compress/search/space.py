"""The ``search:`` section of a recipe: what is searched, towards what, under which limits.

Validated against the resolved recipe before any trial starts (one :class:`UserError` line
naming ``search.<key>``): every key of ``space`` must exist in the resolved recipe, a range
needs a numeric key, and each end of a range and each choice must itself make a valid recipe
(so ``stages.1.sparsity: {high: 1.5}`` fails now, not in trial 7).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from compress.errors import UserError
from compress.files import json_text
from compress.recipe import Recipe, load_recipe
from compress.schema import merge_structured
from compress.search._registry import PRUNERS, SAMPLERS

__all__ = ["SearchConfig", "Param", "Objective", "Constraint", "SearchSpec", "parse_search", "trial_overrides",
           "metric_value", "constraint_violations"]

DIRECTIONS = ("maximize", "minimize")
BOUNDS = ("max", "min")
RANGE_KEYS = {"low", "high", "log", "step"}


@dataclass
class SearchConfig:
    """The recipe's ``search:`` block (see README "Search")."""

    space: dict[str, Any] = field(default_factory=dict)  # dotted recipe key -> {low, high, log, step} | [choices]
    objectives: list[Any] = field(default_factory=list)  # [{maximize: accuracy}, {minimize: stored_bytes}]
    constraints: dict[str, Any] = field(default_factory=dict)  # report key -> {max: v} | {min: v}
    sampler: str | None = None  # tpe | nsga2 | random; default tpe for one objective, nsga2 for several
    pruner: str = "none"  # median | percentile | hyperband | successive_halving: stops a trial dominated after a stage
    trials: int = 20  # default of --trials
    seed: int | None = None  # the sampler's seed (default: the recipe's)


@dataclass(frozen=True)
class Param:
    """One searched key: a float or int range (``choices`` None) or a list of choices."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """The value Optuna's ``trial`` proposes for this key."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


@dataclass(frozen=True)
class Objective:
    key: str
    direction: str  # maximize | minimize


@dataclass(frozen=True)
class Constraint:
    key: str
    bound: str  # max | min
    value: float

    def violation(self, metrics: dict[str, Any]) -> float:
        """Optuna's convention: <= 0 when met, else by how much it is missed."""
        v = metric_value(metrics, self.key, f"search.constraints.{self.key}")
        return v - self.value if self.bound == "max" else self.value - v

    def describe(self, metrics: dict[str, Any]) -> str:
        v = metrics.get(self.key)
        op = ">" if self.bound == "max" else "<"
        return f"{self.key} {v:g} {op} {self.bound} {self.value:g}"


@dataclass(frozen=True)
class SearchSpec:
    """A validated ``search:`` section."""

    params: tuple[Param, ...]
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    sampler: str
    pruner: str
    trials: int
    seed: int

    @property
    def shared_stages(self) -> int:
        """How many leading stages no searched key touches (0 if a top-level key is searched)."""
        first = [int(p.key.split(".")[1]) if p.key.startswith("stages.") else -1 for p in self.params]
        return 0 if not first or min(first) < 0 else min(first)


def _walk(container: Any, key: str) -> Any:
    """The value at a dotted key of the resolved recipe; KeyError naming the first missing part."""
    node = container
    for i, part in enumerate(key.split(".")):
        where = ".".join(key.split(".")[:i]) or "recipe"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise KeyError(f"'{where}' has {len(node)} items; index '{part}' does not exist")
            node = node[int(part)]
        elif isinstance(node, dict):
            if part not in node:
                raise KeyError(f"'{where}' has no key '{part}'" + (f" (keys: {', '.join(map(str, node))})" if node else ""))
            node = node[part]
        else:
            raise KeyError(f"'{where}' is {node!r}, not a section (set it in the recipe first)")
    return node


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def metric_value(metrics: dict[str, Any], key: str, where: str) -> float:
    """A numeric report key of a stage record; a one-line UserError naming ``where`` if it is absent."""
    v = metrics.get(key)
    if not _number(v):
        numeric = sorted(k for k, x in metrics.items() if _number(x))
        raise UserError(f"{where}: the last stage reports no number '{key}'; "
                        f"{'it holds ' + repr(v) if v is not None else 'keys: ' + ', '.join(numeric)}")
    return float(v)


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """``key=value`` overrides for the values of one trial (YAML scalars, so strings stay strings)."""
    return [f"{k}={json_text(v)}" for k, v in params.items()]


def _check_value(base: dict[str, Any], key: str, value: Any, where: str, numeric: bool) -> None:
    """``value`` at ``key`` must make a valid recipe (the stage's own checks say why not)."""
    try:
        recipe = load_recipe(base, trial_overrides({key: value}))
    except UserError as e:
        raise UserError(f"{where}: {value!r} makes an invalid recipe: {e}") from None
    if numeric and not _number(_walk(recipe.to_container(), key)):
        raise UserError(f"{where}: a range needs a numeric key, and {key} is not one "
                        f"({value!r} became {_walk(recipe.to_container(), key)!r}); give a list of choices")


def _parse_param(base: dict[str, Any], key: str, spec: Any) -> Param:
    where = f"search.space.{key}"
    try:
        # `enabled` is read, not shown: the resolved recipe lists only the stages that run.
        current = True if re.fullmatch(r"stages\.\d+\.enabled", key) and _walk(base, key[:-8]) else _walk(base, key)
    except KeyError as e:
        raise UserError(f"{where}: not a key of the resolved recipe: {e.args[0]}; "
                        "see `python run.py RECIPE --dry-run` for every key") from None
    if isinstance(spec, list):
        if not spec:
            raise UserError(f"{where}: an empty list of choices; give at least one value")
        for c in spec:
            if c is not None and not isinstance(c, bool | int | float | str):
                raise UserError(f"{where}: choice {c!r} is not a number, string, boolean or null (Optuna's choices)")
            _check_value(base, key, c, where, numeric=False)
        return Param(key, choices=tuple(spec))
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or set(spec) - RANGE_KEYS:
        raise UserError(f"{where}: expected a range {{low: L, high: H, log: false, step: S}} or a list of "
                        f"choices, got {spec!r}")
    if current is not None and not _number(current):
        raise UserError(f"{where}: a range needs a numeric key, and {key} is {current!r}; give a list of choices")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    for name, v in (("low", low), ("high", high), ("step", step)):
        if v is not None and (not _number(v) or not math.isfinite(v)):
            raise UserError(f"{where}.{name}: {v!r} is not a number")
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: {log!r} must be true or false")
    if low >= high:
        raise UserError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0, got {low}")
    if log and step is not None:
        raise UserError(f"{where}: log and step cannot go together (Optuna samples a log range continuously)")
    if step is not None and step <= 0:
        raise UserError(f"{where}.step: {step} must be > 0")
    integer = isinstance(current, int) and not isinstance(current, bool) or (
        current is None and all(isinstance(v, int) for v in (low, high, step or 1)))
    if integer and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise UserError(f"{where}: {key} is an integer ({current}); give integer low, high and step")
    for v in (low, high):
        _check_value(base, key, v, where, numeric=True)
    return Param(key, low=low, high=high, log=log, step=step, integer=integer)


def _parse_objectives(items: list[Any]) -> tuple[Objective, ...]:
    if not items:
        raise UserError("search.objectives: required; e.g. [{maximize: accuracy}, {minimize: stored_bytes}]")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in DIRECTIONS:
            raise UserError(f"search.objectives[{i}]: expected {{maximize: KEY}} or {{minimize: KEY}}, got {item!r}")
        direction, key = next(iter(item.items()))
        out.append(Objective(str(key), direction))
    keys = [o.key for o in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"search.objectives: a key appears twice ({keys}); each objective once")
    return tuple(out)


def _parse_constraints(items: dict[str, Any]) -> tuple[Constraint, ...]:
    out = []
    for key, spec in items.items():
        where = f"search.constraints.{key}"
        if not isinstance(spec, dict) or not spec or set(spec) - set(BOUNDS):
            raise UserError(f"{where}: expected {{max: V}} and/or {{min: V}}, got {spec!r}")
        for bound, v in spec.items():
            if not _number(v):
                raise UserError(f"{where}.{bound}: {v!r} is not a number")
            out.append(Constraint(str(key), bound, float(v)))
    return tuple(out)


def parse_search(recipe: Recipe) -> SearchSpec:
    """The recipe's ``search:`` section, validated against the rest of the recipe."""
    full = recipe.to_container()
    block = full.pop("search", None)
    if not block:
        raise UserError("search: the recipe has no search section; add search: {space: ..., objectives: ...} "
                        "(recipes/search_lenet5.yaml is an example)")
    cfg = merge_structured(SearchConfig, block, "search")
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(cfg, resolve=True)
    if not raw["space"]:
        raise UserError("search.space: empty; name at least one recipe key, e.g. stages.1.sparsity: {low: 0.5, high: 0.9}")
    params = tuple(_parse_param(full, str(k), v) for k, v in raw["space"].items())
    objectives = _parse_objectives(raw["objectives"])
    sampler = raw["sampler"] or ("tpe" if len(objectives) == 1 else "nsga2")
    SAMPLERS.get(sampler, "search.sampler")
    PRUNERS.get(raw["pruner"], "search.pruner")
    if raw["pruner"] != "none" and len(objectives) > 1:
        raise UserError(f"search.pruner: '{raw['pruner']}' needs one objective (Optuna prunes single-objective "
                        f"studies only), the recipe has {len(objectives)}; use pruner: none")
    if raw["trials"] < 1:
        raise UserError(f"search.trials: {raw['trials']} must be >= 1")
    return SearchSpec(params, objectives, _parse_constraints(raw["constraints"]), sampler, raw["pruner"],
                      int(raw["trials"]), int(raw["seed"] if raw["seed"] is not None else full.get("seed", 0)))


def constraint_violations(spec: SearchSpec, metrics: dict[str, Any]) -> list[float]:
    """One value per constraint, Optuna's way (<= 0: met)."""
    return [c.violation(metrics) for c in spec.constraints]
