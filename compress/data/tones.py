"""``tones``: frames of pure tones at exact pitches, labelled in CREPE's 360 pitch bins (no download).

Each sample is one frame of ``frame`` samples at ``sample_rate`` Hz of ``sin(2 pi f t + phase)`` at a
random amplitude, plus white noise at ``noise`` (relative to the amplitude), normalised to zero mean
and unit variance per frame as CREPE does. The pitch is drawn uniformly in cents between bins
``min_bin`` and ``max_bin``; the target is its exact, fractional bin: ``(cents - 1997.38) / 20``
(CREPE's bins are 20 cents wide from 31.70 Hz, Kim et al. 2018; torchcrepe's ``convert``). A
``multilabel`` task with ``label_smoothing_sigma: 1.25`` trains on CREPE's Gaussian targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from compress.data._registry import DATAMODULES
from compress.data.base import DataConfig, TensorDataModule
from compress.errors import UserError

__all__ = ["TonesConfig", "TonesDataModule", "CENTS_OFFSET", "CENTS_PER_BIN", "bin_to_hz"]

CENTS_OFFSET = 1997.3794084376191  # cents (re 10 Hz) of bin 0: 31.70 Hz
CENTS_PER_BIN = 20.0
BINS = 360


def bin_to_hz(bins: Tensor) -> Tensor:
    """Frequency of (fractional) CREPE bins."""
    return 10.0 * 2.0 ** ((CENTS_OFFSET + CENTS_PER_BIN * bins) / 1200.0)


@dataclass
class TonesConfig(DataConfig):
    sample_rate: int = 16000
    frame: int = 1024
    min_bin: int = 40  # 50.3 Hz
    max_bin: int = 300  # 1014 Hz
    noise: float = 0.0
    train_size: int = 2048
    test_size: int = 512


@DATAMODULES.register("tones")
class TonesDataModule(TensorDataModule):
    """Pure tones of exact pitch; targets are fractional CREPE bins (float); 360 labels."""

    Config = TonesConfig
    num_classes = BINS
    target_dtype = None  # fractional bins

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = self.config
        if not 0 <= c.min_bin < c.max_bin <= BINS - 1:
            raise UserError(f"data.min_bin, data.max_bin: {c.min_bin}, {c.max_bin}; need 0 <= min_bin < max_bin <= 359")
        if bin_to_hz(torch.tensor(float(c.max_bin))) >= c.sample_rate / 2:
            raise UserError(f"data.max_bin: {c.max_bin} is above the Nyquist frequency of data.sample_rate")
        g = torch.Generator().manual_seed(2024 + self.seed)
        n = c.train_size + c.test_size
        bins = c.min_bin + (c.max_bin - c.min_bin) * torch.rand(n, generator=g, dtype=torch.float64)
        t = torch.arange(c.frame, dtype=torch.float64) / c.sample_rate
        phase = 2 * math.pi * torch.rand(n, 1, generator=g, dtype=torch.float64)
        amp = 0.3 + 0.7 * torch.rand(n, 1, generator=g, dtype=torch.float64)
        x = amp * torch.sin(2 * math.pi * bin_to_hz(bins)[:, None] * t[None, :] + phase)
        x = x + c.noise * amp * torch.randn(n, c.frame, generator=g, dtype=torch.float64)
        x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp(min=1e-10)
        x, y = x.float(), bins.float()
        return x[: c.train_size], y[: c.train_size], x[c.train_size:], y[c.train_size:]
