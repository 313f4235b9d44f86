"""pruning/structured.py, pruning/masks.py, metrics/counting.py and the unstructured stage: values worked out by hand (mutation testing: docs/mutants/pruning.md)."""

from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
from torch import Tensor, nn

from compress.errors import UserError
from compress.metrics.counting import count_layers
from compress.models import build_model
from compress.models.vit import Attention
from compress.pruning.attention import ATTENTION_KINDS, AttentionKind
from compress.pruning.masks import set_mask
from compress.pruning.structured import (
    PruneResult,
    SparsityRegularizer,
    channel_counts,
    count_macs,
    prune_model,
    restore_structure,
)
from tests.test_attention import WidthBoundAttention  # timm 1.0's width-bound forward

torch.set_num_threads(1)
TOKENS = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))  # 2 samples of 3 tokens of 4


# ---------------------------------------------------------------------------------------------
# counting: MACs per sample
# ---------------------------------------------------------------------------------------------
class TokensInTheBatch(nn.Module):
    """(B, T, 4) tokens folded into the batch for a projection (as the classic word-language-model
    decoder does), then averaged over the tokens for a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, F = x.shape
        h = self.proj(x.reshape(B * T, F)).view(B, T, 6)
        return self.head(h.mean(1))


def test_a_layer_that_sees_the_tokens_as_a_batch_is_counted_for_every_token_of_the_sample():
    model = TokensInTheBatch()
    set_mask(model.proj, torch.arange(24).view(6, 4) % 3 != 0)  # 8 of the 24 weights pruned
    proj, head = count_layers(model, torch.randn(2, 5, 4))  # 2 samples of 5 tokens: still per sample
    assert (proj.name, proj.macs, proj.effective_macs) == ("proj", 5 * 4 * 6, 5 * 16)  # 24 MACs per token, 5 tokens
    assert (head.name, head.macs) == ("head", 6 * 3)
    # Torch-Pruning's own counter (every op of one sample, the same two layers here) agrees
    assert count_macs(TokensInTheBatch(), torch.randn(2, 5, 4))[0] == 5 * 4 * 6 + 6 * 3


# ---------------------------------------------------------------------------------------------
# prune_model: ratios, caps and the MAC search's resolution
# ---------------------------------------------------------------------------------------------
def _wide() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 1000, bias=False), nn.ReLU(), nn.Linear(1000, 1, bias=False))


def test_a_mac_search_takes_200_steps_of_the_cap_and_stops_at_the_first_that_reaches_the_target():
    # 1 -> h -> 1 with a ReLU: 3h MACs (h + h + the ReLU's h), so base / MACs = 1000 / h. The search prunes the
    # hidden layer to max_layer_ratio (0.9) in 200 steps: after step k it keeps int(1000 * (1 - (k / 200) * 0.9))
    # (Torch-Pruning's linear schedule), 667 after step 74, 662 after step 75, 658 after step 76. A target of
    # exactly 1000 / 662 is met at step 75: reached in a few jumps along the schedule and single steps at the end.
    model, x = _wide(), torch.randn(2, 1)
    result = prune_model(model, x, mac_speedup=1000 / 662)
    assert channel_counts(model) == {"0": 662, "2": 1}
    assert result.history[-2:] == [1000 / 667, 1000 / 662] and len(result.history) <= 8
    assert result.history == sorted(result.history)


def test_a_mac_search_jumps_to_the_same_channels_as_single_steps_with_a_few_of_them(monkeypatch):
    import compress.pruning.structured as structured

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    jumped = build_model("resnet20", input_shape=(3, 8, 8), num_classes=10).eval()
    single = copy.deepcopy(jumped)
    fast = prune_model(jumped, x, mac_speedup=2.0)
    monkeypatch.setattr(structured, "SEARCH_FINE", 10**6)  # always one step of the schedule at a time
    slow = prune_model(single, x, mac_speedup=2.0)
    assert channel_counts(jumped) == channel_counts(single) and fast.mac_speedup == slow.mac_speedup >= 2.0
    assert len(slow.history) > 40 and len(fast.history) <= 8
    assert slow.history[-2] < 2.0 and fast.history[-2] < 2.0  # both stop at the first step that reaches it


def test_a_single_step_of_little_change_never_sends_the_search_past_the_target():
    from compress.pruning.structured import next_search_step

    schedule = [0.9 * s / 200 for s in range(201)]  # Torch-Pruning's linear schedule to max_layer_ratio 0.9
    # DenseNet-121 at 2x: the single step 64 -> 65 moved the ratio by 0.003 only (whole channels); the line through
    # those two points meets 2x at step 70, the line from the start at step 66: the search takes one step
    assert next_search_step(schedule, [(0, 1.0), (52, 1.70), (64, 1.98), (65, 1.983)], 2.0, 200) == 66
    assert next_search_step(schedule, [(0, 1.0)], 2.0, 200) == 52  # 80% of the way to step 65 (1 - r = 1 / sqrt 2)


def test_a_model_with_nothing_to_prune_keeps_its_one_mac_and_a_search_says_so_without_a_warning():
    # the output layer alone, 1 x 1: one MAC before and after, a speedup of exactly 1
    x = torch.randn(2, 1)
    assert prune_model(nn.Linear(1, 1, bias=False), x, ratio=0.5).history == [1.0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UserError) as e:
            prune_model(nn.Linear(1, 1, bias=False), x, mac_speedup=2.0)
    assert str(e.value).startswith("prune.mac_speedup: reached only 1.000x of 2.0x (max_layer_ratio 0.9")
    assert [str(w.message) for w in seen] == []  # the search stops at its 200th step, never asks for a 201st


class OwnWarning(nn.Module):
    """Tokens -> embed -> + a position parameter used directly (unwrapped, as a ViT's pos_embed) -> classes;
    its forward warns once per call."""

    calls = 0

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.pos = nn.Parameter(torch.zeros(1, 3, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        OwnWarning.calls += 1
        warnings.warn("the model's own warning", stacklevel=1)
        return self.head((self.embed(x) + self.pos).mean(1))


def test_pruning_hides_torch_prunings_unwrapped_parameter_notice_and_nothing_else():
    OwnWarning.calls = 0
    model = OwnWarning()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        prune_model(model, TOKENS, ratio=0.5)
    assert model.pos.shape == (1, 3, 4)  # the unwrapped parameter follows the embedding (8 -> 4)
    assert [str(w.message) for w in seen] == ["the model's own warning"] * OwnWarning.calls


def test_a_global_ratio_above_the_cap_is_still_the_overall_target():
    # lenet5's prunable channels: 20 + 50 + 500 = 570 (fc_out, the output layer, is kept). A global 95% removes
    # round(0.95 * 570) = 542 of them, though max_layer_ratio is 0.9 (the ranking goes in 10 sub-steps and the
    # cap is checked before each); only a local ratio is clamped to the cap.
    torch.manual_seed(0)
    model = build_model("lenet5", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    counts = channel_counts(_pruned(model, x, ratio=0.95, global_pruning=True))
    assert 570 - (counts["features.0"] + counts["features.3"] + counts["fc1"]) == 542
    assert counts["fc_out"] == 10


def _pruned(model: nn.Module, x: Tensor, **kwargs) -> nn.Module:
    prune_model(model, x, **kwargs)
    return model


# ---------------------------------------------------------------------------------------------
# prune_model with attention: heads by ratio, by layer, by head_ratio; refusals; a failed step put back
# ---------------------------------------------------------------------------------------------
class AttentionNet(nn.Module):
    """Tokens (B, N, 4) -> embed 16 -> [check] -> residual timm-style attention (4 heads of 4) -> mean -> 10 classes."""

    def __init__(self, attention: type[nn.Module] = Attention, check: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 16)
        self.check = check if check is not None else nn.Identity()
        self.attn = attention(16, 4)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.check(self.embed(x))
        return self.head((h + self.attn(h)).mean(1))



def _heads(**kwargs) -> tuple[AttentionNet, PruneResult]:
    model = AttentionNet()
    return model, prune_model(model, TOKENS, **kwargs)


def test_heads_follow_the_ratio_a_layer_ratio_or_head_ratio():
    # heads: prune (the default) at ratio 0.5: 2 of the 4 heads go, each keeps its 4 dimensions
    model, result = _heads(ratio=0.5)
    assert (model.attn.num_heads, model.attn.head_dim, model.attn.qkv.out_features) == (2, 4, 3 * 2 * 4)
    assert result.as_dict()["heads_before"] == {"attn": 4} and result.as_dict()["heads"] == {"attn": 2}
    # a ratio for the qkv layer alone: its heads halve, the embedding (no ratio of its own) keeps its 16
    model, _ = _heads(layer_ratios={"attn.qkv": 0.5})
    assert (model.attn.num_heads, model.embed.out_features) == (2, 16)
    # head_ratio 0.25 overrides the channel ratio for heads: 1 of 4 goes, while the embedding halves
    model, result = _heads(ratio=0.5, head_ratio=0.25)
    assert (model.attn.num_heads, model.embed.out_features) == (3, 8) and result.heads_after == {"attn": 3}
    assert model(TOKENS).shape == (2, 10)


def test_heads_keep_to_the_cap_and_the_ignored_layers_and_a_global_dims_ratio_is_not_checked_per_module():
    # head_ratio 0.95 capped at max_layer_ratio 0.5: 2 of 4 heads go, not round(3.8) = 3
    model, _ = _heads(ratio=0.5, head_ratio=0.95, max_layer_ratio=0.5)
    assert model.attn.num_heads == 2
    # an ignored projection keeps its module's heads
    model, result = _heads(ratio=0.5, ignore=["attn.qkv"])
    assert model.attn.num_heads == 4 and result.heads_after == {"attn": 4}
    # dims at a local 0.8 would leave int(4 * 0.2) = 0 of each head's 4 dims: refused; a global 0.8 is overall
    with pytest.raises(UserError, match=r"^prune\.heads: dims at ratio 0\.8 would leave 'attn' heads of width 0"):
        _heads(ratio=0.8, heads="dims")
    model, _ = _heads(ratio=0.8, heads="dims", global_pruning=True)
    assert model.attn.num_heads == 4 and model.attn.qkv.out_features == 3 * 4 * model.attn.head_dim


def test_head_ratio_goes_only_with_heads_prune_and_a_ratio():
    message = "prune.head_ratio: only with heads: prune and a ratio"
    for kwargs in ({"ratio": 0.5, "heads": "keep"}, {"ratio": 0.5, "heads": "dims"}, {"mac_speedup": 2.0},
                   {"mac_speedup": 2.0, "heads": "keep"}):
        with pytest.raises(UserError) as e:
            _heads(head_ratio=0.5, **kwargs)
        assert str(e.value).startswith(message), kwargs
    model, _ = _heads(ratio=0.5, heads="prune", head_ratio=0.5)
    assert model.attn.num_heads == 2


def test_dims_with_round_to_is_refused_before_the_model_is_touched():
    model = AttentionNet()
    with pytest.raises(UserError) as e:
        prune_model(model, TOKENS, ratio=0.5, heads="dims", round_to=8, key="s")
    assert str(e.value).startswith("s.round_to: 8 with heads: dims")
    assert channel_counts(model) == {"embed": 16, "attn.qkv": 48, "attn.proj": 16, "head": 10}


class WidthCheck(nn.Module):
    """A module that needs at least the width it was built for: a bare assert, or a long two-line ValueError."""

    def __init__(self, width: int, long_message: bool = False):
        super().__init__()
        self.width, self.long_message = width, long_message

    def forward(self, x: Tensor) -> Tensor:
        if self.long_message and x.shape[-1] < self.width:
            raise ValueError(f"  {'width mismatch; ' * 12}got {x.shape[-1]}\nsecond line  ")
        if x.shape[-1] < self.width:
            raise AssertionError  # as a bare ``assert`` does
        return x


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _refused(model: nn.Module, **kwargs) -> str:
    """The UserError of a pruning that fails after a step; the model is as it came in."""
    before = _state(model)
    with pytest.raises(UserError) as e:
        prune_model(model, TOKENS, **kwargs)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert channel_counts(model) == {"embed": 16, "attn.qkv": 48, "attn.proj": 16, "head": 10}
    assert model(TOKENS).shape == (2, 10)
    return str(e.value)


def test_a_forward_that_fails_on_the_new_widths_names_the_innermost_module_and_is_put_back():
    # The stream it reshapes to is narrowed: the self-check's probe refuses before any work, naming the module
    # and the channels to keep (not heads: keep, which would not help).
    assert _refused(AttentionNet(WidthBoundAttention), ratio=0.5, head_ratio=0.25) == (
        "prune: after removing channels of 'embed', 'attn' (WidthBoundAttention) fails (RuntimeError: shape "
        "'[1, 3, 15]' is invalid for input of size 48): its forward needs the width it was traced with; keep those channels "
        "(prune.ignore: attn.proj, embed), or leave this model out of structured pruning")
    # the stream kept: the heads are checked on a copy when the stage is planned (half of them: 2 heads of 4,
    # 8 wide, reshaped to the input width 16): torch refuses the shape, inside 'attn', before any work
    try:
        torch.zeros(1, 3, 8).reshape(1, 3, 16)
    except RuntimeError as e:
        torch_says = str(e)
    assert _refused(AttentionNet(WidthBoundAttention), ratio=0.5, head_ratio=0.25, ignore=["embed", "attn.proj"]) == (
        f"prune.heads: after pruning, 'attn' (timm-style attention (qkv)) fails in its forward ({torch_says}); "
        "found on a copy before any work; heads: keep leaves its heads alone")
    # heads: keep, the input width still shrinks: the probe's refusal (and the key given)
    assert _refused(AttentionNet(WidthBoundAttention), ratio=0.5, heads="keep", key="s").startswith(
        "s: after removing channels of 'embed', 'attn' (WidthBoundAttention) fails (RuntimeError: ")


def test_a_failing_module_that_is_no_attention_is_named_by_its_class_and_its_first_line():
    # a bare assert has no message: its type says what failed
    assert _refused(AttentionNet(check=WidthCheck(16)), ratio=0.5, heads="keep") == (
        "prune: after removing channels of 'embed', 'check' (WidthCheck) fails (AssertionError): its forward needs "
        "the width it was traced with; keep those channels (prune.ignore: attn.proj, embed), or leave this model out of "
        "structured pruning")
    # a long message: its first line, stripped, cut at 160 characters; the innermost module running is named
    first_line = f"{'width mismatch; ' * 12}got 8"
    assert len(first_line) > 160
    message = _refused(AttentionNet(check=nn.Sequential(WidthCheck(16, long_message=True))), ratio=0.5)
    assert f"'check.0' (WidthCheck) fails (ValueError: {first_line[:160]}): its forward" in message


def test_a_failure_in_a_later_step_puts_back_the_model_as_it_came_in_before_any_step():
    # ratio 0.5 in 2 steps: the embedding keeps int(16 * 0.75) = 12 after step 1, which the check takes, 8 after step 2
    seen = []
    model = AttentionNet(check=WidthCheck(12))
    message = _refused(model, ratio=0.5, iterative_steps=2, heads="keep",
                       on_step=lambda m, step, steps: seen.append((step, m.embed.out_features)))
    assert seen == [(1, 12)] and "'check' (WidthCheck) fails in its forward (AssertionError)" in message


def test_a_failure_inside_the_callback_is_its_own_and_leaves_the_model_as_the_callback_had_it():
    def fine_tune(m, step, steps):
        raise RuntimeError("the fine-tuning failed")

    model = AttentionNet()
    with pytest.raises(RuntimeError, match="^the fine-tuning failed$"):
        prune_model(model, TOKENS, ratio=0.5, iterative_steps=2, on_step=fine_tune)
    assert model.embed.out_features == 12 and model.attn.num_heads == 3  # step 1 of 2: a quarter (1 of 4 heads)


def test_a_failing_forward_in_a_model_without_attention_is_refused_naming_the_module_and_put_back():
    for width, message in ((16, "prune: after removing channels of '0', '1' (WidthCheck) fails (AssertionError): its "
                                "forward needs the width it was traced with; keep those channels (prune.ignore: 0)"),
                           # one channel less passes the probe; half of them fails the step's own check
                           (12, "prune: after pruning, '1' (WidthCheck) fails (AssertionError): its forward needs a "
                                "width it was traced with; the model was put back unpruned")):
        model = nn.Sequential(nn.Linear(4, 16), WidthCheck(width), nn.Linear(16, 10))
        before = _state(model)
        with pytest.raises(UserError) as e:
            prune_model(model, TOKENS, ratio=0.5)
        assert str(e.value).startswith(message)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model[0].out_features == 16


def test_a_mac_search_removes_whole_heads_with_the_channels_and_refuses_a_forward_that_cannot_follow():
    model = AttentionNet()
    result = prune_model(model, TOKENS, mac_speedup=1.5, search_steps=20)
    a = model.attn
    assert result.mac_speedup >= 1.5 and 1 <= a.num_heads < 4 and a.head_dim == 4  # heads go, each keeps 4 dims
    assert a.qkv.out_features == 3 * 4 * a.num_heads and result.heads_after == {"attn": a.num_heads}
    assert model(TOKENS).shape == (2, 10)
    message = _refused(AttentionNet(WidthBoundAttention), mac_speedup=1.5, search_steps=20, key="s")
    assert message.startswith("s: after removing channels of 'embed', 'attn' (WidthBoundAttention) fails "
                              "(RuntimeError: shape '[1, 3, ")


def test_taylor_gradients_are_gone_before_each_callback():
    # Taylor importance needs a backward pass; the fine-tuning between steps must not start from its gradients
    seen = []
    batches = [(TOKENS, torch.tensor([0, 1]))]
    for kwargs in ({"ratio": 0.5}, {"ratio": 0.5, "global_pruning": True}, {"mac_speedup": 1.3, "search_steps": 20}):
        seen.clear()
        prune_model(AttentionNet(), TOKENS, importance="taylor", iterative_steps=2, gradient_batches=batches,
                    on_step=lambda m, step, steps: seen.append(all(p.grad is None for p in m.parameters())), **kwargs)
        assert seen == [True, True], kwargs


class FixedHeads(nn.Module):
    """Heads in a projection ``to_heads`` whose attributes its family never updates (a broken ``update``)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.size = heads, dim // heads
        self.to_heads = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        h = self.to_heads(x).view(B, N, -1, self.size).softmax(-1)
        return self.out(h.flatten(2))


class FixedHeadsKind(AttentionKind):
    label = "fixed heads"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, FixedHeads)

    def projections(self, module: nn.Module) -> list[nn.Module]:
        return [module.to_heads]

    def heads(self, module: nn.Module) -> int:
        return module.heads

    def head_dim(self, module: nn.Module) -> int:
        return module.size

    def problem(self, module: nn.Module) -> str | None:
        width = module.to_heads.out_features
        return None if width == module.heads * module.size else f"to_heads has {width} outputs"

    def update(self, module: nn.Module, num_heads: int) -> None:
        pass


