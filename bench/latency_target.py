"""Benchmark: structured pruning to a latency target, against MAC-targeted and uniform pruning.

Part ``speed``: zoo ResNet-20, ResNet-56 and MobileNetV2 (3x32x32, random weights: speed does not
depend on their values) pruned by ``compress.pruning.latency.prune_to_latency`` to each target on
each ``latency_on`` (ONNX Runtime at batch 1 and 32, ``jetson-tx2`` simulated at batch 32), with
``round_to: auto``. Per row: target, achieved (measured in the runtime against the unpruned model
in alternating rounds, or simulated), MAC ratio; then the same model pruned by ``mac_speedup`` to
the same MAC ratio (L2, ``round_to`` null, the stage's behaviour without a latency target) and
its speedup taken the same way. A target the allocation cannot reach within ``max_layer_ratio``
is a row saying how far it got.

Part ``accuracy``: LeNet-5 on MNIST (``--data``), trained ``--epochs``; then, per seed,
latency-targeted pruning (``--acc-target`` on ``--acc-on``) and uniform pruning (one channel
ratio for every layer, channel counts unrounded or rounded to 8 or 16: the one whose measured
speedup is nearest the latency-targeted arm's, found by a scan and a refinement, both arms timed again back to back), each fine-tuned
``--finetune-epochs`` the same way; test accuracy of both.

    nice python bench/latency_target.py --part speed --models resnet20 --targets 2 --on onnxruntime:32
    nice python bench/latency_target.py --part accuracy --data ../shared/data --seeds 0 1 2

The machine is shared (2 cores): measured rows carry the load; simulated rows are exact.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from common import print_table, write_json

from compress.errors import UserError
from compress.metrics import evaluate_accuracy
from compress.models import build_model
from compress.pruning.latency import latency_backend, prune_to_latency
from compress.pruning.structured import prune_model

MODELS = ("resnet20", "resnet56", "mobilenetv2")
ON = ("onnxruntime:1", "onnxruntime:32", "jetson-tx2:32")


def parse_round_to(text: str) -> dict[str, Any]:
    """``auto``, ``16``, ``16/8`` (8 for groups narrower than 32), ``none``: prune_to_latency's alignment."""
    if text == "auto":
        return {"round_to": "auto"}
    if text == "none":
        return {"round_to": None}
    big, _, small = text.partition("/")
    return {"round_to": int(big), "small_round_to": int(small) if small else None}


def speed_rows(models: list[str], targets: list[float], on: list[str], threads: int,
               round_to: str = "auto") -> list[dict[str, Any]]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        base = build_model(name, input_shape=(3, 32, 32), num_classes=10).eval()
        x = torch.randn(2, 3, 32, 32)
        for where in on:
            runtime, batch = where.rsplit(":", 1)
            backend = latency_backend(runtime, threads=threads)
            xb = torch.randn(int(batch), 3, 32, 32)
            for target in targets:
                model = copy.deepcopy(base)
                row: dict[str, Any] = {"model": name, "on": runtime, "batch": int(batch), "target": target}
                t0 = time.perf_counter()
                try:
                    r = prune_to_latency(model, x, xb, target=target, backend=backend, **parse_round_to(round_to))
                    row.update(achieved=r.achieved, estimated=r.estimated, mac_ratio=r.mac_speedup,
                               round_to=f"{r.round_to}" + (f"/{r.small_round_to}" if r.small_round_to else ""), rounds=len(r.latency_history), table_entries=r.table_entries)
                except UserError as e:
                    row.update(unreached=str(e))
                row["prune_s"] = time.perf_counter() - t0
                if "mac_ratio" in row:
                    mac = copy.deepcopy(base)
                    prune_model(mac, x, mac_speedup=row["mac_ratio"], round_to=None)
                    row["mac_pruned_speedup"] = backend.speedup(mac, base, xb)
                rows.append(row)
                print(f"{name:12s} {runtime:12s} b{batch:>2s} target {target:.1f}x  "
                      + (f"achieved {row['achieved']:.2f}x  MACs {row['mac_ratio']:.2f}x  MAC-targeted "
                         f"{row['mac_pruned_speedup']:.2f}x" if "achieved" in row else row["unreached"])
                      + f"  ({row['prune_s']:.0f} s)", flush=True)
    return rows


