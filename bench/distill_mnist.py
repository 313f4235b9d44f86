"""Hinton et al. (2015), section 3, on MNIST: teacher 1200-1200, students trained alone and distilled.

For each seed and each student size (800-800 as in the paper, and 30-30, ~100x smaller than the
teacher), trains the student on hard labels alone and, from the same initialisation, data order
and budget, distilled from the teacher (``T`` = 20 by default). Prints test errors per seed and
writes JSON. The comparison needs several models, so it is a script over the Python API rather
than one recipe; ``recipes/distill_mnist_mlp.yaml`` is one of its runs.

Usage::

    python bench/distill_mnist.py [--data ../shared/data] [--seeds 0 1 2] [--epochs 15]
                                  [--train-teacher] [--out runs/bench/distill_mnist.json]

Hinton et al. found T above 8 equally good for students of 300+ units per layer but 2.5-4 best
for 30-30; at T = 20 a 30-30 student collapses here, so run it with ``--students 30-30 --T 4``.

The teacher is ``teachers/mnist_mlp1200.yaml`` (``--teacher NAME`` for another spec, e.g.
``mnist_lenet5``, whose 69 errors teach far more than the MLP's 128: 61% of the 800-800 gap closed at T = 8);
``--train-teacher`` trains it when its checkpoint is missing (``python run.py teacher NAME`` does
the same).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from compress.data import build_datamodule
from compress.distill import check_teacher, resolve_teacher
from compress.errors import UserError
from compress.files import json_text
from compress.metrics import evaluate_accuracy
from compress.models import build_model
from compress.stages import Context, TrainStage
from compress.teachers import train_teacher


def test_errors(model: torch.nn.Module, dm) -> int:
    acc = evaluate_accuracy(model, dm.test_dataloader())["accuracy"]
    return round((1.0 - acc) * len(dm.test_tensors[1]))


def run_student(hidden: list[int], seed: int, dm, teacher: str | None, args) -> tuple[int, float]:
    """Train one student (distilled from the named teacher when given); returns (test errors, wall seconds)."""
    torch.manual_seed(seed)
    model = build_model("mlp", hidden=hidden, input_shape=dm.input_shape, num_classes=10)
    cfg = {"epochs": args.epochs, "optimizer": {"name": "sgd", "lr": args.lr, "momentum": 0.9}, "lr_schedule": "cosine"}
    if teacher is not None:
        cfg["distill"] = {"teacher": teacher, "T": args.T, "alpha": args.alpha}
    ctx = Context(dm, seed=seed, teachers_dir=args.teachers_dir, trainer={"progress_bar": False})
    t0 = time.perf_counter()
    TrainStage(cfg, key="student").apply(model, ctx)
    return test_errors(model, dm), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--teachers-dir", default="teachers")
    p.add_argument("--teacher", default="mnist_mlp1200", help="a teacher name under --teachers-dir")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--students", nargs="+", default=["800-800", "30-30"])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.02)  # 0.05 diverges when distilling at T = 20
    p.add_argument("--T", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-teacher", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/bench/distill_mnist.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        try:
            check_teacher(args.teacher, args.teachers_dir)
        except UserError:
            if not args.train_teacher:
                raise
            train_teacher(args.teacher, args.teachers_dir, quiet=True)
        teacher = resolve_teacher(args.teacher, Context(teachers_dir=args.teachers_dir))
        dm = build_datamodule({"name": "mnist", "root": args.data, "batch_size": args.batch_size}, seed=0)
        dm.setup()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    teacher_errors = test_errors(teacher, dm)
    print(f"teacher {args.teacher}: {teacher_errors} test errors")
    rows = []
    for spec in args.students:
        hidden = [int(h) for h in spec.split("-")]
        for seed in args.seeds:
            dm.seed = seed
            alone, t_alone = run_student(hidden, seed, dm, None, args)
            distilled, t_dist = run_student(hidden, seed, dm, args.teacher, args)
            rows.append({"student": spec, "seed": seed, "alone": alone, "distilled": distilled,
                         "alone_s": round(t_alone, 1), "distilled_s": round(t_dist, 1)})
            print(f"student {spec:>8} seed {seed}: alone {alone} errors ({t_alone:.0f} s), "
                  f"distilled {distilled} errors ({t_dist:.0f} s)", flush=True)
    summary = {}
    print("\n| student | seed | alone (errors) | distilled (errors) | teacher | gap closed | wall s alone / distilled |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.students:
        mine = [r for r in rows if r["student"] == spec]
        for r in mine:
            gap = r["alone"] - teacher_errors
            closed = (r["alone"] - r["distilled"]) / gap if gap > 0 else float("nan")
            print(f"| {spec} | {r['seed']} | {r['alone']} | {r['distilled']} | {teacher_errors} | {closed:.0%} | "
                  f"{r['alone_s']:.0f} / {r['distilled_s']:.0f} |")
        alone = statistics.mean(r["alone"] for r in mine)
        dist = statistics.mean(r["distilled"] for r in mine)
        gap = alone - teacher_errors
        summary[spec] = {"alone_mean": alone, "distilled_mean": dist, "teacher": teacher_errors,
                         "gap_closed": (alone - dist) / gap if gap > 0 else None,
                         "accuracy_gain_points": (alone - dist) / len(dm.test_tensors[1]) * 100}
        print(f"| {spec} | mean | {alone:.1f} | {dist:.1f} | {teacher_errors} | "
              f"{summary[spec]['gap_closed'] if summary[spec]['gap_closed'] is None else format(summary[spec]['gap_closed'], '.0%')} "
              f"| gain {summary[spec]['accuracy_gain_points']:+.2f} points |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_text({"config": vars(args), "teacher_errors": teacher_errors, "runs": rows,
                               "summary": summary}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