def test_attributes_that_disagree_with_the_widths_after_a_step_are_refused_and_the_model_put_back():
    if "test_rules_fixed_heads" not in ATTENTION_KINDS:
        ATTENTION_KINDS.register("test_rules_fixed_heads", FixedHeadsKind())
    model = AttentionNet(FixedHeads)
    before = _state(model)
    with pytest.raises(UserError) as e:
        prune_model(model, TOKENS, layer_ratios={"attn.to_heads": 0.5}, heads="dims")
    # heads: dims at 0.5: each of the 4 heads keeps int(4 * 0.5) = 2 dimensions, 8 outputs; heads x size is still
    # 16: found when the stage is planned, on a copy (the heads check), so the model is never touched
    assert str(e.value) == "prune.heads: pruning left 'attn': to_heads has 8 outputs (found on a copy before any work)"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.attn.to_heads.out_features == 16


# ---------------------------------------------------------------------------------------------
# SparsityRegularizer
# ---------------------------------------------------------------------------------------------
class Outputs:
    """A model output that is neither a tensor nor a tuple or mapping: the logits are an attribute."""

    def __init__(self, logits: Tensor):
        self.logits = logits


class AttributeOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(1, 3, 1, bias=False)
        self.b = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x: Tensor) -> Outputs:
        return Outputs(self.b(self.a(x).relu()).mean((2, 3)))


