"""Does distillation recover a structurally pruned model better than plain fine-tuning?

LeNet-5 (trained, from a stage checkpoint or trained here) is pruned with Torch-Pruning to a MAC
speedup target (3x by default) without fine-tuning, then two copies of the same pruned model are
fine-tuned for the same epochs, data order and optimizer: one on hard labels alone, one distilled
from the unpruned model (``teacher: self``: softened logits plus a FitNets hint on the last conv
features through a learned 1x1 adapter). Prints the accuracies per seed and writes JSON.

Usage::

    python bench/distill_structured.py [--data ../shared/data] [--from runs/X/stage-1-train.ckpt]
                                       [--mac-speedup 3] [--epochs 1] [--seeds 0 1 2] [--out FILE]

On our LeNet-5 (99.31%) at 3.03x MACs: one epoch, plain 99.16%, distilled 99.25-99.30%; at three
epochs both reach the dense accuracy (99.32 vs 99.29%), so a short budget is the informative one.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from compress.checkpoint import load_model
from compress.data import build_datamodule
from compress.errors import UserError
from compress.files import json_text
from compress.metrics import count_layers, evaluate_accuracy, summarize
from compress.models import build_model
from compress.stages import Context, StructuredPruningStage, TrainStage


def finetune(model: torch.nn.Module, teacher: torch.nn.Module | None, dm, seed: int, args) -> tuple[float, float]:
    cfg = {"epochs": args.epochs, "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.9,
                                                "weight_decay": 0.0005}, "lr_schedule": "cosine"}
    if teacher is not None:
        cfg["distill"] = {"teacher": "self", "T": args.T, "alpha": args.alpha,
                          "features": [{"student": "features.3", "teacher": "features.3", "kind": "hint",
                                        "weight": args.hint_weight}]}
    torch.manual_seed(seed)
    ctx = Context(dm, seed=seed, reference_model=teacher, trainer={"progress_bar": False})
    t0 = time.perf_counter()
    TrainStage(cfg, key="finetune").apply(model, ctx)
    return evaluate_accuracy(model, dm.test_dataloader())["accuracy"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--from", dest="ckpt", default=None, help="a trained LeNet-5 stage checkpoint (else: train)")
    p.add_argument("--train-epochs", type=int, default=10)
    p.add_argument("--mac-speedup", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=1)  # at 3 epochs both arms recover the dense accuracy
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--T", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--hint-weight", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/distill_structured.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        dm = build_datamodule({"name": "mnist", "root": args.data, "batch_size": 128}, seed=0)
        dm.setup()
        if args.ckpt:
            dense = load_model(args.ckpt)
        else:
            dense = build_model("lenet5", input_shape=dm.input_shape, num_classes=10)
            TrainStage({"epochs": args.train_epochs, "optimizer": {"lr": 0.05, "weight_decay": 0.0005}},
                       key="train").apply(dense, Context(dm, trainer={"progress_bar": False}))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dense.eval()
    x1 = dm.test_tensors[0][:1]
    base = summarize(dense, count_layers(dense, x1))
    dense_acc = evaluate_accuracy(dense, dm.test_dataloader())["accuracy"]
    pruned = copy.deepcopy(dense)
    StructuredPruningStage(mac_speedup=args.mac_speedup).apply(pruned, Context(dm))
    after = summarize(pruned, count_layers(pruned, x1))
    pruned_acc = evaluate_accuracy(pruned, dm.test_dataloader())["accuracy"]
    speedup = base["macs"] / after["macs"]
    print(f"dense {dense_acc:.2%}; pruned to {speedup:.2f}x MACs ({after['params']:,} params): {pruned_acc:.2%} "
          f"before fine-tuning")
    rows = []
    for seed in args.seeds:
        plain, t_plain = finetune(copy.deepcopy(pruned), None, dm, seed, args)
        dist, t_dist = finetune(copy.deepcopy(pruned), dense, dm, seed, args)
        rows.append({"seed": seed, "plain": plain, "distilled": dist, "plain_s": round(t_plain, 1),
                     "distilled_s": round(t_dist, 1)})
        print(f"seed {seed}: plain fine-tuning {plain:.2%} ({t_plain:.0f} s), distilled {dist:.2%} ({t_dist:.0f} s)",
              flush=True)
    plain_mean = statistics.mean(r["plain"] for r in rows)
    dist_mean = statistics.mean(r["distilled"] for r in rows)
    print(f"\n| fine-tuning ({args.epochs} epochs) | " + " | ".join(f"seed {r['seed']}" for r in rows) + " | mean |")
    print("|---|" + "---|" * (len(rows) + 1))
    print("| plain | " + " | ".join(f"{r['plain']:.2%}" for r in rows) + f" | {plain_mean:.2%} |")
    print("| distilled (self, logits + hint) | " + " | ".join(f"{r['distilled']:.2%}" for r in rows)
          + f" | {dist_mean:.2%} |")
    print(f"dense {dense_acc:.2%}, pruned {pruned_acc:.2%} before fine-tuning, {speedup:.2f}x MACs")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_text({"config": vars(args), "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc,
                               "mac_speedup": speedup, "runs": rows,
                               "summary": {"plain_mean": plain_mean, "distilled_mean": dist_mean}}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
