"""Adapters that map a student's features to the shape of the teacher's (FitNets' regressors).

Created from shapes observed in one forward pass, so a recipe only names the two modules:

* conv maps ``(B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt)``: a 1x1 convolution, then a spatial resize when
  the sizes differ (average pooling to shrink, bilinear interpolation to grow);
* vectors or tokens ``(B, ..., Cs) -> (B, ..., Ct)``: a linear layer on the last dimension.

When the shapes already match, the adapter starts as the identity, so the hint initially asks
the student to reproduce the teacher's features exactly (what ``teacher: self`` wants after
pruning).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.errors import UserError

__all__ = ["ConvAdapter", "LinearAdapter", "make_adapter", "resize_spatial"]


def resize_spatial(x: Tensor, size: Sequence[int]) -> Tensor:
    """Resize ``(B, C, H, W)`` to ``size``: average pooling when shrinking, bilinear when growing."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvAdapter(nn.Module):
    """1x1 convolution ``Cs -> Ct`` (FitNets' convolutional regressor), then resize to ``size``."""

    def __init__(self, in_channels: int, out_channels: int, size: Sequence[int] | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.size = tuple(size) if size is not None else None
        if in_channels == out_channels:
            with torch.no_grad():
                self.conv.weight.copy_(torch.eye(out_channels)[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:  # (B, Cs, Hs, Ws) -> (B, Ct, Ht, Wt)
        x = self.conv(x)
        return resize_spatial(x, self.size) if self.size is not None else x

    def extra_repr(self) -> str:
        return f"size={self.size}" if self.size is not None else ""


class LinearAdapter(nn.Linear):
    """Linear ``Cs -> Ct`` on the last dimension; the identity at start when the widths match."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        if in_features == out_features:
            with torch.no_grad():
                self.weight.copy_(torch.eye(out_features))
                self.bias.zero_()


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], key: str = "") -> nn.Module:
    """An adapter taking features of ``student_shape`` to ``teacher_shape`` (both with the batch dim).

    Raises:
        UserError: the two features cannot be paired (a conv map with a vector, different token
            counts); ``key`` names the recipe entry.
    """
    s, t = tuple(int(v) for v in student_shape), tuple(int(v) for v in teacher_shape)
    if len(s) == 4 and len(t) == 4:
        return ConvAdapter(s[1], t[1], t[2:] if s[2:] != t[2:] else None)
    if len(s) == len(t) >= 2 and s[1:-1] == t[1:-1]:
        return LinearAdapter(s[-1], t[-1])
    raise UserError(f"{key}: cannot pair student features of shape {s} with teacher features of shape {t}; "
                    "pair conv maps with conv maps (B, C, H, W) or vectors with vectors (B, C)")