def test_the_regularizer_traces_a_model_whose_output_holds_the_logits_in_an_attribute():
    # DepGraph's eq. 6 as in test_structured: one group per filter of a (its filter, b's input channel k)
    model = AttributeOutput()
    reg = SparsityRegularizer("group_norm", torch.randn(2, 1, 4, 4), reg=1e-3)
    reg.build(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    reg.regularize()
    wa, wb = model.a.weight.detach(), model.b.weight.detach()
    s = (wa.pow(2).sum((1, 2, 3)) + wb.pow(2).sum((0, 2, 3))).sqrt()
    gamma = 16 ** ((s.max() - s) / (s.max() - s.min()))
    assert torch.allclose(model.a.weight.grad, 1e-3 * gamma.view(3, 1, 1, 1) * wa)


def test_prune_model_traces_a_model_whose_output_holds_the_logits_in_an_attribute():
    # a: 3 filters, ratio 0.5 keeps int(3 * 0.5) = 1; b is the output layer (its 2 outputs are the classes)
    model = AttributeOutput()
    result = prune_model(model, torch.randn(2, 1, 4, 4), ratio=0.5)
    assert result.channels_after == {"a": 1, "b": 2} and model.b.weight.shape == (2, 1, 1, 1)


@pytest.mark.parametrize("kind", SparsityRegularizer.KINDS)
def test_a_regularizer_keeps_nothing_of_its_model_alive_once_it_is_gone(kind):
    # Torch-Pruning records grouped convs in the channel-group dicts it is given; its defaults are shared dicts
    model = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    grouped = weakref.ref(model[3])
    reg = SparsityRegularizer(kind, torch.randn(2, 1, 4, 4))
    reg.build(model)
    del reg, model
    gc.collect()
    assert grouped() is None


# ---------------------------------------------------------------------------------------------
# restore_structure
# ---------------------------------------------------------------------------------------------
def test_restore_structure_leaves_a_masked_layer_of_the_stored_shape_alone():
    # a transposed conv whose groups equal its out_channels (2) but not its in_channels (4): Torch-Pruning's
    # depthwise rule would call it depthwise, so recomputing its attributes would make it 4 groups of 4 -> 4
    up = nn.ConvTranspose2d(4, 2, 2, groups=2)
    set_mask(up, torch.ones_like(up.weight, dtype=torch.bool))
    model = nn.Sequential(up, nn.ReLU())
    assert restore_structure(model, model.state_dict()) == []
    assert (up.in_channels, up.out_channels, up.groups) == (4, 2, 2) and up.weight.shape == (4, 1, 2, 2)
