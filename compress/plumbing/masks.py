"""Pruning masks as ``torch.nn.utils.parametrize`` parametrizations.

``module.weight`` becomes ``original * mask`` on every access, so a pruned weight stays exactly
zero through any training loop (Lightning, DDP, a user's own), through ``deepcopy`` and later
stages, with no callback to remember. The mask is a buffer, so it is in the ``state_dict`` and
checkpoints carry it; :func:`make_permanent` bakes it in for export.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.plumbing.restorers import PARAMETRIZATIONS

__all__ = ["Mask", "set_mask", "get_mask", "masked_modules", "make_permanent", "deployed_copy", "prunable_layers",
           "weight_layers", "is_hf_conv1d", "output_dim", "out_width"]


class Mask(nn.Module):
    """Parametrization ``w -> w * mask``."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: Tensor) -> Tensor:
        return w * self.mask


def _mask_param(module: nn.Module, name: str = "weight") -> Mask | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, Mask):
            return p
    return None


def get_mask(module: nn.Module, name: str = "weight") -> Tensor | None:
    p = _mask_param(module, name)
    return None if p is None else p.mask


def set_mask(module: nn.Module, mask: Tensor, name: str = "weight") -> None:
    """Install or replace the mask of ``module.<name>``; the masked-out values become zero at once."""
    mask = mask.to(device=getattr(module, name).device, dtype=torch.bool)
    p = _mask_param(module, name)
    if p is None:
        parametrize.register_parametrization(module, name, Mask(mask))
    else:
        p.mask = mask
    with torch.no_grad():  # zero the stored values too, so removing the mask later keeps them zero
        module.parametrizations[name].original.mul_(mask)


@PARAMETRIZATIONS.register("Mask")
def _reinstall_mask(module: nn.Module, tensor: str, state_dict: dict, prefix: str) -> None:
    """Checkpoint replay: an all-true mask, filled by ``load_state_dict``."""
    set_mask(module, torch.ones_like(getattr(module, tensor), dtype=torch.bool), tensor)


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if _mask_param(m) is not None}


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every parametrization, keeping the current (masked, shared) values. In place.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the generated
    ``Parametrized<Class>``, a class ``copy.deepcopy`` shares between a model and its copies, and
    so would break every copy (a ``teacher: self``, a reference model). Here only this module's
    ``__class__`` is swapped back.
    """
    for m in list(model.modules()):
        if parametrize.is_parametrized(m):
            with torch.no_grad():
                values = {n: getattr(m, n).detach().clone() for n in m.parametrizations.keys()}
            m.__class__ = m.__class__.__bases__[0]  # the class parametrize subclassed
            del m._modules["parametrizations"]
            for n, v in values.items():
                m.register_parameter(n, nn.Parameter(v))
    return model


def deployed_copy(model: nn.Module) -> nn.Module:
    """A copy with masks and codebooks baked in, as it would be deployed; ``model`` is untouched."""
    return make_permanent(copy.deepcopy(model))


PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose ``weight`` the pruning and sharing stages act on, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a linear layer whose weight is stored transposed,
    ``(in, out)``, computing ``x @ W + b``. Found without importing transformers: a model that holds one
    has loaded it, and where it is not loaded no module can be one."""
    cls = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return isinstance(cls, type) and isinstance(module, cls)


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose ``weight`` a matmul or convolution reads and which magnitude pruning, weight sharing,
    counting and quantisation act on: :data:`PRUNABLE` plus Hugging Face's ``Conv1D``, by qualified name.

    Structured pruning keeps to :func:`prunable_layers`: Torch-Pruning cannot trace ``Conv1D``.
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE) or is_hf_conv1d(m)}


def output_dim(module: nn.Module) -> int:
    """The dimension of a quantisable layer's weight that indexes output channels: 1 for ``Conv1D``
    (in, out), 0 for ``Linear`` (out, in) and ``Conv`` (out, in/groups, k...)."""
    return 1 if is_hf_conv1d(module) else 0


def out_width(module: nn.Module) -> int:
    """Output channels (features) of a layer of :func:`weight_layers`."""
    width = getattr(module, "out_channels", getattr(module, "out_features", None))
    return int(width) if width is not None else int(module.weight.shape[output_dim(module)])
