"""Vectorised 1-D k-means.

In one dimension the clusters of a sorted vector are contiguous runs, so a Lloyd iteration is a
``searchsorted`` of the midpoints between centroids plus segment sums over the sorted values:
O(n) per iteration after one O(n log n) sort, no (n x k) distance matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans_1d", "init_centroids"]


def init_centroids(sorted_w: Tensor, k: int, init: str, generator: torch.Generator | None = None) -> Tensor:
    """Deep Compression section 3.2: ``linear`` spaces centroids evenly over [min, max] (the paper's
    best: it keeps the rare large weights), ``density`` at evenly spaced quantiles of the CDF,
    ``random`` picks k weights."""
    if init == "linear":
        return torch.linspace(float(sorted_w[0]), float(sorted_w[-1]), k, dtype=sorted_w.dtype)
    if init == "density":
        q = torch.linspace(0, 1, k, dtype=sorted_w.dtype)
        return torch.quantile(sorted_w, q) if sorted_w.numel() < 16_000_000 else \
            sorted_w[(q * (sorted_w.numel() - 1)).long()]
    if init == "random":
        idx = torch.randperm(sorted_w.numel(), generator=generator)[:k]
        return sorted_w[idx].sort().values
    raise ValueError(f"unknown init '{init}' (linear, density, random)")


def kmeans_1d(w: Tensor, k: int, init: str = "linear", iters: int = 30,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Cluster the values of ``w`` (any shape) into at most ``k`` centroids.

    Returns ``(centroids (k',), labels)`` with ``labels`` of ``w``'s shape indexing ``centroids``.
    A cluster left empty (linear init puts centroids in the gap that pruning leaves around zero)
    moves to the value farthest from its centroid; clusters still empty at the end (fewer distinct
    values than ``k``) are dropped, so ``k' <= k``.
    """
    flat = w.detach().flatten().double()
    n = flat.numel()
    if n == 0:
        return torch.zeros(0, dtype=w.dtype), torch.zeros(w.shape, dtype=torch.long)
    k = max(1, min(k, n))
    sorted_w, order = flat.sort()
    c = init_centroids(sorted_w, k, init, generator).double()
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), sorted_w.cumsum(0)])
    for _ in range(iters):
        bounds = torch.searchsorted(sorted_w, (c[1:] + c[:-1]) / 2)  # run ends, (k-1,)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), bounds])
        ends = torch.cat([bounds, torch.tensor([n])])
        counts = ends - starts
        sums = prefix[ends] - prefix[starts]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        empty = int((counts == 0).sum())
        if empty:  # relocate empty clusters to the worst-served values (as sklearn does); n >= k here
            labels = torch.repeat_interleave(torch.arange(k), counts)
            far = (sorted_w - new[labels]).abs().topk(empty).indices
            new[counts == 0] = sorted_w[far]
        new = new.sort().values
        if torch.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    bounds = torch.searchsorted(sorted_w, (c[1:] + c[:-1]) / 2)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), bounds])
    ends = torch.cat([bounds, torch.tensor([n])])
    keep = ends > starts  # drop empty clusters
    sorted_labels = torch.repeat_interleave(torch.arange(int(keep.sum())), (ends - starts)[keep])
    labels = torch.empty(n, dtype=torch.long)
    labels[order] = sorted_labels
    return c[keep].to(w.dtype), labels.view(w.shape)
