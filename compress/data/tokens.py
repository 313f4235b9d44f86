"""``tokens``: synthetic token sequences for text classifiers (instant, no tokenizer, no download).

Batches are ``({"input_ids": (B, T) int64, "attention_mask": (B, T) int64}, labels)``, the form a
Hugging Face text classifier takes as keyword arguments. Each sequence has a random length in
``[min_len, seq_len]`` (padding id 0, mask 0 after the end) and tokens drawn from ``1..vocab_size-1``.
The vocabulary is cut into ``classes`` bands of ids; the label is the band holding most of the
sequence's tokens (ties: the lower band), so the task is learnable from the tokens alone and
ignores the padding only if the model honours the attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from compress.data._registry import DATAMODULES
from compress.data.base import ConfiguredDataModule, EpochShuffleSampler
from compress.errors import UserError

__all__ = ["TokenConfig", "TokenDataModule", "make_tokens"]


@dataclass
class TokenConfig:
    vocab_size: int = 64
    seq_len: int = 16
    min_len: int = 4
    classes: int = 2
    train_size: int = 512
    test_size: int = 128
    batch_size: int = 32
    eval_batch_size: int = 128


def make_tokens(n: int, vocab_size: int, seq_len: int, min_len: int, classes: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(input_ids, attention_mask, labels)`` of ``n`` sequences (the rule in the module docstring)."""
    ids = torch.randint(1, vocab_size, (n, seq_len), generator=generator)
    lengths = torch.randint(min_len, seq_len + 1, (n,), generator=generator)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    band = ((ids - 1).clamp(min=0) * classes) // (vocab_size - 1)  # 0..classes-1 for ids 1..vocab-1
    counts = torch.stack([((band == c) & (mask == 1)).sum(1) for c in range(classes)], 1)
    return ids, mask, counts.argmax(1)


class _Sequences(Dataset):
    def __init__(self, ids: Tensor, mask: Tensor, labels: Tensor):
        self.ids, self.mask, self.labels = ids, mask, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.labels[i]


@DATAMODULES.register("tokens")
class TokenDataModule(ConfiguredDataModule):
    """Synthetic token classification (``classes`` labels); seeded by the recipe."""

    Config: ClassVar[type] = TokenConfig

    def __init__(self, config: Any = None, /, seed: int = 0, **kwargs: Any):
        super().__init__()
        self.config = self.make_config(config if config is not None else kwargs, "data")
        c = self.config
        for k in ("batch_size", "eval_batch_size", "train_size", "test_size", "min_len"):
            if c[k] < 1:
                raise UserError(f"data.{k}: {c[k]} must be >= 1")
        if c.seq_len < c.min_len:
            raise UserError(f"data.seq_len: {c.seq_len} must be >= data.min_len ({c.min_len})")
        if not 2 <= c.classes < c.vocab_size:
            raise UserError(f"data.classes: {c.classes} must be >= 2 and < data.vocab_size ({c.vocab_size})")
        self.seed = seed
        self._splits: tuple[_Sequences, _Sequences] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.config.classes)

    @property
    def input_shape(self) -> dict[str, tuple[int, ...]]:
        return {"input_ids": (self.config.seq_len,), "attention_mask": (self.config.seq_len,)}

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            c = self.config
            g = torch.Generator().manual_seed(4321 + self.seed)
            ids, mask, y = make_tokens(c.train_size + c.test_size, c.vocab_size, c.seq_len, c.min_len, c.classes, g)
            n = c.train_size
            self._splits = (_Sequences(ids[:n], mask[:n], y[:n]), _Sequences(ids[n:], mask[n:], y[n:]))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        data = self._splits[0]
        return DataLoader(data, batch_size=self.config.batch_size, sampler=EpochShuffleSampler(len(data), self.seed))

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._splits[1], batch_size=self.config.eval_batch_size)
