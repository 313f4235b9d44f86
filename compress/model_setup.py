"""The recipe's model before any stage: what rebuilds it, its starting weights, one checked forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from compress.calls import describe_inputs, eval_mode, forward, output_field
from compress.checkpoint import load_into, read_checkpoint
from compress.errors import UserError
from compress.models import model_kwargs
from compress.tasks import Task, build_task

__all__ = ["model_spec", "load_weights", "check_outputs"]


def model_spec(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """What rebuilds the architecture: the zoo name, every constructor argument and the output field."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k not in ("name", "checkpoint", "output")}
    kwargs = model_kwargs(str(cfg.name), kwargs, input_shape=input_shape, num_classes=num_classes)
    spec = {"name": str(cfg.name), "kwargs": kwargs}
    if cfg.get("output") is not None:
        spec["output"] = cfg.output
    return spec


def check_outputs(model: nn.Module, x: Any, num_classes: int | None, task: Task | None = None) -> None:
    """One forward before any work: the inputs fit, the outputs are found (``model.output``), and where
    the task has classes and the data says how many, the model's output width agrees (a one-line
    UserError otherwise). Without a task: classification."""
    task = task if task is not None else build_task(None)
    try:
        with eval_mode(model), torch.no_grad():
            logits = forward(model, x)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"model: it does not run on the data's inputs {describe_inputs(x)} "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    if not task.has_classes:
        return
    if logits.dim() < 2:
        raise UserError(f"model.output: the logits have shape {tuple(logits.shape)}; expected (batch, classes, ...) "
                        f"for task {task.name} (set model.output to the field holding them)")
    field = output_field(model)
    width = task.width(logits)
    if num_classes is not None and width != num_classes:
        where = "" if field is None else f" (model.output {field!r})"
        also = "" if field is None else ", or model.output to the field that holds the logits"
        raise UserError(f"model: it predicts {width} classes{where}, the data has {num_classes}; set "
                        f"model.num_classes: {num_classes} (or the model's own argument for it){also}")


def load_weights(model: nn.Module, path: Path) -> None:
    """``model.checkpoint``: a compress checkpoint, or a plain state_dict (both weights_only)."""
    try:
        data = read_checkpoint(path)
    except UserError as e:
        if "not a compress checkpoint" not in str(e):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
        data = {"state_dict": state.get("state_dict", state) if isinstance(state, dict) else state}
    load_into(model, data, path)
