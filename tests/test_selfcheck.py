"""The self-check of structured pruning: correct or refused, never a model that computes something else."""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from compress.errors import UserError
from compress.pruning.selfcheck import RemovalLog, StepCheck, probe, relative_error, zeroed
from compress.pruning.structured import prune_model, trace_logits
from compress.stages import Context
from compress.stages.prune_structured import BN_BATCHES, StructuredPruningStage

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


class PermuteNet(nn.Module):
    """conv -> permute(0, 2, 1, 3) -> flatten -> Linear, as torchcrepe ends: the classifier's column of
    channel c at time t is t * C + c, not Torch-Pruning's channel-major c * T + t."""

    def __init__(self, hard_coded: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.in_features = 6 * 4 * 2
        self.hard_coded = hard_coded
        self.classifier = nn.Linear(self.in_features, 5)

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, T=4, F=2)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))  # (B, C, T, F)
        x = x.permute(0, 2, 1, 3)  # (B, T, C, F)
        x = x.reshape(-1, self.in_features) if self.hard_coded else x.reshape(x.shape[0], -1)
        return self.classifier(x)


class ShuffleNet(nn.Module):
    """A ShuffleNetV2-style channel shuffle (view, transpose, reshape) between a conv and a grouped conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def _bn_stats(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    with torch.no_grad():  # BN that is not the identity: a zeroed conv channel alone would not zero its output
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _permute(hard_coded: bool = False) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return _bn_stats(PermuteNet(hard_coded)), torch.randn(8, 1, 4, 2)


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _torch_pruning_maps_it_wrongly(model: nn.Module, x: Tensor) -> float:
    """Torch-Pruning alone (no self-check) on conv2's last channel: how far the outputs move from the zeroed one."""
    import torch_pruning as tp

    work, base = copy.deepcopy(model), copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(work, example_inputs=x[:1])
    group = graph.get_pruning_group(work.conv2, tp.prune_conv_out_channels, [5])
    log = RemovalLog(work)
    log.record(group)
    group.prune()
    with zeroed(base, log):
        return relative_error(work, base, [x])


def test_permute_then_flatten_is_pruned_without_the_wrongly_mapped_layer_and_says_so():
    model, x = _permute()
    assert _torch_pruning_maps_it_wrongly(model, x) > 0.05  # the Torch-Pruning bug this guards against
    reference = copy.deepcopy(model)
    result = prune_model(model, x[:2], ratio=0.5, check_inputs=[x])
    # conv2 feeds the permute: left whole, named in a note; conv1's channels went, correctly
    assert model.conv2.out_channels == 6 and model.classifier.in_features == 48
    assert model.conv1.out_channels == 4 and model.conv2.in_channels == 4
    assert result.notes and result.notes[0].startswith("self-check: Torch-Pruning would remove the wrong channels of "
                                                       "'conv2' (outputs differ by ")
    assert result.notes[0].endswith("from the model with those channels zeroed): conv2 left unpruned")
    assert result.self_check < 1e-4
    removed = [i for i in range(8) if not any(torch.equal(reference.conv1.weight[i], w) for w in model.conv1.weight)]
    with torch.no_grad():  # the pruned model is the original with conv1's removed channels zeroed
        for m in (reference.conv1, reference.bn1):
            m.weight[removed] = 0
            m.bias[removed] = 0
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_a_hard_coded_reshape_width_is_refused_in_one_line_naming_the_module_before_any_work():
    model, x = _permute(hard_coded=True)
    before = _state(model)
    with pytest.raises(UserError) as e:
        prune_model(model, x[:2], ratio=0.5, key="stages.1")
    message = str(e.value)
    assert message.startswith("stages.1: after removing channels of 'conv2', the model's own forward (PermuteNet) fails "
                              "(RuntimeError: shape '[-1, 48]' is invalid")
    assert message.endswith("its forward needs the width it was traced with; keep those channels (stages.1.ignore: "
                            "conv2), or leave this model out of structured pruning")
    assert "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    prune_model(model, x[:2], ratio=0.5, ignore=["conv2"])  # as the message says: conv1 is pruned, conv2 kept
    assert (model.conv1.out_channels, model.conv2.out_channels) == (4, 6)


