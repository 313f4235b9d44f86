"""Model inputs that are not one tensor, and model outputs that are not one tensor.

Every place that runs a model (training, accuracy, latency, tracing, MAC counting, distillation,
calibration, export) goes through :func:`forward`, so a model and its data may take either form:

* **Inputs** (the first element of a ``(inputs, targets)`` batch): a tensor is passed as the one
  positional argument; a mapping of tensors (``{"input_ids": ..., "attention_mask": ...}``, a Hugging
  Face ``BatchEncoding``) as keyword arguments; a tuple or list as positional arguments.
* **Outputs**: a tensor is the logits. Otherwise the rule, in order: the field the model names in
  ``model.compress_output`` (the recipe's ``model.output``; a key, an attribute or a tuple index);
  a ``logits`` key or attribute (Hugging Face ``ModelOutput``, a dict); the first element of a tuple
  or list (``return_dict=False``); the only tensor of a mapping. Anything else is a
  :class:`~compress.errors.UserError` naming what the output holds.

Batch helpers (:func:`take`, :func:`repeat_to`, :func:`to_device`, :func:`batch_size`) map over the
tensors of any of these forms with Lightning's ``apply_to_collection``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from compress.errors import UserError

__all__ = ["OUTPUT_ATTR", "eval_mode", "call", "logits_of", "forward", "set_output", "output_field", "tensors", "batch_size",
           "take", "repeat_to", "to_device", "cat", "first_tensor", "describe_inputs", "is_structured"]

OUTPUT_ATTR = "compress_output"  # the model's attribute naming its logits field (recipe: model.output)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, and back in the mode it was in after it (also on error)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def is_structured(inputs: Any) -> bool:
    """True when ``inputs`` is not a single tensor (a mapping, tuple or list of tensors)."""
    return not isinstance(inputs, Tensor)


def call(model: nn.Module | Any, inputs: Any) -> Any:
    """``model(inputs)``, ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def set_output(model: nn.Module, field: str | int | None) -> nn.Module:
    """Name the field of ``model``'s output that holds the logits (None: the automatic rule)."""
    if field is None:
        if OUTPUT_ATTR in model.__dict__:
            del model.__dict__[OUTPUT_ATTR]
    else:
        object.__setattr__(model, OUTPUT_ATTR, field)
    return model


def output_field(model: Any) -> str | int | None:
    return getattr(model, OUTPUT_ATTR, None)


def logits_of(output: Any, field: str | int | None = None) -> Tensor:
    """The logits tensor in a model's ``output`` (the rule in the module docstring)."""
    if isinstance(output, Tensor):
        return output
    if field is not None:
        found = _pick(output, field)
        if found is None:
            raise UserError(f"model.output: the model's output has no field {field!r} ({_what(output)}); "
                            "set model.output to one of its fields")
        return logits_of(found)
    if isinstance(output, Mapping) and "logits" in output:
        return logits_of(output["logits"])
    if not isinstance(output, (Mapping, tuple, list)) and isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    if isinstance(output, Mapping):
        found = [v for v in output.values() if isinstance(v, Tensor)]
        if len(found) == 1:
            return found[0]
    raise UserError(f"model.output: cannot tell which part of the model's output is the logits ({_what(output)}); "
                    "set model.output to the field that holds them")


def _pick(output: Any, field: str | int) -> Any:
    if isinstance(output, Mapping):
        return output.get(field) if isinstance(field, str) else None
    if isinstance(output, (tuple, list)):
        if isinstance(field, int) or (isinstance(field, str) and field.lstrip("-").isdigit()):
            i = int(field)
            return output[i] if -len(output) <= i < len(output) else None
        return getattr(output, field, None)  # a namedtuple
    return getattr(output, str(field), None)


def _what(output: Any) -> str:
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(str, output))}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)}"
    return f"a {type(output).__name__}"


def forward(model: nn.Module | Any, inputs: Any) -> Tensor:
    """The logits of ``model`` on ``inputs`` (any input form, any output form)."""
    return logits_of(call(model, inputs), output_field(model))


def tensors(inputs: Any) -> list[Tensor]:
    """The tensors in ``inputs``, in order."""
    found: list[Tensor] = []
    apply_to_collection(inputs, Tensor, found.append)
    return found


def first_tensor(inputs: Any) -> Tensor:
    found = tensors(inputs)
    if not found:
        raise UserError(f"data: a batch's inputs hold no tensor ({type(inputs).__name__})")
    return found[0]


def batch_size(inputs: Any) -> int:
    """Samples in a batch of inputs (the first dimension of its first tensor)."""
    return int(first_tensor(inputs).shape[0])


def take(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor."""
    return apply_to_collection(inputs, Tensor, lambda t: t[:n])


def repeat_to(inputs: Any, n: int) -> Any:
    """Exactly ``n`` samples: the first ones, cycled when the batch is smaller."""
    have = batch_size(inputs)
    if n <= have:
        return take(inputs, n)
    reps = -(-n // have)
    return apply_to_collection(inputs, Tensor, lambda t: t.repeat(reps, *[1] * (t.dim() - 1))[:n].contiguous())


def to_device(inputs: Any, device: torch.device | str) -> Any:
    return apply_to_collection(inputs, Tensor, lambda t: t.to(device))


def cat(batches: list[Any]) -> Any:
    """Batches of one form concatenated along the batch dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: cat([b[k] for b in batches]) for k in first}
    return type(first)(cat([b[i] for b in batches]) for i in range(len(first)))


def describe_inputs(inputs: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | list[tuple[int, ...]]:
    """The per-sample shape of a batch of inputs: a tuple, ``{name: shape}`` or a list of shapes."""
    if isinstance(inputs, Tensor):
        return tuple(inputs.shape[1:])
    if isinstance(inputs, Mapping):
        return {str(k): tuple(v.shape[1:]) for k, v in inputs.items() if isinstance(v, Tensor)}
    return [tuple(t.shape[1:]) for t in tensors(inputs)]
