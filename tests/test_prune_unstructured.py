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


@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 0.5, "scope": "globl"},
     "prune.unstructured.scope: 'globl' is not valid; valid: global, layer (did you mean 'global'?)"),
    ({"sparsity": 0.5, "criterion": "l1"}, "prune.unstructured.criterion: 'l1' is not valid; valid: magnitude, std"),
    ({"sparsity": 0.5, "layers": {"0": 1.5}}, "prune.unstructured.layers.0: 1.5 is outside [0, 1)"),
    ({"criterion": "std", "quality": 0}, "prune.unstructured.quality: 0.0 must be > 0"),
    ({"sparsity": 0.5, "ramp": 0}, "prune.unstructured.ramp: 0.0 is outside (0, 1]"),
    ({"sparsity": 0.5, "ramp": 1.5}, "prune.unstructured.ramp: 1.5 is outside (0, 1]"),
])
def test_config_errors_name_the_key_exactly(kwargs, message):
    with pytest.raises(UserError) as e:
        UnstructuredPruningStage(**kwargs)
    assert str(e.value) == message


def test_config_edges_that_are_valid():
    UnstructuredPruningStage(sparsity=0.5, ramp=1.0)  # the whole fine-tuning
    UnstructuredPruningStage(sparsity=0.5, quality=0)  # quality only matters to the std criterion
    with pytest.raises(UserError) as e:
        UnstructuredPruningStage(sparsity=0.5, ignore=["nope"]).apply(mlp())
    assert str(e.value).startswith("prune.unstructured.ignore: 'nope' matches no layer")


def test_plans_list_each_layers_target():
    assert UnstructuredPruningStage(sparsity=0.3, layers={"4": 0.1}).plan(mlp()) == \
        ["0 -> 0.30", "2 -> 0.30", "4 -> 0.10"]
    assert UnstructuredPruningStage(sparsity=0.3, scope="global", layers={"4": 0.1}).plan(mlp()) == \
        ["0 -> global 0.30", "2 -> global 0.30", "4 -> 0.10"]
    assert UnstructuredPruningStage(layers={"4": 0.1}).plan(mlp()) == ["4 -> 0.10"]
    assert UnstructuredPruningStage(criterion="std", quality=0.5).plan(mlp()) == \
        ["0 -> |w| < 0.5 std", "2 -> |w| < 0.5 std", "4 -> |w| < 0.5 std"]


def test_per_layer_targets_alone_leave_the_other_layers_dense_and_one_weight_can_go():
    model = mlp()
    UnstructuredPruningStage(layers={"4": 0.5}).apply(model)
    assert zeros(model[0]) == zeros(model[2]) == 0 and zeros(model[4]) == round(0.5 * 29 * 7)
    layer = nn.Linear(10, 1)
    UnstructuredPruningStage(sparsity=0.1).apply(nn.Sequential(layer))  # 10 weights: exactly one pruned
    assert zeros(layer) == 1


def test_k_smallest_mask_keeps_the_scores_device():
    from compress.stages.prune_unstructured import _k_smallest_mask

    assert _k_smallest_mask(torch.rand(10, device="meta"), 3).device.type == "meta"


def test_prune_to_is_a_usable_verb_on_its_own_and_never_revives_a_pruned_weight():
    # without apply, a gradual step starts from 0%: step 1 of 2 of AGP to 0.8 is 0.8 * (1 - 1/8) = 0.7
    for kwargs in ({"sparsity": 0.8}, {"sparsity": 0.8, "scope": "global"}):
        model = mlp()
        stage = UnstructuredPruningStage(schedule="agp", **kwargs)
        out = stage.prune_to(model, 1, 2)
        total = sum(model[i].weight.numel() for i in (0, 2, 4))
        assert sum(zeros(model[i]) for i in (0, 2, 4)) == pytest.approx(0.7 * total, abs=3)
        assert out == stage.report(model)
    # std at step 2 of 4: half the quality
    model = mlp()
    w = model[0].weight.detach().clone()
    UnstructuredPruningStage(criterion="std", quality=1.0).prune_to(model, 2, 4)
    assert zeros(model[0]) == int((w.abs() < 0.5 * w.std()).sum())
    # with nothing to fine-tune, a gradual schedule is one-shot: the std of the unpruned weights, once
    model = mlp()
    UnstructuredPruningStage(criterion="std", quality=1.0, schedule="iterative", steps=2).apply(model)
    assert zeros(model[0]) == int((w.abs() < w.std()).sum())
    # a mask already holding 60% zeros stays on when the new target is 50%
    model = mlp()
    UnstructuredPruningStage(sparsity=0.6).apply(model)
    UnstructuredPruningStage(sparsity=0.5).apply(model)
    from compress.pruning.masks import get_mask

    assert int((~get_mask(model[0])).sum()) == round(0.6 * model[0].weight.numel())


class _Recording:
    """The part of a Context a stage calls: fine-tuning, recorded as (model, tag, overall sparsity at each batch)."""

    def __init__(self, batches: int = 2):
        self.batches, self.calls = batches, []

    def finetune(self, model, cfg, callbacks=(), tag="finetune"):
        seen = []
        trainer = _Trainer(self.batches, cfg.epochs)
        for epoch in range(cfg.epochs):
            trainer.current_epoch = epoch
            for batch in range(self.batches):
                for cb in callbacks:
                    cb.on_train_batch_start(trainer, model, None, batch)
                seen.append(sum(zeros(model[i]) for i in (0, 2, 4)))
        self.calls.append((model, tag, seen))
        return {}


def test_oneshot_and_gradual_stages_drive_fine_tuning_as_documented():
    total = 37 * 53 + 53 * 29 + 29 * 7
    target = round(0.8 * 37 * 53) + round(0.8 * 53 * 29) + round(0.8 * 29 * 7)  # per layer

    def agp(t, n, start=0.0):  # AGP's overall sparsity, in weights
        return (0.8 + (start - 0.8) * (1 - t / n) ** 3) * total

    # one-shot: pruned to the target before fine-tuning, which is told the model and the stage's name
    model, ctx = mlp(), _Recording()
    result = UnstructuredPruningStage(sparsity=0.8, name="p", finetune={"epochs": 4}).apply(model, ctx)
    assert ctx.calls == [(model, "p", [target] * 8)]
    assert result.info == {"layer_sparsity": UnstructuredPruningStage(sparsity=0.8).report(model)}
    # gradual over 1 epoch: round(0.75 * 1) = 1 step, the target at once; or 2 steps when asked
    model, ctx = mlp(), _Recording()
    UnstructuredPruningStage(sparsity=0.8, schedule="agp", name="g", finetune={"epochs": 1}).apply(model, ctx)
    assert ctx.calls == [(model, "g", [target, target])]
    model, ctx = mlp(), _Recording()
    UnstructuredPruningStage(sparsity=0.8, schedule="agp", steps=2, finetune={"epochs": 1}).apply(model, ctx)
    assert ctx.calls[0][2][0] == pytest.approx(agp(1, 2), abs=3) and ctx.calls[0][2][1] == target
    # global scope ramps from the layers' overall sparsity when the stage began (26 of 53 rows of layer 0)
    model, ctx = mlp(), _Recording()
    with torch.no_grad():
        model[0].weight[:26] = 0
    UnstructuredPruningStage(sparsity=0.8, scope="global", schedule="agp", steps=2,
                             finetune={"epochs": 1}).apply(model, ctx)
    first, last = ctx.calls[0][2]
    assert first == pytest.approx(agp(1, 2, start=26 * 37 / total), abs=1) and last == round(0.8 * total)
