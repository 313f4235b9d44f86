"""Attention heads in structured pruning: whole heads or head dims go, attributes follow, reloads bit for bit.

Models: the zoo's plain-torch timm-style ViT (``vit``), a tiny ``nn.MultiheadAttention`` net, and a
Hugging Face BERT built from a config (skipped where transformers is absent).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from compress.batches import forward
from compress.checkpoint import load_into, read_checkpoint, save_checkpoint
from compress.cli import main
from compress.encoding.deep import read_compressed, write_compressed
from compress.errors import UserError
from compress.models import build_model
from compress.models.vit import Attention
from compress.pruning.attention import attention_state, find_attention
from compress.pruning.structured import prune_model
from compress.stages.prune_structured import StructuredPruningStage
from tests.conftest import quick_recipe

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent
VIT = dict(input_shape=(3, 16, 16), num_classes=10, patch_size=4, embed_dim=64, depth=2, num_heads=8)


def _vit(seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("vit", **{**VIT, **kwargs}).eval()


def _images(n: int = 4) -> Tensor:
    torch.manual_seed(1)
    return torch.randn(n, 3, 16, 16)


def _attn(model: nn.Module) -> list[Attention]:
    return [b.attn for b in model.blocks]


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# timm-style ViT
# ---------------------------------------------------------------------------------------------
def test_vit_heads_prune_removes_whole_heads():
    model, x = _vit(), _images()
    before = _params(model)
    result = prune_model(model, x, ratio=0.5, heads="prune")
    for a in _attn(model):
        assert (a.num_heads, a.head_dim) == (4, 8)  # 8 heads of 8 -> 4 heads of 8
        assert a.scale == pytest.approx(8 ** -0.5)
        assert a.qkv.out_features == a.qkv.weight.shape[0] == 3 * 4 * 8
        assert a.proj.in_features == a.proj.weight.shape[1] == 4 * 8
    assert result.heads_before == {"blocks.0.attn": 8, "blocks.1.attn": 8}
    assert result.heads_after == {"blocks.0.attn": 4, "blocks.1.attn": 4}
    assert model.blocks[0].mlp.fc1.out_features == 64  # the MLP is pruned at the ratio too (128 -> 64)
    assert _params(model) < before / 2
    assert model(x).shape == (4, 10)


def test_vit_heads_dims_narrows_every_head():
    model, x = _vit(), _images()
    original = copy.deepcopy(model)
    prune_model(model, x, layer_ratios={"blocks.*.attn.qkv": 0.5}, heads="dims")  # the attention alone
    for a, a0 in zip(_attn(model), _attn(original), strict=True):
        assert (a.num_heads, a.head_dim) == (8, 4)
        assert a.scale == pytest.approx(4 ** -0.5)
        assert a.qkv.weight.shape[0] == 3 * 8 * 4 and a.proj.weight.shape[1] == 8 * 4
        # the same dimensions went from every head: each kept query row is the original row at the same
        # offset in its own head (a mixed-up head would show another offset or another head)
        q, q0 = a.qkv.weight[:32].detach(), a0.qkv.weight[:64].detach()
        offsets = set()
        for i, row in enumerate(q):
            j = int(((q0 - row).abs().sum(1) == 0).nonzero()[0])
            assert j // 8 == i // 4  # still in head i // 4
            offsets.add((i % 4, j % 8))
        assert len(offsets) == 4  # one offset per kept dimension, shared by all heads
    assert model.blocks[0].mlp.fc1.out_features == 128 and model.pos_embed.shape[-1] == 64
    assert model(_images()).shape == (4, 10)


def test_vit_heads_keep_leaves_attention_and_prunes_the_mlp():
    model, x = _vit(), _images()
    prune_model(model, x, ratio=0.5, heads="keep")
    for a in _attn(model):
        assert (a.num_heads, a.head_dim, a.qkv.out_features, a.proj.in_features) == (8, 8, 192, 64)
    assert model.blocks[0].mlp.fc1.out_features == 64
    assert model.blocks[0].attn.qkv.in_features == 32  # the residual stream follows the ratio
    assert model(x).shape == (4, 10)


def test_iterative_and_global_head_pruning_reach_the_planned_heads():
    """Torch-Pruning 1.6 alone leaves 1 of 8 heads after four steps to a half; global ranking fails mid-way."""
    model = _vit()
    prune_model(model, _images(), ratio=0.5, iterative_steps=4, heads="prune")
    assert [a.num_heads for a in _attn(model)] == [4, 4]
    model = _vit()
    prune_model(model, _images(), ratio=0.5, global_pruning=True, heads="prune")
    assert sum(a.num_heads for a in _attn(model)) == 8  # half of all 16 heads, ranked across modules
    assert all(a.qkv.out_features == 3 * a.num_heads * a.head_dim for a in _attn(model))
    assert model(_images()).shape == (4, 10)


def test_removing_a_zero_head_leaves_the_outputs_unchanged():
    """Zero one head's query/key/value rows and output-projection columns in every block: it adds
    nothing, so pruning exactly one head per module (the magnitude criterion picks it) changes nothing."""
    model, x = _vit(num_heads=4), _images()
    zeroed = {0: 1, 1: 3}  # block -> head
    with torch.no_grad():
        for b, h in zeroed.items():
            a = model.blocks[b].attn
            for part in range(3):  # q, k, v sections of qkv: (3 * heads * head_dim, D)
                rows = slice(part * 64 + h * 16, part * 64 + (h + 1) * 16)
                a.qkv.weight[rows] = 0
                a.qkv.bias[rows] = 0
            a.proj.weight[:, h * 16:(h + 1) * 16] = 0
    reference = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
    prune_model(model, x, ratio=0.0, head_ratio=0.25, heads="prune")
    for b, h in zeroed.items():
        a, a0 = model.blocks[b].attn, reference.blocks[b].attn
        assert (a.num_heads, a.head_dim, a.qkv.in_features) == (3, 16, 64)  # one head gone, nothing else
        kept = [i for i in range(4) if i != h]
        rows = [p * 64 + i * 16 + d for p in range(3) for i in kept for d in range(16)]
        assert torch.equal(a.qkv.weight, a0.qkv.weight[rows])  # the zero head is the one removed
    assert model.blocks[0].mlp.fc1.out_features == 128
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


def test_pruned_vit_reloads_bit_identical_in_a_fresh_process(tmp_path):
    x = _images(2)
    results = {}
    for heads in ("prune", "dims"):
        model = _vit()
        prune_model(model, _images(), ratio=0.5, heads=heads)
        path = tmp_path / f"{heads}.ckpt"
        save_checkpoint(path, model, model_spec={"name": "vit", "kwargs": {**VIT, "input_shape": list(VIT["input_shape"])}})
        with torch.no_grad():
            torch.save({"x": x, "y": model(x)}, tmp_path / f"{heads}.io")
        results[heads] = {n: [a.num_heads, a.head_dim, a.scale] for n, a in
                          (("blocks.0.attn", model.blocks[0].attn), ("blocks.1.attn", model.blocks[1].attn))}
    script = textwrap.dedent(f"""
        import json, torch
        from compress.checkpoint import load_model
        out = {{}}
        for heads in ("prune", "dims"):
            model = load_model({str(tmp_path)!r} + f"/{{heads}}.ckpt")
            io = torch.load({str(tmp_path)!r} + f"/{{heads}}.io", weights_only=True)
            with torch.no_grad():
                same = torch.equal(model(io["x"]), io["y"])
            attrs = {{n: [m.num_heads, m.head_dim, m.scale] for n, m in model.named_modules() if n.endswith(".attn")}}
            out[heads] = {{"same": same, "attrs": attrs}}
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ),
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for heads in ("prune", "dims"):
        assert out[heads]["same"], f"heads: {heads}: outputs differ after reload"
        assert out[heads]["attrs"] == results[heads]


