"""Structured pruning: channels really go, every zoo model still runs and trains, reloads bit for bit."""

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
from torch import Tensor, nn

from compress.errors import UserError
from compress.models import build_model
from compress.pruning.masks import get_mask, masked_modules, set_mask
from compress.pruning.structured import (
    IMPORTANCES,
    SparsityRegularizer,
    mask_shapes_ok,
    output_layers,
    prune_model,
    restore_structure,
)
from compress.stages import STAGES, Context
from compress.stages.prune_structured import StructuredPruningStage

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parent


class ConcatNet(nn.Module):
    """Stem, two branches (1x1; grouped 3x3 then depthwise 3x3) concatenated, a residual add, a classifier."""

    def __init__(self, input_shape=(3, 8, 8), num_classes: int = 10):
        super().__init__()
        c = input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.branch_b = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(12),
                                      nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1, groups=12, bias=False),
                                      nn.BatchNorm2d(12), nn.ReLU())
        self.merge = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        y = torch.cat([self.branch_a(s), self.branch_b(s)], dim=1)
        y = torch.relu(self.merge(y) + s)  # residual: merge's outputs are coupled to the stem's
        return self.fc(F.adaptive_avg_pool2d(self.head(y), 1).flatten(1))


# name for build_model, input shape (small, for speed)
CASES = {
    "lenet5": ("lenet5", (1, 8, 8)),
    "resnet20": ("resnet20", (3, 8, 8)),
    "resnet56": ("resnet56", (3, 8, 8)),
    "mobilenetv2_small": ("mobilenetv2_small", (1, 16, 16)),
    "concat": ("import:test_structured:ConcatNet", (3, 8, 8)),
}


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))  # so "import:test_structured:ConcatNet" resolves


def _build(case: str, seed: int = 0) -> nn.Module:
    name, shape = CASES[case]
    torch.manual_seed(seed)
    model = build_model(name, input_shape=shape, num_classes=10)
    with torch.no_grad():  # non-trivial BN statistics, so a wrongly reloaded buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    return model


def _x(case: str, n: int = 4) -> Tensor:
    torch.manual_seed(1)
    return torch.randn(n, *CASES[case][1])


def _numels(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


_PRUNED: dict[str, tuple] = {}


def _pruned(case: str):
    """(base model, pruned model, PruneResult), pruned once per session to 2x fewer MACs."""
    if case not in _PRUNED:
        base = _build(case)
        model = copy.deepcopy(base)
        result = prune_model(model, _x(case, 2), mac_speedup=2.0, importance="l2")
        _PRUNED[case] = (base, model, result)
    return _PRUNED[case]


@pytest.mark.parametrize("case", list(CASES))
def test_channels_removed_output_kept_and_target_met(case):
    base, model, result = _pruned(case)
    before, after = _numels(base), _numels(model)
    assert before.keys() == after.keys()
    smaller = [k for k in before if after[k] != before[k]]
    assert smaller, "no tensor got smaller"
    assert all(a <= b for k in smaller for a, b in zip(after[k], before[k], strict=True))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())
    out_name = output_layers(base, _x(case))[0]
    out_layer = model.get_submodule(out_name)
    assert out_layer.out_features == 10  # the classifier's outputs are never pruned
    x = _x(case)
    model.eval()
    assert model(x).shape == base.eval()(x).shape == (4, 10)
    # mac_speedup reached, and not already one pruning step earlier
    assert result.mac_speedup >= 2.0
    assert len(result.history) == 1 or result.history[-2] < 2.0
    assert result.history[-1] == pytest.approx(result.mac_speedup)
    assert sum(result.channels_after.values()) < sum(result.channels_before.values())


@pytest.mark.parametrize("case", list(CASES))
def test_training_step_after_pruning(case):
    _, pruned, _ = _pruned(case)
    model = copy.deepcopy(pruned).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = _x(case), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    # plain SGD moves every parameter by exactly -lr * its gradient, and the gradients reach the pruned layers
    for a, p in zip(before, model.parameters(), strict=True):
        assert p.grad is not None and p.grad.shape == p.shape
        assert torch.allclose(p.detach(), a - 0.01 * p.grad, atol=1e-7)
    assert sum(bool(p.grad.abs().sum() > 0) for p in model.parameters()) >= len(before) // 2
    with torch.no_grad():  # and a small enough step down the gradient lowers the loss (lr 0.01 can overshoot)
        for a, p in zip(before, model.parameters(), strict=True):
            p.copy_(a - 1e-3 * p.grad)
        assert F.cross_entropy(model(x), y) < loss


