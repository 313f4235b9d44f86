"""The data-module registry, apart from the data sets that register into it."""

from __future__ import annotations

from compress.registry import Registry

__all__ = ["DATAMODULES"]

DATAMODULES: Registry[type] = Registry("dataset", allow_import=True)
