"""Compress to a budget on MNIST LeNet-5: does ``run.py search`` find a model that beats the hand-made
``recipes/deploy_lenet5_int8.yaml`` on both test accuracy and ONNX Runtime latency at batch 32?

Runs the deploy recipe once (the baseline; reused when ``OUT/baseline`` holds its report), offers its
input and trained stages to the search's prefix cache (``recipes/search_lenet5.yaml`` shares
everything above ``stages`` and its train stage with it, so the search trains no dense model), then
runs the search (NSGA-II: accuracy, ORT batch-32 latency and stored size; runtime accuracy >= 98.5%).
Prints the Pareto front next to the baseline and writes JSON.

Usage::

    python bench/search.py ../shared/data [--trials 30] [--jobs 2] [--timeout 3600] [--out runs/bench/search]
                           [--set key=value ...]   # e.g. --set stages.0.epochs=1 for a smoke run

A trial "beats" the baseline when it is better on both beyond a tie (accuracy higher by more than 0.05
point, latency lower by more than 2%), or ties one and is at least 10% better on the other (latency at
most 0.9x; or test errors at most 0.9x the baseline's). A tie is within 0.05 point of accuracy or 2% of
latency: one MNIST test image is 0.01 point, and two timings of one graph differ by about 2%.
The latency judged is taken again at the end, in one process, for the baseline and every Pareto trial
together (each run's final model exported by ``run.py export --format onnx``, timed in ONNX Runtime at
batch 32 on one thread, interleaved over rounds, the median): the trials' own figures were taken
minutes apart beside other trials, the baseline's maybe in another session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from common import print_table, write_json

from compress.cli import main as cli
from compress.errors import UserError
from compress.metrics.latency import latency_ms
from compress.pipeline import Pipeline
from compress.recipe import load_recipe
from compress.runtime.ort import OrtModel
from compress.search import run_search
from compress.search.cache import PrefixCache

ROOT = Path(__file__).resolve().parents[1]
LATENCY = "runtime_latency_ms_batch/onnxruntime"
KEYS = ("accuracy", "runtime_accuracy/onnxruntime", LATENCY, "stored_bytes")


def beats(m: dict, base: dict) -> bool:
    """Better on both beyond a tie, or tied on one and >= 10% better on the other (module docstring)."""
    acc, lat = m["accuracy"] - base["accuracy"], m[LATENCY] / base[LATENCY]
    errors = (1 - m["accuracy"]) / max(1 - base["accuracy"], 1e-9)
    acc_tie, lat_tie = abs(acc) <= 0.0005, abs(lat - 1) <= 0.02
    return (acc > 0.0005 and lat < 0.98) or (acc_tie and lat <= 0.9) or (lat_tie and errors <= 0.9)


def retime(runs: dict[str, Path], folder: Path, rounds: int = 9) -> dict[str, float]:
    """ORT batch-32 latency (ms) of each run's final model, all timed in this process, interleaved."""
    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for who, run in runs.items():
        path = folder / f"{who.replace(' ', '-')}.onnx"
        if cli(["export", str(run), "--format", "onnx", "--out", str(path)]) != 0:
            raise UserError(f"{run}: run.py export failed (see above)")
        models[who] = OrtModel(path, threads=1)
    x = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    times: dict[str, list[float]] = {who: [] for who in models}
    for _ in range(rounds):
        for who, model in models.items():
            times[who].append(latency_ms(lambda model=model: model.run(x), repeats=20, warmup=3, threads=1))
    return {who: statistics.median(v) for who, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the folder holding MNIST/raw/*.gz (../shared/data)")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600.0, help="start no trial after S seconds of search")
    p.add_argument("--out", default="runs/bench/search")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="key=value for both recipes")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = [f"data.root={args.data}", *args.overrides]
    t0 = time.perf_counter()
    baseline = load_recipe(ROOT / "recipes" / "deploy_lenet5_int8.yaml", [*common, f"out_dir={out / 'baseline'}"])
    report = out / "baseline" / "report.json"
    if not report.is_file():
        Pipeline(baseline, overwrite=True, quiet=True).run()
    base = json.loads(report.read_text())["stages"][-1]["metrics"]
    baseline_s = time.perf_counter() - t0
    # The baseline's input and trained model serve the search when their prefix keys agree (they do for
    # the shipped recipes; with other overrides the entries are simply never looked up).
    cache = PrefixCache(out / "search" / "cache")
    for index in (0, 1):
        cache.publish(baseline.to_container(), out / "baseline", index)
    t1 = time.perf_counter()
    search_recipe = str(ROOT / "recipes" / "search_lenet5.yaml")
    try:
        summary = run_search(search_recipe, [*common, f"out_dir={out / 'search'}"], trials=args.trials,
                             jobs=args.jobs, timeout=args.timeout)
    except UserError as e:  # no trial met the constraints: the results are written all the same
        print(f"error: {e}", file=sys.stderr)
        summary = json.loads((out / "search" / "search.json").read_text())
    search_s = time.perf_counter() - t1
    runs = {"deploy_lenet5_int8": out / "baseline"}
    runs.update({f"trial {t['trial']}": out / "search" / "trials" / str(t["trial"]) for t in summary["pareto"]})
    together = retime(runs, out / "retimed")
    base_now = {**base, LATENCY: together["deploy_lenet5_int8"]}
    rows = [{"who": "deploy_lenet5_int8", **{k: base.get(k) for k in KEYS}, "beats": ""}]
    for t in summary["pareto"]:
        rows.append({"who": f"trial {t['trial']}", **{k: t["metrics"].get(k) for k in KEYS}, "params": t["params"]})
    for r in rows:
        r["latency_together"] = together[r["who"]]
        if r["who"] != "deploy_lenet5_int8":
            r["beats"] = "yes" if beats({**r, LATENCY: r["latency_together"]}, base_now) else "no"
    for r in rows:
        r["acc %"] = 100 * r["accuracy"]
        r["ORT acc %"] = 100 * r["runtime_accuracy/onnxruntime"]
        r["KB"] = r["stored_bytes"] / 1024
    print_table(rows, [("model", "who", ""), ("acc %", "acc %", ".2f"), ("ORT acc %", "ORT acc %", ".2f"),
                       ("ORT b32 ms (in trial)", LATENCY, ".3f"),
                       ("ORT b32 ms (together)", "latency_together", ".3f"), ("stored KB", "KB", ".1f"), ("beats", "beats", "")])
    states = summary["states"]
    print(f"search: {summary['trials']} trials ({', '.join(f'{k.lower()} {v}' for k, v in states.items())}), "
          f"{search_s / 60:.1f} min on {args.jobs} jobs; {summary['cache_hits']} trials started from cached stages, "
          f"{summary['prefix_builds']} prefix builds; "
          f"baseline {baseline_s / 60:.1f} min")
    write_json(out / "search_bench.json", {"config": vars(args), "baseline": {k: base.get(k) for k in KEYS},
                                           "rows": rows, "search_s": search_s, "baseline_s": baseline_s,
                                           "summary": {k: summary[k] for k in ("trials", "states", "cache_hits", "prefix_builds")}})
    return 0 if any(r["beats"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
