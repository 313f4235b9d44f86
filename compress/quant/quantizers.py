"""Fake-quantisation modules: int8 per-channel symmetric weights, uint8 per-tensor activations.

Both use torch's own fake-quant kernels (``torch.fake_quantize_per_channel_affine`` and
``torch.fake_quantize_per_tensor_affine``), whose backward is the straight-through estimator
(Bengio et al. 2013; Jacob et al. 2018, sec. 3): gradients pass unchanged inside the
representable range and are zero outside it, so an ordinary training loop fine-tunes through them.
The ranges follow ONNX Runtime's static quantiser (``QInt8`` weights in [-127, 127] with zero point
0, ``QUInt8`` activations in [0, 255] from the min/max of calibration data, range widened to hold
0), so the torch model and the exported QDQ graph round the same tensors the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WeightQuantizer", "ActivationQuantizer", "WEIGHT_QMIN", "WEIGHT_QMAX", "ACT_QMIN", "ACT_QMAX"]

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # symmetric int8, as ONNX Runtime's per-channel QInt8 weights
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations (the U8S8 pair x86 VNNI kernels run fastest)


def weight_scales(w: Tensor, axis: int = 0) -> Tensor:
    """Per-output-channel symmetric scales ``max|w_c| / 127``, shape ``(C_out,)``; ``axis``: the weight's
    output-channel dimension."""
    amax = w.detach().abs().movedim(axis, 0).flatten(1).amax(dim=1)
    return (amax / WEIGHT_QMAX).clamp_min(torch.finfo(torch.float32).tiny).float()


class WeightQuantizer(nn.Module):
    """Parametrization ``w -> fake_quant(w)``, per output channel, symmetric int8.

    ``axis`` is the weight's output-channel dimension: 0 for ``Linear`` (out, in) and convolutions, 1 for
    Hugging Face's ``Conv1D`` (in, out), whose ``MatMul``/``Gemm`` ONNX Runtime quantises along the same axis.

    Stateless: the scales are recomputed from the current weight on every access, so they follow
    the weight through QAT and need nothing in the ``state_dict``. Registered after a pruning
    :class:`~compress.plumbing.masks.Mask`, a pruned weight stays exactly zero.
    """

    def __init__(self, axis: int = 0):
        super().__init__()
        self.axis = axis
        self.enabled = True  # off only while calibration observes the float model's activations

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        scale = weight_scales(w, self.axis)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, self.axis, WEIGHT_QMIN, WEIGHT_QMAX)

    def extra_repr(self) -> str:
        return f"axis={self.axis}"


class ActivationQuantizer(nn.Module):
    """Per-tensor uint8 fake quantisation of a layer's input, with a min/max observer.

    Three switches, all buffers so a checkpoint restores them exactly: ``observing`` updates the
    range from each batch seen (all-time min/max, or an exponential moving average with
    ``averaging_constant`` for QAT), ``enabled`` applies the fake quantisation. PTQ calibrates with
    ``observing`` on and ``enabled`` off (ranges of the float model, as ONNX Runtime calibrates),
    then freezes; QAT turns both on, and observes only in ``train()`` mode.
    """

    def __init__(self, averaging_constant: float = 0.0):
        super().__init__()
        self.averaging_constant = averaging_constant
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("observing", torch.tensor(True))
        self.register_buffer("enabled", torch.tensor(False))

    @property
    def calibrated(self) -> bool:
        return bool(torch.isfinite(self.min_val))

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        lo, hi = x.detach().aminmax()
        lo, hi = lo.float(), hi.float()
        if not self.calibrated or self.averaging_constant <= 0:
            self.min_val.copy_(torch.minimum(self.min_val, lo))
            self.max_val.copy_(torch.maximum(self.max_val, hi))
        else:
            c = self.averaging_constant
            self.min_val.lerp_(lo, c)
            self.max_val.lerp_(hi, c)
        self.update_qparams()

    @torch.no_grad()
    def update_qparams(self) -> None:
        """Scale and zero point from the observed range, which is widened to hold 0 (exact zero padding)."""
        lo = torch.clamp(self.min_val, max=0.0)
        hi = torch.clamp(self.max_val, min=0.0)
        scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
        # ONNX Runtime's rule (quant_utils.compute_scale_zp): only a scale below float32's smallest normal is
        # replaced, by 1. A floor at float32 eps (torch.ao's observers) would round small but real activations
        # to zero here and not in the int8 graph: 60 of the 82 input ranges of a random-weight EfficientNet-B0
        # are below 255 eps, where its torch int8 top-1 agreed with float on 11% of inputs and ORT's on 92%.
        scale = torch.where(scale < torch.finfo(torch.float32).tiny, torch.ones_like(scale), scale)
        self.scale.copy_(scale)
        self.zero_point.copy_(torch.clamp(ACT_QMIN - torch.round(lo / scale), ACT_QMIN, ACT_QMAX).to(torch.int32))

    def forward(self, x: Tensor) -> Tensor:
        # Calibration (not enabled) observes in any mode; QAT (enabled) only in train(), so eval() forwards
        # such as Lightning's validation leave the ranges alone.
        if bool(self.observing) and (self.training or not bool(self.enabled)):
            self.observe(x)
        if not bool(self.enabled):
            return x
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, ACT_QMIN, ACT_QMAX)

    def extra_repr(self) -> str:
        return (f"observing={bool(self.observing)}, enabled={bool(self.enabled)}, "
                f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}")
