"""Layers found by what they compute: Hugging Face GPT-2 (Conv1D, fused c_attn) and DistilBERT
(q_lin/k_lin/v_lin) from small configs, through structured, unstructured, share and quantize; a bare
parameter given to F.linear, named and left out of the figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.encoding import model_storage, read_compressed, write_compressed
from compress.errors import UserError
from compress.hardware import weight_infos
from compress.metrics import count_layers, summarize, untouched_share, weight_readers
from compress.plumbing.masks import weight_layers
from compress.pruning.masks import prunable_layers
from compress.stages import Context
from compress.stages.prune_structured import StructuredPruningStage
from compress.stages.prune_unstructured import UnstructuredPruningStage
from compress.stages.quantize import QuantizeStage
from compress.stages.share import ShareStage

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
torch.set_num_threads(1)


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, num_labels=3,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2ForSequenceClassification(config).eval()


def tiny_distilbert() -> nn.Module:
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                           max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(config).eval()


def _tokens(n: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(2)
    return {"input_ids": torch.randint(3, 100, (n, 8)), "attention_mask": torch.ones(n, 8, dtype=torch.long)}


class TokenContext(Context):
    """A context whose example and calibration inputs are a fixed token batch (no data module needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.datamodule = object()

    def example_inputs(self, batch_size: int = 2):
        return {k: v[:batch_size] for k, v in _tokens().items()}

    def training_inputs(self, batches: int) -> list:
        return [_tokens()] * batches


CONV1D = ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
          "transformer.h.0.mlp.c_proj")


def test_weight_readers_find_conv1d_and_every_linear_by_what_they_compute():
    gpt2, bert = tiny_gpt2(), tiny_distilbert()
    readers = weight_readers(gpt2, _tokens())
    assert set(CONV1D) <= set(readers) and "score" in readers  # addmm reads Conv1D's weight, linear the head's
    assert readers["transformer.h.0.attn.c_attn"] == 32 * 96
    assert set(weight_readers(bert, _tokens())) == set(prunable_layers(bert))  # every reader is a Linear here
    share, names = untouched_share(gpt2, _tokens(), prunable_layers(gpt2))
    conv1d = sum(m.weight.numel() for m in gpt2.modules() if type(m).__name__ == "Conv1D")
    assert share == pytest.approx(conv1d / sum(p.numel() for p in gpt2.parameters()))
    assert len(names) == 8 and all(type(gpt2.get_submodule(n)).__name__ == "Conv1D" for n in names)


@pytest.mark.parametrize("build, message", [
    (tiny_gpt2, r"^s: Torch-Pruning cannot trace this model's channels \(TypeError: .*\); layers it does not know "
                r"compute with their own weights: 'transformer\.h\.0\.attn\.c_attn' \(Conv1D\), "
                r"'transformer\.h\.0\.attn\.c_proj' \(Conv1D\); leave this model out of structured pruning$"),
])
def test_structured_gpt2_is_refused_at_plan_time_in_one_line(build, message):
    model = build()
    stage = StructuredPruningStage(ratio=0.5, key="s")
    with pytest.raises(UserError, match=message) as e:
        stage.plan(model, _tokens(2))  # what --dry-run and the pipeline's start call
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("heads, n_heads, head_size", [("prune", 2, 8), ("dims", 4, 4), ("keep", 4, 8)])
def test_structured_distilbert_q_lin_k_lin_v_lin_is_pruned_checked_and_reloads(heads, n_heads, head_size, tmp_path):
    from compress.checkpoint import load_into, read_checkpoint, save_checkpoint

    model, x = tiny_distilbert(), _tokens()
    result = StructuredPruningStage(ratio=0.5, heads=heads, example_inputs=_tokens(2)).apply(model)
    attention = model.distilbert.transformer.layer[0].attention
    assert (attention.n_heads, attention.attention_head_size) == (n_heads, head_size)
    assert 0 < result.info["self_check"] < 1e-4 and "notes" not in result.info
    save_checkpoint(tmp_path / "d.ckpt", model, model_spec={}, check_inputs=x)
    fresh = load_into(tiny_distilbert(), read_checkpoint(tmp_path / "d.ckpt"))  # the saved outputs are checked
    assert torch.equal(fresh(**x).logits, model(**x).logits)


