"""Random tensors labelled by a fixed random teacher: learnable, instant, for tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from compress.data._registry import DATAMODULES
from compress.data.base import DataConfig, TensorDataModule


@dataclass
class SyntheticConfig(DataConfig):
    shape: list[int] = field(default_factory=lambda: [1, 8, 8])
    classes: int = 10
    train_size: int = 512
    test_size: int = 128


@DATAMODULES.register("synthetic")
class SyntheticDataModule(TensorDataModule):
    Config = SyntheticConfig

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.config.classes

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c = self.config
        g = torch.Generator().manual_seed(1234 + self.seed)
        n = c.train_size + c.test_size
        x = torch.randn(n, *c.shape, generator=g)
        w = torch.randn(x[0].numel(), c.classes, generator=g)
        y = (x.flatten(1) @ w).argmax(1)
        return x[: c.train_size], y[: c.train_size], x[c.train_size:], y[c.train_size:]