def test_reload_in_fresh_process_is_bit_identical(tmp_path):
    """Checkpoints of pruned models (one also masked) load in a new process with weights_only=True."""
    from compress.checkpoint import save_checkpoint

    entries = []
    for case in CASES:
        _, model, _ = _pruned(case)
        model = copy.deepcopy(model).eval()
        if case == "lenet5":  # masked on top: keys `parametrizations.weight.original`
            layer = model.features[0]
            set_mask(layer, torch.rand_like(layer.weight) > 0.5)
        x = _x(case)
        with torch.no_grad():
            y = model(x)
        name, shape = CASES[case]
        save_checkpoint(tmp_path / f"{case}.pt", model,
                        model_spec={"name": name, "kwargs": {"input_shape": list(shape), "num_classes": 10}})
        torch.save({"x": x, "y": y}, tmp_path / f"{case}.io.pt")
        entries.append(case)
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)  # as in this process: float sums are ordered by the thread split
        from compress.checkpoint import load_model
        from compress.pruning.masks import masked_modules
        for case in {entries!r}:
            model = load_model({str(tmp_path)!r} + f"/{{case}}.pt", trust_model_code=True)  # import: test models
            io = torch.load({str(tmp_path)!r} + f"/{{case}}.io.pt", weights_only=True)
            with torch.no_grad():
                same = torch.equal(model(io["x"]), io["y"])
            print(case, same, sorted(masked_modules(model)))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert set(lines) == set(entries)
    for case, rest in lines.items():
        assert rest.startswith("True"), f"{case}: outputs differ after reload ({rest})"
    assert "features.0" in lines["lenet5"]


def test_restore_structure_sets_attributes_for_grouped_and_depthwise():
    _, model, _ = _pruned("concat")
    fresh = _build("concat", seed=5)
    changed = restore_structure(fresh, model.state_dict())
    assert changed
    for name, m in model.named_modules():
        f = fresh.get_submodule(name)
        for attr in ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features"):
            if hasattr(m, attr):
                assert getattr(f, attr) == getattr(m, attr), f"{name}.{attr}"
    dw = model.branch_b[3]
    assert dw.groups == dw.out_channels == dw.in_channels < 12  # depthwise stayed depthwise
    assert model.branch_b[0].groups == 2  # a grouped conv keeps its groups


def test_masked_model_keeps_valid_masks():
    model = _build("lenet5")
    torch.manual_seed(3)
    for layer in (model.features[0], model.features[3], model.fc1):
        set_mask(layer, torch.rand_like(layer.weight) > 0.5)
    x = _x("lenet5")
    prune_model(model, x, ratio=0.4)
    assert sorted(masked_modules(model)) == ["fc1", "features.0", "features.3"]
    assert mask_shapes_ok(model)
    assert model.features[0].parametrizations.weight.original.shape[0] < 20
    for m in masked_modules(model).values():
        assert torch.all(m.weight[~get_mask(m)] == 0)
        assert get_mask(m).float().mean() < 0.8  # the old zeros are still masked
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    for m in masked_modules(model).values():
        assert torch.all(m.weight[~get_mask(m)] == 0)


@pytest.mark.parametrize("importance", IMPORTANCES.names())
def test_every_importance_prunes(importance):
    model = _build("concat")
    x = _x("concat")
    batches = [(x, torch.tensor([0, 1, 2, 3]))]
    result = prune_model(model, x, importance=importance, ratio=0.25, gradient_batches=batches)
    assert result.mac_speedup > 1.1
    assert model(x).shape == (4, 10)


def test_custom_importance_by_name_and_object():
    class FirstChannelsFirst:
        """Prunes the lowest-indexed channels (scores rise with the index)."""

        def __call__(self, group):
            return torch.arange(len(group[0][1]), dtype=torch.float) + 1

    if "test_first" not in IMPORTANCES:
        IMPORTANCES.register("test_first", FirstChannelsFirst)
    for imp in ("test_first", FirstChannelsFirst()):
        model = _build("lenet5")
        w = model.features[0].weight.detach().clone()
        prune_model(model, _x("lenet5"), importance=imp, layer_ratios={"features.0": 0.5})
        assert torch.equal(model.features[0].weight, w[10:])


def test_layer_ratios_global_round_to_and_ignore():
    model = _build("resnet20")
    x = _x("resnet20")
    r = prune_model(model, x, ratio=0.5, global_pruning=True, round_to=4, ignore=["conv1"])
    assert r.channels_after["conv1"] == 16  # conv1 and everything coupled to it by residuals
    assert all(c % 4 == 0 for n, c in r.channels_after.items() if n != "fc")
    model = _build("resnet20")
    r = prune_model(model, x, layer_ratios={"layer3.*.conv1": 0.5})
    changed = {n for n in r.channels_after if r.channels_after[n] != r.channels_before[n]}
    assert changed == {"layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"}
    assert all(r.channels_after[n] == 32 for n in changed)


