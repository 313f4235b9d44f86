"""Benchmark: what pruning and int8 buy where models ship (ONNX Runtime) against eager PyTorch.

Zoo ResNet-20, ResNet-56 and MobileNetV2 (3x32x32, random weights: speed does not depend on their
values), in five variants: dense; pruned to 2x fewer MACs with unaligned channel counts; the same
with counts in multiples of ``--align`` (``round_to``); dense int8; pruned (aligned) + int8. Each
variant is timed against the dense model in alternating rounds (``compress.metrics.compare_latency``,
the pipeline's helper) at batch 1 and 32, both in eager PyTorch (int8 variants run their float copy
there: eager has no int8 kernels here) and in ONNX Runtime (the files ``compress.runtime`` exports:
fp32, or int8 QDQ calibrated on ``--calibration`` random batches). Prints a table; ``--out`` writes JSON.

    python bench/deploy.py [--models resnet20 resnet56 mobilenetv2] [--rounds 5] [--out bench/results/deploy.json]
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
from pathlib import Path

import torch
from common import print_table, write_json

from compress.metrics import compare_latency
from compress.models import build_model
from compress.pruning.structured import prune_model
from compress.quant import float_copy, quantize_ptq
from compress.runtime import RUNTIMES

MODELS = ("resnet20", "resnet56", "mobilenetv2")
VARIANTS = ("dense", "pruned 2x", "pruned 2x aligned", "int8", "pruned 2x aligned + int8")


def variants(base: torch.nn.Module, x1: torch.Tensor, align: int,
             calibration: list[torch.Tensor]) -> tuple[dict[str, torch.nn.Module], dict[str, float]]:
    """The five models of the table, built from ``base`` (left untouched), and their MAC ratios."""
    out, mac_ratio = {"dense": base}, {"dense": 1.0}
    for name, round_to in (("pruned 2x", None), ("pruned 2x aligned", align)):
        model = copy.deepcopy(base)
        mac_ratio[name] = prune_model(model, x1, importance="l2", mac_speedup=2.0, round_to=round_to).mac_speedup
        out[name] = model.eval()
    for name, source in (("int8", "dense"), ("pruned 2x aligned + int8", "pruned 2x aligned")):
        out[name] = quantize_ptq(copy.deepcopy(out[source]), calibration).eval()
        mac_ratio[name] = mac_ratio[source]
    return out, mac_ratio


def bench_model(name: str, rounds: int, threads: int, align: int, calibration: int) -> list[dict]:
    torch.manual_seed(0)
    base = build_model(name, input_shape=(3, 32, 32), num_classes=10).eval()
    x = {1: torch.randn(1, 3, 32, 32), 32: torch.randn(32, 3, 32, 32)}
    batches = [torch.randn(32, 3, 32, 32) for _ in range(calibration)]
    models, mac_ratio = variants(base, x[1], align, batches)
    deploy = RUNTIMES.get("onnxruntime")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        sessions = {v: deploy(m, Path(tmp) / f"{i}.onnx", x[1], calibration=batches, threads=threads)
                    for i, (v, m) in enumerate(models.items())}
        eager = {v: float_copy(m).eval() for v, m in models.items()}
        for variant in VARIANTS:
            row = {"model": name, "variant": variant,
                   "mac_speedup": mac_ratio[variant],
                   "onnx_bytes": (Path(tmp) / f"{VARIANTS.index(variant)}.onnx").stat().st_size}
            for b, xb in x.items():
                a = xb.numpy()
                te = compare_latency(lambda m=eager[variant], xb=xb: m(xb), lambda xb=xb: eager["dense"](xb),
                                     rounds=rounds, threads=threads)
                to = compare_latency(lambda s=sessions[variant], a=a: s.run(a), lambda a=a: sessions["dense"].run(a),
                                     rounds=rounds, threads=threads)
                tf = compare_latency(lambda s=sessions[variant], a=a: s.run(a), lambda xb=xb: eager["dense"](xb),
                                     rounds=rounds, threads=threads)
                row.update({f"eager_ms_b{b}": te.candidate_ms, f"ort_ms_b{b}": to.candidate_ms,
                            f"eager_speedup_b{b}": te.speedup, f"ort_speedup_b{b}": to.speedup,
                            f"ort_vs_eager_dense_b{b}": tf.speedup,
                            f"unreliable_b{b}": te.unreliable or to.unreliable})
            rows.append(row)
            print(f"{name} / {variant}: ORT b32 {row['ort_speedup_b32']:.2f}x, eager b32 {row['eager_speedup_b32']:.2f}x",
                  flush=True)
    return rows


COLUMNS = [("model", "model", ""), ("variant", "variant", ""), ("MAC x", "mac_speedup", ".2f"),
           ("eager b1", "eager_speedup_b1", ".2f"), ("ORT b1", "ort_speedup_b1", ".2f"),
           ("eager b32", "eager_speedup_b32", ".2f"), ("ORT b32", "ort_speedup_b32", ".2f"),
           ("ORT vs eager dense b32", "ort_vs_eager_dense_b32", ".2f"), ("ORT ms b32", "ort_ms_b32", ".2f"),
           ("file KB", "onnx_kb", ".0f")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per figure")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--align", type=int, default=16, help="round_to of the aligned variants")
    p.add_argument("--calibration", type=int, default=4, help="random batches of 32 to calibrate int8 on")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.rounds, args.threads, args.align, args.calibration)
    for r in rows:
        r["onnx_kb"] = r["onnx_bytes"] / 1024
    print()
    print_table(rows, COLUMNS)
    write_json(args.out, {"meta": {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
                                   "align": args.align, "machine": platform.processor() or platform.machine()},
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
