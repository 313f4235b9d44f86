"""Measured latency you can trust: a fixed thread count, A/B rounds, and a verdict on the noise.

A candidate (a stage's model) and its baseline (the input model) are timed in alternation,
round after round, in the same window: load from other processes, frequency scaling and the
state of the thread pool hit both alike, and their per-round ratio stays meaningful where two
latencies measured minutes apart do not. Each sample is a loop of calls lasting at least
``MIN_SAMPLE_S``, since a tiny model runs in tens of microseconds, where one timer read is noise.
Within a round each callable counts as the fastest of its few samples: other processes only ever
slow a sample down (a preemption adds milliseconds to a 2 ms loop), so the fastest is the one
they missed. Beside a process spinning on every core, an A/A comparison (a callable against
itself) gave 0.70x-1.03x with the median of 3 samples per round and 0.99x-1.01x with the fastest
(8 runs of 10 rounds each; both 0.98x-1.01x on a quiet machine).

The helpers are generic over zero-argument callables (``lambda: model(x)``, an ONNX Runtime
session's ``lambda: sess.run(None, feed)``); torch callers choose the autograd mode
(``torch.inference_mode()``) themselves.

Noise is made visible rather than hidden: :class:`Timing` carries the spread of the per-round
speedups and a reason when the figure is unreliable (a busy machine, a wide spread).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.batches import call, eval_mode

__all__ = ["Timing", "compare_latency", "latency_ms", "measure_latency_ms", "thread_env", "machine_busy",
           "runnable_tasks", "usable_cores", "MIN_SAMPLE_S", "WIDE_SPREAD"]

MIN_SAMPLE_S = 0.002  # each timed sample runs enough calls to last this long: timer noise stays small
MAX_CALLS_PER_SAMPLE = 1000
WIDE_SPREAD = 0.25  # a speedup's IQR wider than this fraction of its median is flagged as unreliable


@dataclass(frozen=True)
class Timing:
    """A candidate timed against a baseline in alternating rounds.

    Attributes:
        candidate_ms: median of the candidate's samples (ms per call).
        baseline_ms: median of the baseline's samples (ms per call).
        speedup: median over rounds of ``baseline / candidate`` (each round: the fastest of its samples).
        speedup_iqr: ``[q1, q3]`` of the per-round speedups: the interval holding the middle half of
            the rounds, in the same units as ``speedup`` (a ratio is asymmetric around its median,
            so the interval says more than its width; ``q3 - q1`` is one subtraction away).
        rounds: the per-round speedups, in order.
        threads: torch intra-op threads during the timing.
        busy: why the machine was busy during the timing (:func:`machine_busy`), or None.
    """

    candidate_ms: float
    baseline_ms: float
    speedup: float
    speedup_iqr: tuple[float, float]
    rounds: tuple[float, ...]
    threads: int
    busy: str | None = None

    @property
    def relative_spread(self) -> float:
        """``(q3 - q1) / median`` of the per-round speedups."""
        q1, q3 = self.speedup_iqr
        return (q3 - q1) / self.speedup if self.speedup > 0 else float("inf")

    @property
    def wide_spread(self) -> str | None:
        """A sentence when the per-round speedups spread by more than ``WIDE_SPREAD`` of their median."""
        if self.relative_spread <= WIDE_SPREAD:
            return None
        q1, q3 = self.speedup_iqr
        return (f"the middle half of {len(self.rounds)} rounds spans {q1:.2f}x-{q3:.2f}x "
                f"({self.relative_spread:.0%} of the median)")

    @property
    def unreliable(self) -> str | None:
        """Why the speedup should not be trusted (machine busy, wide spread), or None."""
        reasons = [f"machine busy: {self.busy}" if self.busy else None,
                   f"wide spread: {self.wide_spread}" if self.wide_spread else None]
        return "; ".join(r for r in reasons if r) or None


@contextmanager
def thread_env(threads: int | None) -> Iterator[int]:
    """Set torch's intra-op thread count for the block, restore the previous one after.

    Yields the thread count in effect. ``None`` leaves the count as it is. Only intra-op threads
    can be set: torch fixes the inter-op pool size once it has started
    (``torch.set_num_interop_threads`` raises after the first parallel work), and a single-stream
    forward does not use it anyway.
    """
    previous = torch.get_num_threads()
    if threads is not None and threads < 1:
        raise ValueError(f"threads: {threads} must be >= 1")
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runnable_tasks() -> int | None:
    """Tasks running or ready to run on the whole machine right now, this one included.

    The fourth field of Linux's ``/proc/loadavg``; None elsewhere. Unlike the load average (a
    one-minute moving average, slow to rise) it shows the competition during the timing itself.
    """
    try:
        return int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None


def machine_busy(threads: int = 1, running: Sequence[int] | None = None) -> str | None:
    """Why timing at ``threads`` threads competes with other work, or None when it does not.

    The machine is busy when other work needs more than the cores left free by the timing
    (``usable_cores() - threads``): by the one-minute load average (minus this process, counted
    as one task, and a margin of half a core for its lag) or by ``running``, counts of runnable
    tasks sampled during the timing (:func:`runnable_tasks`, this process included: their median
    minus one is the other work).

    Args:
        threads: intra-op threads the timing runs on.
        running: runnable-task samples taken during the timing, if any.

    Returns:
        A sentence such as ``"load average 2.9 on 2 cores"``, or None.
    """
    cores = usable_cores()
    free = max(0, cores - threads)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = None
    others_now = statistics.median(running) - 1 if running else None
    busy_by_load = load is not None and load - 1 > free + 0.5
    busy_now = others_now is not None and others_now > free
    if not (busy_by_load or busy_now):
        return None
    parts = [f"load average {load:.1f} on {cores} cores" if load is not None else f"{cores} cores"]
    if others_now is not None:
        parts.append(f"{others_now:g} other tasks running during the timing")
    return ", ".join(parts) + f" (timing uses {threads} thread{'s' if threads != 1 else ''})"


def _calls_per_sample(fn: Callable[[], Any], warmup: int) -> int:
    """Run ``warmup`` calls (at least one) and size a sample to last ``MIN_SAMPLE_S``."""
    n = max(1, warmup)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    per_call = (time.perf_counter() - t0) / n
    return max(1, min(MAX_CALLS_PER_SAMPLE, int(MIN_SAMPLE_S / max(per_call, 1e-7))))


def _sample_ms(fn: Callable[[], Any], calls: int) -> float:
    """One timed loop of ``calls`` calls: ms per call."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