def test_a_channel_shuffle_is_pruned_correctly_or_left_out():
    torch.manual_seed(0)
    model, x = _bn_stats(ShuffleNet()), torch.randn(4, 3, 6, 6)
    reference = copy.deepcopy(model)
    result = prune_model(model, x[:2], ratio=0.5, check_inputs=[x])
    assert any("'conv1'" in n for n in result.notes)  # the shuffle: Torch-Pruning maps conv1's channels wrongly
    assert model.conv1.out_channels == 8 and model.conv3.out_channels == 8  # conv3 pruned, conv1 kept
    assert result.self_check < 1e-4
    assert model(x).shape == reference(x).shape


def test_a_latency_target_leaves_the_shuffled_layer_out_too():
    from compress.pruning.latency import latency_backend, prune_to_latency

    torch.manual_seed(0)
    model, x = _bn_stats(ShuffleNet()), torch.randn(4, 3, 32, 32)
    result = prune_to_latency(model, x[:2], torch.randn(8, 3, 32, 32), target=1.02,
                              backend=latency_backend("jetson-tx2"), round_to=None, check_inputs=[x])
    assert len(result.notes) == 1 and "'conv1'" in result.notes[0] and result.as_dict()["notes"] == result.notes
    assert model.conv1.out_channels == 8 and model.conv3.out_channels < 16
    assert 0 < result.self_check < 1e-4


def test_the_step_check_catches_a_deliberately_wrong_mapping():
    """Columns of the classifier removed other than those of the removed channel: the check refuses."""
    import torch_pruning as tp

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.randn(4, 1, 6, 6)
    check = StepCheck(model, [x], key="s")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [1])
    check.record(group)
    group.prune()
    assert check.verify(model) < 1e-5  # Torch-Pruning's own mapping (channel-major flatten) is right here
    wrong = copy.deepcopy(model)
    with torch.no_grad():  # shift the classifier's columns by one position: a wrong mapping
        wrong[3].weight.copy_(torch.roll(wrong[3].weight, 1, dims=1))
    with pytest.raises(UserError, match=r"^s: self-check failed: the pruned model's outputs differ by [\d.e-]+ of "
                                        r"their scale from the original with the removed channels zeroed \(groups of "
                                        r"0\); the model was not kept"):
        check.verify(wrong)


def test_probe_leaves_the_model_alone_and_finds_every_faulty_group():
    model, x = _permute()
    before = _state(model)
    result = probe(model, x[:2], [x], ignored=["classifier"], prunable=["conv1", "conv2"], forward_fn=trace_logits)
    assert [f.root for f in result.faults] == ["conv2"] and result.refusal is None and result.groups >= 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a fault that cannot be left out (not a layer the pruning acts on) is a refusal
    result = probe(model, x[:2], [x], ignored=["classifier"], prunable=[], forward_fn=trace_logits, key="k")
    assert result.refusal.startswith("k: Torch-Pruning removes the wrong channels of 'conv2'")


class DeepShuffleNet(nn.Module):
    """Eight conv blocks with a channel shuffle after the sixth: one group Torch-Pruning maps wrongly among many."""

    def __init__(self):
        super().__init__()
        widths = [3, 8, 8, 8, 8, 8, 8, 8, 8]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, groups=2 if i == 6 else 1)
                                   for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths[1:])
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns, strict=True)):
            if i == 6:  # channel shuffle between convs[5] and the grouped convs[6]
                b, c, h, w = x.shape
                x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
            x = F.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def test_probe_checks_all_groups_at_once_and_bisects_only_to_the_wrong_one():
    torch.manual_seed(0)
    model, x = _bn_stats(DeepShuffleNet()), torch.randn(4, 3, 6, 6)
    layers = [f"convs.{i}" for i in range(8)]
    result = probe(model, x[:2], [x], ignored=["fc"], prunable=layers, forward_fn=trace_logits)
    assert [f.root for f in result.faults] == ["convs.5"] and result.faults[0].layers == ["convs.5"]
    assert result.refusal is None and result.groups == 8  # the other seven pruned together agree
    # round 1: all eight groups (fails), then a bisection of 8 groups: 3 checks, a new trace after each failing one;
    # round 2 without convs.5: one trace, one check. Never a copy and a check per group.
    assert result.checks == 1 + 3 + 1 and result.traces <= 1 + 3 + 1
    clean = probe(model, x[:2], [x], ignored=["fc", "convs.5"], prunable=layers, forward_fn=trace_logits)
    assert (clean.faults, clean.groups, clean.checks, clean.traces) == ([], 7, 1, 1)  # nothing wrong: one of each
    pruned = copy.deepcopy(model)
    out = prune_model(pruned, x[:2], ratio=0.5, check_inputs=[x])
    assert [c.out_channels for c in pruned.convs] == [4, 4, 4, 4, 4, 8, 4, 4] and out.self_check < 1e-4
    assert len(out.notes) == 1 and "'convs.5'" in out.notes[0]


