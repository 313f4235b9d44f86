"""A model priced on hardware profiles: the simulated figures of a stage, against stage 0.

:func:`simulate_model` traces a model once and simulates it on profiles; :func:`hardware_metrics`
turns that into a stage's metrics, per-layer rows and notes; :func:`priced_at` says at which
precision a profile runs a float or an int8 model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from compress.batches import batch_size
from compress.hardware.notes import hardware_notes
from compress.hardware.profiles import HardwareProfile, load_profile, resolve_profile
from compress.hardware.roofline import Simulation, simulate, weight_infos
from compress.hardware.trace import trace_ops
from compress.plumbing.masks import deployed_copy

__all__ = ["LAYER_FIELDS", "simulate_model", "priced_at", "hardware_metrics"]

# Per-layer figures each profile adds to a report row (under row["hardware"][profile]).
LAYER_FIELDS = ("time_us", "bound", "compute_us", "memory_us", "overhead_us", "flops", "dram_bytes", "chip_bytes",
                "weight_bytes", "weight_format", "fused")
TOP_BOTTLENECKS = 5


def simulate_model(model: nn.Module, example: Tensor, profiles: Sequence[str | HardwareProfile],
                   deployed: nn.Module | None = None) -> dict[str, Simulation]:
    """Trace ``model(example)`` once and simulate it on every profile (name, path or object).

    ``model`` may carry masks and codebooks (their formats are read from it); the trace runs on
    ``deployed`` (default: ``deployed_copy(model)``), where they are baked in.
    """
    resolved = [resolve_profile(p, f"hardware[{i}]") for i, p in enumerate(profiles)]
    deployed = deployed if deployed is not None else deployed_copy(model)
    trace = trace_ops(deployed, example)
    weights = weight_infos(model, deployed)
    return {p.name: simulate(trace, weights, p) for p in resolved}


def priced_at(profile: HardwareProfile, precision: str) -> tuple[HardwareProfile, str | None]:
    """The profile a model of ``precision`` (``fp32`` float, ``int8`` quantised) runs at, and a note.

    A float model runs at the profile's float dtype (fp16 toolchains cast it); on an int8-only
    profile it is priced as if quantised, with a note that it needs quantising. An int8 model runs
    at int8 where the profile gives an int8 peak, else at the profile's dtype, with a note.
    """
    if precision == "int8":
        if profile.dtype == "int8":
            return profile, None
        if profile.peak_gflops.int8 is not None:
            return dataclasses.replace(profile, dtype="int8"), None
        return profile, (f"{profile.name}: no int8 figure for this hardware: the int8 model is priced at "
                         f"{profile.dtype}")
    if profile.dtype == "int8":
        return profile, (f"{profile.name}: runs int8 only: this {precision} model is priced as if quantised; add a "
                         "quantize stage before deploying it there")
    return profile, None


def hardware_metrics(model: nn.Module, x1: Tensor, profiles: list[str], baseline: dict[str, Any] | None,
                     deployed: nn.Module | None = None, precision: str = "fp32", xb: Tensor | None = None,
                     ) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Any]]], list[str]]:
    """Per-stage simulated figures: ``(metrics, per-layer rows by profile, notes)``.

    Metrics: ``sim_latency_ms``/``sim_speedup`` (the first profile) and, per profile P,
    ``sim_latency_ms/P``, ``sim_speedup/P`` (against ``baseline``, stage 0),
    ``sim_memory_bound_share/P``, ``sim_overhead_share/P`` and ``sim_bottlenecks/P`` (a list: in
    report.json, left out of the CSV and wandb scalars). ``precision`` is the model's (``int8`` after
    ``quantize``): each profile prices it there when it can (:func:`priced_at`). With ``xb`` (a batch
    at the latency batch size), also ``sim_latency_ms_batch/P`` and ``sim_speedup_batch/P``, so a
    latency target at that batch can be read back.
    """
    resolved = [load_profile(p, f"hardware[{i}]") for i, p in enumerate(profiles)]
    deployed = (deployed if deployed is not None else deployed_copy(model)).eval()
    trace = trace_ops(deployed, x1)
    trace_b = None if xb is None else trace if batch_size(xb) == batch_size(x1) else trace_ops(deployed, xb)
    weights = weight_infos(model, deployed)
    metrics: dict[str, Any] = {}
    layers: dict[str, dict[str, dict[str, Any]]] = {}
    notes: list[str] = []
    base = baseline or {}
    for i, profile in enumerate(resolved):
        p = profile.name
        profile, precision_note = priced_at(profile, precision)
        if precision_note:
            notes.append(precision_note)
        sim = simulate(trace, weights, profile)
        ms = sim.latency_ms
        base_ms = base.get(f"sim_latency_ms/{p}", ms if baseline is None else None)
        speedup = base_ms / ms if base_ms is not None and ms > 0 else None
        metrics[f"sim_latency_ms/{p}"] = ms
        metrics[f"sim_speedup/{p}"] = speedup
        metrics[f"sim_memory_bound_share/{p}"] = sim.share("memory")
        metrics[f"sim_overhead_share/{p}"] = sim.overhead_share
        metrics[f"sim_bottlenecks/{p}"] = [
            {"name": o.name, "op": o.op, "time_us": round(o.time_us, 3), "share": round(o.time_us / sim.latency_us, 4),
             "bound": o.bound} for o in sim.bottlenecks(TOP_BOTTLENECKS)]
        if trace_b is not None:
            ms_b = simulate(trace_b, weights, profile).latency_ms
            base_b = base.get(f"sim_latency_ms_batch/{p}", ms_b if baseline is None else None)
            metrics[f"sim_latency_ms_batch/{p}"] = ms_b
            metrics[f"sim_speedup_batch/{p}"] = base_b / ms_b if base_b is not None and ms_b > 0 else None
        if i == 0:
            metrics["sim_latency_ms"] = ms
            metrics["sim_speedup"] = speedup
        for name, cost in sim.by_layer().items():
            row = cost.as_row()
            layers.setdefault(name, {})[p] = {k: row[k] for k in LAYER_FIELDS}
        if baseline is None and profile.calibrate:
            notes.append(_calibration_note(profile))
        notes += hardware_notes(sim, profile, weights)
    return metrics, layers, notes


def _calibration_note(p: HardwareProfile) -> str:
    o = p.overhead_us
    return (f"{p.name}: {p.description}: {p.peak_gflops.fp32:.0f} GFLOP/s fp32 GEMM, conv "
            f"{p.efficiency.conv:.0%} and depthwise {p.efficiency.grouped_conv:.0%} of it, {p.memory_gbps:.0f} GB/s "
            f"DRAM, {p.on_chip_gbps:.0f} GB/s from cache, {o.op:.1f} us per op, {o.conv:.1f} per conv, "
            f"{o.module:.1f} per module call (python -m compress.hardware.calibrate --force measures again)")
