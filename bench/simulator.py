"""Benchmark: does the simulated speedup on ``cpu-local`` predict the speedup this CPU measures?

Model variants (random weights: speed does not depend on their values): an MLP, LeNet-5,
ResNet-20, ResNet-56 and the MobileNetV2-style net, each dense, structurally pruned at several
channel ratios (``compress.pruning.structured.prune_model``, Torch-Pruning), and 90% unstructured
sparse (magnitude masks). Every variant's deployed copy is timed on this CPU at batch 1 and 32
with one thread against its dense baseline, as the pipeline does (``compress.metrics.compare_latency``:
``--rounds`` alternating rounds, the median of the per-round speedups kept), so load from other
processes hits a variant and its dense baseline alike; ``round_spread`` is the interquartile range
of the per-round speedups relative to their median (the dense row: the noise floor, dense against
itself). Each is simulated on ``cpu-local`` (calibrated at the same thread count) and on the
shipped profiles.

Printed per variant: ``mac_speedup`` (dense MACs / MACs without zeros), ``sim_speedup`` and
``measured_speedup``, and both predictions' relative errors; then the median absolute errors and
the Spearman rank correlation of each prediction with the measurement (dense baselines left out:
their speedup is 1 by definition).

    python bench/simulator.py --out bench/results/simulator.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from compress.files import json_text
from compress.hardware import load_profile, priced_at, simulate_model
from compress.metrics import compare_latency, count_layers, summarize
from compress.models import build_model
from compress.pruning.masks import deployed_copy, prunable_layers, set_mask
from compress.pruning.structured import output_layers, prune_model
from compress.quant import float_copy, quantize_ptq
from compress.runtime import RUNTIMES

# zoo name -> (constructor kwargs, input shape)
MODELS = {
    "mlp": ({"hidden": (1200, 1200)}, (1, 28, 28)),
    "lenet5": ({}, (1, 28, 28)),
    "resnet20": ({}, (3, 32, 32)),
    "resnet56": ({}, (3, 32, 32)),
    "mobilenetv2_small": ({}, (1, 28, 28)),
}
RATIOS = (0.3, 0.5, 0.7)
SPARSITY = 0.9
OTHER_PROFILES = ("jetson-tx2", "tpu-v1", "edge-npu-int8", "a100")


def unstructured(model: nn.Module, sparsity: float, x: torch.Tensor) -> nn.Module:
    """Per-layer magnitude masks at ``sparsity`` (the output layer kept dense)."""
    keep = set(output_layers(model, x))
    for name, m in prunable_layers(model).items():
        if name in keep:
            continue
        w = m.weight.detach().abs().flatten()
        k = int(sparsity * w.numel())
        threshold = w.kthvalue(k).values if k > 0 else -1.0
        set_mask(m, m.weight.detach().abs() > threshold)
    return model


def variants(name: str) -> list[tuple[str, nn.Module, torch.Tensor]]:
    kwargs, shape = MODELS[name]
    torch.manual_seed(0)
    dense = build_model(name, input_shape=shape, num_classes=10, **kwargs).eval()
    x1 = torch.randn(1, *shape)
    out = [(f"{name}/dense", dense, x1)]
    for r in RATIOS:
        m = copy.deepcopy(dense)
        prune_model(m, x1, importance="l1", ratio=r)
        out.append((f"{name}/struct{int(r * 100)}", m.eval(), x1))
    out.append((f"{name}/sparse{int(SPARSITY * 100)}", unstructured(copy.deepcopy(dense), SPARSITY, x1).eval(), x1))
    return out


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median speedup kept)")
    p.add_argument("--repeats", type=int, default=3, help="timed samples per model in each round (the fastest kept)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runtime", default=None, choices=["onnxruntime"],
                   help="also time every variant (and int8 copies of dense and struct50) in this runtime and "
                        "score cpu-local's simulation against it")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cpu = load_profile("cpu-local")  # calibrated at this thread count (cached)
    profiles = [cpu] + [load_profile(n) for n in OTHER_PROFILES]

    rows = []
    for name in args.models:
        vs = variants(name)
        deployed = [(vname, m, deployed_copy(m).eval(), x1) for vname, m, x1 in vs]
        for batch in args.batches:
            xb = x1 = deployed[0][3]
            xb = x1.expand(batch, *x1.shape[1:]).contiguous()
            sims = {vname: simulate_model(m, xb, profiles, d) for vname, m, d, _ in deployed}
            macs = {vname: summarize(m, count_layers(m, x1)) for vname, m, _, _ in deployed}
            base, dense = deployed[0][0], deployed[0][2]
            for vname, _, d, _ in deployed:
                with torch.inference_mode():
                    t = compare_latency(partial(d, xb), partial(dense, xb), rounds=args.rounds,
                                        repeats=args.repeats, warmup=3, threads=args.threads)
                row = {"name": vname, "batch": batch,
                       "mac_speedup": macs[base]["macs"] / max(1, macs[vname]["effective_macs"]),
                       "sim_speedup": sims[base][cpu.name].latency_ms / sims[vname][cpu.name].latency_ms,
                       "measured_speedup": t.speedup, "measured_speedup_iqr": list(t.speedup_iqr),
                       "round_spread": t.relative_spread, "unreliable": t.unreliable,
                       "measured_ms": t.candidate_ms, "sim_ms": sims[vname][cpu.name].latency_ms}
                for prof in profiles[1:]:
                    row[f"sim_speedup/{prof.name}"] = sims[base][prof.name].latency_ms / sims[vname][prof.name].latency_ms
                rows.append(row)
                print_row(row)
            if args.runtime:
                rows += runtime_rows(args.runtime, deployed, xb, batch, profiles, args)

    scored = [r for r in rows if not r["name"].endswith("/dense") and "runtime" not in r]
    for r in scored:
        r["sim_error"] = abs(r["sim_speedup"] - r["measured_speedup"]) / r["measured_speedup"]
        r["mac_error"] = abs(r["mac_speedup"] - r["measured_speedup"]) / r["measured_speedup"]
    summary = {
        "variants_scored": len(scored),
        "sim_median_abs_error": statistics.median(r["sim_error"] for r in scored),
        "mac_median_abs_error": statistics.median(r["mac_error"] for r in scored),
        "sim_spearman": spearman([r["sim_speedup"] for r in scored], [r["measured_speedup"] for r in scored]),
        "mac_spearman": spearman([r["mac_speedup"] for r in scored], [r["measured_speedup"] for r in scored]),
        "median_round_spread": statistics.median(r["round_spread"] for r in scored),
    }
    print()
    print(f"{'variant':28} {'batch':>5} {'mac':>7} {'sim':>7} {'measured':>8} {'err sim':>8} {'err mac':>8} "
          f"{'spread':>7} {'meas ms':>9} {'sim ms':>9}")
    for r in rows:
        print_row(r)
    print()
    print(f"cpu-local, {len(scored)} variants (dense baselines excluded):")
    print(f"  median |error|: sim {summary['sim_median_abs_error']:.1%}, MAC ratio {summary['mac_median_abs_error']:.1%}")
    print(f"  Spearman with measured: sim {summary['sim_spearman']:.3f}, MAC ratio {summary['mac_spearman']:.3f}")
    print(f"  timing: median spread (IQR / median) of a variant's speedup across {args.rounds} rounds "
          f"{summary['median_round_spread']:.1%}")
    unreliable = [r["name"] + f" b{r['batch']}" for r in rows if r["unreliable"]]
    if unreliable:
        print(f"  timing unreliable for {len(unreliable)} rows ({', '.join(unreliable[:4])}...): "
              f"{next(r['unreliable'] for r in rows if r['unreliable'])}")
    if args.runtime:
        summary["runtime"] = runtime_summary(rows, args.runtime)
    checks = hardware_checks(rows)
    for line in checks["lines"]:
        print("  " + line)
    summary["goal_met"] = (summary["sim_median_abs_error"] <= 0.20
                           and summary["sim_median_abs_error"] <= 0.5 * summary["mac_median_abs_error"]
                           and summary["sim_spearman"] >= 0.9)
    print(f"  goal (sim error <= 20%, <= half the MAC ratio's, Spearman >= 0.9): "
          f"{'met' if summary['goal_met'] else 'NOT met'}")
    print(f"  ({time.perf_counter() - t_start:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"variants": rows, "summary": summary, "checks": checks,
                   "cpu_local": cpu.as_dict(), "machine": {"cpu": platform.processor() or platform.machine(),
                                                           "torch": torch.__version__, "threads": args.threads}}
        args.out.write_text(json_text(payload, indent=1))
        print(f"written: {args.out}")


def runtime_rows(runtime: str, deployed: list, xb: torch.Tensor, batch: int, profiles: list, args) -> list[dict]:
    """Every variant in ``runtime`` against the dense model there, plus int8 copies of dense and struct50;
    cpu-local's simulation of each (at the variant's precision) beside the runtime's measured speedup."""
    cpu = profiles[0]
    x1 = deployed[0][3]
    calibration = [torch.randn(8, *x1.shape[1:]) for _ in range(2)]
    models = [(vname, m, "fp32") for vname, m, _, _ in deployed]
    models += [(f"{vname}+int8", quantize_ptq(copy.deepcopy(m), calibration).eval(), "int8")
               for vname, m, _, _ in deployed if vname.endswith(("/dense", "/struct50"))]
    deploy = RUNTIMES.get(runtime)
    a = xb.numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {v: deploy(m, Path(tmp) / f"{i}.onnx", x1, calibration=calibration, threads=args.threads)
                    for i, (v, m, _) in enumerate(models)}
        dense_name = models[0][0]
        base_sim = simulate_model(models[0][1], xb, [cpu])[cpu.name].latency_ms
        for vname, m, precision in models:
            t = compare_latency(partial(sessions[vname].run, a), partial(sessions[dense_name].run, a),
                                rounds=args.rounds, repeats=args.repeats, warmup=3, threads=args.threads)
            profile, _ = priced_at(cpu, precision)
            sim = simulate_model(float_copy(m) if precision == "int8" else m, xb, [profile])[cpu.name].latency_ms
            macs = summarize(float_copy(m), count_layers(float_copy(m), x1))
            base_macs = summarize(models[0][1], count_layers(models[0][1], x1))["macs"]
            rows.append({"name": f"{vname} [{runtime}]", "batch": batch, "runtime": runtime, "precision": precision,
                         "mac_speedup": base_macs / max(1, macs["effective_macs"]), "sim_speedup": base_sim / sim,
                         "measured_speedup": t.speedup, "measured_speedup_iqr": list(t.speedup_iqr),
                         "round_spread": t.relative_spread, "unreliable": t.unreliable,
                         "measured_ms": t.candidate_ms, "sim_ms": sim})
            print_row(rows[-1])
    return rows


