"""LeNet-5 in the Caffe form Deep Compression uses (20-50 conv filters, 500 hidden units)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from compress.models._registry import MODELS


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """conv5x5(20) - maxpool - conv5x5(50) - maxpool - fc(500) - relu - fc(classes).

    Caffe's LeNet has no activation after the convolutions; ``conv_act`` adds ReLU there.
    Inputs smaller than 16x16 are padded so both 5x5 convolutions fit.
    """

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10,
                 conv_act: bool = False, hidden: int = 500):
        super().__init__()
        c, h, w = input_shape
        pad = 2 if min(h, w) < 16 else 0
        act = nn.ReLU(inplace=True) if conv_act else nn.Identity()
        self.features = nn.Sequential(
            nn.Conv2d(c, 20, 5, padding=pad), act, nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(inplace=True) if conv_act else nn.Identity(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.fc1 = nn.Linear(flat, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.relu(self.fc1(self.features(x).flatten(1))))