def _train(model: torch.nn.Module, dm: Any, epochs: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for xb, yb in dm.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    model.eval()


def match_uniform(base: torch.nn.Module, x: torch.Tensor, xb: torch.Tensor, backend: Any, like: torch.nn.Module,
                  within: float = 0.03) -> tuple[torch.nn.Module, str, float]:
    """The uniformly pruned model (one channel ratio everywhere) whose measured latency is nearest ``like``'s.

    Each candidate is timed against ``like`` itself in alternating rounds (the goal is a ratio of 1),
    not against the dense model: timed against the dense model, the same pruned LeNet-5 read 1.97x
    during pruning and 4.89x minutes later (seeds 0 and 1; the uniform arm's figure moved with it, so
    presumably the dense model's time moved), which would match the arms to different speeds.

    Measured speedup is not monotone in the ratio, and jumps where a layer's width becomes a multiple
    of the runtime's block (LeNet-5 at batch 32 in ONNX Runtime: 1.23x at ratio 0.150, 2.45x at
    0.153, where fc1 goes from 425 to 424 units), so bisection can stop far from the goal. Scan a grid
    of ratios, unrounded and with channel counts rounded to 8 and 16 (the same ratio everywhere, then
    aligned as ``round_to`` does), then refine between neighbouring ratios that bracket the goal until
    one lands within ``within``; of those within it, the lowest ratio (the uniform arm's best case).

    Returns:
        (model, "ratio/round_to", its speedup over ``like``: near 1)
    """
    goal = 1.0
    tried: dict[tuple[int | None, float], tuple[float, torch.nn.Module]] = {}

    def measure(rt: int | None, ratio: float) -> None:
        ratio = round(ratio, 4)
        if (rt, ratio) not in tried:
            cand = copy.deepcopy(base)
            prune_model(cand, x, ratio=ratio, round_to=rt)
            tried[rt, ratio] = (backend.speedup(cand, like, xb), cand)

    def miss(k: tuple[int | None, float]) -> float:
        return abs(math.log(tried[k][0] / goal))

    for rt in (None, 8, 16):
        for ratio in [i / 20 for i in range(1, 18)]:  # 0.05 .. 0.85
            measure(rt, ratio)
    for _ in range(10):
        if miss(min(tried, key=miss)) <= math.log1p(within):
            break
        pairs = []
        for rt in (None, 8, 16):
            qs = sorted(q for r, q in tried if r == rt)
            pairs += [((rt, a), (rt, b)) for a, b in zip(qs, qs[1:], strict=False)
                      if (tried[rt, a][0] - goal) * (tried[rt, b][0] - goal) <= 0 and b - a > 0.004]
        if not pairs:
            break
        lo, hi = min(pairs, key=lambda ab: min(miss(ab[0]), miss(ab[1])))
        measure(lo[0], (lo[1] + hi[1]) / 2)
    # several uniform models can sit within ``within`` (a plateau of aligned widths): give the uniform arm its
    # best case, the one keeping the most channels (lowest ratio), not whichever the timing noise put nearest
    near = [k for k in tried if miss(k) <= math.log1p(within)]
    best = min(near, key=lambda k: (k[1], -(k[0] or 0))) if near else min(tried, key=miss)
    for rt in (None, 8, 16):
        print(f"  uniform scan, round_to {rt}: " + ", ".join(
            f"{q:.3f}:{tried[rt, q][0]:.2f}x" for r, q in sorted(tried, key=lambda k: k[1]) if r == rt), flush=True)
    return tried[best][1], f"{best[1]:.3f}/{best[0]}", tried[best][0]


def accuracy_rows(data: str, seeds: list[int], target: float, on: str, epochs: int, finetune_epochs: int,
                  threads: int) -> list[dict[str, Any]]:
    from compress.data import build_datamodule

    runtime, batch = on.rsplit(":", 1)
    backend = latency_backend(runtime, threads=threads)
    rows = []
    for seed in seeds:
        dm = build_datamodule({"name": "mnist", "root": data, "batch_size": 128}, seed=seed)
        dm.setup("fit")
        torch.manual_seed(seed)
        base = build_model("lenet5", input_shape=(1, 28, 28), num_classes=10)
        _train(base, dm, epochs, 0.05, seed)
        x, xb = next(iter(dm.test_dataloader()))[0][:2], next(iter(dm.test_dataloader()))[0][: int(batch)]
        latency = copy.deepcopy(base)
        r = prune_to_latency(latency, x, xb, target=target, backend=backend, round_to="auto")
        uniform, ratio, vs_latency = match_uniform(base, x, xb, backend, latency)
        # both arms timed again against the dense model, back to back (the match itself is uniform vs latency)
        achieved = backend.speedup(latency, base, xb)
        speed = backend.speedup(uniform, base, xb)
        base_acc = evaluate_accuracy(base, dm.test_dataloader())["accuracy"]
        for kind, model, sp in (("latency", latency, achieved), ("uniform", uniform, speed)):
            _train(model, dm, finetune_epochs, 0.01, seed)
            acc = evaluate_accuracy(model, dm.test_dataloader())["accuracy"]
            rows.append({"seed": seed, "kind": kind, "speedup": sp, "accuracy": acc, "base_accuracy": base_acc,
                         "on": on, "target": target, "ratio": ratio if kind == "uniform" else None,
                         "uniform_over_latency": vs_latency, "achieved_while_pruning": r.achieved})
            print(f"seed {seed} {kind:8s} speedup {sp:.2f}x  accuracy {acc:.4f} (dense {base_acc:.4f})"
                  + (f"  uniform {ratio}, {vs_latency:.3f}x the latency arm's speed" if kind == "uniform" else ""),
                  flush=True)
    for kind in ("latency", "uniform"):
        accs = [r["accuracy"] for r in rows if r["kind"] == kind]
        print(f"{kind:8s} mean accuracy {statistics.mean(accs):.4f} over {len(accs)} seeds")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("speed", "accuracy", "all"), default="speed")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--targets", nargs="+", type=float, default=[1.5, 2.0, 3.0])
    p.add_argument("--on", nargs="+", default=list(ON), help="RUNTIME_OR_PROFILE:BATCH")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--round-to", default="auto", help="auto | N | N/M (M below 2N channels) | none")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--acc-target", type=float, default=2.0)
    p.add_argument("--acc-on", default="onnxruntime:32")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    payload: dict[str, Any] = {"meta": {"torch": torch.__version__, "threads": args.threads,
                                        "load": os.getloadavg()[0], "cores": os.cpu_count()}}
    if args.part in ("speed", "all"):
        rows = speed_rows(args.models, args.targets, args.on, args.threads, args.round_to)
        print_table(rows, [("model", "model", ""), ("on", "on", ""), ("batch", "batch", "d"), ("target", "target", ".1f"),
                           ("achieved", "achieved", ".2f"), ("MACs", "mac_ratio", ".2f"),
                           ("MAC-targeted", "mac_pruned_speedup", ".2f"), ("round_to", "round_to", ""),
                           ("prune s", "prune_s", ".0f")])
        payload["speed"] = rows
    if args.part in ("accuracy", "all"):
        payload["accuracy"] = accuracy_rows(args.data, args.seeds, args.acc_target, args.acc_on, args.epochs,
                                            args.finetune_epochs, args.threads)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
