"""Measured latency: median of repeated timed forward passes, warm-up excluded."""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor, nn

__all__ = ["measure_latency_ms"]

MIN_SAMPLE_S = 0.002  # each timed sample runs enough forwards to last this long: timer noise stays small


@torch.inference_mode()
def measure_latency_ms(model: nn.Module, x: Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ``model(x)`` in milliseconds (eval mode, no autograd).

    A tiny model runs in tens of microseconds, where one timer read is noise; each of the
    ``repeats`` samples therefore times a loop of forwards lasting at least ``MIN_SAMPLE_S``.
    """
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            model(x)
        per_call = (time.perf_counter() - t0) / max(1, warmup)
        inner = max(1, min(1000, int(MIN_SAMPLE_S / max(per_call, 1e-7))))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                model(x)
            times.append((time.perf_counter() - t0) * 1e3 / inner)
    finally:
        model.train(was_training)
    return statistics.median(times)
