"""Data as LightningDataModules, registered by name; each has a typed ``Config``.

All datasets here fit in memory, so they are held as tensors: loading is instant after the first
read and shuffling is seeded by the recipe (repeatable runs).
"""

from __future__ import annotations

import itertools
from typing import Any

from torch import Tensor

from compress.calls import batch_size, describe_inputs, repeat_to
from compress.data import cifar10, digits, mnist, synthetic, text, tokens, tones  # noqa: F401  (imported for their registrations)
from compress.data._registry import DATAMODULES
from compress.data.base import TensorDataModule
from compress.data.imagefolder import ImageFolderDataModule
from compress.data.text import TextDataModule
from compress.data.tokens import TokenDataModule
from compress.errors import UserError

__all__ = ["DATAMODULES", "ImageFolderDataModule", "TensorDataModule", "TextDataModule", "TokenDataModule", "build_datamodule", "describe", "example_batch",
           "training_inputs"]


def build_datamodule(cfg: dict[str, Any] | Any, seed: int = 0, key: str = "data") -> Any:
    """A data module from a recipe's ``data`` block: ``name`` plus that dataset's keys.

    ``name`` is a registered data set (typed ``Config``, seeded) or ``import:package.module:Class``,
    any LightningDataModule whose batches are ``(inputs, targets)``, built with the block's other keys.
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    name = str(cfg.pop("name", ""))
    cls = DATAMODULES.get(name, f"{key}.name")
    if isinstance(cls, type) and issubclass(cls, TensorDataModule | ImageFolderDataModule | TokenDataModule | TextDataModule):
        return cls(cls.make_config(cfg, key), seed=seed)
    try:
        dm = cls(**cfg)
    except TypeError as e:
        raise UserError(f"{key}: cannot build {getattr(cls, '__name__', name)} ({e})") from None
    if not all(callable(getattr(dm, f, None)) for f in ("train_dataloader", "test_dataloader")):
        raise UserError(f"{key}.name: {name} is not a LightningDataModule (it needs train_dataloader and "
                        "test_dataloader)")
    return dm


def describe(dm: Any, key: str = "data") -> tuple[tuple[int, ...], int | None, int]:
    """``(input_shape, num_classes or None, training batch size)`` of any data module.

    ``input_shape`` is per sample: a tuple for tensor inputs, ``{name: shape}`` for a mapping of tensors.

    Registered ones say; for others they are read from the module's attributes (``input_shape``,
    ``num_classes``, ``batch_size``) where it has them, else from its first batches.
    """
    shape = getattr(dm, "input_shape", None)
    batch = getattr(getattr(dm, "config", None), "batch_size", None) or getattr(dm, "batch_size", None)
    if shape is None or batch is None:
        x = next(iter(dm.train_dataloader()))[0]
        shape = shape or describe_inputs(x)
        batch = batch or batch_size(x)
    return (tuple(shape) if isinstance(shape, list | tuple) else shape), getattr(dm, "num_classes", None), int(batch)


def training_inputs(dm: Any, n: int) -> list[Tensor]:
    """The inputs of the first ``n`` training batches, in the data module's own seeded order
    (what int8 calibration runs on)."""
    batches = [b[0] if isinstance(b, list | tuple) else b for b in itertools.islice(dm.train_dataloader(), n)]
    if not batches:
        raise UserError("data: the training data loader yielded no batches (to calibrate on)")
    return batches


def example_batch(dm: Any, n: int = 2) -> tuple[Any, Tensor]:
    """The first ``n`` test inputs and labels (a deterministic batch for tracing and latency); cycled
    when the first test batch is smaller. Inputs may be a tensor or a mapping of tensors."""
    if isinstance(dm, TensorDataModule):
        dm.setup("test")
        x, y = dm.test_tensors
        if n <= len(x):
            return x[:n], y[:n]
        reps = -(-n // len(x))
        return x.repeat(reps, *[1] * (x.dim() - 1))[:n], y.repeat(reps)[:n]
    x, y = next(iter(dm.test_dataloader()))[:2]
    return repeat_to(x, n), repeat_to(y, n)

