"""Checkpoints as data: a state_dict, the model spec, how the model was changed, the recipe.

Never a pickled module: everything loads with ``torch.load(..., weights_only=True)``, and a
model is rebuilt by (1) building the architecture from its spec, (2) reshaping layers whose
channels were removed and giving attention modules their pruned head attributes, (3) re-installing parametrizations (masks, codebooks) and int8 quantisation, (4) loading the
state_dict strictly. Steps (2) and (3) are the capabilities' own, registered in
:mod:`compress.plumbing.restorers` when their modules are imported (below).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

# Imported for their registrations: each capability says how its changes are saved and restored.
from compress import quant, sharing  # noqa: F401  (registrations)
from compress.calls import eval_mode, forward, take
from compress.errors import UserError
from compress.files import atomic_write
from compress.models import build_from_spec
from compress.plumbing.restorers import PARAMETRIZATIONS, restore_saved, saved_states
from compress.pruning import attention, layers, structured  # noqa: F401  (registrations, as above)
from compress.pruning.selfcheck import TOLERANCE, outputs_error

__all__ = ["FORMAT", "PARAMETRIZATIONS", "atomic_write", "save_checkpoint", "read_checkpoint", "load_model",
           "model_from_checkpoint", "describe_parametrizations"]

FORMAT = "compress-checkpoint/1"


def describe_parametrizations(model: nn.Module) -> dict[str, dict[str, list[str]]]:
    """``{module path: {tensor name: [parametrization class names]}}``."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m):
            out[name] = {t: [type(p).__name__ for p in plist] for t, plist in m.parametrizations.items()}
    return out


def save_checkpoint(path: str | Path, model: nn.Module, *, model_spec: dict[str, Any],
                    recipe: dict[str, Any] | None = None, stage_index: int = 0, stage_name: str = "",
                    metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    check_inputs: Any = None) -> None:
    """Write a checkpoint atomically; everything in it is tensors or plain containers.

    ``check_inputs``: a batch whose first two samples and the model's outputs on them are saved, so a
    reload that computes something else is refused (:func:`load_into`).
    """
    payload = {
        "format": FORMAT,
        "model_spec": model_spec,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "parametrizations": describe_parametrizations(model),
        **saved_states(model),  # "attention" (head counts: widths cannot tell heads from head dims), "quantization"
        "recipe": recipe or {},
        "stage_index": stage_index,
        "stage_name": stage_name,
        "metrics": metrics or {},
        "extra": extra or {},
        "check": _outputs_check(model, check_inputs) if check_inputs is not None else None,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _outputs_check(model: nn.Module, inputs: Any) -> dict[str, Any]:
    inputs = take(inputs, 2)
    inputs = dict(inputs) if isinstance(inputs, dict) else inputs  # a BatchEncoding is no plain container
    with eval_mode(model), torch.no_grad():
        outputs = forward(model, inputs).detach().cpu()
    return {"inputs": inputs, "outputs": outputs}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint's data with ``weights_only=True``; any problem is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise UserError(f"{path}: refused to load: the file holds more than tensors and plain data "
                        f"(it could run code when loaded): {first[:160]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable checkpoint (truncated or corrupt?): {str(e).splitlines()[0][:160]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a compress checkpoint (expected format {FORMAT}); "
                        "a plain state_dict can be loaded with model.load_state_dict(torch.load(path, weights_only=True))")
    return data


def model_from_checkpoint(data: dict[str, Any], path: str | Path = "checkpoint", *, trust_model_code: bool = False,
                          trusted: Sequence[str] = ()) -> nn.Module:
    """Rebuild the model a checkpoint describes.

    The file's ``model_spec`` is data: a zoo model is rebuilt, but one that runs code (``import:``,
    ``transformers``) only with ``trust_model_code`` or when its name is in ``trusted`` (the caller's
    own recipe names it): :func:`compress.models.build_from_spec`.
    """
    model = build_from_spec(data.get("model_spec"), str(path), trust_model_code=trust_model_code, trusted=trusted)
    load_into(model, data, path)
    return model


def load_into(model: nn.Module, data: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Load a checkpoint's weights into ``model``, reshaping pruned layers and re-installing parametrizations."""
    state = data["state_dict"]
    restore_saved(model, data, state, str(path))  # pruned shapes, head counts (absent in older checkpoints)
    for mod_name, tensors in data.get("parametrizations", {}).items():
        try:
            module = model.get_submodule(mod_name)
        except AttributeError:
            raise UserError(f"{path}: checkpoint is of another architecture (no module '{mod_name}')") from None
        for tensor, kinds in tensors.items():
            for kind in kinds:
                PARAMETRIZATIONS.get(kind)(module, tensor, state, f"{mod_name}.parametrizations.{tensor}.")
    restore_saved(model, data, state, str(path), after_parametrizations=True)  # int8: reads the masked weight
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UserError(f"{path}: checkpoint does not fit this model (another architecture?): {detail[:200]}") from None
    check = data.get("check")
    if check:  # the reloaded structure must compute what was saved, not just hold tensors of its shapes
        with eval_mode(model), torch.no_grad():
            err = outputs_error([(forward(model, check["inputs"]), check["outputs"])])
        if not err <= TOLERANCE:
            raise UserError(f"{path}: the reloaded model computes something else than the model saved (outputs "
                            f"differ by {err:.2g} of their scale); rebuild it with the code that wrote the checkpoint")
    return model


def load_model(path: str | Path, *, trust_model_code: bool = False, trusted: Sequence[str] = ()) -> nn.Module:
    """A model from a checkpoint file, ready to run (eval mode).

    Loading never imports or calls code the file names unless ``trust_model_code`` (as Hugging Face's
    ``trust_remote_code``) or the code's name is in ``trusted``: :func:`model_from_checkpoint`.
    """
    data = read_checkpoint(path)
    return model_from_checkpoint(data, path, trust_model_code=trust_model_code, trusted=trusted).eval()
