"""Huffman coding (Deep Compression section 4): optimal prefix codes from symbol frequencies."""

from __future__ import annotations

import heapq

import numpy as np

__all__ = ["code_lengths", "canonical_codes", "encode", "decode", "decode_packed"]


MAX_CODE_BITS = 20  # longest codeword written: the decoder's look-up table has 2^MAX_CODE_BITS entries


def code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_BITS) -> np.ndarray:
    """Huffman code length per symbol (0 for symbols that never occur; 1 if only one occurs).

    Optimal unless a codeword would pass ``max_length`` bits (rare symbols of a skewed stream: a
    count of 1 among 25M weights wants ~25 bits, and the decoder's table doubles per bit). Then
    the counts are halved, rounding up, and the code is rebuilt until none does, as encoders that
    bound their depth do (JPEG Annex K.3 and DEFLATE bound theirs too); it costs a few bits per
    million here.
    """
    freqs = np.asarray(freqs, dtype=np.int64)
    used = np.flatnonzero(freqs)
    if len(used) > 1 << max_length:
        raise ValueError(f"{len(used)} symbols do not fit codes of at most {max_length} bits")
    while True:
        lengths = _huffman_lengths(freqs, used)
        if lengths.max(initial=0) <= max_length:
            return lengths
        freqs = np.where(freqs > 0, (freqs + 1) // 2, 0)  # flatter counts: a shallower tree


def _huffman_lengths(freqs: np.ndarray, used: np.ndarray) -> np.ndarray:
    lengths = np.zeros(len(freqs), dtype=np.int64)
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
    """``count`` symbols from a bit stream (uint8 array of 0/1) written by :func:`encode`."""
    symbols, _ = decode_packed(np.packbits(np.asarray(bits, dtype=np.uint8)), lengths, count,
                               nbits=len(bits))
    return symbols


LANE_BITS = 4096  # bits each decoding lane starts apart


def decode_packed(data: np.ndarray | bytes, lengths: np.ndarray, count: int, bit_offset: int = 0,
                  nbits: int | None = None) -> tuple[np.ndarray, int]:
    """``count`` symbols from packed bytes (MSB first) starting at ``bit_offset``; ``(symbols, bits used)``.

    Table-driven and vectorised across lanes: the stream is cut every :data:`LANE_BITS` bits and
    numpy advances every lane by one symbol per step (one look-up of the next ``max length`` bits).
    The true symbol boundary in each cut is found without a sequential decode: (1) every lane is
    walked from its cut, marking the positions it visits; (2) from each other bit of its first
    codeword it is walked again until it lands on a marked position (a Huffman code falls into step
    within a few symbols: Klein & Wiseman 2003) or leaves the lane, which gives each lane's end for
    each possible start; (3) chaining those ends from the stream's start gives every lane's true
    start, and (4) one last walk from the true starts yields the symbols (:func:`_decode_lanes`).
    """
    data = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else np.asarray(data, np.uint8)
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.empty(0, dtype=np.int64), 0
    used = np.flatnonzero(lengths)
    width = int(lengths.max())
    if len(used) == 0 or width > 56:
        raise ValueError("no code, or a code longer than 56 bits")
    first_byte = bit_offset // 8  # work on the bytes this stream can occupy only
    end = bit_offset + (nbits if nbits is not None else count * width)
    data = data[first_byte:min(len(data), -(-min(end, bit_offset + count * width) // 8))]
    start = bit_offset - 8 * first_byte
    end = min(8 * len(data), start + count * width, end - 8 * first_byte)
    windows = _Windows(data, lengths, used, width)

    if len(np.unique(lengths[used])) == 1:  # a fixed-length code: every boundary is known, no lanes needed
        if start + count * width > end:
            raise ValueError("bit stream ended early")
        total, chunk = count * width, width << 22  # 4M symbols per look-up
        symbols = np.concatenate([windows.step(np.arange(start + i, start + min(i + chunk, total), width,
                                                         dtype=np.int64))[0]
                                  for i in range(0, total, chunk)])
        if (symbols < 0).any():  # a window that is no codeword (a one-symbol code has one unused 1-bit word)
            raise ValueError("bit stream ended early")
        return symbols.astype(np.int64), total

    symbols = _decode_lanes(windows, start, end)[:count]
    if len(symbols) < count or (symbols < 0).any():
        raise ValueError("bit stream ended early")
    bits = int(lengths[symbols].sum())
    if start + bits > end:  # the last codeword ran past the stream, into padding or past the data
        raise ValueError("bit stream ended early")
    return symbols, bits


class _Windows:
    """The codeword at any bit position of a byte stream: one table look-up of the next ``width`` bits."""

    def __init__(self, data: np.ndarray, lengths: np.ndarray, used: np.ndarray, width: int):
        codes = canonical_codes(lengths)
        table = np.full(1 << width, -1, dtype=np.int32)  # every `width`-bit window -> the symbol it starts with
        for sym in used:
            shift = width - int(lengths[sym])
            table[int(codes[sym]) << shift:(int(codes[sym]) + 1) << shift] = sym
        self.table, self.table_len = table, np.where(table >= 0, lengths[np.maximum(table, 0)], 1)
        words = np.zeros(len(data) + 1, dtype=np.uint64)  # the 8 bytes from each byte on, big-endian
        padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
        for k in range(8):
            words |= padded[k:k + len(words)].astype(np.uint64) << np.uint64(56 - 8 * k)
        self.words, self.width, self.data_bits = words, width, 8 * len(data)
        self.mask = np.uint64((1 << width) - 1)
        self.visited = np.zeros(8 * len(data) + 64, dtype=bool)

    def step(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(symbol, its length) of the codeword at each bit position."""
        p = np.minimum(pos, self.data_bits)
        w = ((self.words[p >> 3] >> (np.uint64(64 - self.width) - (p & 7).astype(np.uint64))) & self.mask).astype(np.int64)
        return self.table[w], self.table_len[w]

    def walk(self, starts: np.ndarray, stops: np.ndarray, *, mark: bool = False, until_marked: bool = False,
             keep: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Advance lanes from ``starts`` until they pass ``stops``: (end positions, landed on a mark)."""
        visited = self.visited
        pos, merged = starts.copy(), np.zeros(len(starts), dtype=bool)
        live = np.flatnonzero(pos < stops)
        while live.size:
            p = pos[live]
            if mark:
                visited[p] = True
            sym, n = self.step(p)
            if keep is not None:
                keep.append((live, sym))
            p = p + n
            pos[live] = p
            done = p >= stops[live]
            if until_marked:
                hit = ~done & visited[np.minimum(p, len(visited) - 1)]
                merged[live[hit]] = True
                done |= hit
            live = live[~done]
        return pos, merged


def _decode_lanes(windows: _Windows, start: int, end: int) -> np.ndarray:
    """Every symbol between bits ``start`` and ``end`` of a variable-length code, steps (1)-(4) of
    :func:`decode_packed` (a symbol past the stream's end may follow; the caller checks)."""
    width, visited, walk = windows.width, windows.visited, windows.walk
    lanes = np.arange(start, max(end, start + 1), LANE_BITS, dtype=np.int64)
    stops = np.append(lanes[1:], end)
    ends0, _ = walk(lanes, stops, mark=True)  # (1)
    phases = np.arange(1, width)  # (2) every other start inside a lane's first codeword
    j = np.repeat(np.arange(len(lanes)), len(phases))
    alt = lanes[j] + np.tile(phases, len(lanes))
    alt_ends, merged = walk(alt, stops[j], until_marked=True)
    alt_ends = np.where(merged | visited[np.minimum(alt, len(visited) - 1)], ends0[j], alt_ends)
    alt_ends = alt_ends.reshape(len(lanes), len(phases))
    true_starts = np.empty(len(lanes), dtype=np.int64)  # (3)
    t = start
    for k in range(len(lanes)):
        true_starts[k] = t
        r = t - lanes[k]
        t = int(ends0[k]) if r == 0 else int(alt_ends[k, r - 1]) if r < width else t
    steps: list[tuple[np.ndarray, np.ndarray]] = []
    walk(true_starts, np.maximum(stops, true_starts), keep=steps)  # (4)
    per_lane = np.zeros(len(lanes), dtype=np.int64)
    for live, _ in steps:
        per_lane[live] += 1
    offsets = np.cumsum(per_lane) - per_lane
    out = np.empty(int(per_lane.sum()), dtype=np.int64)
    for k, (live, sym) in enumerate(steps):  # a lane's k-th symbol comes from step k
        out[offsets[live] + k] = sym
    return out
