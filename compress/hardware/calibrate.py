"""``cpu-local``: the roofline figures of the CPU running this process, measured once and cached.

A ~2 s micro-benchmark at the current thread count (``torch.get_num_threads()``), timing
PyTorch eager as the pipeline's latency measurement does:

* dispatch cost of an op, a view and an ``nn.Module`` call (tiny tensors: nothing but overhead);
* GEMM throughput (the fp32 peak) and a batch-1 GEMV's weight-read bandwidth from cache;
* convolution: the fixed cost (a tiny conv) and the throughput of a dense 3x3 conv, of one whose
  channels are not multiples of the SIMD lanes, and of a depthwise conv;
* 2x2 max-pooling throughput;
* copy bandwidth of a buffer larger than the last-level cache (DRAM).

Cached as JSON under ``$COMPRESS_CACHE`` (default ``~/.cache/compress``) in
``hardware/cpu-local-<key>.json``, keyed by CPU model, torch version and thread count; delete
the file, or run ``python -m compress.hardware.calibrate --force``, to measure again.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from compress.files import json_text
from compress.hardware.profiles import CALIBRATORS, HardwareProfile, load_profile, profile_from_dict

__all__ = ["calibrated_profile", "measure_cpu", "cache_path", "cache_key", "cache_root", "cpu_model", "simd_lanes_fp32"]

CHUNK_S = 50e-6  # calls timed together
BUDGET_S = 0.05  # time spent on each measurement


def cache_root() -> Path:
    """``$COMPRESS_CACHE``, default ``~/.cache/compress``: measurements worth keeping between runs."""
    return Path(os.environ.get("COMPRESS_CACHE") or Path.home() / ".cache" / "compress")


def cache_dir() -> Path:
    return cache_root() / "hardware"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), a key of every cached measurement."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key() -> dict[str, Any]:
    return {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_path(key: dict[str, Any] | None = None) -> Path:
    key = key or cache_key()
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"cpu-local-{digest}.json"


def _time_us(fn: Callable[[], Any]) -> float:
    """Microseconds per call: the fastest of many short chunks of calls (about CHUNK_S each).

    The fastest, not the median: other processes only ever slow a chunk down, and a calibration
    taken on a busy machine is cached for every later run. Chunks are short so that some fall
    between the other processes' time slices.
    """
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(CHUNK_S / once)))
    best = float("inf")
    deadline = time.perf_counter() + BUDGET_S
    chunks = 0
    while chunks < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner * 1e6)
        chunks += 1
    return best


def _largest_cache_bytes() -> int:
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes, default=8 * 1024 ** 2)


def simd_lanes_fp32() -> int:
    """fp32 values per SIMD register: 16 with AVX-512, 8 with AVX/AVX2, else 4.

    The lanes of ``cpu-local``, and the channel block CPU runtimes compute side by side (ONNX
    Runtime's MLAS NCHWc convolutions and oneDNN's blocked layouts use 16 with AVX-512, 8 with AVX2).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx " in flags else 4


