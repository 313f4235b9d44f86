import copy

import torch
from torch import nn

from compress.pruning.masks import deployed_copy, get_mask, make_permanent, masked_modules, set_mask
from compress.stages import Context, FinetuneConfig, UnstructuredPruningStage


def zeros_where_masked(model: nn.Module) -> bool:
    return all(bool((m.weight[~get_mask(m)] == 0).all()) for m in masked_modules(model).values())


def test_masked_weights_stay_zero_through_sgd_with_momentum_and_weight_decay(tiny_model):
    UnstructuredPruningStage(sparsity=0.7).apply(tiny_model)
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        opt.zero_grad()
        tiny_model(torch.randn(8, 1, 8, 8)).sum().backward()
        opt.step()
    assert zeros_where_masked(tiny_model)
    assert int((tiny_model.fc.weight == 0).sum()) == round(0.7 * tiny_model.fc.weight.numel())


def test_masks_hold_through_lightning_finetune_and_later_stage(tiny_model, synthetic_dm):
    ctx = Context(synthetic_dm, trainer={"progress_bar": False})
    UnstructuredPruningStage(sparsity=0.5, finetune={"epochs": 2, "optimizer": {"lr": 0.1}}).apply(tiny_model, ctx)
    first = {n: get_mask(m).clone() for n, m in masked_modules(tiny_model).items()}
    assert zeros_where_masked(tiny_model)
    UnstructuredPruningStage(sparsity=0.8, schedule="agp",
                             finetune={"epochs": 2, "optimizer": {"lr": 0.1}}).apply(tiny_model, ctx)
    for name, m in masked_modules(tiny_model).items():
        assert not (get_mask(m) & ~first[name]).any(), "a weight pruned earlier came back"
    assert zeros_where_masked(tiny_model)


def test_make_permanent_keeps_values_and_leaves_copies_working(tiny_model):
    set_mask(tiny_model.fc, torch.rand_like(tiny_model.fc.weight) > 0.5)
    copy_ = copy.deepcopy(tiny_model)
    x = torch.randn(2, 1, 8, 8)
    expected = tiny_model(x)
    deployed = deployed_copy(tiny_model)
    assert type(deployed.fc) is nn.Linear and "fc.weight" in deployed.state_dict()
    make_permanent(copy_)
    assert torch.equal(copy_(x), expected) and torch.equal(deployed(x), expected)
    assert torch.equal(tiny_model(x), expected)  # the original still has its mask
    assert get_mask(tiny_model.fc) is not None


def test_stage_used_from_python_without_recipe():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    result = UnstructuredPruningStage(sparsity=0.6, layers={"2": 0.2}).apply(model)
    assert result.model is model
    assert int((model[0].weight == 0).sum()) == round(0.6 * 600)
    assert int((model[2].weight == 0).sum()) == round(0.2 * 150)
    FinetuneConfig()  # importable config types for Python users


def test_masks_are_bool_buffers_replaced_in_place_and_per_tensor():
    from compress.pruning.masks import Mask

    assert Mask(torch.tensor([1.0, 0.0])).mask.dtype == torch.bool
    layer = nn.Linear(3, 2)
    set_mask(layer, torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))  # 0/1 floats are taken as a keep-mask
    set_mask(layer, torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))  # a second mask replaces the first
    assert len(layer.parametrizations.weight) == 1 and get_mask(layer).dtype == torch.bool
    assert get_mask(layer).tolist() == [[False, False, True], [True, True, False]]
    assert get_mask(layer, "bias") is None
    set_mask(layer, torch.tensor([True, False]), "bias")  # the bias has a mask of its own
    assert get_mask(layer, "bias").tolist() == [True, False] and layer.bias[1] == 0
    assert get_mask(layer).shape == (2, 3) and len(layer.parametrizations.bias) == 1


def test_a_bias_mask_alone_is_not_a_weight_mask_and_masks_follow_the_layers_device():
    from compress.sharing.shared import get_shared

    layer = nn.Linear(3, 2)
    set_mask(layer, torch.tensor([True, False]), "bias")
    assert get_mask(layer) is None and get_shared(layer) is None and get_mask(layer, "bias") is not None
    meta = nn.Linear(3, 2, device="meta")  # a layer on another device than the mask given
    set_mask(meta, torch.ones(2, 3, dtype=torch.bool))
    assert get_mask(meta).device.type == "meta"