def test_max_layer_ratio_caps_and_unreachable_target_errors():
    model = _build("lenet5")
    r = prune_model(model, _x("lenet5"), ratio=0.5, max_layer_ratio=0.3)
    assert r.channels_after["features.0"] >= 14
    with pytest.raises(UserError, match="mac_speedup: reached only"):
        prune_model(_build("lenet5"), _x("lenet5"), mac_speedup=2.0, importance="bn_scale")  # no BN to rank
    # the stage hands an Importance object: the message names its class (was its repr, '<... object at 0x...>')
    with pytest.raises(UserError, match=r"importance 'BNScaleImportance' leave too few"):
        prune_model(_build("lenet5"), _x("lenet5"), mac_speedup=2.0, importance=IMPORTANCES.get("bn_scale")())


def test_stage_iterative_with_finetune_between_steps():
    model = _build("concat")
    x = _x("concat")
    calls = []

    class RecordingContext(Context):
        def finetune(self, m, cfg, callbacks=(), tag="finetune"):
            calls.append((tag, sum(p.numel() for p in m.parameters())))
            return {}

    stage = STAGES.get("prune.structured")({"mac_speedup": 2.0, "iterative_steps": 3, "global": True},
                                           example_inputs=x)
    result = stage.apply(model, RecordingContext())
    assert [t for t, _ in calls] == ["prune.structured/step1", "prune.structured/step2", "prune.structured/step3"]
    assert calls[0][1] > calls[1][1] > calls[2][1]
    assert result.info["mac_speedup"] >= 2.0
    assert result.info["channels"]["fc"] == 10
    assert result.info["output_layers"] == ["fc"]


def test_stage_with_data_regularizes_finetunes_and_uses_taylor(synthetic_dm, tmp_path):
    torch.manual_seed(0)
    model = ConcatNet((1, 8, 8), num_classes=synthetic_dm.num_classes)
    stage = StructuredPruningStage(
        importance="taylor", ratio=0.3, taylor_batches=2,
        regularize={"kind": "group_norm", "reg": 1e-3, "finetune": {"epochs": 1, "limit_train_batches": 0.25}},
        finetune={"epochs": 1, "limit_train_batches": 0.25})
    ctx = Context(synthetic_dm, trainer={"progress_bar": False}, seed=0)
    result = stage.apply(model, ctx)
    assert result.info["mac_speedup"] > 1.2
    assert ctx.fits == 2  # the regularised run and the fine-tune
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, synthetic_dm.num_classes)


def test_sparsity_regularizer_changes_gradients():
    for kind in SparsityRegularizer.KINDS:
        model = _build("concat")
        x, y = _x("concat"), torch.tensor([0, 1, 2, 3])
        F.cross_entropy(model(x), y).backward()
        plain = {n: p.grad.clone() for n, p in model.named_parameters()}
        reg = SparsityRegularizer(kind, x, reg=0.1)
        reg.build(model)
        reg.regularize()
        diff = [n for n, p in model.named_parameters() if not torch.equal(p.grad, plain[n])]
        assert diff, kind
        assert not any(n.startswith("fc.") for n in diff) or kind == "group_norm"


@pytest.mark.parametrize("values, match", [
    ({"ratio": 1.0}, r"prune\.structured\.ratio: 1\.0 is outside \[0, 1\)"),
    ({"ratio": -0.1}, r"prune\.structured\.ratio"),
    ({"importance": "l3", "ratio": 0.5}, r"importance: unknown importance 'l3'; valid: .*l2.*did you mean"),
    ({}, r"give either ratio/layer_ratios .* or mac_speedup"),
    ({"ratio": 0.5, "mac_speedup": 2.0}, r"not both"),
    ({"mac_speedup": 1.0}, r"mac_speedup: 1\.0 must be > 1"),
    ({"ratio": 0.5, "regularize": {"kind": "l1"}}, r"regularize\.kind: 'l1' is not valid"),
    ({"ratio": 0.5, "max_layer_ratio": 1.0}, r"max_layer_ratio"),
])
def test_config_errors(values, match):
    with pytest.raises(UserError, match=match):
        StructuredPruningStage(values)


@pytest.mark.parametrize("values, match", [
    ({"ratio": 0.5, "ignore": ["nothing.*"]}, r"prune\.structured\.ignore: 'nothing\.\*' matches no layer"),
    ({"layer_ratios": {"layer9.*": 0.5}}, r"layer_ratios: 'layer9\.\*' matches no layer"),
    ({"layer_ratios": {"fc": 0.5}}, r"would prune the output layer 'fc'"),
    ({"layer_ratios": {"*": 0.5}}, r"would prune the output layer 'fc'"),
])
def test_layer_errors_in_plan_and_apply(values, match):
    model = _build("resnet20")
    with pytest.raises(UserError, match=match):
        StructuredPruningStage(values).plan(model)
    with pytest.raises(UserError, match=match):
        StructuredPruningStage(values, example_inputs=_x("resnet20")).apply(model)


