"""Benchmark: writing and reading back a Deep Compression file of a ResNet-50-sized model.

An MLP of about 25M parameters (five 2236-wide linear layers), dense or 80% pruned, shared at 5
bits, written with ``write_compressed`` and read back with ``read_compressed`` (which must give
identical weights). The issue's target: reading 25M parameters at 5 bits back in under 3 s (it
was 29 s with a symbol-at-a-time Huffman decoder). Prints a table; ``--out`` writes JSON.

    python bench/encoding.py [--threads 1] [--out bench/results/encoding.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import print_table, write_json

from compress.encoding import read_compressed, write_compressed
from compress.models import build_model
from compress.pruning.masks import deployed_copy, prunable_layers, set_mask
from compress.sharing import share_layer

WIDTH = 2236


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bits", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = {"name": "mlp", "kwargs": {"hidden": [WIDTH] * 4, "input_shape": [WIDTH], "num_classes": WIDTH}}
    rows = []
    for pruned in (0.0, 0.8):
        model = build_model(spec["name"], **spec["kwargs"])
        for m in prunable_layers(model).values():
            if pruned:
                set_mask(m, torch.rand_like(m.weight) > pruned)
            share_layer(m, args.bits)
        params = sum(p.numel() for p in deployed_copy(model).parameters())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.dc"
            t0 = time.perf_counter()
            size = write_compressed(model, path, spec)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = read_compressed(path)
            read_s = time.perf_counter() - t0
        expected = deployed_copy(model).state_dict()
        identical = all(torch.equal(expected[k], v) for k, v in back.state_dict().items())
        rows.append({"model": f"mlp 5x{WIDTH}, {pruned:.0%} pruned", "params": params, "bits": args.bits,
                     "file_bytes": size, "write_s": write_s, "read_s": read_s, "identical": identical})
    print_table(rows, [("model", "model", ""), ("params", "params", ","), ("bits", "bits", "d"),
                        ("file bytes", "file_bytes", ","), ("write s", "write_s", ".2f"),
                        ("read s", "read_s", ".2f"), ("identical", "identical", "")])
    write_json(args.out, {"threads": args.threads, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
