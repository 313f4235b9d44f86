"""int8 quantisation of a plain ``nn.Module``: PTQ, QAT, save/restore, storage size.

Design: fake quantisation in torch, real int8 in ONNX Runtime.

- In torch, each ``Linear``/``Conv`` gets symmetric per-channel int8 fake quantisation of its weight
  (a parametrization, stacked after a pruning mask) and per-tensor uint8 fake quantisation of its
  input (a min/max observer). torch's ``fake_quantize_*`` ops give straight-through gradients, so
  QAT is an ordinary training loop (Lightning, distillation objective and all) and the model stays
  a plain module whose state is ``state_dict`` tensors plus :func:`quant_state`'s small dict.
- The deployable int8 model is built by :func:`compress.runtime.export_onnx` with ``int8=True``:
  the float graph goes through ONNX Runtime's ``quantize_static`` (QDQ, per-channel symmetric
  int8 weights, uint8 activations), calibrated on the same batches, with the layers torch kept
  float excluded. Weight scales are computed by the same rule on both sides, so weights round to
  the same integers; the graph it writes is one ORT fuses into ``QLinearConv``/``QGemm`` kernels.

Why not the alternatives (checked with torch 2.13, ORT 1.32): ``torch.ao.quantization`` eager
and FX are deprecated in favour of torchao, and their quantised modules neither export to ONNX
nor train; PT2E needs torchao (whose wheels track torch releases) and an exported graph that
re-traces on every restore. Exporting torch's own fake-quant ops as Q/DQ puts Q/DQ only around
each layer's inputs, a pattern ORT does not fuse into int8 convolutions (they stay fp32 on
dequantised weights); ORT's quantiser places Q/DQ where its own kernels need them.
"""

from __future__ import annotations

from compress.quant.int8 import (
    QUANTIZABLE,
    SUPPORTED_BITS,
    calibrate,
    check_bits,
    dequantize_layer,
    float_copy,
    freeze,
    int8_storage_bytes,
    is_quantizable,
    is_quantized,
    prepare,
    prepare_qat,
    quant_state,
    quantizable_layers,
    quantize_ptq,
    quantized_layers,
    restore_quant,
    strip_quant,
    unreached_layers,
)
from compress.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "QUANTIZABLE", "SUPPORTED_BITS", "ActivationQuantizer", "WeightQuantizer", "calibrate", "check_bits",
    "dequantize_layer", "float_copy", "freeze", "int8_storage_bytes", "is_quantizable", "is_quantized", "prepare",
    "prepare_qat", "quant_state", "quantizable_layers", "quantize_ptq", "quantized_layers", "restore_quant",
    "strip_quant", "unreached_layers",
]
