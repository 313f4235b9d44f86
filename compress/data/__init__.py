"""Data as LightningDataModules, registered by name; each has a typed ``Config``.

All datasets here fit in memory, so they are held as tensors: loading is instant after the first
read and shuffling is seeded by the recipe (repeatable runs).
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import Tensor

from compress.data import cifar10, digits, mnist, synthetic  # noqa: F401  (imported for their registrations)
from compress.data._registry import DATAMODULES
from compress.data.base import TensorDataModule
from compress.errors import UserError

__all__ = ["DATAMODULES", "TensorDataModule", "build_datamodule", "example_batch", "training_inputs"]


def build_datamodule(cfg: dict[str, Any] | Any, seed: int = 0, key: str = "data") -> TensorDataModule:
    """A data module from a recipe's ``data`` block (``name`` plus that dataset's keys)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    cls = DATAMODULES.get(str(cfg.pop("name", "")), f"{key}.name")
    return cls(cls.make_config(cfg, key), seed=seed)


def training_inputs(dm: Any, n: int) -> list[Tensor]:
    """The inputs of the first ``n`` training batches, in the data module's own seeded order
    (what int8 calibration runs on)."""
    batches = [b[0] if isinstance(b, list | tuple) else b for b in itertools.islice(dm.train_dataloader(), n)]
    if not batches:
        raise UserError("data: the training data loader yielded no batches (to calibrate on)")
    return batches


def example_batch(dm: Any, n: int = 2) -> tuple[Tensor, Tensor]:
    """The first ``n`` test inputs and labels (a deterministic batch for tracing and latency)."""
    if isinstance(dm, TensorDataModule):
        dm.setup("test")
        x, y = dm.test_tensors
        if n <= len(x):
            return x[:n], y[:n]
        reps = -(-n // len(x))
        return x.repeat(reps, *[1] * (x.dim() - 1))[:n], y.repeat(reps)[:n]
    batch = next(iter(dm.test_dataloader()))
    return batch[0][:n], batch[1][:n]

