"""scikit-learn's bundled 8x8 digits: the embedded default, no download."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from compress.data._registry import DATAMODULES
from compress.data.base import TensorDataModule


@DATAMODULES.register("digits")
class DigitsDataModule(TensorDataModule):
    """1,797 handwritten digits (UCI), 8x8 grey levels 0..16; a fixed stratified 80/20 split."""

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.images.astype(np.float32) / 16.0 - 0.5) / 0.5  # roughly zero-mean, unit range
        tx, vx, ty, vy = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
        f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(1)  # noqa: E731  (N, 1, 8, 8)
        return f(tx), torch.from_numpy(ty), f(vx), torch.from_numpy(vy)
