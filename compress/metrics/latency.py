"""Measured latency: median of repeated timed forward passes, warm-up excluded."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

__all__ = ["measure_latency_ms"]


@torch.inference_mode()
def measure_latency_ms(model: nn.Module, x: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``model(x)`` in milliseconds (eval mode, no autograd)."""
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        model.train(was_training)
    return statistics.median(times)