def runtime_summary(rows: list[dict], runtime: str) -> dict:
    """cpu-local (calibrated on eager PyTorch) scored against the runtime, fp32 and int8 apart."""
    out = {}
    for precision in ("fp32", "int8"):
        scored = [r for r in rows if r.get("runtime") == runtime and r["precision"] == precision
                  and not r["name"].startswith(tuple(f"{m}/dense [" for m in MODELS))]
        if not scored:
            continue
        sim = statistics.median(abs(r["sim_speedup"] - r["measured_speedup"]) / r["measured_speedup"] for r in scored)
        mac = statistics.median(abs(r["mac_speedup"] - r["measured_speedup"]) / r["measured_speedup"] for r in scored)
        out[precision] = {"variants": len(scored), "sim_median_abs_error": sim, "mac_median_abs_error": mac}
        print(f"{runtime} {precision}, {len(scored)} variants: median |error| sim (cpu-local) {sim:.1%}, "
              f"MAC ratio {mac:.1%}")
    return out


def hardware_checks(rows: list[dict]) -> dict:
    """The issue's other goals, on jetson-tx2: depthwise pruning and unstructured sparsity."""
    lines = []
    dw = [r for r in rows if "runtime" not in r and r["name"].startswith("mobilenetv2") and "/struct" in r["name"]]
    dw_ok = all(r["sim_speedup/jetson-tx2"] < r["mac_speedup"] for r in dw)
    lines.append("jetson-tx2, depthwise-heavy MobileNetV2 pruned: sim " + ", ".join(
        f"{r['sim_speedup/jetson-tx2']:.2f}x vs MAC {r['mac_speedup']:.2f}x" for r in dw)
        + f" -> {'lower' if dw_ok else 'NOT lower'}")
    sparse = [r for r in rows if "runtime" not in r and "/sparse" in r["name"]]
    no_support = ("jetson-tx2", "tpu-v1")
    flat = all(abs(r[f"sim_speedup/{p}"] - 1.0) < 1e-9 for r in sparse for p in no_support)
    lines.append(f"unstructured {SPARSITY:.0%} sparsity on profiles without sparse support "
                 f"({', '.join(no_support)}): sim speedup "
                 f"{'1.00x everywhere' if flat else 'NOT 1.00x'}; on edge-npu-int8 (CSR): " + ", ".join(
                     f"{r['sim_speedup/edge-npu-int8']:.2f}x" for r in sparse if r["batch"] == 1))
    return {"depthwise_below_mac_on_jetson": dw_ok, "unstructured_flat_without_support": flat, "lines": lines}


def print_row(r: dict) -> None:
    err_s = f"{r['sim_error']:8.1%}" if "sim_error" in r else f"{'':8}"
    err_m = f"{r['mac_error']:8.1%}" if "mac_error" in r else f"{'':8}"
    print(f"{r['name']:28} {r['batch']:5d} {r['mac_speedup']:7.2f} {r['sim_speedup']:7.2f} {r['measured_speedup']:8.2f} "
          f"{err_s} {err_m} {r['round_spread']:7.1%} {r['measured_ms']:9.3f} {r['sim_ms']:9.3f}", flush=True)


if __name__ == "__main__":
    main()
