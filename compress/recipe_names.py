"""The second half of loading a recipe: its names looked up in the registries, its stages built.

:func:`compress.recipe.load_recipe` checks keys, types and ranges without torch first; this module
imports the capabilities (the model zoo, hardware profiles, runtimes, the stage classes), so torch
loads here, and the data sets (Lightning) only when their name is checked, last.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from compress.errors import UserError, suggest
from compress.hardware import check_profiles
from compress.models import model_class
from compress.runtime import check_runtimes
from compress.stages import STAGES
from compress.tasks import Task, build_task

__all__ = ["check_names", "check_data", "build_stage_objects", "build_recipe_task"]


def check_names(cfg: DictConfig) -> None:
    """The model, hardware profiles and runtimes a recipe names."""
    model_class(str(cfg.model.name), "model.name")
    check_profiles(list(cfg.hardware), "hardware")
    check_runtimes(list(cfg.eval.runtimes), "eval.runtimes")


def check_data(cfg: DictConfig) -> None:
    """The data set a recipe names."""
    from compress.data import (
        DATAMODULES,  # data modules are Lightning classes: loaded after every other check
    )

    if "name" not in cfg.data:
        raise UserError(f"data.name: required; {suggest('', DATAMODULES.names())}")
    DATAMODULES.get(str(cfg.data.name), "data.name")


def build_stage_objects(blocks: list[Any], cfg: DictConfig | None = None) -> list[Any]:
    """Stage objects for the ``StageBlock``s of :func:`compress.recipe.check_stage_blocks`; each stage adds
    the checks that need its capability (registry names). With ``cfg`` (the whole recipe), its model,
    hardware profiles and runtimes are looked up first and its data set last (Lightning)."""
    if cfg is not None:
        check_names(cfg)
    stages = [STAGES.get(b.type_name, f"{b.key}.type")(b.config, key=b.key, name=b.name) for b in blocks]
    if cfg is not None:
        check_data(cfg)
    return stages


def build_recipe_task(cfg: DictConfig) -> Task:
    """The task a recipe's ``task:`` section names (``classification`` when it has none)."""
    return build_task(cfg.get("task"), "task")