def test_a_checkpoint_without_attention_entry_still_loads(tmp_path):
    """Checkpoints written before attention pruning have no ``attention`` entry: nothing to restore."""
    model = _vit()
    save_checkpoint(tmp_path / "old.ckpt", model, model_spec={"name": "vit", "kwargs": {}})
    data = read_checkpoint(tmp_path / "old.ckpt")
    assert data["attention"]["blocks.0.attn"] == {"num_heads": 8, "head_dim": 8, "scale": 8 ** -0.5}
    del data["attention"]
    fresh = load_into(_vit(seed=3), data)
    with torch.no_grad():
        assert torch.equal(fresh(_images()), model(_images()))


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the key, the model untouched
# ---------------------------------------------------------------------------------------------
class WidthBoundAttention(Attention):
    """timm 1.0's forward: the heads' output is reshaped to the *input* width (``reshape(B, N, C)``)."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class HeadlessAttention(nn.Module):
    """A qkv projection but no ``num_heads`` attribute: its head count cannot be read."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).reshape(*x.shape[:2], 3, 2, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj((q @ k.transpose(-2, -1)).softmax(-1).matmul(v).transpose(1, 2).flatten(2))


class HeadlessNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.attn = HeadlessAttention()
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # (B, N, 16)
        return self.head((h + self.attn(h)).mean(1))


