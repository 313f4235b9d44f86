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


def test_schedules_at_their_edges():
    from compress.stages.prune_unstructured import linear_sparsity

    for sched in (agp_sparsity, linear_sparsity):
        assert sched(3, 0, 0.2, 0.8) == 0.8  # no steps: the target at once
        assert sched(0, 1, 0.2, 0.8) == pytest.approx(0.2)  # one step: the start, then the target
        assert sched(1, 1, 0.2, 0.8) == pytest.approx(0.8)
        assert sched(-1, 4, 0.2, 0.8) == pytest.approx(0.2)  # clamped to [0, steps]
        assert sched(9, 4, 0.2, 0.8) == pytest.approx(0.8)
    assert linear_sparsity(1, 4, 0.2, 0.8) == pytest.approx(0.2 + 0.6 / 4)


def test_std_criterion_keeps_a_weight_exactly_at_the_threshold():
    # [1, -1, 0]: mean 0, unbiased std exactly 1, so quality 1 puts the threshold at |w| = 1
    layer = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0, 0.0]]))
    UnstructuredPruningStage(criterion="std", quality=1.0).apply(nn.Sequential(layer))
    assert layer.weight.tolist() == [[1.0, -1.0, 0.0]]  # "below quality x std" is pruned: +-1 are not below


class _Trainer:
    """The three fields of a Lightning Trainer that GradualPruningCallback reads."""

    def __init__(self, batches: int, epochs: int):
        self.num_training_batches, self.max_epochs, self.current_epoch = batches, epochs, 0


def _run_callback(cb, trainer, epochs: int) -> list[tuple[int, int, int, int]]:
    """(epoch, batch, step, steps) of every prune_to the callback asks for."""
    calls: list[tuple[int, int, int, int]] = []
    cb.stage = type("Spy", (), {"prune_to": lambda self, model, step, steps: calls.append(
        (trainer.current_epoch, batch, step, steps))})()
    for epoch in range(epochs):
        trainer.current_epoch = epoch
        for batch in range(trainer.num_training_batches):
            cb.on_train_batch_start(trainer, None, None, batch)
    return calls


def test_gradual_callback_steps_evenly_over_the_ramp_and_resumes_from_its_state():
    from compress.stages.prune_unstructured import GradualPruningCallback

    # 4 steps over the first half of 4 epochs of 2 batches: the ramp is 4 batches, one step at the start of each
    cb = GradualPruningCallback(None, "model", steps=4, ramp=0.5)
    assert _run_callback(cb, _Trainer(2, 4), 4) == [(0, 0, 1, 4), (0, 1, 2, 4), (1, 0, 3, 4), (1, 1, 4, 4)]
    assert cb.state_dict() == {"done": 4}
    # a ramp shorter than one epoch: 2 steps over a quarter of 2 epochs of 4 batches (2 batches)
    cb = GradualPruningCallback(None, "model", steps=2, ramp=0.25)
    assert _run_callback(cb, _Trainer(4, 2), 2) == [(0, 0, 1, 2), (0, 1, 2, 2)]
    # resumed after step 2 (a checkpoint): steps 3 and 4 only, never step 2 again
    first = GradualPruningCallback(None, "model", steps=4, ramp=0.5)
    first.done = 2
    resumed = GradualPruningCallback(None, "model", steps=4, ramp=0.5)
    resumed.load_state_dict(first.state_dict())
    assert resumed.done == 2
    assert _run_callback(resumed, _Trainer(2, 4), 4) == [(1, 0, 3, 4), (1, 1, 4, 4)]


def test_gradual_stage_prunes_step_one_before_training_and_ends_at_the_target():
    from compress.stages import Context

    class Batches(Context):
        """Fine-tuning as the pruning callback sees it: 2 batches per epoch, no training."""

        def finetune(self, model, cfg, callbacks=(), tag="finetune"):
            trainer = _Trainer(2, cfg.epochs)
            for epoch in range(cfg.epochs):
                trainer.current_epoch = epoch
                for batch in range(2):
                    for cb in callbacks:
                        cb.on_train_batch_start(trainer, model, None, batch)
                    seen.append(zeros(model[0]) / model[0].weight.numel())
            return {}

    def agp(t, n):  # Zhu & Gupta eq. 1 from 0 to 0.8
        return 0.8 * (1 - (1 - t / n) ** 3)

    # 4 epochs, ramp 0.75: 3 steps over the first 3 epochs, step 1 before the first batch
    for kwargs, steps, at in [({}, 3, [1, 1, 2, 2, 3, 3, 3, 3]), ({"steps": 2}, 2, [1, 1, 1, 2, 2, 2, 2, 2])]:
        model, seen = mlp(), []
        UnstructuredPruningStage(sparsity=0.8, schedule="agp", finetune={"epochs": 4}, **kwargs).apply(model, Batches())
        assert seen == pytest.approx([agp(t, steps) for t in at], abs=1 / model[0].weight.numel())
        assert zeros(model[0]) == round(0.8 * model[0].weight.numel())
    # a layer half pruned already ramps from its own 50%, linearly for `iterative`
    model, seen = mlp(), []
    with torch.no_grad():
        model[0].weight[:26] = 0  # 26 of 53 rows
    UnstructuredPruningStage(sparsity=0.8, schedule="iterative", steps=2, finetune={"epochs": 2}).apply(model, Batches())
    start = 26 / 53
    assert seen[0] == pytest.approx(start + (0.8 - start) / 2, abs=1 / model[0].weight.numel())
    assert seen[-1] == pytest.approx(0.8, abs=1 / model[0].weight.numel())
