"""A MobileNetV2-style net (Sandler et al. 2018): inverted residuals with depthwise convolutions.

Sized for small inputs (CIFAR, MNIST, digits): stride-1 stem, fewer downsamplings.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from compress.models._registry import MODELS


def _divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def conv_bn_act(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_residual = stride == 1 and c_in == c_out
        layers = [conv_bn_act(c_in, hidden, 1)] if expand != 1 else []
        layers += [conv_bn_act(hidden, hidden, 3, stride, groups=hidden),  # depthwise
                   conv_bn_act(hidden, c_out, 1, act=False)]  # linear bottleneck
        self.block = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.use_residual else out


@MODELS.register("mobilenetv2")
class MobileNetV2(nn.Module):
    # (expansion t, channels c, repeats n, stride s), as in the paper's Table 2, CIFAR strides.
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, width_mult: float = 1.0,
                 last_channels: int = 1280, settings: Sequence[Sequence[int]] | None = None, dropout: float = 0.0):
        super().__init__()
        c = _divisible(32 * width_mult)
        layers: list[nn.Module] = [conv_bn_act(input_shape[0], c, 3, 1)]
        for t, ch, n, s in settings or self.SETTINGS:
            c_out = _divisible(ch * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        last = _divisible(last_channels * max(1.0, width_mult))
        layers.append(conv_bn_act(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.pool(self.features(x)).flatten(1)))


@MODELS.register("mobilenetv2_small")
class MobileNetV2Small(MobileNetV2):
    """Half width, 512 last channels: a digits/MNIST-sized MobileNetV2 that trains in minutes on a CPU."""

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10):
        super().__init__(input_shape, num_classes, width_mult=0.5, last_channels=512,
                         settings=((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1)))
