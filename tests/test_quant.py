"""int8 fake quantisation: PTQ and QAT accuracy on digits, save/restore, ignore, put-back-to-float, sizes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError
from compress.pruning.masks import set_mask
from compress.quant import (
    dequantize_layer,
    float_copy,
    int8_storage_bytes,
    is_quantized,
    prepare,
    prepare_qat,
    quant_state,
    quantize_ptq,
    quantized_layers,
    restore_quant,
)

PTQ_DROP = 0.02  # int8 PTQ may cost at most 2 points of digits test accuracy (360 samples: 7 images)


def accuracy(model: nn.Module, data) -> float:
    x, y = data
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def calibration(digits, n: int = 4) -> list[torch.Tensor]:
    return list(digits[0][0][: 64 * n].split(64))


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_ptq_keeps_accuracy(trained, digits, kind):
    float_acc = accuracy(trained[kind], digits[1])
    assert float_acc > 0.9
    q = quantize_ptq(copy.deepcopy(trained[kind]), calibration(digits))
    assert is_quantized(q) and set(quantized_layers(q)) == {n for n, m in q.named_modules()
                                                            if isinstance(m, nn.Linear | nn.Conv2d)}
    assert accuracy(q, digits[1]) >= float_acc - PTQ_DROP
    with torch.no_grad():  # and it really is quantised: outputs differ from the float model's
        assert not torch.equal(q(digits[1][0][:8]), trained[kind](digits[1][0][:8]))


def test_weights_round_to_int8_per_channel(trained, digits):
    q = quantize_ptq(copy.deepcopy(trained["cnn"]), calibration(digits, 1))
    w = q.conv2.weight  # the fake-quantised weight: 255 levels per output channel at most
    scale = w.abs().flatten(1).amax(1) / 127
    levels = w / scale.view(-1, 1, 1, 1)
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.abs().max() <= 127 + 1e-3


def test_save_restore_bit_identical_through_weights_only_load(trained, digits, tmp_path, new_model):
    model = copy.deepcopy(trained["cnn"])
    mask = torch.rand_like(model.conv2.weight) > 0.5
    set_mask(model.conv2, mask)  # a pruned model, quantised
    q = quantize_ptq(model, calibration(digits), ignore=["fc"])
    torch.save({"state_dict": q.state_dict(), "quant": quant_state(q)}, tmp_path / "q.pt")
    ckpt = torch.load(tmp_path / "q.pt", weights_only=True)

    fresh = new_model("cnn")
    set_mask(fresh.conv2, torch.ones_like(fresh.conv2.weight))
    restore_quant(fresh, ckpt["quant"], ckpt["state_dict"])
    x = digits[1][0]
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), q.eval()(x))
    assert list(quantized_layers(fresh)) == ["conv1", "conv2"]
    assert not fresh.conv2.weight[~mask].any()  # pruned weights stay exactly zero after quantisation


def test_restore_rejects_unknown_format(new_model):
    with pytest.raises(UserError, match="format"):
        restore_quant(new_model("mlp"), {"format": "other", "bits": 8, "layers": []})


def test_qat_trains_and_stays_quantised(trained, digits):
    q = prepare_qat(copy.deepcopy(trained["mlp"]), calibration=calibration(digits, 2))
    before = {k: v.clone() for k, v in q.state_dict().items()}
    x, y = digits[0]
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    q.train()
    for idx in torch.arange(256).split(64):
        loss = F.cross_entropy(q(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = q.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.endswith("weight.original") for k in changed)  # weights learn through fake quantisation
    assert any(k.endswith("input_quantizer.min_val") or k.endswith("input_quantizer.max_val") for k in changed)
    assert is_quantized(q)
    # eval() forwards leave the ranges alone (Lightning validation inside QAT must not move them)
    ranges = {k: v.clone() for k, v in q.state_dict().items() if "input_quantizer" in k}
    q.eval()(x[:64])
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in ranges.items())
    assert accuracy(q, digits[1]) >= accuracy(trained["mlp"], digits[1]) - PTQ_DROP


def test_qat_model_resumes_bit_identical(trained, digits, tmp_path, new_model):
    q = prepare_qat(copy.deepcopy(trained["mlp"]))
    q.train()(digits[0][0][:64])  # first batch sets the ranges
    torch.save({"sd": q.state_dict(), "quant": quant_state(q)}, tmp_path / "qat.pt")
    ckpt = torch.load(tmp_path / "qat.pt", weights_only=True)
    fresh = restore_quant(new_model("mlp"), ckpt["quant"], ckpt["sd"])
    batch = digits[0][0][64:128]
    assert torch.equal(fresh.train()(batch), q.train()(batch))  # the EMA observer continues identically
    assert torch.equal(fresh.fc_out.input_quantizer.max_val, q.fc_out.input_quantizer.max_val)


@pytest.mark.parametrize("bits", [4, 16])
def test_other_bit_widths_are_refused(bits, new_model):
    with pytest.raises(UserError, match=rf"^bits: {bits} is not supported"):
        prepare(new_model("mlp"), bits=bits)


def test_ignore_keeps_layers_float(trained, digits):
    float_model = trained["cnn"]
    q = quantize_ptq(copy.deepcopy(float_model), calibration(digits, 1), ignore=["fc", "conv*1"])
    assert list(quantized_layers(q)) == ["conv2"]
    assert type(q.fc) is nn.Linear and not hasattr(q.fc, "input_quantizer")
    assert torch.equal(q.fc.weight, float_model.fc.weight)
    with pytest.raises(UserError, match="ignore: 'nope' matches no quantisable layer"):
        prepare(copy.deepcopy(float_model), ignore=["nope"])


def test_dequantize_layer_puts_it_back_to_float(trained, digits):
    float_model = trained["cnn"]
    q = quantize_ptq(copy.deepcopy(float_model), calibration(digits, 1))
    for name in list(quantized_layers(q)):
        dequantize_layer(q, name)
    assert not is_quantized(q)
    x = digits[1][0][:32]
    with torch.no_grad():
        assert torch.equal(q(x), float_model(x))
    with pytest.raises(UserError, match="not a quantised layer"):
        dequantize_layer(q, "conv1")


def test_dequantize_keeps_pruning_mask(trained, digits):
    model = copy.deepcopy(trained["cnn"])
    mask = torch.rand_like(model.conv1.weight) > 0.5
    set_mask(model.conv1, mask)
    q = quantize_ptq(model, calibration(digits, 1))
    dequantize_layer(q, "conv1")
    assert not q.conv1.weight[~mask].any() and type(q.conv1).__name__ == "ParametrizedConv2d"
    assert not float_copy(q).conv1.weight[~mask].any()


def test_int8_storage_bytes(trained, digits):
    float_model = trained["mlp"]
    q = quantize_ptq(copy.deepcopy(float_model), calibration(digits, 1))
    weights = sum(m.weight.numel() for m in quantized_layers(q).values())
    biases = sum(m.bias.numel() for m in quantized_layers(q).values())
    channels = sum(m.weight.shape[0] for m in quantized_layers(q).values())
    assert int8_storage_bytes(q) == weights + 4 * biases + 5 * channels + 5 * len(quantized_layers(q))
    float_bytes = sum(p.numel() * 4 for p in float_model.parameters())
    assert float_bytes / int8_storage_bytes(q) > 3.5
    kept = quantize_ptq(copy.deepcopy(float_model), calibration(digits, 1), ignore=["fc_out"])
    assert int8_storage_bytes(kept) - int8_storage_bytes(q) == 3 * float_model.fc_out.weight.numel() - \
        5 * float_model.fc_out.weight.shape[0] - 5


def test_calibration_sees_the_float_models_activations_as_onnx_runtime_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 8)
    with torch.no_grad():
        hidden = model[1](model[0](x))  # the second layer's input in the float model
    quantize_ptq(model, [x])
    q = model[2].input_quantizer
    # int8 weights in the first layer would move these; ORT calibrates the float graph
    assert (float(q.min_val), float(q.max_val)) == (float(hidden.min()), float(hidden.max()))
    assert not torch.equal(model[0].weight, model[0].parametrizations.weight.original)  # quantised after


@pytest.mark.parametrize("low, high", [(-3e-13, 5e-13), (0.0, 0.0), (-0.5, 2.0)])
def test_activation_ranges_follow_onnx_runtime_even_when_tiny(low, high):
    """Small but real activations (a random-weight EfficientNet's are ~1e-13) keep their resolution, as in the
    int8 graph; only a range too small for a float32 scale gets scale 1, as ORT's compute_scale_zp gives it."""
    quant_utils = pytest.importorskip("onnxruntime.quantization.quant_utils")
    from compress.quant import ActivationQuantizer

    q = ActivationQuantizer()
    x = torch.tensor([low, high, (low + high) / 2])
    q(x)  # observes
    q.update_qparams()
    zero, scale = quant_utils.compute_scale_zp(np.array(low, dtype=np.float32), np.array(high, dtype=np.float32),
                                               np.array(0, dtype=np.uint8), np.array(255, dtype=np.uint8))
    assert float(q.scale) == pytest.approx(float(scale), rel=1e-6) and int(q.zero_point) == int(zero)
    q.observing.fill_(False)
    q.enabled.fill_(True)
    assert (q(x) - x).abs().max() <= float(q.scale) / 2 + 1e-30  # within half a step, not rounded to zero
