import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.stages.prune_unstructured import UnstructuredPruningStage, agp_sparsity


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(37, 53), nn.ReLU(), nn.Linear(53, 29), nn.ReLU(), nn.Linear(29, 7))


def zeros(m: nn.Module) -> int:
    return int((m.weight == 0).sum())


@pytest.mark.parametrize("target", [0.1, 0.5, 0.83, 0.99])
def test_layerwise_target_met_within_one_weight_per_layer(target):
    model = mlp()
    UnstructuredPruningStage(sparsity=target).apply(model)
    for i in (0, 2, 4):
        w = model[i].weight
        assert abs(zeros(model[i]) - target * w.numel()) <= 1


@pytest.mark.parametrize("target", [0.3, 0.9])
def test_global_target_met_overall_and_layers_differ(target):
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(0.1)  # a layer of small weights takes more of a global budget
    UnstructuredPruningStage(sparsity=target, scope="global").apply(model)
    layers = [model[i] for i in (0, 2, 4)]
    total = sum(m.weight.numel() for m in layers)
    assert abs(sum(zeros(m) for m in layers) - target * total) <= len(layers)
    assert zeros(model[2]) / model[2].weight.numel() > target


def test_agp_schedule_values():
    # Zhu & Gupta 2017, eq. 1 with s_i=0, s_f=0.8, n=4: s_t = 0.8 (1 - (1 - t/4)^3)
    expected = [0.0, 0.8 * (1 - 0.75 ** 3), 0.8 * (1 - 0.5 ** 3), 0.8 * (1 - 0.25 ** 3), 0.8]
    assert [agp_sparsity(t, 4, 0.0, 0.8) for t in range(5)] == pytest.approx(expected)
    assert agp_sparsity(2, 4, 0.5, 0.9) == pytest.approx(0.9 + (0.5 - 0.9) * 0.125)
    values = [agp_sparsity(t, 10, 0.0, 0.9) for t in range(11)]
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert all(s1 >= s2 for s1, s2 in zip(steps, steps[1:], strict=False)), "AGP prunes fastest first"


def test_gradual_schedule_reaches_target_during_finetune(synthetic_dm):
    from compress.models import build_model
    from compress.stages import Context

    model = build_model("lenet300", input_shape=(1, 8, 8))
    seen = []
    stage = UnstructuredPruningStage(sparsity=0.8, schedule="agp", steps=3,
                                     finetune={"epochs": 3, "optimizer": {"lr": 0.05}})
    original = stage.prune_to

    def spy(model, step=1, steps=1):
        out = original(model, step, steps)
        seen.append(round(out["features.0"], 3))
        return out

    stage.prune_to = spy
    stage.apply(model, Context(synthetic_dm, trainer={"progress_bar": False}))
    assert seen[:3] == sorted(seen[:3]) and seen[0] < 0.8
    assert seen[-1] == pytest.approx(0.8, abs=1e-3)


def test_std_criterion_prunes_below_quality_times_std():
    model = mlp()
    w = model[0].weight.detach().clone()
    UnstructuredPruningStage(criterion="std", quality=0.5).apply(model)
    expected = int((w.abs() < 0.5 * w.std()).sum())
    assert zeros(model[0]) == expected


def test_ignore_leaves_layers_dense():
    model = mlp()
    UnstructuredPruningStage(sparsity=0.5, ignore=["4"]).apply(model)
    assert zeros(model[4]) == 0 and zeros(model[0]) > 0


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"sparsity: 1.0 is outside \[0, 1\)"),
    ({"sparsity": -0.1}, r"sparsity: -0.1 is outside"),
    ({}, r"sparsity: required"),
    ({"sparsity": 0.5, "schedule": "cubic"}, r"schedule: 'cubic' is not valid; valid: agp, iterative, oneshot"),
    ({"sparsity": 0.5, "scope": "globl"}, r"did you mean 'global'"),
    ({"sparsty": 0.5}, r"unknown key 'sparsty'.*did you mean 'sparsity'"),
])
def test_bad_configs_raise_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        UnstructuredPruningStage(**kwargs)


def test_glob_matching_no_layer_is_an_error():
    with pytest.raises(UserError, match=r"layers: 'fc\*' matches no layer"):
        UnstructuredPruningStage(sparsity=0.5, layers={"fc*": 0.9}).apply(mlp())
