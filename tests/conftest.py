"""Shared fixtures: a tiny model, a synthetic data module, the shared MNIST folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("COMPRESS_SHARED_DATA", ROOT.parent / "shared" / "data"))


class TinyNet(nn.Module):
    """conv(1->4) - relu - linear(4*6*6 -> 10): small enough to check by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


class SmallCNN(nn.Module):
    """conv(1->8) - bn - relu - conv(8->16) - relu - pool - linear: a CNN with BN, for digits 8x8."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, 4, 4)
        return self.fc(x.flatten(1))


def make_digits_model(kind: str) -> nn.Module:
    """A freshly initialised (seed 0) ``"cnn"`` (:class:`SmallCNN`) or ``"mlp"`` (zoo MLP 64-32) for digits."""
    from compress.models import build_model

    torch.manual_seed(0)
    if kind == "cnn":
        return SmallCNN()
    return build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(64, 32))


@pytest.fixture
def new_model():
    """The :func:`make_digits_model` factory, for tests that rebuild a model (e.g. to restore a checkpoint)."""
    return make_digits_model


@pytest.fixture(scope="session")
def digits():
    """((train_x, train_y), (test_x, test_y)) of the bundled digits data, (N, 1, 8, 8) inputs."""
    from compress.data import build_datamodule

    dm = build_datamodule({"name": "digits", "batch_size": 64})
    dm.setup()
    return dm.train_tensors, dm.test_tensors


def train_briefly(model: nn.Module, data, epochs: int = 6, lr: float = 0.05) -> nn.Module:
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def trained(digits):
    """A float CNN and MLP trained briefly on digits (about 95% test accuracy); copy before changing them."""
    return {kind: train_briefly(make_digits_model(kind), digits[0]) for kind in ("cnn", "mlp")}


@pytest.fixture
def synthetic_dm():
    from compress.data import build_datamodule

    dm = build_datamodule({"name": "synthetic", "shape": [1, 8, 8], "train_size": 256, "test_size": 64,
                           "batch_size": 32})
    dm.setup()
    return dm


@pytest.fixture
def mnist_root() -> Path:
    if not (SHARED_DATA / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set COMPRESS_SHARED_DATA)")
    return SHARED_DATA


def quick_recipe(tmp_path: Path, **over) -> dict:
    """A shrunken quick start: digits, lenet300, train + two pruning stages, few epochs."""
    recipe = {
        "name": "t", "seed": 0, "out_dir": str(tmp_path / "run"),
        "model": {"name": "lenet300"}, "data": {"name": "digits", "batch_size": 64},
        "trainer": {"progress_bar": False}, "logger": {"wandb": {"mode": "disabled"}},
        "eval": {"latency_repeats": 3, "latency_warmup": 1}, "hardware": [],
        "stages": [
            {"type": "train", "epochs": 3, "optimizer": {"lr": 0.05}},
            {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}}},
            {"type": "prune.unstructured", "sparsity": 0.8, "schedule": "agp",
             "finetune": {"epochs": 2, "optimizer": {"lr": 0.01}}},
        ],
    }
    recipe.update(over)
    return recipe


class FactoryNet(nn.Module):
    """A model built by a torchvision/timm-style factory: knows ``num_classes`` but not ``input_shape``."""

    def __init__(self, width: int = 16, num_classes: int = 1000):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU())  # (B, 64): digits 8x8
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def factory_net(**kwargs) -> nn.Module:
    """``torchvision.models.resnet18(**kwargs)``'s shape: every argument forwarded to the class."""
    return FactoryNet(**kwargs)


class ToyDataModule(pl.LightningDataModule):
    """A user's own LightningDataModule (not registered): 2-D points in ``classes`` separable clusters,
    served as (inputs, targets) batches by plain DataLoaders; it has no input_shape or batch config."""

    def __init__(self, n: int = 512, classes: int = 3, batch_size: int = 32):
        super().__init__()
        self.n, self.num_classes, self.batch_size = n, classes, batch_size

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(self.num_classes, 2, generator=g) * 4
        y = torch.randint(0, self.num_classes, (self.n,), generator=g)
        x = centers[y] + torch.randn(self.n, 2, generator=g) * 0.5
        self.train_set = torch.utils.data.TensorDataset(x[: self.n // 2], y[: self.n // 2])
        self.test_set = torch.utils.data.TensorDataset(x[self.n // 2:], y[self.n // 2:])

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.test_set, batch_size=64)