def test_plan_lists_touched_layers():
    model = _build("resnet20")
    plan = StructuredPruningStage(mac_speedup=2.0, ignore=["layer1.*"]).plan(model)
    assert plan[0] == "conv1 -> until 2x MACs"
    assert not any(p.startswith(("layer1.", "fc ")) for p in plan)


def test_sensitivity_writes_csv_png_and_suggests(tmp_path):
    from compress.sensitivity import run_sensitivity, suggest_ratios

    model = _build("concat")
    x = _x("concat", 16)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # the unpruned model is 100% "accurate"

    def evaluate(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    out = run_sensitivity(model, evaluate, x, tmp_path, ratios=(0.25, 0.5), max_drop=0.2)
    assert out["baseline"] == 1.0
    assert (tmp_path / "sensitivity.csv").read_text().startswith("layer,coupled,ratio")
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert "fc" not in out["curves"]
    assert "merge.0" not in out["curves"]  # coupled to the stem by the residual: one group
    assert "stem.0" in out["groups"] and "merge.0" in out["groups"]["stem.0"]
    assert len(out["rows"]) == 2 * len(out["curves"])
    # by hand from the curves: the largest ratio such that it and every smaller one lose <= 0.2
    expected = {}
    for layer, curve in out["curves"].items():
        ok = [q for q in (0.25, 0.5) if all(out["baseline"] - curve[p] <= 0.2 for p in (0.25, 0.5) if p <= q)]
        if ok:
            expected[layer] = max(ok)
    assert expected and out["suggested"] == expected
    assert json.loads((tmp_path / "suggested_ratios.json").read_text())["layer_ratios"] == expected
    # a constructed table: a layer stops at its first ratio over the limit, even if a larger one recovers
    curves = {"robust": {0.25: 0.99, 0.5: 0.95, 0.75: 0.91}, "fragile": {0.25: 0.80, 0.5: 0.95},
              "dip": {0.25: 0.97, 0.5: 0.85, 0.75: 0.99}, "edge": {0.25: 0.90, 0.5: 0.89}}
    assert suggest_ratios(curves, baseline=1.0, max_drop=0.1) == {"robust": 0.75, "dip": 0.25, "edge": 0.25}
    assert suggest_ratios(curves, baseline=1.0, max_drop=0.0) == {}
    with pytest.raises(UserError, match="outside"):
        run_sensitivity(model, evaluate, x, tmp_path, ratios=(1.0,))


@pytest.mark.parametrize("block, message", [
    ({"ratio": 0.5, "global": True, "global_pruning": True}, "s.global: give `global` or `global_pruning`, not both"),
    ({"latency_speedup": 2, "latency_batch": 0}, "s.latency_batch: 0 is outside [1, 1024]"),
    ({"ratio": 0.5, "iterative_steps": 0}, "s.iterative_steps: 0 must be >= 1"),
    ({"ratio": 0.5, "round_to": "lanes"}, "s.round_to: 'lanes' is not valid; give an integer, auto or null"),
    ({"ratio": 0.5, "round_to": 0}, "s.round_to: 0 must be >= 1"),
    ({"ratio": 0.5, "taylor_batches": 0}, "s.taylor_batches: 0 must be >= 1"),
    ({"ratio": 0.5, "search_steps": 1}, "s.search_steps: 1 must be >= 2"),
    ({"ratio": 0.5, "regularize": {"kind": "group_norm", "reg": 0}}, "s.regularize.reg: 0.0 must be > 0"),
])
def test_structured_config_mistakes_are_one_line_naming_the_key(block, message):
    with pytest.raises(UserError, match=f"^{re.escape(message)}"):
        StructuredPruningStage(block, key="s")


@pytest.mark.parametrize("init", ["density", "random"])
def test_kmeans_other_inits_give_sorted_centroids_and_nearest_labels(init):
    from compress.sharing import kmeans_1d

    w = torch.cat([torch.randn(500) - 4, torch.randn(500) + 4])
    centroids, labels = kmeans_1d(w, 2, init=init, generator=torch.Generator().manual_seed(0))
    assert torch.all(centroids[1:] > centroids[:-1])
    nearest = (w[:, None] - centroids[None, :]).abs().argmin(1)
    assert torch.equal(labels, nearest)
    assert centroids[0] == pytest.approx(-4, abs=0.3) and centroids[1] == pytest.approx(4, abs=0.3)
    with pytest.raises(ValueError, match="unknown init 'kmeans'"):
        kmeans_1d(w, 2, init="kmeans")


SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "in1_features", "in2_features",
               "num_features", "num_channels", "normalized_shape", "num_parameters", "num_embeddings", "embedding_dim")


