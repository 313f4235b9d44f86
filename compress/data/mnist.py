"""MNIST from the standard IDX files (gzipped or not), e.g. ``root: ../shared/data``."""

from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from compress.data._registry import DATAMODULES
from compress.data.base import DataConfig, TensorDataModule
from compress.errors import UserError

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# md5 of the uncompressed files (the official MNIST checksums).
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
MEAN, STD = 0.1307, 0.3081


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (LeCun's format: magic, dims, big-endian uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(data) - offset != count:
        raise UserError(f"{path}: truncated IDX file ({len(data) - offset} of {count} bytes)")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_file(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw", root / "raw", root / "MNIST"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def download(root: Path) -> None:
    """Fetch the four files into ``root/MNIST/raw`` and check their md5 (needs a network)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem, md5 in MD5.items():
        target = raw / (stem + ".gz")
        if target.is_file():
            continue
        tmp = target.with_suffix(".part")
        with urllib.request.urlopen(MIRROR + stem + ".gz", timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        with gzip.open(tmp, "rb") as f:
            if hashlib.md5(f.read()).hexdigest() != md5:
                tmp.unlink()
                raise UserError(f"{target}: downloaded file fails its md5 check; try again")
        tmp.rename(target)


@dataclass
class MNISTConfig(DataConfig):
    root: str = "../shared/data"
    download: bool = False
    normalize: bool = True


@DATAMODULES.register("mnist")
class MNISTDataModule(TensorDataModule):
    Config = MNISTConfig

    def load(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        root = Path(self.config.root)
        paths = {k: find_file(root, v) for k, v in FILES.items()}
        if any(p is None for p in paths.values()) and self.config.download:
            download(root)
            paths = {k: find_file(root, v) for k, v in FILES.items()}
        missing = [FILES[k] for k, p in paths.items() if p is None]
        if missing:
            raise UserError(f"data.root: MNIST file '{missing[0]}[.gz]' not found under '{root}' "
                            "(point data.root at the folder holding MNIST/raw, or set data.download=true)")
        arrays = {k: read_idx(p) for k, p in paths.items()}

        def images(a: np.ndarray) -> Tensor:
            x = torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # (N, 1, 28, 28)
            return (x - MEAN) / STD if self.config.normalize else x

        return (images(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64)),
                images(arrays["test_images"]), torch.from_numpy(arrays["test_labels"].astype(np.int64)))