class MHANet(nn.Module):
    """Patch tokens, one ``nn.MultiheadAttention`` (4 heads of 8) with a residual, an MLP, a classifier."""

    def __init__(self, dim: int = 32, heads: int = 4, kdim: int | None = None):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(dim, kdim) if kdim else nn.Identity()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        kv = self.kv(x)
        x = x + self.attn(x, kv, kv, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.norm(x))))
        return self.head(x.mean(1))


def _refused(model: nn.Module, match: str, **kwargs) -> str:
    state = _state(model)
    with torch.no_grad():
        out = model(_images())
    with pytest.raises(UserError, match=match) as info:
        prune_model(model, _images(), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert _same_state(state, _state(model)), "the model was changed"
    with torch.no_grad():
        assert torch.equal(model(_images()), out)
    return message


def test_a_forward_that_cannot_take_fewer_heads_is_refused_and_the_model_put_back():
    """The issue's timm crash: without the refusal the stage died inside forward, half-pruned."""
    model = _vit()
    for a in _attn(model):
        a.__class__ = WidthBoundAttention
    # The stream it reshapes to is narrowed too: found by the self-check's probe before any work,
    # naming the module (not heads: keep, which would not help).
    message = _refused(model, r"^prune: after removing channels of '[\w.]+', 'blocks\.0\.attn' \(WidthBoundAttention\) "
                       r"fails \(RuntimeError: .*\): its forward needs the width it was traced with; keep those channels "
                       r"\(prune\.ignore: [\w.]+, [\w.]+, [\w.]+ and \d+ more\)", ratio=0.5, head_ratio=0.25)
    assert "heads: keep" not in message
    assert [(a.num_heads, a.head_dim, a.qkv.out_features) for a in _attn(model)] == [(8, 8, 192)] * 2


class Timm10Attention(Attention):
    """timm 1.0's ``Attention``: an ``attn_dim`` attribute (heads x head_dim) the heads' output is reshaped to,
    and ``F.scaled_dot_product_attention`` (whose softmax scale follows the width of q) unless ``fused_attn`` is off."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.attn_dim = num_heads * self.head_dim
        self.fused_attn = True

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim))


class FusedOnlyAttention(Timm10Attention):
    """``scaled_dot_product_attention`` always: with heads: dims no reference reproduces its new softmax scale."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        del self.fused_attn

    def forward(self, x: Tensor) -> Tensor:
        self.fused_attn = True
        try:
            return super().forward(x)
        finally:
            del self.fused_attn


class FixedWidthAttention(Attention):
    """Reshapes the heads' output to a width of its own (``inner``), which pruning knows nothing of."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__(dim, num_heads)
        self.inner = dim

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, self.inner))


class InterleavedAttention(Attention):
    """Lays the heads' outputs out dimension-major (``d * heads + h``), while Torch-Pruning removes the
    output projection's columns of head ``h`` as if head-major (``h * head_dim + d``): it runs, wrongly."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).permute(0, 2, 3, 1).reshape(B, N, self.num_heads * self.head_dim))


def _vit_with(cls: type[Attention], **kwargs) -> nn.Module:
    model = _vit(**kwargs)
    for block in model.blocks:
        block.attn = cls(model.pos_embed.shape[-1], block.attn.num_heads)
    return model.eval()


def test_timm_10_attention_is_pruned_by_heads_with_its_attn_dim():
    """timm 1.0's ViT-Tiny / MobileViT with the default heads: prune failed after the whole search: the update
    left ``attn_dim`` at the width it was built with. Now checked by the plan (one forward) and pruned."""
    model, x = _vit_with(Timm10Attention), _images()
    StructuredPruningStage(mac_speedup=2.0, key="s").plan(model, x)  # --dry-run: the heads pruned on a copy
    result = prune_model(model, x, ratio=0.5, heads="prune", check_inputs=[_images(8)])
    assert [(a.num_heads, a.head_dim, a.attn_dim) for a in _attn(model)] == [(4, 8, 32)] * 2
    assert result.self_check < 1e-5
    assert attention_state(model)["blocks.0.attn"]["attn_dim"] == 32  # saved in checkpoints, restored on reload
    assert model(x).shape == (4, 10)


def test_timm_10_attention_head_dims_under_scaled_dot_product_attention():
    """The reference (the original, the removed head dims zeroed) runs with fused_attn off and the narrowed
    heads' scale: what scaled_dot_product_attention computes on the narrower heads."""
    model, x = _vit_with(Timm10Attention), _images()
    StructuredPruningStage(mac_speedup=2.0, heads="dims", key="s").plan(model, x)
    result = prune_model(model, x, layer_ratios={"blocks.*.attn.qkv": 0.5}, heads="dims", check_inputs=[_images(8)])
    assert [(a.num_heads, a.head_dim, a.attn_dim, a.fused_attn) for a in _attn(model)] == [(8, 4, 32, True)] * 2
    assert 0 < result.self_check < 1e-5


def test_an_attn_dim_unlike_its_heads_is_refused():
    model = _vit()  # its forward reads num_heads x head_dim; an attn_dim that says otherwise is refused, not updated
    model.blocks[1].attn.attn_dim = 48
    with pytest.raises(UserError, match=r"^s\.heads: 'blocks\.1\.attn' \(timm-style attention \(qkv\)\) attn_dim is 48, "
                                        r"not num_heads 8 x head_dim 8; use heads: dims or keep$"):
        StructuredPruningStage(mac_speedup=2.0, key="s").plan(model, _images())


def _refused_at_plan(model: nn.Module, heads: str) -> str:
    state = _state(model)
    with pytest.raises(UserError) as info:
        StructuredPruningStage(mac_speedup=2.0, heads=heads, key="stages[0]").plan(model, _images())
    assert "\n" not in str(info.value)
    assert _same_state(state, _state(model))  # the copy was pruned, not the model
    assert [a.num_heads for a in _attn(model)] == [8, 8]
    return str(info.value)


def test_attention_that_reshapes_by_its_own_width_is_refused_at_plan_time():
    message = _refused_at_plan(_vit_with(FixedWidthAttention), "prune")
    assert re.fullmatch(r"stages\[0\]\.heads: after pruning, 'blocks\.0\.attn' \(timm-style attention \(qkv\)\) fails "
                        r"in its forward \(shape .* is invalid for input of size \d+\); found on a copy before any "
                        r"work; heads: keep leaves its heads alone", message), message
    StructuredPruningStage(mac_speedup=2.0, heads="keep", key="stages[0]").plan(_vit_with(FixedWidthAttention), _images())


@pytest.mark.parametrize("cls, heads, what, instead", [(InterleavedAttention, "prune", "heads", "keep"),
                                                       (FusedOnlyAttention, "dims", "head dims", "prune or keep")])
def test_attention_pruned_into_another_function_is_refused_at_plan_time(cls, heads, what, instead):
    """Interleaved heads: Torch-Pruning removes the wrong columns. dims under scaled_dot_product_attention: the
    softmax scale follows the narrower heads, which no zeroing reproduces. Either would fail the self-check
    after the search; the plan's copy finds it first."""
    message = _refused_at_plan(_vit_with(cls), heads)
    assert re.fullmatch(rf"stages\[0\]\.heads: removing {what} of 'blocks\.0\.attn' \(timm-style attention \(qkv\)\) "
                        r"changes what the model computes \(outputs differ by [\d.e-]+ of their scale from the original "
                        rf"with them zeroed; found on a copy before any work\); use heads: {instead}", message), message


def test_unreadable_head_count_is_refused():
    model = HeadlessNet()
    x = torch.randn(2, 3, 4)
    state = _state(model)
    with pytest.raises(UserError, match=r"^prune\.heads: 'attn' \(timm-style attention \(qkv\)\) has a qkv Linear but "
                                        r"no integer num_heads; use heads: keep$"):
        prune_model(model, x, ratio=0.5)
    assert _same_state(state, _state(model))
    prune_model(model, x, ratio=0.5, heads="keep")  # keep needs no head count
    assert (model.attn.qkv.out_features, model.attn.qkv.in_features, model.embed.out_features) == (48, 8, 8)
    assert model(x).shape == (2, 10)


def test_dims_refusals_round_to_and_no_width_left():
    _refused(_vit(), r"^prune\.round_to: 8 with heads: dims: Torch-Pruning rounds the width of all heads together",
             ratio=0.5, heads="dims", round_to=8)
    _refused(_vit(), r"^prune\.heads: dims at ratio 0\.9 would leave 'blocks\.0\.attn' heads of width 0",
             ratio=0.9, heads="dims")
    with pytest.raises(UserError, match=r"^prune\.head_ratio: only with heads: prune"):
        prune_model(_vit(), _images(), ratio=0.5, heads="dims", head_ratio=0.5)


# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention
# ---------------------------------------------------------------------------------------------
def test_multihead_attention_dims_narrow_every_head_with_the_stream():
    torch.manual_seed(0)
    model = MHANet().eval()
    x = _images()
    original = copy.deepcopy(model)
    prune_model(model, x, ratio=0.25, heads="dims")
    a = model.attn
    assert (a.num_heads, a.head_dim, a.embed_dim, a.kdim, a.vdim) == (4, 6, 24, 24, 24)
    assert a.in_proj_weight.shape == (72, 24) and a.out_proj.weight.shape == (24, 24)
    q, q0 = a.in_proj_weight[:24].detach(), original.attn.in_proj_weight[:32].detach()
    offsets = set()
    for i in range(24):  # a kept query row: the same output row, its inputs narrowed with the stream
        matches = [j for j in range(32) if torch.equal(q0[j][_kept_columns(model, original)], q[i])]
        assert len(matches) == 1 and matches[0] // 8 == i // 6  # still in its own head
        offsets.add((i % 6, matches[0] % 8))
    assert len(offsets) == 6  # the same dimensions left every head
    assert model(x).shape == (4, 10)
    assert attention_state(model)["attn"] == {"num_heads": 4, "head_dim": 6, "embed_dim": 24, "kdim": 24,
                                              "vdim": 24, "_qkv_same_embed_dim": True}


def _kept_columns(model: nn.Module, original: nn.Module) -> list[int]:
    """The stream channels kept: the embedding conv's output filters that survived."""
    w, w0 = model.embed.weight.detach(), original.embed.weight.detach()
    return [int(((w0 - w[i]).abs().flatten(1).sum(1) == 0).nonzero()[0]) for i in range(w.shape[0])]


def test_multihead_attention_refusals_and_keep():
    torch.manual_seed(0)
    message = _refused(MHANet().eval(), r"^prune\.heads: 'attn' \(nn\.MultiheadAttention\) cannot lose whole heads",
                       ratio=0.5)
    assert message.endswith("use heads: dims or keep")
    torch.manual_seed(0)
    _refused(MHANet(kdim=16).eval(), r"kdim/vdim unlike embed_dim", ratio=0.5, heads="dims")
    torch.manual_seed(0)
    model = MHANet().eval()
    prune_model(model, _images(), ratio=0.5, heads="keep")
    assert (model.attn.embed_dim, model.attn.num_heads, model.fc1.out_features) == (32, 4, 32)
    assert model(_images()).shape == (4, 10)


# ---------------------------------------------------------------------------------------------
# The stage: recipe keys
# ---------------------------------------------------------------------------------------------
def test_stage_keys_heads_and_head_ratio():
    stage = StructuredPruningStage(ratio=0.5, heads="prune", head_ratio=0.25, example_inputs=_images(2))
    model = _vit()
    assert "blocks.0.attn -> heads: prune (timm-style attention (qkv))" in stage.plan(model)
    result = stage.apply(model)
    assert [a.num_heads for a in _attn(model)] == [6, 6]
    assert result.info["heads"] == {"blocks.0.attn": 6, "blocks.1.attn": 6}
    with pytest.raises(UserError, match=r"^prune\.structured\.heads: 'drop' is not valid; valid: .*"):
        StructuredPruningStage(ratio=0.5, heads="drop", key="prune.structured")
    with pytest.raises(UserError, match=r"^s\.head_ratio: only with heads: prune and ratio/layer_ratios"):
        StructuredPruningStage(mac_speedup=2.0, head_ratio=0.5, key="s")
    with pytest.raises(UserError, match=r"^s\.heads: latency_speedup prunes by per-layer latency tables"):
        StructuredPruningStage(latency_speedup=1.5, latency_on="torch", key="s", example_inputs=_images(2)).apply(_vit())


def test_cli_refuses_before_any_stage_runs(tmp_path, capsys):
    """The refusal comes from the stage's plan, checked when the pipeline starts: nothing is trained."""
    recipe = quick_recipe(tmp_path, model={"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 1, "num_heads": 4},
                          stages=[{"type": "train", "epochs": 1},
                                  {"type": "prune.structured", "ratio": 0.5, "heads": "dims", "round_to": 8}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main([str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("error: stages[1].round_to: 8 with heads: dims: Torch-Pruning rounds the width of all heads "
                   "together, not each head ('blocks.0.attn' has 4 heads of 8); set round_to: null or heads: prune")
    assert not list((tmp_path / "run").glob("*.ckpt"))


# ---------------------------------------------------------------------------------------------
# Hugging Face BERT (transformers installs without torchvision)
# ---------------------------------------------------------------------------------------------
def tiny_bert(num_labels: int = 3) -> nn.Module:
    """A BertForSequenceClassification of 2 layers, hidden 64, 4 heads of 16 (a factory for ``import:``)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=32, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _tokens(n: int = 2) -> dict[str, Tensor]:
    torch.manual_seed(2)
    mask = torch.ones(n, 12, dtype=torch.long)
    mask[-1, 8:] = 0  # a padded sequence
    return {"input_ids": torch.randint(0, 100, (n, 12)), "attention_mask": mask}


def test_bert_pruned_by_heads_runs_on_token_inputs_and_reloads(tmp_path, monkeypatch):
    model = tiny_bert()
    x = _tokens()
    found = find_attention(model)
    assert [a.name for a in found] == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    before = _params(model)
    result = StructuredPruningStage(ratio=0.5, example_inputs=x).apply(model)
    assert result.info["heads"] == {a.name: 2 for a in found}
    for a in found:
        m = a.module
        assert (m.num_attention_heads, m.attention_head_size, m.all_head_size) == (2, 16, 32)
        assert m.scaling == pytest.approx(16 ** -0.5)
        assert m.query.out_features == m.key.out_features == m.value.out_features == 32
    assert model.classifier.out_features == 3
    assert _params(model) < before / 2
    logits = forward(model, x)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()

    monkeypatch.syspath_prepend(str(TESTS))
    save_checkpoint(tmp_path / "bert.ckpt", model, model_spec={"name": "import:test_attention:tiny_bert", "kwargs": {}})
    data = read_checkpoint(tmp_path / "bert.ckpt")
    fresh = load_into(tiny_bert(), data)
    assert fresh.bert.encoder.layer[1].attention.self.num_attention_heads == 2
    with torch.no_grad():
        assert torch.equal(forward(fresh.eval(), x), forward(model, x))


def test_bert_head_dims():
    model = tiny_bert()
    prune_model(model, _tokens(), ratio=0.5, heads="dims")
    m = model.bert.encoder.layer[0].attention.self
    assert (m.num_attention_heads, m.attention_head_size, m.all_head_size) == (4, 8, 32)
    assert forward(model, _tokens()).shape == (2, 3)


def test_a_deep_compression_file_of_a_head_pruned_vit_reads_back(tmp_path):
    model = _vit()
    prune_model(model, _images(), ratio=0.5, heads="prune")
    write_compressed(model, tmp_path / "vit.dc", {"name": "vit", "kwargs": {**VIT, "input_shape": [3, 16, 16]}})
    decoded = read_compressed(tmp_path / "vit.dc")
    assert [(a.num_heads, a.head_dim) for a in _attn(decoded)] == [(4, 8), (4, 8)]
    with torch.no_grad():
        torch.testing.assert_close(decoded(_images()), model(_images()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("heads, expected", [("prune", (2, 16)), ("dims", (4, 8))])
def test_hf_vit_with_q_proj_k_proj_v_proj(heads, expected):
    """transformers 5's ViT names its projections q_proj/k_proj/v_proj and its head width head_dim."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=5)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    prune_model(model, _images(2), ratio=0.5, heads=heads)
    for a in find_attention(model):
        heads_attr = getattr(a.module, "num_attention_heads", getattr(a.module, "num_heads", None))
        assert (heads_attr, a.module.head_dim) == expected
        assert a.module.scaling == pytest.approx(expected[1] ** -0.5)
        assert a.module.q_proj.out_features == expected[0] * expected[1]
    assert forward(model, _images(2)).shape == (2, 5)


def test_sensitivity_scans_channels_of_a_vit_but_leaves_attention_projections_whole(tmp_path):
    """A qkv narrowed alone would split its heads: the per-layer scan leaves attention to heads:."""
    from compress.models import build_model
    from compress.sensitivity import run_sensitivity

    torch.manual_seed(0)
    model = build_model("vit", input_shape=(3, 16, 16), num_classes=4, embed_dim=32, depth=1, num_heads=4).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)

    def evaluate(m):
        with torch.no_grad():  # every pruned copy must still run: heads consistent
            return float((m(x).argmax(1) == y).float().mean())

    out = run_sensitivity(model, evaluate, x, tmp_path, ratios=(0.5,), max_drop=1.0)
    scanned = {name for group in out["groups"].values() for name in group}
    assert "blocks.0.mlp.fc1" in out["curves"]  # the MLP's hidden channels are scanned
    assert not any(n.endswith("attn.qkv") for n in scanned)  # its outputs are the heads
    assert "blocks.0.attn.proj" in out["groups"]["patch_embed"]  # the stream it writes is scanned as one group
    assert out["baseline"] == 1.0


def test_vit_recipe_heads_distil_and_int8_in_onnxruntime(tmp_path):
    """The zoo ViT through a recipe: train, prune whole heads with distillation from the dense model,
    then int8, each stage measured in ONNX Runtime."""
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    recipe = quick_recipe(
        tmp_path, model={"name": "vit", "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 4},
        eval={"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]},
        stages=[{"type": "train", "epochs": 6, "optimizer": {"name": "adamw", "lr": 0.003}},
                {"type": "prune.structured", "ratio": 0.5, "heads": "prune",
                 "finetune": {"epochs": 2, "optimizer": {"name": "adamw", "lr": 0.001},
                              "distill": {"teacher": "self", "T": 2.0, "alpha": 0.5}}},
                {"type": "quantize", "mode": "ptq", "calibration_batches": 4}])
    records = Pipeline(load_recipe(recipe), quiet=True).run()
    trained, pruned, q = (r["metrics"] for r in records[1:])
    assert records[2]["info"]["heads"] == {"blocks.0.attn": 2, "blocks.1.attn": 2}
    assert trained["accuracy"] > 0.6 and pruned["accuracy"] > 0.5  # digits, 10 classes (chance 0.1), a few epochs
    assert pruned["mac_speedup"] > 2.0 and q["precision"] == "int8"
    for m in (trained, pruned):
        assert m["runtime_accuracy/onnxruntime"] == pytest.approx(m["accuracy"], abs=0.01)
    assert q["runtime_accuracy/onnxruntime"] >= pruned["accuracy"] - 0.05
