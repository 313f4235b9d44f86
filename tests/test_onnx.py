"""ONNX export and ONNX Runtime: fp32 fidelity (masks, pruned shapes, dynamic batch), int8 QDQ graphs, errors."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compress.errors import UserError
from compress.models import build_model
from compress.pruning.masks import set_mask
from compress.quant import quantize_ptq
from compress.runtime import OrtModel, export_onnx, ort_accuracy

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def calibration(digits, n: int = 4) -> list[torch.Tensor]:
    return list(digits[0][0][: 64 * n].split(64))


def max_abs_diff(model, path, x) -> float:
    with torch.no_grad():
        return float((OrtModel(path)(x) - model.eval()(x)).abs().max())


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "mobilenetv2_small"])
def test_fp32_export_matches_torch_with_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, input_shape=[3, 32, 32], num_classes=10).eval()
    path = export_onnx(model, tmp_path / "m.onnx", torch.randn(2, 3, 32, 32))
    assert OrtModel(path).session.get_inputs()[0].shape[0] == "batch"
    assert max_abs_diff(model, path, torch.randn(5, 3, 32, 32)) <= 1e-4  # another batch size


def test_fp32_export_bakes_masks_and_real_pruned_shapes(tmp_path):
    from compress.pruning.structured import prune_model

    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=[3, 32, 32], num_classes=10).eval()
    prune_model(model, torch.randn(2, 3, 32, 32), ratio=0.5)
    set_mask(model.fc, torch.rand_like(model.fc.weight) > 0.5)
    path = export_onnx(model, tmp_path / "pruned.onnx", torch.randn(2, 3, 32, 32))
    assert max_abs_diff(model, path, torch.randn(4, 3, 32, 32)) <= 1e-4
    init = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    conv_out = sorted({a.shape[0] for a in init.values() if a.ndim == 4})
    assert max(conv_out) < 64  # the widest conv of dense ResNet-20 has 64 channels
    fc = next(a for a in init.values() if a.ndim == 2)
    assert (fc == 0).mean() >= 0.4  # the fc mask is in the weights


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_int8_export_runs_with_int8_weights_and_agrees(trained, digits, kind, tmp_path):
    cal = calibration(digits)
    q = quantize_ptq(copy.deepcopy(trained[kind]), cal)
    fp32 = export_onnx(q, tmp_path / "fp32.onnx", cal[0], int8=False)
    int8 = export_onnx(q, tmp_path / "int8.onnx", cal[0], calibration=cal)

    graph = onnx.load(str(int8)).graph
    init = {i.name: i for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    producers = {o: n for n in graph.node for o in n.output}
    for w in weights:  # every layer's weight is an int8 initializer, dequantised per channel
        dq = producers[w]
        assert dq.op_type == "DequantizeLinear" and init[dq.input[0]].data_type == onnx.TensorProto.INT8
    assert {n.op_type for n in graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    weight_bytes = sum(len(init[producers[w].input[0]].raw_data) for w in weights)
    assert weight_bytes * 4 == sum(p.numel() * 4 for n, p in trained[kind].named_parameters() if n.endswith("weight")
                                   and p.ndim > 1)  # 1 byte per weight (these nets are too small for file ratios)

    x, y = digits[1]
    with torch.no_grad():
        torch_pred = q.eval()(x).argmax(1)
    ort_pred = OrtModel(int8)(x).argmax(1)
    assert (ort_pred == torch_pred).float().mean() >= 0.99
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    float_acc = ort_accuracy(fp32, loader)
    assert ort_accuracy(int8, loader) >= float_acc - 0.02


def test_int8_file_of_a_conv_net_is_over_3_5x_smaller(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=[1, 28, 28], num_classes=10).eval()
    cal = [torch.randn(8, 1, 28, 28)]
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", cal[0])
    int8 = export_onnx(quantize_ptq(model, cal), tmp_path / "int8.onnx", cal[0], check=False)  # untrained: size only
    assert fp32.stat().st_size / int8.stat().st_size >= 3.5


def test_int8_export_keeps_ignored_layer_float(trained, digits, tmp_path):
    cal = calibration(digits, 2)
    q = quantize_ptq(copy.deepcopy(trained["cnn"]), cal, ignore=["fc"])
    graph = onnx.load(str(export_onnx(q, tmp_path / "int8.onnx", cal[0], calibration=cal))).graph
    init = {i.name: i for i in graph.initializer}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert init[gemm.input[1]].data_type == onnx.TensorProto.FLOAT
    conv_weights = [producers.input[0] for producers in graph.node if producers.op_type == "DequantizeLinear"
                    and producers.input[0] in init and init[producers.input[0]].data_type == onnx.TensorProto.INT8]
    assert len(conv_weights) == 2


def test_ort_model_takes_numpy_and_tensors(tiny_model, tmp_path):
    x = torch.randn(3, 1, 8, 8)
    ort_model = OrtModel(export_onnx(tiny_model, tmp_path / "t.onnx", x), threads=1)
    assert isinstance(ort_model(x), torch.Tensor) and isinstance(ort_model(x.numpy()), np.ndarray)
    np.testing.assert_allclose(ort_model(x.numpy()), ort_model(x).numpy())


def test_failed_check_writes_nothing(tiny_model, tmp_path, monkeypatch):
    import compress.runtime.export as export

    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)
    with pytest.raises(UserError, match="^export: ONNX Runtime fp32 outputs differ"):
        export_onnx(tiny_model, tmp_path / "t.onnx", torch.randn(2, 1, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_int8_needs_a_quantised_model(tiny_model, tmp_path):
    with pytest.raises(UserError, match="int8 needs a model quantised"):
        export_onnx(tiny_model, tmp_path / "t.onnx", torch.randn(2, 1, 8, 8), int8=True)


def test_missing_onnxruntime_is_one_line(tiny_model, tmp_path, monkeypatch):
    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name.startswith("onnxruntime"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(UserError, match=r"^onnxruntime is not installed; pip install onnx onnxruntime$"):
        export_onnx(tiny_model, tmp_path / "t.onnx", torch.randn(2, 1, 8, 8))
    with pytest.raises(UserError, match="pip install onnx onnxruntime"):
        OrtModel(tmp_path / "t.onnx")


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such ONNX file"):
        OrtModel(tmp_path / "absent.onnx")


def test_int8_export_with_labels_applies_the_stages_accuracy_gate(trained, digits, tmp_path):
    from compress.runtime import int8_accuracy_gate

    cal = calibration(digits)
    q = quantize_ptq(copy.deepcopy(trained["mlp"]), cal)
    x, y = digits[1]
    loader = DataLoader(TensorDataset(x, y), batch_size=128)
    path = export_onnx(q, tmp_path / "ok.onnx", cal[0], calibration=cal, test=loader, max_accuracy_drop=0.05)
    float_acc = ort_accuracy(export_onnx(q, tmp_path / "f.onnx", cal[0], int8=False), loader)
    gate = int8_accuracy_gate(path, loader, float_acc, 0.05)
    assert gate["met"] and gate["drop"] == pytest.approx(float_acc - ort_accuracy(path, loader))
    assert not int8_accuracy_gate(path, loader, gate["runtime_accuracy"] + 0.02, 0.01)["met"]  # 2 points > 1
    with pytest.raises(UserError, match=r"^export: int8 accuracy in ONNX Runtime [\d.]+ is -?[\d.]+ worse than the float "
                                        r"model's [\d.]+ on the test split \(max_accuracy_drop -1; export --max-accuracy-drop "
                                        r"or the quantize stage's max_accuracy_drop sets it\); file not written$"):
        export_onnx(q, tmp_path / "no.onnx", cal[0], calibration=cal, test=loader, max_accuracy_drop=-1.0)
    assert not (tmp_path / "no.onnx").exists()
