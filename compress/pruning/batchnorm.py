"""BatchNorm statistics after a structural change.

Removing channels changes what every later BatchNorm sees (its input is a sum over fewer channels), so
the running statistics collected on the dense model no longer describe it; re-estimating them on a few
training batches before fine-tuning (EagleEye, Li et al. 2020, section 3.2: "adaptive BN") recovers
much of the accuracy at once. A BatchNorm built with ``momentum=0`` never updates its statistics in
training, which its owner may not know: it is named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from compress.calls import call

__all__ = ["reestimate_batchnorm", "frozen_batchnorms"]


def _batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


def frozen_batchnorms(model: nn.Module) -> list[str]:
    """BatchNorms whose ``momentum`` is 0: their running statistics never change in training."""
    return [n for n, m in _batchnorms(model).items() if m.momentum == 0]


def reestimate_batchnorm(model: nn.Module, batches: Iterable[Any]) -> int:
    """Every BatchNorm's running statistics recomputed as the plain average over ``batches`` (inputs),
    the rest of the model in eval mode (no dropout); returns the number of BatchNorms re-estimated."""
    norms = _batchnorms(model)
    if not norms:
        return 0
    was_training = model.training
    momenta = {n: m.momentum for n, m in norms.items()}
    model.eval()
    for m in norms.values():
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch counts the same
        m.train()
    try:
        with torch.no_grad():
            for x in batches:
                call(model, x)
    finally:
        for n, m in norms.items():
            m.momentum = momenta[n]
        model.train(was_training)
    return len(norms)
