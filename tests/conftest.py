"""Shared fixtures: a tiny model, a synthetic data module, the shared MNIST folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
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
