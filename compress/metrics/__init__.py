"""Metrics computed from the model in hand after every stage."""

from compress.metrics.counting import (
    LayerStats,
    count_layers,
    summarize,
    untouched_note,
    untouched_share,
    weight_readers,
    weight_reads,
)
from compress.metrics.evaluate import evaluate_accuracy
from compress.metrics.latency import (
    Timing,
    compare_latency,
    latency_ms,
    machine_busy,
    measure_latency_ms,
    thread_env,
)

__all__ = ["LayerStats", "count_layers", "summarize", "untouched_note", "untouched_share", "weight_readers", "weight_reads",
           "evaluate_accuracy", "measure_latency_ms", "Timing", "compare_latency", "latency_ms", "machine_busy",
           "thread_env"]