def _shape_attrs(module: nn.Module) -> dict:
    return {a: getattr(module, a) for a in SHAPE_ATTRS if hasattr(module, a)}


class _Scale(nn.Module):
    """A layer restore_structure has no rule for: an absent tensor and an unchanged one before the pruned one."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_parameter("offset", None)
        self.gain = nn.Parameter(torch.ones(1))
        self.weight = nn.Parameter(torch.ones(size))

    @property
    def scale(self) -> Tensor:
        return self.weight


def _layers(c: int, dw: int, g: int, ti: int, to: int, tdw: int, pair: int) -> nn.ModuleDict:
    """One of every kind of layer restore_structure knows, at the given channel counts."""
    return nn.ModuleDict({
        "conv": nn.Conv2d(c, c + 2, 3),
        "dw": nn.Conv2d(dw, dw, 3, groups=dw),  # depthwise: stays depthwise
        "pair": nn.Conv2d(pair, pair, 3, groups=pair),  # depthwise, from 2 channels down to 1
        "grouped": nn.Conv2d(2 * g, 2 * g, 1, groups=2),  # grouped, not depthwise: keeps 2 groups
        "single": nn.Conv2d(c, 1, 1),  # one output channel, groups 1: not depthwise
        "up": nn.ConvTranspose2d(ti, to, 2),
        "up_dw": nn.ConvTranspose2d(tdw, tdw, 2, groups=tdw),
        "up_single": nn.ConvTranspose2d(ti, 1, 2),
        "fc": nn.Linear(c, c + 1),
        "bilinear": nn.Bilinear(c, c + 3, c + 1),
        "bn": nn.BatchNorm2d(c),
        "bn_plain": nn.BatchNorm1d(c, affine=False),  # no weight: running_mean gives the size
        "bn_nostats": nn.BatchNorm2d(c, track_running_stats=False),  # no running_mean: the weight gives it
        "gn": nn.GroupNorm(2, 2 * g),
        "ln": nn.LayerNorm(c),
        "prelu": nn.PReLU(c),
        "emb": nn.Embedding(c + 4, c),
    })


def test_restore_structure_gives_every_kind_of_layer_the_attributes_of_one_built_at_the_stored_shapes():
    big, small = _layers(6, 6, 4, 6, 4, 4, 2).double(), _layers(4, 3, 3, 3, 2, 3, 1).double()
    big["other"], small["other"] = _Scale(6).double(), _Scale(4).double()
    big["conv"].requires_grad_(False)  # a frozen layer stays frozen
    changed = restore_structure(big, small.state_dict())
    assert set(changed) == set(big.keys())
    assert big["other"].scale.shape == (4,) and big["other"].size == 6  # reshaped; attributes it cannot know
    for name, layer in small.items():
        assert _shape_attrs(big[name]) == _shape_attrs(layer), name
    # parameters stay trainable parameters (but the frozen ones), buffers stay buffers, all in the model's dtype
    assert {n for n, _ in big.named_parameters()} == {n for n, _ in small.named_parameters()}
    assert {n for n, _ in big.named_buffers()} == {n for n, _ in small.named_buffers()}
    assert not any(isinstance(b, nn.Parameter) for b in big.buffers())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad == (not n.startswith("conv."))
               for n, p in big.named_parameters())
    assert all(t.dtype == torch.float64 for t in big.state_dict().values() if t.is_floating_point())
    big.load_state_dict(small.state_dict())
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(big["conv"](x), small["conv"](x)) and torch.equal(big["up"](x[:, :3]), small["up"](x[:, :3]))
    # a bare layer (the model is the layer: no name prefix), and a model on another device (meta) stays there
    fc = nn.Linear(6, 5)
    assert restore_structure(fc, nn.Linear(4, 3).state_dict()) == [""] and (fc.in_features, fc.out_features) == (4, 3)
    meta = _layers(6, 6, 4, 6, 4, 4, 2).to("meta")
    restore_structure(meta, small.state_dict())
    assert all(t.device.type == "meta" for t in meta.state_dict().values())


def test_restore_structure_follows_the_stored_original_of_masked_layers_without_bias():
    def masked(c: int, o: int) -> nn.ModuleDict:
        torch.manual_seed(c)
        layers = nn.ModuleDict({"fc": nn.Linear(c, o, bias=False), "conv": nn.Conv2d(c, o, 3, bias=False),
                                "up": nn.ConvTranspose2d(c, o, 2, bias=False)})
        for layer in layers.values():
            set_mask(layer, torch.rand_like(layer.weight) > 0.5)
        return layers

    big, small = masked(6, 5), masked(4, 3)
    state = small.state_dict()
    assert "fc.parametrizations.weight.original" in state and "fc.weight" not in state
    changed = restore_structure(big, state)
    assert set(changed) == {f"{n}.parametrizations.weight{i}" for n in small for i in ("", ".0")}  # original, mask
    for name, layer in small.items():
        assert _shape_attrs(big[name]) == _shape_attrs(layer), name
    big.load_state_dict(state)
    assert mask_shapes_ok(big)
    assert torch.equal(big["conv"].weight, small["conv"].weight)
    # a checkpoint's case: the fresh model has no masks yet (they are re-installed after the reshape)
    plain = nn.ModuleDict({"fc": nn.Linear(6, 5, bias=False), "conv": nn.Conv2d(6, 5, 3, bias=False),
                           "up": nn.ConvTranspose2d(6, 5, 2, bias=False)})
    assert set(restore_structure(plain, state)) == set(small)
    for name, layer in small.items():
        assert _shape_attrs(plain[name]) == _shape_attrs(layer), name
        assert plain[name].weight.shape == layer.weight.shape


def test_mask_shapes_ok_spots_a_mask_of_another_shape():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    for layer in model:
        set_mask(layer, torch.ones_like(layer.weight, dtype=torch.bool))
    assert mask_shapes_ok(model)
    model[1].parametrizations.weight[0].mask = torch.ones(2, 2, dtype=torch.bool)  # a mask the pruning forgot
    assert not mask_shapes_ok(model)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)


def test_group_norm_regularizer_is_depgraphs_gradient_on_the_prunable_groups():
    # conv0 (1 -> 3) feeds conv2 (3 -> 2), the output layer: one group per conv0 filter, holding that filter
    # and conv2's matching input channel. DepGraph (Fang et al. 2023, eq. 6): the gradient of
    # gamma_k ||w_k||^2 / 2 is gamma_k w_k, gamma_k = 2^(alpha (s_max - s_k) / (s_max - s_min)), 2^alpha = 16,
    # s_k the group's L2 norm; the output layer's own filters are never pruned, so never pushed to zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.ReLU(), nn.Conv2d(3, 2, 1, bias=False))
    x = torch.randn(2, 1, 4, 4)
    reg = SparsityRegularizer("group_norm", x, reg=1e-3)
    assert reg.calls == 0
    with pytest.raises(RuntimeError, match=r"build\(model\) must run first"):
        reg.regularize()
    reg.build(model)
    _zero_grads(model)
    reg.regularize()
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()  # (3, 1, 1, 1), (2, 3, 1, 1)
    s = (w0.pow(2).sum((1, 2, 3)) + w2.pow(2).sum((0, 2, 3))).sqrt()  # (3,)
    gamma = 16 ** ((s.max() - s) / (s.max() - s.min()))
    assert torch.allclose(model[0].weight.grad, 1e-3 * gamma.view(3, 1, 1, 1) * w0)
    assert torch.allclose(model[2].weight.grad, 1e-3 * gamma.view(1, 3, 1, 1) * w2)
    reg.regularize()
    assert reg.calls == 2
    # ignoring conv0 too leaves no prunable group: nothing to push
    reg = SparsityRegularizer("group_norm", x, ignore=["0"])
    reg.build(model)
    _zero_grads(model)
    reg.regularize()
    assert all(not p.grad.any() for p in model.parameters())


def test_bn_scale_regularizer_is_network_slimmings_l1_subgradient_at_the_default_strength():
    # Liu et al. 2017, eq. 1: lambda * |gamma| on every BN scale adds lambda * sign(gamma); lambda defaults to 1e-4
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0, -0.1]))
    reg = SparsityRegularizer("bn_scale", torch.randn(2, 1, 6, 6))
    reg.build(model)
    _zero_grads(model)
    reg.regularize()
    assert torch.equal(model[1].weight.grad, 1e-4 * torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert not model[0].weight.grad.any() and not model[4].weight.grad.any()


def test_regularizer_builds_on_the_model_a_lightning_module_wraps():
    inner = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    wrapper = nn.Module()
    wrapper.model = inner
    reg = SparsityRegularizer("group_norm", torch.randn(2, 4))
    reg.on_fit_start(None, wrapper)
    assert reg.model is inner
    reg.on_fit_start(None, inner)  # a bare module is the model itself
    assert reg.model is inner
    _zero_grads(inner)
    reg.on_after_backward(None, wrapper)
    assert reg.calls == 1 and inner[0].weight.grad.any()


def test_prune_result_reports_the_counts_before_and_after():
    from compress.pruning.structured import channel_counts, count_macs

    model, x = _build("lenet5"), _x("lenet5")
    macs0, params0 = count_macs(model, x)
    channels0 = channel_counts(model)
    result = prune_model(model, x, ratio=0.5, iterative_steps=2)
    macs1, params1 = count_macs(model, x)
    assert result.as_dict() == {
        "mac_speedup": macs0 / macs1, "macs_before": macs0, "macs_after": macs1, "params_before": params0,
        "params_after": params1, "channels_before": channels0, "channels": channel_counts(model),
        "speedup_history": result.history, "steps": 2, "self_check": result.self_check}
    assert 0.0 < result.self_check < 1e-4  # removal reorders fp32 sums, nothing more
    assert len(result.history) == 2 and result.history[-1] == pytest.approx(macs0 / macs1)


class _Heads(nn.Module):
    """Two classifier heads returned in a dict inside a tuple, and an auxiliary tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(6, 2)

    def forward(self, x: Tensor):
        h = self.body(x).relu()
        return ({"a": self.a(h), "b": self.b(h)}, [h.sum(1)])


