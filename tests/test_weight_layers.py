"""Layers found by what they compute: Hugging Face GPT-2 (Conv1D, fused c_attn) and DistilBERT
(q_lin/k_lin/v_lin) from small configs, through structured, unstructured and quantize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.metrics import count_layers, summarize, untouched_share, weight_readers
from compress.pruning.masks import prunable_layers
from compress.stages import Context
from compress.stages.prune_structured import StructuredPruningStage
from compress.stages.prune_unstructured import UnstructuredPruningStage
from compress.stages.quantize import QuantizeStage

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


def test_unstructured_gpt2_says_what_it_left_untouched_and_its_figures_match_what_changed():
    model = tiny_gpt2()
    before = {n: model.get_submodule(n).weight.clone() for n in CONV1D}
    result = UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    share = untouched_share(tiny_gpt2(), _tokens(), prunable_layers(model))[0]
    assert result.info["notes"] == [
        f"{share:.0%} of the parameters are in layers this stage cannot touch ('transformer.h.0.attn.c_attn' (Conv1D), "
        "'transformer.h.0.attn.c_proj' (Conv1D) and 6 more): its sparsity and MAC figures leave them out"]
    assert all(torch.equal(model.get_submodule(n).weight, w) for n, w in before.items())  # untouched, as it says
    layers = count_layers(model, _tokens(1))
    assert [s.name for s in layers] == ["score"] and summarize(model, layers)["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_unstructured_distilbert_prunes_every_projection_without_a_note():
    model = tiny_distilbert()
    result = UnstructuredPruningStage(sparsity=0.5).apply(model, TokenContext())
    assert "notes" not in result.info
    layers = count_layers(model, _tokens(1))
    assert {"distilbert.transformer.layer.0.attention.q_lin", "pre_classifier"} <= {s.name for s in layers}
    assert all(s.sparsity == pytest.approx(0.5, abs=0.02) for s in layers)


def test_quantize_gpt2_names_the_layers_it_left_in_float():
    model = tiny_gpt2()
    result = QuantizeStage(mode="ptq", calibration_batches=1).apply(model, TokenContext())
    assert result.info["quantized"] == ["score"]
    assert result.info["notes"][0].endswith("parameters are in layers this stage cannot touch "
                                            "('transformer.h.0.attn.c_attn' (Conv1D), 'transformer.h.0.attn.c_proj' "
                                            "(Conv1D) and 6 more): its sparsity and MAC figures leave them out")
