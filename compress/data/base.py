"""In-memory tensor DataModule shared by every dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from compress.errors import UserError
from compress.schema import merge_structured

__all__ = ["DataConfig", "ConfiguredDataModule", "EpochShuffleSampler", "TensorDataModule"]


@dataclass
class DataConfig:
    batch_size: int = 64
    eval_batch_size: int = 256
    resize: int | None = None  # square side to resize images to (e.g. 28 for LeNet-5 on digits)
    channels: int | None = None  # repeat grey images to this many channels (e.g. 3 for CIFAR nets)
    limit_train: int | None = None  # use only the first N training samples (quick runs)
    limit_test: int | None = None


class EpochShuffleSampler(Sampler[int]):
    """A permutation drawn from (seed, epoch) alone, so a run resumed at epoch e sees the same
    order as one that never stopped. Lightning calls ``set_epoch`` before every epoch (under DDP it
    swaps in a DistributedSampler, which is seeded the same way)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class ConfiguredDataModule(pl.LightningDataModule):
    """A DataModule whose recipe section is its ``Config`` dataclass, merged and typed by :meth:`make_config`."""

    Config: ClassVar[type] = DataConfig

    @classmethod
    def make_config(cls, values: Any, key: str = "data") -> Any:
        return merge_structured(cls.Config, values, key)


class TensorDataModule(ConfiguredDataModule):
    """Subclasses implement :meth:`load` -> (train_x, train_y, test_x, test_y), images (N, C, H, W)."""

    Config: ClassVar[type] = DataConfig
    num_classes: int = 10
    target_dtype: ClassVar[torch.dtype | None] = torch.long  # None: targets as load() gives them

    def __init__(self, config: Any = None, /, seed: int = 0, **kwargs: Any):
        super().__init__()
        self.config = self.make_config(config if config is not None else kwargs, type(self).__name__)
        for k in ("batch_size", "eval_batch_size"):
            if self.config[k] < 1:
                raise UserError(f"data.{k}: {self.config[k]} must be >= 1")
        self.seed = seed
        self._tensors: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _prepared(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._tensors is None:
            tx, ty, vx, vy = self.load()
            c = self.config
            tx, vx = (self._shape(x) for x in (tx, vx))
            if c.limit_train:
                tx, ty = tx[: c.limit_train], ty[: c.limit_train]
            if c.limit_test:
                vx, vy = vx[: c.limit_test], vy[: c.limit_test]
            dtype = self.target_dtype  # class ids by default; float targets (regression, pitch) kept as they are
            self._tensors = (tx.contiguous(), ty.to(dtype) if dtype else ty, vx.contiguous(), vy.to(dtype) if dtype else vy)
        return self._tensors

    def _shape(self, x: Tensor) -> Tensor:
        c = self.config
        if c.resize and tuple(x.shape[-2:]) != (c.resize, c.resize):
            x = F.interpolate(x, size=(c.resize, c.resize), mode="bilinear", align_corners=False)
        if c.channels and x.shape[1] != c.channels:
            if x.shape[1] != 1:
                raise UserError(f"data.channels: can only repeat 1-channel images, these have {x.shape[1]}")
            x = x.repeat(1, c.channels, 1, 1)
        return x

    def setup(self, stage: str | None = None) -> None:
        self._prepared()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._prepared()[0].shape[1:])

    @property
    def train_tensors(self) -> tuple[Tensor, Tensor]:
        tx, ty, _, _ = self._prepared()
        return tx, ty

    @property
    def test_tensors(self) -> tuple[Tensor, Tensor]:
        _, _, vx, vy = self._prepared()
        return vx, vy

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(*self.train_tensors)
        return DataLoader(data, batch_size=self.config.batch_size, sampler=EpochShuffleSampler(len(data), self.seed))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.test_tensors), batch_size=self.config.eval_batch_size)