GPT2_SPEC = {"name": "transformers", "kwargs": {"num_classes": 3, "config": {
    "model_type": "gpt2", "vocab_size": 100, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}}


def _conv1d(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}


def test_stage0_counts_conv1d_macs_as_the_per_token_matmuls():
    model = tiny_gpt2()
    layers = count_layers(model, _tokens(1))
    d, tokens = model.config.n_embd, 8
    # per block and token: c_attn (d -> 3d), attn.c_proj (d -> d), c_fc (d -> 4d), mlp.c_proj (4d -> d);
    # the score head (d -> 3) runs on every token before the last one is picked
    per_token = model.config.n_layer * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + d * 3
    assert summarize(model, layers)["macs"] == per_token * tokens == 197_376
    assert {s.name for s in layers} == {*_conv1d(model), "score"}
    assert next(s for s in layers if s.name == CONV1D[0]).macs == 32 * 96 * tokens
    assert untouched_share(model, _tokens(), weight_layers(model)) == (0.0, [])


def test_unstructured_gpt2_prunes_conv1d_and_its_figures_match_what_changed():
    model = tiny_gpt2()
    dense = model_storage(model)["total"]["compression_ratio"]
    result = UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    assert "notes" not in result.info  # nothing left untouched
    for name, m in _conv1d(model).items():  # measured on the weights the layer computes with
        assert float((m.weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3), name
        assert result.info["layer_sparsity"][name] == pytest.approx(0.5, abs=1e-3)
    stats = summarize(model, count_layers(model, _tokens(1)))
    assert stats["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert stats["effective_macs"] == pytest.approx(stats["macs"] / 2, rel=0.01)
    assert dense == pytest.approx(1.0, abs=0.01) and model_storage(model)["total"]["compression_ratio"] > 1.4


def test_share_gpt2_conv1d_codebooks_and_the_dc_file_decodes_to_the_same_weights(tmp_path):
    from compress.plumbing.masks import deployed_copy
    from compress.sharing.shared import get_shared

    model = tiny_gpt2()
    UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    result = ShareStage(bits=4).apply(model, TokenContext())
    assert "notes" not in result.info and set(_conv1d(model)) <= set(result.info["bits"])
    for name, m in _conv1d(model).items():
        assert get_shared(m) is not None, name
        assert len(torch.unique(m.weight[m.weight != 0])) <= 16 and float((m.weight == 0).float().mean()) >= 0.5
    storage = model_storage(model)
    assert storage["layers"][CONV1D[0]]["format"] == "shared" and storage["layers"][CONV1D[0]]["compression_ratio"] > 8
    assert storage["total"]["compression_ratio"] > 3.5  # the embeddings (15% of the parameters) stay dense
    info = weight_infos(model)[f"{CONV1D[0]}.weight"]  # the simulated hardware reads the codebook too
    assert (info.shared_bits, info.rows, tuple(info.tensor.shape)) == (4, 96, (96, 32)) and info.density <= 0.5
    write_compressed(model, tmp_path / "g.dc", GPT2_SPEC)
    back = read_compressed(tmp_path / "g.dc", trust_model_code=True).state_dict()
    for key, t in deployed_copy(model).state_dict().items():
        assert torch.equal(back[key], t), key


def test_quantize_gpt2_quantises_conv1d_per_output_column_and_the_int8_graph_passes_the_gate(tmp_path):
    from compress.runtime import export_onnx

    onnx = pytest.importorskip("onnx")
    float_model, model = tiny_gpt2(), tiny_gpt2()
    result = QuantizeStage(mode="ptq", calibration_batches=1).apply(model, TokenContext())
    assert result.info["quantized"] == [*CONV1D, *(n.replace(".0.", ".1.") for n in CONV1D), "score"]
    assert "notes" not in result.info and result.info["float_layers"] == []
    c_fc = model.get_submodule("transformer.h.0.mlp.c_fc")  # weight (in 32, out 128)
    w, latent = c_fc.weight, c_fc.parametrizations.weight.original
    scale = latent.abs().amax(dim=0) / 127  # one scale per output column
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)  # on the int8 grid of its column
    assert not torch.allclose(w / scale.max(), torch.round(w / scale.max()), atol=1e-3)  # not per tensor
    torch.manual_seed(3)
    test = [(x, float_model(**x).logits.argmax(1)) for x in
            ({"input_ids": torch.randint(3, 100, (256, 8)), "attention_mask": torch.ones(256, 8, dtype=torch.long)},)]
    # labelled by the float model: the int8 graph agrees on 99.2% here (the torch int8 model on 98.8%)
    path = export_onnx(model, tmp_path / "g.onnx", _tokens(2), calibration=[_tokens()], test=test,
                       max_accuracy_drop=0.02)
    graph = onnx.load(str(path)).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    axes = {tuple(inits[n.input[0]]): n.attribute[0].i for n in graph.node
            if n.op_type == "DequantizeLinear" and len(inits.get(n.input[0], [])) == 2}
    assert axes[(32, 96)] == axes[(128, 32)] == 1  # Conv1D's (in, out) weights, per output column in ORT too
    assert sum(n.op_type in ("Gemm", "MatMul") for n in graph.node) >= 9
    made_by = {out: n.op_type for n in graph.node for out in n.output}
    rounded = {made_by.get(n.input[0]) for n in graph.node if n.op_type == "QuantizeLinear"}
    assert not rounded & {"Gemm", "MatMul"}  # as the torch model: layer inputs are rounded, linear outputs never


def test_qat_trains_conv1d_through_fake_quantisation():
    from compress.quant import prepare_qat

    model = tiny_gpt2().train()
    prepare_qat(model, calibration=[_tokens()])
    model(**_tokens()).logits.sum().backward()
    c_attn = model.get_submodule(CONV1D[0])
    assert c_attn.parametrizations.weight.original.grad.abs().sum() > 0  # straight-through to the latent weight
    assert repr(c_attn.parametrizations.weight[0]) == "WeightQuantizer(axis=1)"


class BareLinear(nn.Module):
    """A parameter given to ``F.linear`` by a module that is no Linear (as MultiheadAttention's in_proj_weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight).relu()


def bare_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), BareLinear(), nn.Linear(16, 3)).eval()


class BareContext(Context):
    def __init__(self) -> None:
        super().__init__()
        self.datamodule = object()

    def example_inputs(self, batch_size: int = 2):
        torch.manual_seed(4)
        return torch.randn(batch_size, 8)

    def training_inputs(self, batches: int) -> list:
        return [self.example_inputs(16)] * batches


BARE_NOTE = ("57% of the parameters are in layers this stage cannot touch ('2' (BareLinear)): its sparsity and MAC "
             "figures leave them out")


@pytest.mark.parametrize("stage", [UnstructuredPruningStage(sparsity=0.5), ShareStage(bits=2)])
def test_a_bare_parameter_given_to_f_linear_is_named_untouched_and_never_counted(stage):
    model = bare_net()
    bare = model[2].weight.detach().clone()
    result = stage.apply(model, BareContext())
    assert result.info["notes"] == [BARE_NOTE]  # 256 of the 451 parameters
    assert torch.equal(model[2].weight, bare)  # untouched, as the note says
    layers = count_layers(model, torch.randn(1, 8))
    assert [s.name for s in layers] == ["0", "3"]
    assert summarize(model, layers)["macs"] == 8 * 16 + 16 * 3  # the bare matmul is in no figure


def test_quantize_names_the_bare_parameter_and_int8_export_keeps_it_float(tmp_path):
    from compress.runtime import export_onnx

    onnx = pytest.importorskip("onnx")
    model, ctx = bare_net(), BareContext()
    result = QuantizeStage(mode="ptq", calibration_batches=1).apply(model, ctx)
    assert result.info["quantized"] == ["0", "3"] and result.info["notes"] == [BARE_NOTE]
    path = export_onnx(model, tmp_path / "b.onnx", ctx.example_inputs(2), calibration=ctx.training_inputs(1))
    graph = onnx.load(str(path)).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    quantised = sorted(inits[n.input[0]] for n in graph.node
                       if n.op_type == "DequantizeLinear" and len(inits.get(n.input[0], [])) == 2)
    assert quantised == [[3, 16], [16, 8]]  # the two Linear layers; the bare (16, 16) weight stays float
    assert [16, 16] in inits.values()


def test_unstructured_distilbert_prunes_every_projection_without_a_note():
    model = tiny_distilbert()
    result = UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    assert "notes" not in result.info
    layers = count_layers(model, _tokens(1))
    assert {"distilbert.transformer.layer.0.attention.q_lin", "pre_classifier"} <= {s.name for s in layers}
    assert all(s.sparsity == pytest.approx(0.5, abs=0.02) for s in layers)


def test_int8_export_refuses_in_one_line_when_weight_reads_and_graph_nodes_cannot_be_matched(tmp_path):
    from compress.quant import quantize_ptq
    from compress.runtime import export_onnx

    pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    model[2].weight = model[0].weight  # tied: the exporter feeds the second Gemm through an Identity, not a weight
    x = torch.randn(16, 8)
    quantize_ptq(model, [x], ignore=["4"])  # a float layer must be found in the graph
    with pytest.raises(UserError, match=r"^export: cannot match the 3 weight reads to the 2 Conv/Gemm/MatMul nodes"):
        export_onnx(model, tmp_path / "t.onnx", x, calibration=[x])
    assert not (tmp_path / "t.onnx").exists()


def test_stage0_names_the_bare_parameter_every_stage_leaves_out_of_its_figures():
    from compress.data import build_datamodule
    from compress.measurement import MeasureConfig, measure

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), BareLinear(), nn.Linear(16, 10)).eval()
    dm = build_datamodule({"name": "digits"})  # 1 x 8 x 8 images
    quick = MeasureConfig(repeats=3, warmup=1)
    base, _, extras = measure(net, dm, quick)
    assert base["macs"] == 64 * 16 + 16 * 10  # the bare (16, 16) matmul in no figure, and said so once:
    assert [n for n in extras["notes"] if "touch" in n] == [
        "17% of the parameters are in layers no stage can touch ('2' (BareLinear)): its sparsity and MAC figures "
        "leave them out"]  # 256 of 1,466
    _, _, later = measure(net, dm, quick, baseline=base)
    assert not [n for n in later.get("notes", []) if "touch" in n]  # each stage says what it left itself


def test_a_pruned_and_quantised_gpt2_checkpoint_reloads_bit_identical(tmp_path):
    from compress.checkpoint import load_into, read_checkpoint, save_checkpoint

    model, x = tiny_gpt2(), _tokens()
    UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    QuantizeStage(mode="ptq", calibration_batches=1).apply(model, TokenContext())
    save_checkpoint(tmp_path / "g.ckpt", model, model_spec={}, check_inputs=x)
    fresh = load_into(tiny_gpt2(), read_checkpoint(tmp_path / "g.ckpt"))  # masks, then the quantizers (axis 1)
    assert fresh.get_submodule(CONV1D[0]).parametrizations.weight[-1].axis == 1
    assert torch.equal(fresh(**x).logits, model(**x).logits)


def test_int8_storage_and_share_types_treat_conv1d_as_a_linear_layer():
    from compress.quant import calibrate, freeze, int8_storage_bytes, prepare

    model = tiny_gpt2()
    params = sum(p.numel() for p in model.parameters())
    prepare(model, layers=["transformer.h.0.mlp.c_fc"])  # weight (in 32, out 128)
    freeze(calibrate(model, [_tokens()]))
    # int8 weights, a float32 scale and int8 zero point per output column (128, not 32), the input's pair
    assert int8_storage_bytes(model) == 4 * params - 4 * 32 * 128 + 32 * 128 + 128 * 5 + 5
    bits = ShareStage(bits=8, types={"linear": 3}).bits_per_layer(tiny_gpt2())
    assert {bits[n] for n in _conv1d(tiny_gpt2())} == {3}  # share's `types: {linear: ...}` covers Conv1D


def test_a_conv1d_left_float_by_ignore_stays_float_in_the_int8_graph(tmp_path):
    from compress.runtime import export_onnx

    onnx = pytest.importorskip("onnx")
    model = tiny_gpt2()
    result = QuantizeStage(mode="ptq", calibration_batches=1, ignore=["*.mlp.c_fc"]).apply(model, TokenContext())
    assert result.info["float_layers"] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    path = export_onnx(model, tmp_path / "g.onnx", _tokens(2), calibration=[_tokens()], check_inputs=_tokens())
    graph = onnx.load(str(path)).graph
    inits = {i.name: list(i.dims) for i in graph.initializer}
    quantised = [inits[n.input[0]] for n in graph.node
                 if n.op_type == "DequantizeLinear" and len(inits.get(n.input[0], [])) == 2]
    assert [32, 128] not in quantised and quantised.count([32, 96]) == 2  # c_fc (32 -> 128) float, c_attn int8
    assert sum(dims == [32, 128] for dims in inits.values()) == 2
