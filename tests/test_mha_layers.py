"""``nn.MultiheadAttention``'s weights, read without calling a layer, as torchvision's ViT uses them.

``F.multi_head_attention_forward`` reads ``in_proj_weight`` (a bare parameter) and ``out_proj.weight``
directly: ``out_proj`` is an ``nn.Linear`` never called as a module. Rebuilt in a few lines (no torchvision):
embed -> MultiheadAttention -> mean over tokens -> zero-initialised head (torchvision's ViT head starts at zero).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from compress.metrics import count_layers, weight_readers
from compress.quant import quantized_layers, unreached_layers
from compress.stages import Context
from compress.stages.prune_unstructured import UnstructuredPruningStage
from compress.stages.quantize import QuantizeStage
from compress.stages.share import ShareStage

torch.set_num_threads(1)
E = 8  # embedding width: in_proj_weight is (3E, E), out_proj.weight (E, E)


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=True)
        self.head = nn.Linear(E, 3)
        nn.init.zeros_(self.head.weight)  # as torchvision's VisionTransformer does

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 6)
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def _inputs(n: int = 4) -> Tensor:
    torch.manual_seed(2)
    return torch.randn(n, 5, 6)


class InputsContext(Context):
    """Example and calibration inputs from a fixed batch (no data module needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.datamodule = object()

    def example_inputs(self, batch_size: int = 2):
        return _inputs()[:batch_size]

    def training_inputs(self, batches: int) -> list:
        return [_inputs()] * batches


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyViT().eval()


def test_weight_readers_see_the_projections_attention_reads_itself():
    readers = weight_readers(_model(), _inputs())
    assert readers == {"embed": 6 * E, "attn": 3 * E * E, "attn.out_proj": E * E, "head": 3 * E}


def test_unstructured_and_share_run_and_name_the_bare_in_projection():
    model, x = _model(), _inputs()
    ctx = InputsContext()
    result = UnstructuredPruningStage(sparsity=0.5).apply(model, ctx)
    assert result.info["layer_sparsity"]["attn.out_proj"] == pytest.approx(0.5)
    # counted where its weight is read: E x E weights at each of the 5 tokens, half of them zero now
    stats = {s.name: s for s in count_layers(model, x)}
    assert list(stats) == ["embed", "attn.out_proj", "head"]
    assert (stats["attn.out_proj"].macs, stats["attn.out_proj"].effective_macs) == (E * E * 5, E * E * 5 // 2)
    share = 3 * E * E / sum(p.numel() for p in model.parameters())
    assert result.info["notes"] == [f"{share:.0%} of the parameters are in layers this stage cannot touch ('attn' "
                                    "(MultiheadAttention)): its sparsity and MAC figures leave them out"]
    result = ShareStage(bits=2).apply(model, ctx)  # the all-zero head gets one centroid, zero
    assert result.info["clusters"] == {"embed": 4, "attn.out_proj": 4, "head": 1}
    # the same share of the model (its shared weights are buffers now, and still the model's weights)
    assert result.info["notes"][0].startswith(f"{share:.0%} of the parameters are in layers this stage cannot touch")
    assert torch.isfinite(model(x)).all() and model.head.weight.abs().max() == 0


def test_quantize_leaves_the_layer_attention_reads_itself_float_and_says_so():
    model, x = _model(), _inputs()
    assert unreached_layers(model, x[:1]) == ["attn.out_proj"]
    stage = QuantizeStage(mode="ptq", calibration_batches=1)
    assert stage.plan(model, x[:1]) == ["embed -> int8", "head -> int8", "attn.out_proj -> float (never called as a layer)"]
    result = stage.apply(model, InputsContext())  # was: "a layer saw no calibration data"
    assert list(quantized_layers(model)) == ["embed", "head"]
    assert result.info["float_layers"] == ["attn.out_proj"]
    notes = result.info["notes"]
    assert notes[0].startswith("'attn.out_proj' (NonDynamicallyQuantizableLinear) left float: never called as a layer")
    assert notes[1].endswith("cannot touch ('attn' (MultiheadAttention), 'attn.out_proj' "
                             "(NonDynamicallyQuantizableLinear)): its sparsity and MAC figures leave them out")
    assert torch.isfinite(model(x)).all()


def test_the_int8_graph_keeps_float_what_the_torch_model_keeps_float(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    from onnx import numpy_helper

    from compress.quant import quantize_ptq
    from compress.runtime import export_onnx

    model, x = _model(), _inputs(8)
    with torch.no_grad():
        model.head.weight.normal_()  # a head that tells inputs apart, for the export's check
    quantize_ptq(model, [x], ignore=["attn.out_proj"])
    path = export_onnx(model, tmp_path / "m.onnx", x[:2], calibration=[x])
    graph = onnx.load(str(path)).graph
    int8 = sorted(tuple(sorted(numpy_helper.to_array(i).shape)) for i in graph.initializer
                  if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2)
    assert int8 == [(3, E), (6, E)]  # the embedding and the head; neither projection of the attention


def test_structured_pruning_narrows_the_in_projection_and_does_not_call_it_untouched():
    from compress.stages.prune_structured import StructuredPruningStage

    model = _model()
    result = StructuredPruningStage(ratio=0.5, heads="dims").apply(model, InputsContext())
    assert model.attn.in_proj_weight.shape == (3 * E // 2, E // 2)  # Torch-Pruning narrowed it with the channels
    assert not any("cannot touch" in n for n in result.info.get("notes", []))
