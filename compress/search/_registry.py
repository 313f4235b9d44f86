"""The search's extension points: Optuna samplers and pruners by the names a recipe gives them.

Kept apart from ``study.py`` so that ``space.py`` validates names against the same registries.
Optuna is imported inside each factory: a recipe error answers before it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compress.registry import Registry

__all__ = ["SAMPLERS", "PRUNERS"]


def _optuna() -> Any:
    import optuna

    return optuna


# name -> factory(seed) -> an Optuna sampler. Constraints reach TPE and NSGA-II through each trial's
# ``set_constraint`` (Optuna >= 5), so the samplers need no constraints_func.
SAMPLERS: Registry[Callable[[int], Any]] = Registry("sampler")
SAMPLERS.register("tpe", lambda seed: _optuna().samplers.TPESampler(seed=seed))
SAMPLERS.register("nsga2", lambda seed: _optuna().samplers.NSGAIISampler(seed=seed))
SAMPLERS.register("random", lambda seed: _optuna().samplers.RandomSampler(seed=seed))

# name -> factory() -> an Optuna pruner; its steps are stage indices, its values the first objective's.
PRUNERS: Registry[Callable[[], Any]] = Registry("pruner")
PRUNERS.register("none", lambda: _optuna().pruners.NopPruner())
PRUNERS.register("median", lambda: _optuna().pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1))
PRUNERS.register("percentile", lambda: _optuna().pruners.PercentilePruner(25.0, n_startup_trials=2, n_warmup_steps=1))
PRUNERS.register("hyperband", lambda: _optuna().pruners.HyperbandPruner(min_resource=1))
PRUNERS.register("successive_halving", lambda: _optuna().pruners.SuccessiveHalvingPruner(min_resource=1))
