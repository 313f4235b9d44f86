"""The masks' old import path: they live in :mod:`compress.plumbing.masks` (below every capability)."""

from compress.plumbing.masks import (
    PRUNABLE,
    Mask,
    deployed_copy,
    get_mask,
    make_permanent,
    masked_modules,
    prunable_layers,
    set_mask,
)

__all__ = ["Mask", "PRUNABLE", "set_mask", "get_mask", "masked_modules", "make_permanent", "deployed_copy",
           "prunable_layers"]