class _Softmaxed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3)
        self.aux = nn.Linear(3, 7)

    def forward(self, x: Tensor) -> Tensor:
        h = self.head(self.body(x))
        self.aux(h)  # runs last, but its output is not the model's
        return h.softmax(1)  # body also gives (1, 3): the last layer run with the output's shape is the head


class _Pooled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.mid = nn.Conv2d(2, 2, 1)
        self.last = nn.Conv2d(2, 5, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.mid(self.conv(x))).mean((2, 3))  # no layer gives (1, 5): the last layer run


def test_output_layers_found_through_structures_activations_and_pooling():
    assert output_layers(_Heads(), torch.randn(2, 4)) == ["a", "b"]
    assert output_layers(_Softmaxed(), torch.randn(2, 4)) == ["head"]
    assert output_layers(_Pooled(), torch.randn(2, 1, 6, 6)) == ["last"]
    from compress.pruning.structured import channel_counts

    assert channel_counts(_Pooled()) == {"conv": 2, "mid": 2, "last": 5} and channel_counts(_Heads())["b"] == 2


def test_local_ratios_are_per_layer_and_a_global_ratio_is_one_threshold_over_all_channels():
    from compress.pruning.structured import channel_counts

    x = _x("lenet5")
    before = channel_counts(_build("lenet5"))  # features.0 20, features.3 50, fc1 500; fc_out is the output
    prunable = ("features.0", "features.3", "fc1")
    local = channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.3))
    assert {n: local[n] for n in prunable} == {n: round(0.7 * before[n]) for n in prunable}
    glob = channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.3, global_pruning=True))
    assert sum(glob[n] for n in prunable) == round(0.7 * sum(before[n] for n in prunable))
    assert len({glob[n] / before[n] for n in prunable}) > 1  # not 30% of each layer
    # the same holds for a MAC target: a local search shrinks every layer, a global one only the cheapest groups
    local = channel_counts(_pruned_by(_build("lenet5"), x, mac_speedup=1.3))
    glob = channel_counts(_pruned_by(_build("lenet5"), x, mac_speedup=1.3, global_pruning=True))
    assert all(local[n] < before[n] for n in prunable) and any(glob[n] == before[n] for n in prunable)
    # a global ratio above the cap: no layer loses much more than max_layer_ratio (one of 10 sub-steps at most)
    capped = channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.7, global_pruning=True, max_layer_ratio=0.5))
    assert all(capped[n] >= 0.4 * before[n] for n in prunable)


