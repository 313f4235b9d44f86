"""``imagefolder``: class-per-folder images, read from disk batch by batch (no torchvision needed).

    root/train/<class>/*.png|jpg|...     root/test/<class>/*.png|jpg|...

Classes are the sorted folder names of ``train`` (``test`` must not add any); images are decoded
with Pillow, resized to ``size`` x ``size``, converted to ``channels`` (1: grey, 3: RGB), scaled to
[0, 1] and normalised by ``mean``/``std`` per channel. Nothing is held in memory beyond a batch,
so a folder larger than RAM works; shuffling is seeded per epoch as for every data set here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from compress.data._registry import DATAMODULES
from compress.data.base import ConfiguredDataModule, EpochShuffleSampler
from compress.errors import UserError

__all__ = ["ImageFolderConfig", "ImageFolderDataModule", "ImageFolder", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class ImageFolderConfig:
    root: str = "data/images"  # holds train/ and test/, one sub-folder per class
    train: str = "train"
    test: str = "test"
    size: int = 32  # images are resized to size x size
    channels: int = 3  # 1 (grey) or 3 (RGB)
    mean: list[float] = field(default_factory=lambda: [0.5])  # per channel (one value: every channel)
    std: list[float] = field(default_factory=lambda: [0.5])
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0


class ImageFolder(Dataset):
    """``(image tensor (C, size, size), class index)`` for every image file under ``folder/<class>/``."""

    def __init__(self, folder: Path, classes: list[str], size: int, channels: int, mean: Tensor, std: Tensor):
        self.items = [(path, i) for i, c in enumerate(classes)
                      for path in sorted((folder / c).iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
        self.size, self.mode = size, {1: "L", 3: "RGB"}[channels]
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path, label = self.items[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode).resize((self.size, self.size), Image.BILINEAR)
                x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        except (UnidentifiedImageError, OSError, ValueError) as e:  # Pillow's "cannot identify", truncated files
            raise UserError(f"data.root: {path} is not an image Pillow can read ({str(e).splitlines()[0]}); "
                            "remove or replace it") from None
        x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # (C, H, W)
        return (x - self.mean) / self.std, label


@DATAMODULES.register("imagefolder")
class ImageFolderDataModule(ConfiguredDataModule):
    """``data: {name: imagefolder, root: path/to/images, size: 64, channels: 3}``."""

    Config: ClassVar[type] = ImageFolderConfig

    def __init__(self, config: Any = None, /, seed: int = 0, **kwargs: Any):
        super().__init__()
        self.config = self.make_config(config if config is not None else kwargs, "data")
        c = self.config
        if c.channels not in (1, 3):
            raise UserError(f"data.channels: {c.channels}; imagefolder reads grey (1) or RGB (3) images")
        for k in ("mean", "std"):
            if len(c[k]) not in (1, c.channels):
                raise UserError(f"data.{k}: {len(c[k])} values for {c.channels} channels; give 1 or {c.channels}")
        if any(s <= 0 for s in c.std):
            raise UserError("data.std: every value must be > 0")
        self.seed = seed
        root = Path(c.root)
        for split in (c.train, c.test):
            if not (root / split).is_dir():
                raise UserError(f"data.root: no folder '{root / split}' (imagefolder wants {root}/{c.train}/<class>/"
                                f"*.png and {root}/{c.test}/<class>/*.png)")
        self.classes = sorted(d.name for d in (root / c.train).iterdir() if d.is_dir())
        extra = sorted({d.name for d in (root / c.test).iterdir() if d.is_dir()} - set(self.classes))
        if len(self.classes) < 2 or extra:
            why = f"test has classes train lacks: {', '.join(extra)}" if extra else \
                f"{len(self.classes)} class folder(s) under {root / c.train}"
            raise UserError(f"data.root: {why}; imagefolder needs >= 2 class folders, the same in train and test")
        shape = (c.channels, 1, 1)
        mean = torch.tensor(list(c.mean), dtype=torch.float32).expand(c.channels).reshape(shape)
        std = torch.tensor(list(c.std), dtype=torch.float32).expand(c.channels).reshape(shape)
        self.splits = {s: ImageFolder(root / d, self.classes, c.size, c.channels, mean, std)
                       for s, d in (("train", c.train), ("test", c.test))}
        for s, data in self.splits.items():
            if len(data) == 0:
                raise UserError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root / getattr(c, s)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.config.channels, self.config.size, self.config.size)

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        return DataLoader(data, batch_size=self.config.batch_size, num_workers=self.config.num_workers,
                          sampler=EpochShuffleSampler(len(data), self.seed))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], batch_size=self.config.eval_batch_size,
                          num_workers=self.config.num_workers)
