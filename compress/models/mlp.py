"""Fully connected nets: LeNet-300-100 and Hinton et al.'s MNIST MLPs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from compress.models._registry import MODELS


@MODELS.register("mlp")
class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden size, then a Linear classifier (``fc_out``)."""

    def __init__(self, hidden: Sequence[int] = (300, 100), input_shape: Sequence[int] = (1, 28, 28),
                 num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.fc_out = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.features(x.flatten(1)))


@MODELS.register("lenet300")
class LeNet300(MLP):
    """LeNet-300-100 (LeCun et al. 1998), Deep Compression's Table 2 model."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__((300, 100), input_shape, num_classes)
