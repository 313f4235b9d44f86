"""Benchmark: structured pruning to target MAC speedups, and the wall-clock speedup it buys.

Prunes ResNet-56 and the MobileNetV2-style net (CIFAR-shaped input, 3x32x32) to 1.5x, 2x and 3x
fewer MACs (``compress.pruning.structured.prune_model``, L2 group importance, layer-wise ratios)
and prints, per row: params, MACs, mac_speedup, and the measured speedup at batch 1 and 32
(``compress.metrics.compare_latency``, as the pipeline: the unpruned and the pruned model timed
in alternating rounds at ``--threads`` threads, the median of the per-round speedups and their
interquartile range), so load from other processes on a shared machine hits both alike; a row
timed on a busy machine or with a wide spread says so. Weights are random: speed does not depend
on their values. Writes the rows as JSON with ``--out``.

    nice python bench/structured.py --reps 5 --out bench/results/structured.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import torch

from compress.files import json_text
from compress.metrics import Timing, compare_latency
from compress.models import build_model
from compress.pruning.structured import prune_model

MODELS = {"resnet56": {}, "mobilenetv2": {}}


@torch.inference_mode()
def paired_timing(base: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor, rounds: int, warmup: int,
                  threads: int) -> Timing:
    """``model(x)`` timed against ``base(x)`` in alternating rounds (eval mode, no autograd)."""
    base.eval()
    model.eval()
    return compare_latency(lambda: model(x), lambda: base(x), rounds=rounds, repeats=3, warmup=warmup,
                           threads=threads)


def bench_model(name: str, speedups: list[float], reps: int, warmup: int, importance: str,
                round_to: int | None, global_pruning: bool, threads: int = 1) -> list[dict]:
    torch.manual_seed(0)
    base = build_model(name, input_shape=(3, 32, 32), num_classes=10, **MODELS[name]).eval()
    x1, x32 = torch.randn(1, 3, 32, 32), torch.randn(32, 3, 32, 32)
    rows = []
    for target in speedups:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        r = prune_model(model, x1, importance=importance, mac_speedup=target, round_to=round_to,
                        global_pruning=global_pruning)
        prune_s = time.perf_counter() - t0
        model.eval()
        t1 = paired_timing(base, model, x1, reps * 4, warmup, threads)
        t32 = paired_timing(base, model, x32, reps, warmup, threads)
        rows.append({"model": name, "target": target, "params_before": r.base_params, "params": r.params,
                     "macs_before": r.base_macs, "macs": r.macs, "mac_speedup": r.mac_speedup,
                     "latency_ms_b1": t1.candidate_ms, "latency_ms_b32": t32.candidate_ms,
                     "base_latency_ms_b1": t1.baseline_ms, "base_latency_ms_b32": t32.baseline_ms,
                     "measured_speedup_b1": t1.speedup, "measured_speedup_b32": t32.speedup,
                     "measured_speedup_iqr_b1": list(t1.speedup_iqr), "measured_speedup_iqr_b32": list(t32.speedup_iqr),
                     "unreliable": "; ".join(f"b{n}: {t.unreliable}" for n, t in ((1, t1), (32, t32)) if t.unreliable)
                     or None, "prune_seconds": prune_s})
        row = rows[-1]
        print(f"{name:12s} {target:4.1f}x  params {row['params']:>9,d}  MACs {row['macs']:>12,d}  "
              f"mac_speedup {row['mac_speedup']:5.2f}  measured b1 {row['measured_speedup_b1']:5.2f}  "
              f"b32 {row['measured_speedup_b32']:5.2f}" + (f"  ({row['unreliable']})" if row["unreliable"] else ""),
              flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    p.add_argument("--reps", type=int, default=5, help="alternating timing rounds at batch 32 (x4 at batch 1)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--importance", default="l2")
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--global", dest="global_pruning", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.speedups, args.reps, args.warmup, args.importance, args.round_to,
                            args.global_pruning, args.threads)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "reps": args.reps, "warmup": args.warmup,
                "importance": args.importance, "round_to": args.round_to, "global": args.global_pruning,
                "machine": platform.processor() or platform.machine()}
        args.out.write_text(json_text({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
