"""Huffman coding (Deep Compression section 4): optimal prefix codes from symbol frequencies."""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["code_lengths", "canonical_codes", "encode", "decode"]


def code_lengths(freqs: np.ndarray) -> np.ndarray:
    """Optimal code length per symbol (0 for symbols that never occur; 1 if only one occurs)."""
    freqs = np.asarray(freqs, dtype=np.int64)
    lengths = np.zeros(len(freqs), dtype=np.int64)
    used = np.flatnonzero(freqs)
    if len(used) == 1:
        lengths[used] = 1
        return lengths
    heap = [(int(freqs[s]), i, [int(s)]) for i, s in enumerate(used)]
    heapq.heapify(heap)
    tie = len(heap)
    while len(heap) > 1:
        f1, _, a = heapq.heappop(heap)
        f2, _, b = heapq.heappop(heap)
        lengths[a] += 1
        lengths[b] += 1
        heapq.heappush(heap, (f1 + f2, tie, a + b))
        tie += 1
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (as integers) for the given lengths: only lengths need storing."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s] = code
        prev = int(lengths[s])
        code += 1
    return codes


def encode(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The bit stream (uint8 array of 0/1) of ``symbols`` under the canonical code. Vectorised."""
    symbols = np.asarray(symbols, dtype=np.int64)
    codes = canonical_codes(lengths)
    ln = lengths[symbols]
    total = int(ln.sum())
    owner = np.repeat(np.arange(len(symbols)), ln)  # which symbol each output bit belongs to
    start = np.cumsum(ln) - ln
    offset = np.arange(total) - start[owner]  # bit position within its code, MSB first
    return ((codes[symbols][owner] >> (ln[owner] - 1 - offset)) & 1).astype(np.uint8)


def decode(bits: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """``count`` symbols from a bit stream written by :func:`encode`."""
    codes = canonical_codes(lengths)
    table = {(int(lengths[s]), int(codes[s])): s for s in np.flatnonzero(lengths)}
    out = np.empty(count, dtype=np.int64)
    code = n = i = 0
    for b in bits.tolist():
        if i == count:
            break
        code = (code << 1) | b
        n += 1
        s = table.get((n, code))
        if s is not None:
            out[i] = s
            i += 1
            code = n = 0
    if i != count:
        raise ValueError("bit stream ended early")
    return out