def _pruned_by(model: nn.Module, x: Tensor, **kwargs) -> nn.Module:
    prune_model(model, x, **kwargs)
    return model


def test_steps_report_their_own_speedup_and_reach_the_target_geometrically():
    from compress.pruning.structured import count_macs

    model, x = _build("lenet5"), _x("lenet5")
    base = count_macs(model, x)[0]
    seen = []
    result = prune_model(model, x, ratio=0.5, iterative_steps=3,
                         on_step=lambda m, step, steps: seen.append((step, steps, base / count_macs(m, x)[0])))
    assert [(s, n) for s, n, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert result.history == pytest.approx([r for _, _, r in seen]) and result.steps == 3
    assert seen[0][2] < seen[1][2] < seen[2][2]
    # mac_speedup in 3 steps: 8 ** (1/3) = 2 after the first, not 8/3
    seen.clear()
    model = _build("lenet5")
    prune_model(model, x, mac_speedup=8.0, iterative_steps=3, max_layer_ratio=0.95,
                on_step=lambda m, step, steps: seen.append(base / count_macs(m, x)[0]))
    assert 2.0 <= seen[0] < 8 / 3 and seen[-1] >= 8.0


def test_taylor_gradients_are_taken_once_per_step_and_required():
    model, x = _build("lenet5"), _x("lenet5")
    with pytest.raises(UserError, match=r"^prune\.importance: taylor needs training batches"):
        prune_model(model, x, importance="taylor", ratio=0.3)
    with pytest.raises(UserError, match=r"^prune\.mac_speedup: 1\.0 must be > 1"):
        prune_model(model, x, mac_speedup=1.0)
    calls = []

    def batches():
        calls.append(1)
        return [(x, torch.tensor([0, 1, 2, 3]))]

    prune_model(model, x, importance="taylor", mac_speedup=1.5, iterative_steps=2, gradient_batches=batches)
    assert len(calls) == 2  # Torch-Pruning prunes .grad with the weights: one backward pass per outer step
    assert all(p.grad is None for p in model.parameters())


def test_masked_layers_keep_exactly_their_non_zero_weights_after_channel_removal():
    model, x = _build("lenet5"), _x("lenet5")
    torch.manual_seed(3)
    set_mask(model.fc1, torch.rand_like(model.fc1.weight) > 0.5)
    prune_model(model, x, ratio=0.4, iterative_steps=2)
    w = model.fc1.parametrizations.weight.original
    assert torch.equal(get_mask(model.fc1), w != 0) and 0.3 < float((w != 0).float().mean()) < 0.7


def test_prune_model_arguments_defaults_and_mistakes():
    from compress.pruning.structured import channel_counts, count_macs, resolve_importance

    x = _x("lenet5")
    assert count_macs(_build("lenet5"), x) == count_macs(_build("lenet5"), x[:1])  # one sample's MACs
    result = prune_model(_build("lenet5"), x, ratio=0.3)
    assert result.steps == 1 and len(result.history) == 1  # one step unless asked
    # a ratio above max_layer_ratio (0.9 by default) acts as the cap
    assert channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.99)) == \
        channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.9))
    # a mapping for ratio is per-layer ratios; the output layer stays whole even when other layers are ignored
    counts = channel_counts(_pruned_by(_build("lenet5"), x, ratio={"features.0": 0.5}))
    assert counts == {"features.0": 10, "features.3": 50, "fc1": 500, "fc_out": 10}
    counts = channel_counts(_pruned_by(_build("lenet5"), x, ratio=0.5, ignore=["features.0"]))
    assert counts["features.0"] == 20 and counts["fc_out"] == 10 and counts["fc1"] == 250
    # a MAC target past half of every layer, in channel counts that are multiples of 4
    counts = channel_counts(_pruned_by(_build("lenet5"), x, mac_speedup=5.0, round_to=4))
    assert counts["features.0"] < 10 and all(c % 4 == 0 for n, c in counts.items() if n != "fc_out")
    # a global MAC search keeps to the cap too: 3x needs more than half of some layer
    with pytest.raises(UserError, match=r"^prune\.mac_speedup: reached only 2\.\d+x of 3\.0x \(max_layer_ratio 0\.5"):
        prune_model(_build("lenet5"), x, mac_speedup=3.0, global_pruning=True, max_layer_ratio=0.5)
    for kwargs, message in [({}, "prune: give either ratio/layer_ratios or mac_speedup"),
                            ({"ratio": 0.5, "mac_speedup": 2.0}, "prune: give either"),
                            ({"importance": "l3", "ratio": 0.5}, "prune.importance: unknown importance 'l3'"),
                            ({"ratio": 0.5, "ignore": ["nope"]}, "prune.ignore: 'nope' matches no layer"),
                            ({"layer_ratios": {"nope": 0.5}}, "prune.layer_ratios: 'nope' matches no layer"),
                            ({"layer_ratios": {"fc_*": 0.5}}, "prune.layer_ratios: 'fc_*' would prune the output layer "
                                                             "'fc_out'")]:
        with pytest.raises(UserError) as e:
            prune_model(_build("lenet5"), x, **kwargs)
        assert str(e.value).startswith(message), kwargs
    with pytest.raises(UserError) as e:
        resolve_importance("l3")
    assert str(e.value).startswith("importance: unknown importance 'l3'")


def test_global_taylor_ranks_every_sub_step_with_one_backward_pass():
    from compress.pruning.structured import channel_counts

    x = _x("lenet5")
    calls = []

    def batches():
        calls.append(1)
        return [(x, torch.tensor([0, 1, 2, 3]))]

    model = _build("lenet5")
    prune_model(model, x, importance="taylor", ratio=0.3, global_pruning=True, gradient_batches=batches)
    counts = channel_counts(model)
    assert len(calls) == 1  # the 10 sub-steps share the gradients Torch-Pruning prunes along with the weights
    assert counts["features.0"] + counts["features.3"] + counts["fc1"] == round(0.7 * 570)
    assert all(p.grad is None for p in model.parameters())
