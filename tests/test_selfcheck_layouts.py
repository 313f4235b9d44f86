"""The self-check on layers whose forward puts the channels elsewhere than torch's own class does.

timm's ``LayerNorm2d`` (ConvNeXt) is an ``nn.LayerNorm`` whose forward permutes NCHW -> NHWC, normalises and
permutes back: its channels are dimension 1, not the last. Rebuilt here in a few lines (no timm in tests).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compress.errors import UserError
from compress.pruning.selfcheck import RemovalLog, relative_error, zeroed
from compress.pruning.structured import prune_model

torch.set_num_threads(1)


class LayerNorm2d(nn.LayerNorm):
    """As timm's: a LayerNorm over the channels (dim 1) of an NCHW tensor."""

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaledNorm(nn.LayerNorm):
    """A LayerNorm subclass whose output is no layer norm along any one dimension (normalises H, W and C)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[1:])


class ChannelsLastConv(nn.Conv2d):
    """A convolution whose forward returns NHWC: its channels are the last dimension."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).permute(0, 2, 3, 1)


class ConvNeXtish(nn.Module):
    """stem conv -> LayerNorm2d -> 1x1 conv (a ConvNeXt ``conv_mlp`` block) -> LayerNorm2d -> pool -> Linear."""

    def __init__(self, norm: type[nn.LayerNorm] = LayerNorm2d):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm1 = norm(8)
        self.fc1 = nn.Conv2d(8, 16, 1)
        self.fc2 = nn.Conv2d(16, 8, 1)
        self.norm2 = norm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(self.stem(x))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(self.norm2(x).mean((2, 3)))


class ChannelsLastNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ChannelsLastConv(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).mean((1, 2)))  # (B, H, W, C) -> (B, C)


def _affine(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():  # norms that are not the identity: their weights must follow the pruned channels
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("side", [6, 8])  # 8: H = W = C, every dimension but the batch's is as wide as the norm
def test_a_layer_norm_over_nchw_channels_is_pruned_and_checked(side):
    torch.manual_seed(0)
    model, x = _affine(ConvNeXtish()), torch.randn(4, 3, side, side)
    reference = copy.deepcopy(model)
    result = prune_model(model, x[:2], ratio=0.5, check_inputs=[x])
    assert model.stem.out_channels == 4 and model.norm1.normalized_shape == (4,) and model.fc1.out_channels == 8
    assert result.self_check < 1e-4 and not result.notes
    kept = [i for i in range(8) if any(torch.equal(reference.stem.weight[i], w) for w in model.stem.weight)]
    assert len(kept) == 4  # the norms kept the weights of the channels the stem kept
    assert torch.equal(model.norm1.weight, reference.norm1.weight[kept])
    assert torch.equal(model.norm2.bias, reference.norm2.bias[kept])


def test_zeroed_normalises_nchw_channels_over_the_kept_ones_only():
    torch.manual_seed(0)
    model, x = _affine(ConvNeXtish()), torch.randn(2, 3, 8, 8)
    out = model(x)
    log = RemovalLog(model)
    log.removed = {"stem": [1, 6], "norm1": [1, 6]}
    seen = {}
    with zeroed(model, log):
        model.fc1.register_forward_pre_hook(lambda m, a: seen.update(norm=a[0]))  # what the norm passes on
        model(x)
    keep = [0, 2, 3, 4, 5, 7]
    stem = model.stem(x)[:, keep]
    expected = F.layer_norm(stem.permute(0, 2, 3, 1), (6,), model.norm1.weight[keep], model.norm1.bias[keep],
                            model.norm1.eps).permute(0, 3, 1, 2)
    assert torch.allclose(seen["norm"][:, keep], expected, atol=1e-6)
    assert seen["norm"][:, [1, 6]].abs().max() == 0
    assert torch.equal(model(x), out)  # hooks gone after the with


def test_a_norm_the_check_cannot_reproduce_is_refused_in_one_line_naming_it():
    torch.manual_seed(0)
    model, x = _affine(ConvNeXtish(ScaledNorm)), torch.randn(4, 3, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as e:
        prune_model(model, x[:2], ratio=0.5, check_inputs=[x], key="stages.0")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("stages.0: the self-check cannot tell which dimension of the output of 'norm1' "
                              "(ScaledNorm, shape (4, 8, 6, 6)) holds its 8 channels; keep them (list the layers that write them in "
                              "stages.0.ignore) or leave this model out of structured pruning")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("side, ok", [(5, True), (6, False)])  # 6: H = W = C, the channels cannot be told apart
def test_a_module_with_its_own_layout_is_zeroed_along_its_channels_or_refused(side, ok):
    torch.manual_seed(0)
    model, x = ChannelsLastNet().eval(), torch.randn(3, 3, side, side)
    base = copy.deepcopy(model)
    work = copy.deepcopy(model)
    keep = [0, 1, 2, 4, 5]
    with torch.no_grad():  # conv's channel 3 removed by hand, as a correct pruning does
        work.conv = ChannelsLastConv(3, 5, 3, padding=1)
        work.conv.weight.copy_(model.conv.weight[keep])
        work.conv.bias.copy_(model.conv.bias[keep])
        work.fc = nn.Linear(5, 4)
        work.fc.weight.copy_(model.fc.weight[:, keep])
        work.fc.bias.copy_(model.fc.bias)
    log = RemovalLog(base, key="k")
    log.removed, log.widths = {"conv": [3]}, {"conv": 6}
    with zeroed(base, log):
        if ok:
            assert relative_error(work, base, [x]) < 1e-6
        else:
            with pytest.raises(UserError, match=r"^k: the self-check cannot tell which dimension of the output of "
                                                r"'conv' \(ChannelsLastConv, shape \(3, 6, 6, 6\)\) holds its 6"):
                relative_error(work, base, [x])


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm's: a BatchNorm2d whose forward adds an activation (MobileViT's convolution blocks)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(super().forward(x))


class BNActNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = BatchNormAct2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def test_a_batchnorm_subclass_is_zeroed_along_dim_1_when_every_dimension_is_as_wide():
    """H = W = C = 8: the width alone cannot tell the channels apart (timm MobileViT-XXS was refused at --dry-run);
    a BatchNorm normalises dim 1 itself, so a subclass's channels are there."""
    torch.manual_seed(0)
    model, x = BNActNet().eval(), torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.bias.uniform_(-1, 1)  # a removed channel's output is silu(bias) != 0 unless zeroed
    result = prune_model(model, x[:2], ratio=0.5, check_inputs=[x])
    assert (model.conv.out_channels, model.bn.num_features, model.head.in_features) == (4, 4, 4)
    assert result.self_check < 1e-5 and not result.notes
