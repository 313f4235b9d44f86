"""The model registry, apart from the families that register into it (timm's ``_registry.py``)."""

from __future__ import annotations

from torch import nn

from compress.registry import Registry

__all__ = ["MODELS"]

MODELS: Registry[type[nn.Module]] = Registry("model", allow_import=True)
