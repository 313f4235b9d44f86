"""Benchmark: how long weight sharing takes (vectorised 1-D k-means, compress.sharing).

Shares a model of about 25M parameters (five 2236x2236 linear layers, 80% pruned or dense) at
5 and 8 bits, and times ``kmeans_1d`` alone on 1M to 25M values. The issue's target: sharing a
25M-parameter model takes seconds, not minutes. Prints a table; ``--out`` writes JSON.

    python bench/kmeans.py [--threads 1] [--out bench/results/kmeans.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import print_table, write_json
from torch import nn

from compress.pruning.masks import set_mask
from compress.sharing import kmeans_1d, share_layer


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for n in (1_000_000, 5_000_000, 25_000_000):
        w = torch.randn(n)
        for k in (32, 256):
            rows.append({"what": "kmeans_1d", "values": n, "clusters": k, "seconds": timed(kmeans_1d, w, k)})
    for pruned in (0.0, 0.8):
        for bits in (5, 8):
            model = nn.Sequential(*(nn.Linear(2236, 2236, bias=False) for _ in range(5)))
            if pruned:
                for m in model:
                    set_mask(m, (torch.rand_like(m.weight) > pruned).float())
            params = sum(m.weight.numel() for m in model)
            nonzero = sum(int(m.weight.count_nonzero()) for m in model)
            seconds = sum(timed(share_layer, m, bits) for m in model)
            rows.append({"what": f"share model, {pruned:.0%} pruned", "values": nonzero, "params": params,
                         "clusters": 2 ** bits, "seconds": seconds})
    print_table(rows, [("what", "what", ""), ("values", "values", ","), ("clusters", "clusters", "d"),
                        ("seconds", "seconds", ".2f")])
    write_json(args.out, {"threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
