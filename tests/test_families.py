"""Each model family through the stages it had no test for: unstructured pruning with distillation
from the dense model, weight sharing with its Deep Compression file, int8 in ONNX Runtime.

From Python, as a user importing stages would: ``Stage(...).apply(model, Context(...))``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compress import (
    Context,
    QuantizeStage,
    ShareStage,
    UnstructuredPruningStage,
    build_datamodule,
    build_model,
)
from compress.batches import forward
from compress.encoding import read_compressed, write_compressed
from compress.pruning.masks import deployed_copy, prunable_layers

FAMILIES = {
    "resnet20": {},  # residual adds
    "mobilenetv2_small": {},  # depthwise convolutions
    "vit": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 4},  # attention
}


def _data():
    dm = build_datamodule({"name": "synthetic", "shape": [3, 16, 16], "classes": 4, "train_size": 128,
                           "test_size": 64, "batch_size": 32}, seed=0)
    dm.setup()
    return dm


def _model(name):
    torch.manual_seed(0)
    spec = {"name": name, "kwargs": {"input_shape": [3, 16, 16], "num_classes": 4, **FAMILIES[name]}}
    return build_model(spec["name"], **spec["kwargs"]), spec


def _layer_weights(model):
    return {n: m.weight.detach() for n, m in prunable_layers(deployed_copy(model)).items()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unstructured_with_distillation_then_sharing_and_its_file(name, tmp_path):
    dm = _data()
    model, spec = _model(name)
    teacher = copy.deepcopy(model).eval()
    ctx = Context(dm, reference_model=teacher, trainer={"progress_bar": False})
    finetune = {"epochs": 1, "optimizer": {"lr": 0.01}, "distill": {"teacher": "self", "T": 2.0, "alpha": 0.5}}
    before = _layer_weights(model)
    UnstructuredPruningStage(sparsity=0.5, finetune=finetune).apply(model, ctx)
    after = _layer_weights(model)
    for layer, w in after.items():  # half of each layer's weights are zero, the rest were trained on
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.02), layer
        assert not torch.equal(w, before[layer] * (w != 0)), layer
    ShareStage(bits=4).apply(model, ctx)
    x = next(iter(dm.test_dataloader()))[0]
    for layer, w in _layer_weights(model).items():
        assert len(torch.unique(w[w != 0])) <= 16, layer  # a 4-bit codebook
        assert torch.equal(w == 0, after[layer] == 0), layer  # pruned weights stay pruned
    write_compressed(model, tmp_path / "m.dc", spec)
    back = read_compressed(tmp_path / "m.dc")
    with torch.no_grad():
        assert torch.equal(forward(back, x), forward(deployed_copy(model).eval(), x))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_int8_in_onnxruntime(name, tmp_path):
    from compress.runtime import OrtModel, export_onnx, ort_accuracy

    dm = _data()
    model, _ = _model(name)
    ctx = Context(dm, trainer={"progress_bar": False})
    QuantizeStage(mode="ptq", calibration_batches=2).apply(model, ctx)
    batches = [b[0] for b in list(dm.train_dataloader())[:2]]
    x = next(iter(dm.test_dataloader()))[0]
    path = export_onnx(model, tmp_path / "m.onnx", x[:1], calibration=batches)  # checks int8 agreement itself
    session = OrtModel(path)
    assert session(x).shape == (len(x), 4)
    with torch.no_grad():
        torch_acc = (forward(model.eval(), x).argmax(1) == next(iter(dm.test_dataloader()))[1]).float().mean().item()
    assert ort_accuracy(session, dm.test_dataloader()) == pytest.approx(torch_acc, abs=0.1)
