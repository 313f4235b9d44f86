"""Metrics computed from the model in hand after every stage."""

from compress.metrics.counting import LayerStats, count_layers, summarize
from compress.metrics.evaluate import evaluate_accuracy
from compress.metrics.latency import measure_latency_ms

__all__ = ["LayerStats", "count_layers", "summarize", "evaluate_accuracy", "measure_latency_ms"]
