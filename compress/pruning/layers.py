"""Whole layers removed: items of an ``nn.ModuleList`` (a transformer's blocks, a stage's residual blocks).

A block whose input and output have the same shape (a residual stream) can go entirely (Sajjad et
al. 2023, "On the effect of dropping layers of pre-trained transformer models"): ``drop_layers``
deletes the named items and tells a Hugging Face config the new count (``num_hidden_layers``,
``num_layers``, ``n_layer``; GPT-Neo's ``attention_layers`` too), so its forward loops over what is
left. A checkpoint keeps every list's length (restorer ``blocks``) and a freshly built model is cut
to it before the state_dict loads; the blocks kept are renumbered from 0, as the saved keys are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList

from compress.errors import UserError
from compress.plumbing.restorers import RESTORERS, Restorer

__all__ = ["drop_layers", "check_drop_layers", "layer_counts", "restore_layer_counts"]

_COUNT_ATTRS = ("num_hidden_layers", "num_layers", "n_layer")


def _block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The model's own ModuleLists (not the ones parametrizations hold: masks, fake quantisation)."""
    return {name: m for name, m in model.named_modules()
            if name and isinstance(m, nn.ModuleList) and not isinstance(m, ParametrizationList)}


def check_drop_layers(model: nn.Module, paths: Sequence[str], key: str) -> dict[str, list[int]]:
    """``{ModuleList path: [indices to drop]}`` for ``paths`` (each ``<list path>.<index>``); a path
    that is not an item of a ModuleList, or a list left empty, is a one-line UserError naming ``key``."""
    lists = set(_block_lists(model))
    out: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        parent, _, index = str(path).rpartition(".")
        if parent not in lists or not index.isdigit() or int(index) >= len(model.get_submodule(parent)):
            hint = f"items of {', '.join(sorted(lists))}" if lists else "the model has no nn.ModuleList"
            raise UserError(f"{key}[{i}]: '{path}' is not an item of an nn.ModuleList ({hint})")
        out.setdefault(parent, []).append(int(index))
    for parent, indices in out.items():
        if len(set(indices)) >= len(model.get_submodule(parent)):
            raise UserError(f"{key}: every item of '{parent}' would go; keep at least one")
    return out


def _set_count(model: nn.Module, old: int, new: int, dropped: Sequence[int] = ()) -> None:
    """A Hugging Face config that counted ``old`` layers now counts ``new`` (and per-layer lists follow)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    for attr in _COUNT_ATTRS:
        if getattr(config, attr, None) == old:
            setattr(config, attr, new)
    per_layer = getattr(config, "attention_layers", None)  # GPT-Neo: one attention type per layer
    if isinstance(per_layer, list) and len(per_layer) == old:
        keep = [i for i in range(old) if i not in set(dropped)] if dropped else list(range(new))
        config.attention_layers = [per_layer[i] for i in keep]


def drop_layers(model: nn.Module, paths: Sequence[str], key: str = "drop_layers") -> list[str]:
    """Delete the ModuleList items named by ``paths`` in place; returns the paths removed."""
    plan = check_drop_layers(model, paths, key)
    for parent, indices in plan.items():
        blocks = model.get_submodule(parent)
        old = len(blocks)
        for index in sorted(set(indices), reverse=True):
            del blocks[index]
        _set_count(model, old, len(blocks), sorted(set(indices)))
    return [f"{parent}.{i}" for parent, indices in plan.items() for i in sorted(set(indices))]


def layer_counts(model: nn.Module) -> dict[str, int]:
    """Every ModuleList's length (what a checkpoint keeps to cut a fresh model the same way)."""
    return {name: len(m) for name, m in _block_lists(model).items()}


def restore_layer_counts(model: nn.Module, saved: Mapping[str, int] | None, state_dict: Mapping[str, Tensor],
                         where: str = "checkpoint") -> None:
    """Cut a freshly built model's ModuleLists to the saved lengths (an older checkpoint: nothing)."""
    for name, n in (saved or {}).items():
        try:
            blocks: Any = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where}: checkpoint is of another architecture (no layer list '{name}')") from None
        old = len(blocks)
        while len(blocks) > n:
            del blocks[len(blocks) - 1]
        if len(blocks) != old:
            _set_count(model, old, len(blocks))


RESTORERS.register("blocks", Restorer(restore=restore_layer_counts, state=layer_counts))
