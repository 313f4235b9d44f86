"""Capture the outputs of named submodules with forward hooks that are removed afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from compress.errors import UserError, nearest

__all__ = ["find_module", "capture_outputs"]


def find_module(model: nn.Module, path: str, key: str = "", role: str = "model") -> nn.Module:
    """``model.get_submodule(path)``, or a one-line UserError naming ``key`` and the nearest path.

    ``""`` is the model itself (its output: the logits).
    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = nearest(path, names)
        hint = f"; did you mean '{near}'?" if near else ""
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise UserError(f"{key}: no module '{path}' in the {role}{hint} (modules: {shown})") from None


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, Tensor):
                return item
    if isinstance(output, dict):
        for item in output.values():
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


@contextmanager
def capture_outputs(model: nn.Module, paths: Sequence[str], *, key: str = "", role: str = "model") -> Iterator[dict[str, Tensor]]:
    """Inside the block, ``store[path]`` is the latest output of ``model.get_submodule(path)``.

    The hooks are removed and ``store`` is emptied when the block exits (also on errors), so no
    activation outlives the step. Outputs are cloned: a following in-place op (``ReLU(inplace=
    True)``) would otherwise change the captured value. A module called twice in one forward
    keeps its last output.

    Example::

        with capture_outputs(model, ["layer2", "layer3"]) as feats:
            logits = model(x)
            hint = feats["layer2"]  # (B, C, H, W)
    """
    store: dict[str, Tensor] = {}
    handles = []

    def saver(path: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[path] = _first_tensor(output).clone()

        return hook

    try:
        for path in dict.fromkeys(paths):  # unique, in order
            handles.append(find_module(model, path, key, role).register_forward_hook(saver(path)))
        yield store
    finally:
        for h in handles:
            h.remove()
        store.clear()
