"""Sparse storage with relative indices (Deep Compression section 2, Fig. 2).

Non-zero positions are stored as the gap to the previous one, in ``index_bits`` bits; a gap that
does not fit gets filler entries (a stored zero) every 2^index_bits positions.
"""

from __future__ import annotations

import numpy as np

__all__ = ["relative_indices", "absolute_positions"]


def relative_indices(positions: np.ndarray, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps, is_filler)`` of the stored entries for sorted flat ``positions``.

    Each stored value is ``gap - 1`` in [0, 2^index_bits); fillers store the largest value.
    """
    span = 1 << index_bits
    positions = np.asarray(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1  # zeros skipped before each non-zero
    fillers = gaps // span
    n = len(positions) + int(fillers.sum())
    stored = np.full(n, span - 1, dtype=np.int64)
    filler = np.ones(n, dtype=bool)
    ends = np.cumsum(fillers + 1) - 1  # where each real entry lands
    stored[ends] = gaps % span
    filler[ends] = False
    return stored, filler


def absolute_positions(stored: np.ndarray, is_filler: np.ndarray) -> np.ndarray:
    """Inverse of :func:`relative_indices` for the real (non-filler) entries."""
    steps = np.asarray(stored, dtype=np.int64) + 1
    return (np.cumsum(steps) - 1)[~np.asarray(is_filler, dtype=bool)]
