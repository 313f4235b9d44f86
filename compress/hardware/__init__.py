"""Simulated hardware: roofline profiles and a per-layer simulator, for a speedup that is honest.

A FLOP ratio is not a speedup: a layer is compute-bound or bandwidth-bound, depthwise and
element-wise ops are bandwidth-heavy, sparsity pays only where the hardware exploits it, and
fused kernels read their data once. :func:`hardware_metrics` traces the model's forward pass at
the aten level and prices every op on each profile (``profiles/*.yaml``, or a user's file).

    from compress.hardware import simulate_model
    sims = simulate_model(model, x, ["cpu-local", "jetson-tx2"])
    sims["jetson-tx2"].latency_ms, sims["jetson-tx2"].bottlenecks()
"""

from __future__ import annotations

from compress.hardware import calibrate  # noqa: F401  (registers the `cpu` calibration)
from compress.hardware.notes import hardware_notes
from compress.hardware.pricing import LAYER_FIELDS, hardware_metrics, priced_at, simulate_model
from compress.hardware.profiles import (
    PROFILES,
    HardwareProfile,
    aligned_channels,
    check_profiles,
    load_profile,
    profile_from_dict,
    resolve_profile,
)
from compress.hardware.roofline import OpCost, Simulation, WeightInfo, simulate, weight_infos
from compress.hardware.trace import Trace, trace_ops

__all__ = ["PROFILES", "HardwareProfile", "check_profiles", "load_profile", "profile_from_dict", "resolve_profile",
           "simulate", "simulate_model", "hardware_metrics", "trace_ops", "weight_infos", "hardware_notes",
           "Simulation", "OpCost", "Trace", "WeightInfo", "LAYER_FIELDS", "priced_at", "aligned_channels"]