@contextmanager
def _quiet_gc() -> Iterator[None]:
    """No garbage collection inside timed loops (as ``timeit`` does); restored after."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0])
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q1, q3)


def latency_ms(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 3, threads: int | None = None) -> float:
    """Median wall time of one ``fn()`` in milliseconds, over ``repeats`` samples after ``warmup`` calls.

    Args:
        fn: the call to time.
        repeats: timed samples (each a loop lasting at least ``MIN_SAMPLE_S``).
        warmup: untimed calls first (at least one: it sizes the loops).
        threads: torch intra-op threads during the timing (None: as they are), restored after.
    """
    with thread_env(threads), _quiet_gc():
        calls = _calls_per_sample(fn, warmup)
        return statistics.median(_sample_ms(fn, calls) for _ in range(max(1, repeats)))


def compare_latency(candidate: Callable[[], Any], baseline: Callable[[], Any], *, rounds: int = 10,
                    repeats: int = 3, warmup: int = 3, threads: int | None = 1) -> Timing:
    """Time ``candidate`` against ``baseline`` in alternating rounds; the speedup is ``baseline / candidate``.

    Each round times both (baseline first in even rounds, candidate first in odd ones, so neither
    always runs in the other's wake), each as the fastest of ``repeats`` samples; the speedup is
    the median of the per-round ratios, and its spread their interquartile range. Passing the same
    callable twice measures the noise floor (a speedup near 1).

    Args:
        candidate: the call whose speedup is wanted (a stage's model).
        baseline: the call it is compared with (the input model).
        rounds: alternating rounds (at least 3 for a meaningful spread).
        repeats: samples per callable in each round (3 or more: the fastest of one sample is no
            defence against a preemption).
        warmup: untimed calls of each before the rounds.
        threads: torch intra-op threads during the timing (None: as they are), restored after.

    Returns:
        The :class:`Timing`, with a reason in ``unreliable`` when the machine was busy or the
        per-round speedups spread by more than ``WIDE_SPREAD`` of their median.
    """
    rounds, repeats = max(1, rounds), max(1, repeats)
    with thread_env(threads) as used, _quiet_gc():
        calls = {"b": _calls_per_sample(baseline, warmup), "c": _calls_per_sample(candidate, warmup)}
        fns = {"b": baseline, "c": candidate}
        samples: dict[str, list[float]] = {"b": [], "c": []}
        ratios, running = [], []
        for r in range(rounds):
            per_round = {}
            for key in ("b", "c") if r % 2 == 0 else ("c", "b"):
                times = [_sample_ms(fns[key], calls[key]) for _ in range(repeats)]
                samples[key] += times
                per_round[key] = min(times)
            ratios.append(per_round["b"] / per_round["c"])
            n = runnable_tasks()
            if n is not None:
                running.append(n)
    return Timing(candidate_ms=statistics.median(samples["c"]), baseline_ms=statistics.median(samples["b"]),
                  speedup=statistics.median(ratios), speedup_iqr=_quartiles(ratios), rounds=tuple(ratios),
                  threads=used, busy=machine_busy(used, running))


@torch.inference_mode()
def measure_latency_ms(model: nn.Module, x: Any, repeats: int = 20, warmup: int = 3,
                       threads: int | None = None) -> float:
    """Median wall time of one ``model(x)`` in milliseconds (eval mode, no autograd).

    :func:`latency_ms` on ``lambda: model(x)``; to compare two models, time them together with
    :func:`compare_latency` instead of dividing two of these.

    Args:
        model: the module; its training mode is restored after.
        x: the input batch (a tensor, or a mapping/tuple of tensors: :func:`compress.batches.call`).
        repeats: timed samples.
        warmup: untimed forwards first.
        threads: torch intra-op threads during the timing (None: as they are), restored after.
    """
    with eval_mode(model):
        return latency_ms(lambda: call(model, x), repeats=repeats, warmup=warmup, threads=threads)