def test_a_group_torch_pruning_fails_on_only_while_bisecting_is_left_out_too(monkeypatch):
    import torch_pruning as tp

    import compress.pruning.selfcheck as selfcheck

    traces, real_trace, real_prune = [], selfcheck._Probe.trace, tp.dependency.Group.prune

    def trace(probe_round):
        traces.append(1)
        return real_trace(probe_round)

    def prune(group, *args, **kwargs):  # convs.6 breaks on every copy but the first (as a flaky mapping would)
        if len(traces) > 1 and group._DG._module2name[group[0].dep.target.module] == "convs.6":
            raise ZeroDivisionError("integer division or modulo by zero")
        return real_prune(group, *args, **kwargs)

    monkeypatch.setattr(selfcheck._Probe, "trace", trace)
    monkeypatch.setattr(tp.dependency.Group, "prune", prune)
    torch.manual_seed(0)
    model, x = _bn_stats(DeepShuffleNet()), torch.randn(4, 3, 6, 6)
    result = probe(model, x[:2], [x], ignored=["fc"], prunable=[f"convs.{i}" for i in range(8)],
                   forward_fn=trace_logits)
    assert [(f.root, f.why) for f in result.faults] == [
        ("convs.6", "Torch-Pruning fails on it: ZeroDivisionError: integer division or modulo by zero"),
        ("convs.5", "outputs differ by 0.047 of their scale from the model with those channels zeroed")]
    assert result.refusal is None


def test_groups_are_compared_before_those_with_a_multihead_attention_which_are_only_run(monkeypatch):
    import compress.pruning.selfcheck as selfcheck
    from compress.pruning.attention import plan_heads
    from compress.pruning.structured import faulty_groups
    from tests.test_attention import MHANet

    torch.manual_seed(0)
    model, x = MHANet().eval(), torch.randn(2, 3, 16, 16)
    skip = {"head"}
    assert faulty_groups(model, x, skip=skip, plan=plan_heads(model, "dims", ratio=0.25)) == ([], [])
    monkeypatch.setattr(selfcheck, "relative_error", lambda *_: 1.0)  # every comparison fails: shows which are made
    layers, notes = faulty_groups(model, x, skip=skip, plan=plan_heads(model, "dims", ratio=0.25))
    assert layers == ["fc1"] and len(notes) == 1  # compared although attn's group (the stream) comes with it
    assert "embed" not in layers  # the stream's group holds attn: run, never compared


def test_probe_skips_a_group_with_a_single_channel_and_checks_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 1, 3), nn.ReLU(), nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).eval()
    x = torch.randn(4, 3, 6, 6)
    result = probe(model, x[:2], [x], ignored=["6"], prunable=["0", "2", "4"], forward_fn=trace_logits)
    assert (result.faults, result.refusal, result.groups, result.checks) == ([], None, 2, 1)  # '0' has one channel


def test_removal_log_maps_later_steps_back_to_original_indices():
    log = RemovalLog(nn.Linear(2, 2))
    log._remove("a", [1, 3])  # of 0..7: 1, 3 go; left 0 2 4 5 6 7
    log._remove("a", [1, 2])  # the 2nd and 3rd left: originals 2 and 4
    assert log.removed["a"] == [1, 2, 3, 4]