@torch.inference_mode()
def measure_cpu() -> dict[str, Any]:
    """The micro-benchmark: profile fields (dotted keys) measured on this CPU."""
    torch.manual_seed(0)
    tiny = torch.randn(1)
    op_us = _time_us(lambda: torch.relu(tiny))
    view_us = _time_us(lambda: tiny.view(-1))
    chain = nn.Sequential(*[nn.Identity() for _ in range(32)])
    module_us = _time_us(lambda: chain(tiny)) / 33

    # GEMM (peak) and GEMV (weights read from cache); F.linear, as nn.Linear runs it
    lin_tiny, x_tiny = nn.Linear(8, 8), torch.randn(1, 8)
    matmul_us = _time_us(lambda: lin_tiny(x_tiny)) - module_us
    lin, xb = nn.Linear(256, 256), torch.randn(256, 256)
    gemm_us = _time_us(lambda: lin(xb)) - module_us - matmul_us
    peak = 2 * 256 ** 3 / max(gemm_us, 1e-3) / 1e3  # GFLOP/s
    gemv, x1 = nn.Linear(1024, 128), torch.randn(1, 1024)
    gemv_us = _time_us(lambda: gemv(x1)) - module_us - matmul_us
    chip_gbps = gemv.weight.numel() * 4 / max(gemv_us, 1e-3) / 1e3

    def conv_us(c: int, hw: int, groups: int = 1) -> tuple[float, int]:
        conv = nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=False).eval()
        x = torch.randn(1, c, hw, hw)
        return _time_us(lambda: conv(x)) - module_us, 2 * c * (c // groups) * 9 * hw * hw

    lanes = simd_lanes_fp32()
    conv0, _ = conv_us(lanes, 2)
    t, flops = conv_us(4 * lanes, 16)
    conv_gflops = flops / max(t - conv0, 1e-3) / 1e3
    odd = 4 * lanes - lanes // 2 - 1  # e.g. 55 with 16 lanes: padded and off the blocked fast path
    t_odd, flops_odd = conv_us(odd, 16)
    fill = odd / (-(-odd // lanes) * lanes)
    predicted = conv0 + flops_odd / (conv_gflops * fill) / 1e3
    unaligned = min(1.0, max(0.05, predicted / max(t_odd, 1e-3)))
    dw0, _ = conv_us(lanes, 2, groups=lanes)
    t_dw, flops_dw = conv_us(8 * lanes, 32, groups=8 * lanes)
    dw_gflops = flops_dw / max(t_dw - dw0, 1e-3) / 1e3

    fmap = torch.randn(1, 4 * lanes, 16, 16)  # 2x2 max-pooling: one FLOP per window element
    pool_us = _time_us(lambda: torch.nn.functional.max_pool2d(fmap, 2)) - op_us
    pool_gflops = fmap.numel() / max(pool_us, 1e-3) / 1e3

    big = torch.empty(8 * 1024 ** 2 // 4 * max(1, _largest_cache_bytes() // (4 * 1024 ** 2)))  # > LLC
    src = torch.randn_like(big)
    copy_us = _time_us(lambda: big.copy_(src))
    dram_gbps = 2 * big.numel() * 4 / copy_us / 1e3
    return {
        "peak_gflops.fp32": round(peak, 2),
        "memory_gbps": round(dram_gbps, 2),
        "on_chip_gbps": round(chip_gbps, 2),
        "on_chip_bytes": _largest_cache_bytes(),
        "lanes": lanes,
        "overhead_us.op": round(op_us, 3),
        "overhead_us.view": round(view_us, 3),
        "overhead_us.module": round(module_us, 3),
        "overhead_us.matmul": round(max(matmul_us, 0.0), 3),
        "overhead_us.conv": round(max(conv0, 0.0), 3),
        "overhead_us.grouped_conv": round(max(dw0, 0.0), 3),
        "efficiency.conv": round(min(1.0, conv_gflops / peak), 4),
        "efficiency.matmul": 1.0,
        "efficiency.grouped_conv": round(min(1.0, max(1e-3, dw_gflops / peak)), 4),
        "efficiency.unaligned": round(unaligned, 4),
        "efficiency.pool": round(min(1.0, max(1e-4, pool_gflops / peak)), 5),
    }


def _busy(threads: int) -> bool:
    """Other processes hold cores this calibration's threads need (1-minute load average)."""
    if not hasattr(os, "getloadavg"):
        return False
    return os.getloadavg()[0] > (os.cpu_count() or 1) - threads + 0.5


def _apply(profile: HardwareProfile, figures: dict[str, Any]) -> HardwareProfile:
    cfg = OmegaConf.structured(profile)
    for key, value in figures.items():
        OmegaConf.update(cfg, key, value)
    data = OmegaConf.to_container(cfg)
    data["calibrate"] = None  # validate as a complete profile
    out = profile_from_dict(data, f"{profile.source or profile.name} (calibrated)")
    out.calibrate, out.source = profile.calibrate, profile.source
    return out


def calibrated_profile(profile: HardwareProfile, force: bool = False,
                       measure: Callable[[], dict[str, Any]] | None = None) -> HardwareProfile:
    """``profile`` with its figures measured on this machine (from the cache when it holds them)."""
    key = cache_key()
    path = cache_path(key)
    figures = None
    if not force and path.is_file():
        try:
            data = json.loads(path.read_text())
            figures = data["figures"] if data.get("key") == key else None
            if figures is not None and data.get("busy") and not _busy(key["threads"]):
                figures = None  # measured while other processes held the cores; now they do not
        except (OSError, ValueError, KeyError):
            figures = None
    if figures is None:
        busy = _busy(key["threads"])
        figures = (measure or measure_cpu)()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        figures["description"] = (f"this machine's CPU under PyTorch eager, calibrated {time.strftime('%Y-%m-%d')} "
                                  f"at {key['threads']} thread(s), load {load:.1f} on {os.cpu_count()} cores"
                                  + (" (busy: measured again once the machine is idle)" if busy else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json_text({"key": key, "figures": figures, "busy": busy,
                                   "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        os.replace(tmp, path)
    return _apply(copy.deepcopy(profile), figures)


CALIBRATORS.register("cpu", calibrated_profile)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.hardware.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--force", action="store_true", help="measure again even if cached")
    p.add_argument("--threads", type=int, default=None, help="torch threads to calibrate at (the cache key)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prof = calibrated_profile(load_profile("cpu-local", calibrate=False), force=args.force)
    print(json.dumps(json.loads(cache_path().read_text()), indent=1))
    print(f"{cache_path()} ({time.perf_counter() - t0:.2f} s)")
    del prof
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
