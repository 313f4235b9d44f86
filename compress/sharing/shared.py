"""``SharedWeight``: a layer's weight read from a codebook (Deep Compression, section 3).

``module.weight = centroids[indices] * keep``: ``centroids`` (K,) is the only trainable tensor,
``indices`` (the weight's shape, uint8/int16) assigns each weight its cluster for good, and
``keep`` (0/1 in the weight's dtype, stored as the parametrization's ``original``) holds pruned weights at exactly
zero. Autograd through the gather gives each centroid the sum of its cluster's weight gradients,
which is the paper's eq. 3, so plain SGD fine-tunes the codebook and the layer never holds more
than 2^bits distinct values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.plumbing.masks import make_permanent
from compress.plumbing.restorers import PARAMETRIZATIONS
from compress.sharing.kmeans import kmeans_1d

__all__ = ["SharedWeight", "share_layer", "shared_bits", "get_shared", "reinstall_shared_weight"]


class SharedWeight(nn.Module):
    """Parametrization ``keep -> centroids[indices] * keep`` (``keep``, 0/1, is the stored original)."""

    def __init__(self, centroids: Tensor, indices: Tensor, bits: int):
        super().__init__()
        self.bits = bits
        self.centroids = nn.Parameter(centroids)
        dtype = torch.uint8 if bits <= 8 else torch.int16
        self.register_buffer("indices", indices.to(dtype))

    def forward(self, keep: Tensor) -> Tensor:
        return self.centroids[self.indices.long()] * keep

    def right_inverse(self, weight: Tensor) -> Tensor:
        return (weight != 0).to(weight.dtype)


def get_shared(module: nn.Module, name: str = "weight") -> SharedWeight | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in module.parametrizations[name] if isinstance(p, SharedWeight)), None)


def shared_bits(module: nn.Module) -> int | None:
    p = get_shared(module)
    return None if p is None else p.bits


def _install(module: nn.Module, shared: SharedWeight, weight: Tensor) -> None:
    # The weight becomes a buffer first, so parametrize stores ``keep`` as a buffer too:
    # only the centroids train.
    del module._parameters["weight"]
    module.register_buffer("weight", weight)
    parametrize.register_parametrization(module, "weight", shared, unsafe=True)


def share_layer(module: nn.Module, bits: int, init: str = "linear") -> SharedWeight:
    """Replace ``module.weight`` by a 2^bits codebook over its non-zero weights. In place.

    A mask parametrization is baked in first; pruned zeros are not clustered and stay zero. A weight
    with no non-zero value gets a codebook of one centroid, zero, so the layer still computes.
    """
    if get_shared(module) is not None:
        raise ValueError("layer is already shared")
    make_permanent(module)
    with torch.no_grad():
        w = module.weight.detach().clone()
        keep = w != 0
        centroids, labels = kmeans_1d(w[keep], 2 ** bits, init)
        if centroids.numel() == 0:  # every weight is zero (torchvision's ViT head starts so): one centroid, 0
            centroids = torch.zeros(1, dtype=w.dtype)
        indices = torch.zeros(w.shape, dtype=torch.long)
        indices[keep] = labels
    shared = SharedWeight(centroids.to(w.dtype), indices, bits)
    _install(module, shared, w)
    return shared


@PARAMETRIZATIONS.register("SharedWeight")
def reinstall_shared_weight(module: nn.Module, tensor: str, state_dict: dict, prefix: str) -> None:
    """Checkpoint replay: a placeholder of the stored shapes, filled by ``load_state_dict``.

    Registered under the parametrization's class name (what a checkpoint lists).
    """
    centroids = state_dict[prefix + "0.centroids"]
    indices = state_dict[prefix + "0.indices"]
    bits = max(1, math.ceil(math.log2(max(2, centroids.numel()))))
    if indices.dtype == torch.int16:
        bits = max(bits, 9)
    w = getattr(module, tensor).detach()
    _install(module, SharedWeight(torch.zeros_like(centroids), torch.zeros_like(indices), bits), w)