def test_zeroed_recomputes_a_layer_norm_over_its_kept_channels_and_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 4)
    out = model(x)
    log = RemovalLog(model)
    log.removed = {"0": [2], "1": [2]}
    pruned = copy.deepcopy(model)
    keep = [0, 1, 3, 4, 5]
    pruned[0] = nn.Linear(4, 5)
    pruned[1] = nn.LayerNorm(5)
    pruned[2] = nn.Linear(5, 3)
    with torch.no_grad():
        pruned[0].weight.copy_(model[0].weight[keep])
        pruned[0].bias.copy_(model[0].bias[keep])
        pruned[1].weight.copy_(model[1].weight[keep])
        pruned[1].bias.copy_(model[1].bias[keep])
        pruned[2].weight.copy_(model[2].weight[:, keep])
        pruned[2].bias.copy_(model[2].bias)
    with zeroed(model, log):
        assert relative_error(pruned, model, [x]) < 1e-6
    assert torch.equal(model(x), out)


# ---------------------------------------------------------------------------------------------
# Through the pipeline: refused at --dry-run, or a note in the report
# ---------------------------------------------------------------------------------------------
def _recipe(tmp_path, hard_coded: bool) -> Path:
    from conftest import quick_recipe

    recipe = quick_recipe(tmp_path, model={"name": "import:test_selfcheck:PermuteNet", "hard_coded": hard_coded},
                          data={"name": "synthetic", "shape": [1, 4, 2], "classes": 5, "train_size": 32,
                                "test_size": 32, "batch_size": 16},
                          stages=[{"type": "prune.structured", "ratio": 0.5}])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_dry_run_refuses_a_hard_coded_width_in_one_line(tmp_path, capsys, monkeypatch):
    from compress.cli import main

    monkeypatch.syspath_prepend(str(TESTS))
    code = main([str(_recipe(tmp_path, hard_coded=True)), "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: stages[0]: after removing channels of 'conv2', the model's own forward (PermuteNet) "
                          "fails (RuntimeError: shape '[-1, 48]' is invalid")


def test_a_run_notes_the_layer_left_out_and_reports_the_check(tmp_path, capsys, monkeypatch):
    from compress.cli import main

    monkeypatch.syspath_prepend(str(TESTS))
    path = _recipe(tmp_path, hard_coded=False)
    assert main([str(path), "--dry-run"]) == 0
    assert "self-check: Torch-Pruning would remove the wrong channels of 'conv2'" in capsys.readouterr().out
    assert main([str(path)]) == 0
    stages = json.loads((tmp_path / "run" / "report.json").read_text())["stages"]
    assert stages[0]["metrics"]["compression_ratio"] == 1.0  # stage 0 changes nothing, whatever the format's overhead
    record = stages[-1]
    assert any(n.startswith("self-check: Torch-Pruning would remove the wrong channels of 'conv2'")
               for n in record["notes"])
    assert record["info"]["channels"]["conv2"] == 6 and record["info"]["channels"]["conv1"] == 4
    assert 0 <= record["info"]["self_check"] < 1e-4 and "notes" not in record["info"]


def test_a_reload_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    from compress.checkpoint import load_model, read_checkpoint, save_checkpoint

    monkeypatch.syspath_prepend(str(TESTS))
    torch.manual_seed(0)
    model, x = _bn_stats(ShuffleNet()), torch.randn(4, 3, 8, 8)
    prune_model(model, x[:2], ratio=0.5, check_inputs=[x])
    spec = {"name": "import:test_selfcheck:ShuffleNet", "kwargs": {}}
    path = tmp_path / "a.ckpt"
    save_checkpoint(path, model, model_spec=spec, check_inputs=x)
    data = read_checkpoint(path)
    assert data["check"]["inputs"].shape == (2, 3, 8, 8)
    assert torch.equal(load_model(path, trust_model_code=True)(x), model(x))  # the check passes on a faithful reload
    data["check"]["outputs"] = data["check"]["outputs"] + 1.0  # as if the rebuilt structure computed otherwise
    torch.save(data, path)
    with pytest.raises(UserError, match=r"a\.ckpt: the reloaded model computes something else than the model saved "
                                        r"\(outputs differ by [\d.e-]+ of their scale\)"):
        load_model(path, trust_model_code=True)
    data["check"] = None  # a checkpoint written before the check loads as before
    torch.save(data, path)
    assert torch.equal(load_model(path, trust_model_code=True)(x), model(x))


class FrozenBNNet(nn.Module):
    """conv - BN (momentum 0, as a pretrained model may ship it) - conv - BN - pool - linear, for 1x8x8."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=0.0)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def test_batchnorm_statistics_are_reestimated_after_pruning_and_momentum_zero_is_named(synthetic_dm):
    from compress.pruning.batchnorm import reestimate_batchnorm

    torch.manual_seed(0)
    model = _bn_stats(FrozenBNNet())
    stage = StructuredPruningStage(ratio=0.5)
    result = stage.apply(model, Context(synthetic_dm))
    assert result.info["notes"] == ["BatchNorm 'bn1' has momentum 0: its running statistics never update in "
                                    "fine-tuning (re-estimated once after pruning)"]
    assert model.bn1.momentum == 0.0 and model.bn2.momentum == 0.1  # put back after the re-estimation
    xs = Context(synthetic_dm).training_inputs(BN_BATCHES)
    with torch.no_grad():  # those of the pruned model on the training batches (every BatchNorm in train mode)
        h = torch.cat([model.conv2(F.relu(F.batch_norm(model.conv1(x), None, None, model.bn1.weight, model.bn1.bias,
                                                        training=True))) for x in xs])
    assert torch.allclose(model.bn2.running_mean, h.mean((0, 2, 3)), atol=1e-6)
    assert reestimate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)]) == 0
    bare = StructuredPruningStage(ratio=0.5, example_inputs=torch.randn(2, 1, 8, 8)).apply(_bn_stats(FrozenBNNet()))
    assert bare.info["notes"] == ["BatchNorm 'bn1' has momentum 0: its running statistics never update in fine-tuning"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_mac_search_shows_its_ratio_on_a_terminal_and_nothing_elsewhere(monkeypatch, capsys):
    torch.manual_seed(0)
    model, x = _bn_stats(ShuffleNet()), torch.randn(4, 3, 8, 8)
    prune_model(copy.deepcopy(model), x[:2], mac_speedup=1.3)
    assert capsys.readouterr().err == ""  # not a terminal: no progress line in logs
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    result = prune_model(model, x[:2], mac_speedup=1.3, key="s")
    lines = terminal.getvalue().split("\r")[1:]
    assert len(lines) == len(result.history) and lines[-1].endswith("\n")
    assert lines[-1].startswith(f"s: {result.history[-1]:.3f}x MACs of 1.3x")


def test_outputs_of_another_shape_never_agree():
    from compress.pruning.selfcheck import outputs_error

    assert outputs_error([(torch.zeros(2, 3), torch.zeros(2, 4))]) == float("inf")
    assert outputs_error([(torch.ones(2), torch.zeros(2))]) == 1.0  # a zero reference: the absolute difference


def test_a_group_torch_pruning_fails_on_is_left_out_with_its_error(monkeypatch):
    import torch_pruning as tp

    model, x = _permute()
    real = tp.dependency.Group.prune

    def prune(group, *args, **kwargs):
        if group[0].dep.target.module is model_copy[0].conv1:
            raise ZeroDivisionError("integer division or modulo by zero")
        return real(group, *args, **kwargs)

    model_copy = []
    original_deepcopy = copy.deepcopy

    def deepcopy(obj, *args):
        out = original_deepcopy(obj, *args)
        if obj is model:
            model_copy[:] = [out]
        return out

    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    monkeypatch.setattr(tp.dependency.Group, "prune", prune)
    result = probe(model, x[:2], [x], ignored=["classifier", "conv2"], prunable=["conv1", "conv2"],
                   forward_fn=trace_logits)
    assert [(f.root, f.why) for f in result.faults] == [
        ("conv1", "Torch-Pruning fails on it: ZeroDivisionError: integer division or modulo by zero")]
    assert result.refusal is None
