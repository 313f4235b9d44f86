"""Where a saved model's changes are put back: registration points the capabilities fill.

A checkpoint (or a compressed file) holds a ``state_dict`` of a model that pruning, attention
pruning, weight sharing or quantisation changed. Rebuilding it takes each capability's own step:
reshape pruned layers, give attention modules their head counts, re-install parametrizations,
re-install quantisation. Each capability registers its step here when its module is imported
(:mod:`compress.checkpoint` imports them), so this layer knows none of them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from compress.registry import Registry

__all__ = ["PARAMETRIZATIONS", "RESTORERS", "Restorer", "saved_states", "restore_saved"]

# name of a parametrization class -> fn(module, tensor_name, state_dict, prefix) that installs a
# placeholder of the right shape, so load_state_dict can fill it.
PARAMETRIZATIONS: Registry[Any] = Registry("parametrization")


@dataclass(frozen=True)
class Restorer:
    """One capability's part of a saved model, kept in the file under the name it is registered by.

    Attributes:
        restore: ``restore(model, saved, state_dict, where)`` changes a freshly built model so the
            ``state_dict`` loads; ``saved`` is what ``state`` returned (None in a file without it);
            ``where`` names the file in errors.
        state: ``state(model)`` -> the plain data to save, or None to save nothing under the name.
        after_parametrizations: run after the parametrizations are re-installed (quantisation reads
            the masked weight), not before (shapes).
    """

    restore: Callable[[nn.Module, Any, Mapping[str, Tensor], str], None]
    state: Callable[[nn.Module], Any] | None = None
    after_parametrizations: bool = False


RESTORERS: Registry[Restorer] = Registry("checkpoint restorer")


def saved_states(model: nn.Module) -> dict[str, Any]:
    """``{restorer name: its saved data}`` for every restorer that saves something."""
    return {name: r.state(model) for name in RESTORERS.names() if (r := RESTORERS.get(name)).state is not None}


def restore_saved(model: nn.Module, saved: Mapping[str, Any], state_dict: Mapping[str, Tensor], where: str,
                  *, after_parametrizations: bool = False) -> None:
    """Run every restorer of one phase on ``model`` with its part of ``saved`` (a checkpoint's data)."""
    for name in RESTORERS.names():
        r = RESTORERS.get(name)
        if r.after_parametrizations == after_parametrizations:
            r.restore(model, saved.get(name), state_dict, where)
