"""``text``: byte-level language-model data from any text files (no tokenizer download).

Every file is read as bytes (ids 0..255, ``vocab_size`` 256), the files are joined, and the stream
is cut into consecutive windows of ``seq_len`` bytes; the last ``test_fraction`` of the windows are
the test split (held out in the order of the text, so no test window overlaps a training one).
Batches are ``(ids, ids)``, both ``(B, seq_len)`` int64: the targets are the inputs, as Hugging
Face's ``labels`` (the ``language-model`` task shifts them: position t predicts t + 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from compress.data._registry import DATAMODULES
from compress.data.base import ConfiguredDataModule, EpochShuffleSampler
from compress.errors import UserError
from compress.schema import check_choice, check_range

__all__ = ["TextConfig", "TextDataModule", "byte_windows"]

TOKENIZERS = ("bytes",)


@dataclass
class TextConfig:
    files: list[str] = field(default_factory=list)  # text files, read as UTF-8 bytes
    seq_len: int = 64
    tokenizer: str = "bytes"  # bytes: one token per byte (vocabulary 256)
    test_fraction: float = 0.1
    batch_size: int = 16
    eval_batch_size: int = 64
    limit_train: int | None = None  # only the first N training windows (quick runs)


def byte_windows(data: bytes, seq_len: int) -> Tensor:
    """``(len(data) // seq_len, seq_len)`` int64 ids of consecutive windows (the tail is dropped)."""
    n = len(data) // seq_len
    return torch.frombuffer(bytearray(data[: n * seq_len]), dtype=torch.uint8).long().view(n, seq_len)


@DATAMODULES.register("text")
class TextDataModule(ConfiguredDataModule):
    """Byte-level windows of the recipe's text files; shuffled by the recipe's seed."""

    Config: ClassVar[type] = TextConfig
    vocab_size: ClassVar[int] = 256

    def __init__(self, config: Any = None, /, seed: int = 0, **kwargs: Any):
        super().__init__()
        self.config = self.make_config(config if config is not None else kwargs, "data")
        c = self.config
        check_choice(c.tokenizer, "data.tokenizer", TOKENIZERS)
        for k, least in (("seq_len", 2), ("batch_size", 1), ("eval_batch_size", 1)):
            if c[k] < least:
                raise UserError(f"data.{k}: {c[k]} must be >= {least}")
        check_range(c.test_fraction, "data.test_fraction", 0.0, 1.0, lo_open=True)
        if not c.files:
            raise UserError("data.files: no text file given; list one or more, e.g. files: [corpus.txt]")
        for i, f in enumerate(c.files):
            if not Path(f).is_file():
                raise UserError(f"data.files[{i}]: {f} is not a file")
        self.seed = seed
        self._splits: tuple[Tensor, Tensor] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (int(self.config.seq_len),)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is None:
            c = self.config
            windows = byte_windows(b"".join(Path(f).read_bytes() for f in c.files), c.seq_len)
            n_test = max(1, round(len(windows) * c.test_fraction))
            if len(windows) - n_test < 1:
                raise UserError(f"data.files: {len(windows)} windows of {c.seq_len} bytes leave none to train on "
                                "after the test split; give more text or a shorter data.seq_len")
            train = windows[:-n_test][: c.limit_train] if c.limit_train else windows[:-n_test]
            self._splits = (train, windows[-n_test:])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ids = self._splits[0]
        return DataLoader(TensorDataset(ids, ids), batch_size=self.config.batch_size,
                          sampler=EpochShuffleSampler(len(ids), self.seed))

    def test_dataloader(self) -> DataLoader:
        self.setup()
        ids = self._splits[1]
        return DataLoader(TensorDataset(ids, ids), batch_size=self.config.eval_batch_size)
