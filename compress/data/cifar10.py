"""CIFAR-10 from the standard python batches (``cifar-10-batches-py``) under a root folder.

The batches are pickles; they are read with an unpickler that only admits the numpy types the
format needs, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress.data._registry import DATAMODULES
from compress.data.base import DataConfig, TensorDataModule
from compress.errors import UserError

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
           ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
           ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
        raise UserError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    return x, y


@dataclass
class CIFAR10Config(DataConfig):
    root: str = "data"


@DATAMODULES.register("cifar10")
class CIFAR10DataModule(TensorDataModule):
    Config = CIFAR10Config

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        root = Path(self.config.root)
        folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"data.root: CIFAR-10 batch '{missing[0]}' not found under '{folder}' "
                            "(point data.root at the folder holding cifar-10-batches-py)")
        parts = [read_batch(folder / n) for n in names]
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)

        def images(a: np.ndarray) -> Tensor:
            return (torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std

        tx = np.concatenate([p[0] for p in parts[:5]])
        ty = np.concatenate([p[1] for p in parts[:5]])
        return images(tx), torch.from_numpy(ty), images(parts[5][0]), torch.from_numpy(parts[5][1])
