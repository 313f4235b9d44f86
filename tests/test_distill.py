"""Distillation: KD loss by hand, frozen teacher, hooks, adapters, errors, teachers, a real gain."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import compress.stages.distill  # noqa: F401  (registers the `distill` stage)
from compress.checkpoint import save_checkpoint
from compress.distill import (
    FEATURE_LOSSES,
    KD_LOSSES,
    ConvAdapter,
    DistillationObjective,
    HintLoss,
    KDLoss,
    LinearAdapter,
    build_objective,
    capture_outputs,
    check_teacher,
    kd_loss,
    make_adapter,
    resolve_teacher,
)
from compress.errors import UserError
from compress.models import build_model
from compress.stages.base import Context, DistillConfig, FeaturePairConfig

torch.set_num_threads(1)


class ConvNet(nn.Module):
    """conv(1->8) - relu - conv(8->16, stride 2) - relu - pool - fc: two conv feature maps to pair."""

    def __init__(self, c1: int = 8, c2: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- the KD loss ---------------------------------------------------------------------------------

def test_kd_loss_equals_hand_computation():
    s = [[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]]
    t = [[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    labels = [2, 0]
    T, alpha = 2.0, 0.7

    def softmax(row, temp):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kl = [sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(softmax(tr, T), softmax(sr, T), strict=True))
          for sr, tr in zip(s, t, strict=True)]
    soft = T * T * sum(kl) / len(kl)  # Hinton et al.: T^2 * KL, batch mean
    hard = sum(-math.log(softmax(sr, 1.0)[y]) for sr, y in zip(s, labels, strict=True)) / len(s)

    st, tt, yt = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), torch.tensor(labels)
    assert kd_loss(st, tt, T).item() == pytest.approx(soft, rel=1e-12)
    loss, parts = KDLoss(T=T, alpha=alpha)(st, tt, yt)
    assert parts["soft"].item() == pytest.approx(soft, rel=1e-12)
    assert parts["hard"].item() == pytest.approx(hard, rel=1e-12)
    assert loss.item() == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-12)
    # T^2 is really there: the unscaled KL at T=2 is a quarter of it
    assert kd_loss(st, tt, T).item() / 4 == pytest.approx(sum(kl) / len(kl), rel=1e-12)
    assert kd_loss(tt, tt, T).item() == pytest.approx(0.0, abs=1e-12)



def test_kd_loss_on_per_position_logits_softens_the_class_dim():
    """(B, K, L) logits (a class per token or pixel): softmax over K at each position, KL summed, mean over B."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g).double(), torch.randn(2, 3, 4, generator=g).double()
    T = 2.0

    def softmax(col):
        e = [math.exp(v / T) for v in col]
        return [v / sum(e) for v in e]

    kl = 0.0
    for b in range(2):
        for pos in range(4):
            p, q = softmax(t[b, :, pos].tolist()), softmax(s[b, :, pos].tolist())
            kl += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    assert kd_loss(s, t, T).item() == pytest.approx(T * T * kl / 2, rel=1e-12)


def test_kd_loss_defaults_and_ranges():
    assert KDLoss().extra_repr() == "T=4, alpha=0.9"  # Hinton et al.'s usual temperature, mostly soft targets
    for T, alpha in ((0.5, 0.0), (1.0, 1.0)):  # a sharpening T below 1; all hard or all soft
        assert KDLoss(T=T, alpha=alpha).extra_repr() == f"T={T:g}, alpha={alpha:g}"
    for T, alpha, match in ((0.0, 0.5, "T must be > 0"), (2.0, 1.5, r"alpha must be in \[0, 1\]"),
                            (2.0, -0.1, "alpha must be in")):
        with pytest.raises(ValueError, match=match):
            KDLoss(T=T, alpha=alpha)

# -- the teacher stays frozen, hooks go away -----------------------------------------------------

def test_gradients_do_not_reach_teacher_and_teacher_is_not_registered():
    torch.manual_seed(0)
    teacher, student = ConvNet(16, 32), ConvNet(8, 16)
    teacher.train()  # the objective must put it in eval mode
    before = copy.deepcopy(teacher.state_dict())
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    obj = DistillationObjective(student, teacher, T=4.0, alpha=0.5, features=[("conv2", "conv2", "hint", 1.0)],
                                example_inputs=x)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in obj.parameters()}
    assert not any(k.startswith("teacher") for k in obj.state_dict())
    opt = torch.optim.SGD([*student.parameters(), *obj.parameters()], lr=0.1)
    loss, logits, parts = obj(student, x, y)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in obj.parameters())  # the adapter trains
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert set(parts) == {"hard", "soft", "feat/conv2"}
    assert all(not v.requires_grad for v in parts.values())
    assert logits.shape == (4, 10)


def test_hooks_are_removed_after_use_and_on_errors():
    torch.manual_seed(0)
    teacher, student = ConvNet(16, 32), ConvNet(8, 16)
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    obj = DistillationObjective(student, teacher, features=[("conv1", "conv1", "hint", 1.0),
                                                            ("conv2", "conv2", "attention", 1.0)], example_inputs=x)
    assert all_hooks(student) == all_hooks(teacher) == 0
    obj(student, x, y)[0].backward()
    assert all_hooks(student) == all_hooks(teacher) == 0
    with pytest.raises(RuntimeError), capture_outputs(student, ["conv1", "conv2"]) as feats:
        student(x)
        assert set(feats) == {"conv1", "conv2"}
        assert all_hooks(student) == 2
        raise RuntimeError("boom")
    assert all_hooks(student) == 0 and feats == {}  # nothing outlives the block


def test_captured_output_is_the_module_output_not_the_inplace_relu():
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.randn(2, 1, 8, 8)
    with capture_outputs(net, ["conv1"]) as feats:
        net(x)
        assert torch.allclose(feats["conv1"], net.conv1(x))
        assert (feats["conv1"] < 0).any()


# -- adapters --------------------------------------------------------------------------------------

@pytest.mark.parametrize("s_shape, t_shape, kind, weight_shape", [
    ((2, 8, 6, 6), (2, 32, 6, 6), ConvAdapter, (32, 8, 1, 1)),  # conv, different widths
    ((2, 32, 8, 8), (2, 16, 4, 4), ConvAdapter, (16, 32, 1, 1)),  # conv + downsample
    ((2, 8, 4, 4), (2, 8, 7, 7), ConvAdapter, (8, 8, 1, 1)),  # conv + upsample
    ((2, 50), (2, 500), LinearAdapter, (500, 50)),  # vectors, different widths
    ((2, 5, 12), (2, 5, 24), LinearAdapter, (24, 12)),  # tokens
])
def test_adapters_have_the_right_shapes(s_shape, t_shape, kind, weight_shape):
    adapter = make_adapter(s_shape, t_shape)
    assert isinstance(adapter, kind)
    assert tuple(adapter.weight.shape if kind is LinearAdapter else adapter.conv.weight.shape) == weight_shape
    assert adapter(torch.randn(s_shape)).shape == t_shape


def test_adapters_start_as_identity_when_shapes_match():
    x, v = torch.randn(2, 8, 5, 5), torch.randn(3, 20)
    assert torch.allclose(make_adapter(x.shape, x.shape)(x), x)
    assert torch.allclose(make_adapter(v.shape, v.shape)(v), v)


def test_adapters_created_from_observed_shapes_in_the_objective():
    torch.manual_seed(0)
    student = build_model("lenet5", input_shape=(1, 8, 8), num_classes=10, conv_act=True, hidden=50)
    teacher = build_model("resnet", depth=8, input_shape=(1, 8, 8), num_classes=10, widths=(16, 32, 64))
    obj = DistillationObjective(student, teacher, features=[
        ("features.0", "layer3", "hint", 1.0),  # (B, 20, 8, 8) -> (B, 64, 2, 2)
        ("fc1", "pool", "hint", 1.0),  # (B, 50) -> (B, 64, 1, 1): cannot pair
    ][:1], example_inputs=torch.randn(2, 1, 8, 8))
    conv = obj.feature_losses[0].adapter
    assert tuple(conv.conv.weight.shape) == (64, 20, 1, 1) and conv.size == (2, 2)
    with pytest.raises(UserError, match=r"distill\.features\[0\]: cannot pair student features of shape \(2, 50\)"):
        DistillationObjective(student, teacher, features=[("fc1", "pool", "hint", 1.0)],
                              example_inputs=torch.randn(2, 1, 8, 8))
    with pytest.raises(UserError, match=r"attention transfer needs conv feature maps"):
        DistillationObjective(student, teacher, features=[("fc1", "layer3", "attention", 1.0)],
                              example_inputs=torch.randn(2, 1, 8, 8))


# -- user mistakes -------------------------------------------------------------------------------------

def test_bad_module_path_names_the_recipe_key(synthetic_dm):
    torch.manual_seed(0)
    student = ConvNet()
    ctx = Context(synthetic_dm, reference_model=ConvNet(16, 32))
    ctx.stage_index = 3  # the pipeline's index of stages[2]
    cfg = DistillConfig(teacher="self", features=[FeaturePairConfig(student="conv9", teacher="conv2")])
    with pytest.raises(UserError, match=r"^stages\[2\]\.finetune\.distill\.features\[0\]\.student: no module 'conv9' "
                                        r"in the student; did you mean 'conv2'\?"):
        build_objective(student, cfg, ctx)
    cfg = DistillConfig(teacher="self", features=[FeaturePairConfig(student="conv2", teacher="layer2")])
    with pytest.raises(UserError, match=r"features\[0\]\.teacher: no module 'layer2' in the teacher"):
        build_objective(student, cfg, ctx)
    cfg = DistillConfig(teacher="self", features=[FeaturePairConfig(student="conv2", teacher="conv2", kind="hnit")])
    with pytest.raises(UserError, match=r"features\[0\]\.kind: unknown feature distillation kind 'hnit'.*'hint'"):
        build_objective(student, cfg, ctx)


def test_cli_bad_module_path_exits_2_with_one_line(tmp_path, capsys):
    from compress.cli import main

    recipe = {"name": "t", "out_dir": str(tmp_path / "run"), "model": {"name": "lenet300"},
              "data": {"name": "digits"}, "logger": {"wandb": {"mode": "disabled"}},
              "stages": [{"type": "distill", "distill": {"teacher": "self",
                                                         "features": [{"student": "features.9", "teacher": "features.0"}]},
                          "finetune": {"epochs": 1}}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: stages[0].distill.features[0].student: no module 'features.9' in the student")


def test_distill_stage_rejects_bad_config():
    from compress.stages.distill import DistillStage

    with pytest.raises(UserError, match=r"stages\[1\]\.distill\.alpha: 1\.5 is outside"):
        DistillStage({"distill": {"alpha": 1.5}}, key="stages[1]")
    with pytest.raises(UserError, match=r"stages\[1\]\.distill\.features\[0\]\.kind: unknown"):
        DistillStage({"distill": {"features": [{"student": "a", "teacher": "b", "kind": "fitnet"}]}}, key="stages[1]")
    with pytest.raises(UserError, match=r"stages\[1\]\.distill\.tmeperature: unknown key"):
        DistillStage({"distill": {"tmeperature": 3}}, key="stages[1]")


# -- teachers ----------------------------------------------------------------------------------------------

def _spec(tmp_path: Path, name: str = "tiny", sha: str | None = None) -> Path:
    tdir = tmp_path / "teachers"
    tdir.mkdir(exist_ok=True)
    (tdir / f"{name}.yaml").write_text(yaml.safe_dump({
        "name": name, "model": {"name": "mlp", "hidden": [16]}, "data": "synthetic",
        "recipe": f"recipes/teachers/{name}.yaml", "checkpoint": f"runs/{name}/stage-1-train.ckpt",
        "sha256": sha, "accuracy": None}))
    return tdir


def test_named_teacher_missing_checkpoint_says_which_recipe_trains_it(tmp_path):
    tdir = _spec(tmp_path)
    ctx = Context(teachers_dir=tdir)
    with pytest.raises(UserError, match=r"^distill\.teacher: teacher 'tiny' is not trained yet .*"
                                        r"train it with `python run\.py recipes/teachers/tiny\.yaml`"):
        resolve_teacher("tiny", ctx, "distill.teacher")
    with pytest.raises(UserError, match=r"unknown teacher 'tiyn'.*did you mean 'tiny'"):
        resolve_teacher("tiyn", ctx, "distill.teacher")


def test_named_and_path_teachers_load_and_sha_is_checked(tmp_path):
    from compress.distill import record_teacher

    tdir = _spec(tmp_path)
    torch.manual_seed(0)
    model = build_model("mlp", hidden=[16], input_shape=(1, 8, 8), num_classes=10)
    ckpt = tdir / "runs" / "tiny" / "stage-1-train.ckpt"
    spec = {"name": "mlp", "kwargs": {"hidden": [16], "input_shape": [1, 8, 8], "num_classes": 10}}
    save_checkpoint(ckpt, model, model_spec=spec, metrics={"accuracy": 0.5})
    x = torch.randn(3, 1, 8, 8)
    for name in ("tiny", str(ckpt)):
        teacher = resolve_teacher(name, Context(teachers_dir=tdir))
        assert torch.allclose(teacher(x), model.eval()(x))
    recorded = record_teacher("tiny", tdir)
    assert recorded.accuracy == 0.5 and len(recorded.sha256) == 64
    assert check_teacher("tiny", tdir) == ckpt
    _spec(tmp_path, sha="0" * 64)
    with pytest.raises(UserError, match=r"does not match the sha256"):
        resolve_teacher("tiny", Context(teachers_dir=tdir))
    with pytest.raises(UserError, match=r"'self' is the model before compression"):
        resolve_teacher("self", Context())


def test_shipped_teacher_specs_and_recipes_are_valid():
    from compress.distill import load_teacher_spec
    from compress.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    specs = sorted((root / "teachers").glob("*.yaml"))
    assert specs
    for path in specs:
        spec = load_teacher_spec(path)
        recipe = load_recipe(root / spec.recipe)
        assert recipe.cfg.model.name == spec.model["name"]
        # the recipe's last stage checkpoint is where the spec points (train_teacher moves out_dir there)
        last = recipe.stages[-1]
        assert Path(spec.checkpoint).name == f"stage-{len(recipe.stages)}-{last.name}.ckpt"


# -- registries -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", FEATURE_LOSSES.names())
def test_every_feature_kind_runs_on_conv_pairs(kind):
    loss = FEATURE_LOSSES.get(kind)((2, 4, 8, 8), (2, 6, 4, 4), "k")
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    value = loss(s, torch.randn(2, 6, 4, 4))
    value.backward()
    assert value.dim() == 0 and s.grad is not None



def test_attention_transfer_by_hand():
    """Zagoruyko & Komodakis eq. 2 with p = 2, in plain Python: maps, average-pooled to the teacher's size,
    L2-normalised per sample, then the mean squared difference."""
    from compress.distill.losses import AttentionLoss, attention_map

    g = torch.Generator().manual_seed(0)
    student = torch.randint(-3, 4, (2, 2, 4, 4), generator=g).double()  # (B, C, H, W), 4x4 -> pooled to 2x2
    teacher = torch.randint(-3, 4, (2, 3, 2, 2), generator=g).double()
    assert attention_map(student).shape == (2, 1, 4, 4)
    s, t = student.tolist(), teacher.tolist()

    def normalise(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    for power in (2.0, 3.0):  # the paper's p = 2 by default; another p is applied to both sides
        total = 0.0
        for b in range(2):
            q_s = [sum(abs(s[b][c][2 * i + di][2 * j + dj]) ** power for c in range(2) for di in (0, 1)
                       for dj in (0, 1)) / 2 / 4 for i in range(2) for j in range(2)]
            q_t = [sum(abs(t[b][c][i][j]) ** power for c in range(3)) / 3 for i in range(2) for j in range(2)]
            total += sum((a - c) ** 2 for a, c in zip(normalise(q_s), normalise(q_t), strict=True))
        kwargs = {} if power == 2.0 else {"p": power}
        loss = AttentionLoss(student.shape, teacher.shape, "k", **kwargs)(student, teacher)
        assert float(loss) == pytest.approx(total / 8, rel=1e-12), power
    assert float(attention_map(student)[1, 0, 2, 3]) == pytest.approx((s[1][0][2][3] ** 2 + s[1][1][2][3] ** 2) / 2)
    # vectors have no spatial attention: the error says which side gave one
    for shapes, side in ((((2, 8), (2, 3, 4, 4)), "student"), (((2, 3, 4, 4), (2, 8)), "teacher")):
        with pytest.raises(UserError, match=rf"^k: attention transfer needs conv feature maps \(B, C, H, W\); "
                                            rf"the {side}'s module gives shape \(2, 8\)"):
            AttentionLoss(*shapes, "k")

@pytest.mark.parametrize("name", KD_LOSSES.names())
def test_every_logit_loss_runs(name):
    loss, parts = KD_LOSSES.get(name)(T=3.0, alpha=0.5)(torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert loss.dim() == 0 and {"hard", "soft"} <= set(parts)


def test_user_registered_feature_kind_is_used_by_name():
    class L1Hint(HintLoss):
        def forward(self, s, t):
            return F.l1_loss(self.adapter(s), t)

    FEATURE_LOSSES.register("test_l1", L1Hint)
    try:
        student, teacher = ConvNet(), ConvNet(16, 32)
        obj = DistillationObjective(student, teacher, features=[{"student": "conv2", "teacher": "conv2",
                                                                  "kind": "test_l1", "weight": 2.0}],
                                    example_inputs=torch.randn(2, 1, 8, 8))
        assert isinstance(obj.feature_losses[0], L1Hint)
        _, _, parts = obj(student, torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
        assert "feat/conv2" in parts
    finally:
        FEATURE_LOSSES._items.pop("test_l1")


# -- it works: a real gain, a plain loop, after channel removal, as a stage ---------------------------

def _task(n: int, seed: int, dim: int = 20, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=g)
    return x, (x @ w).argmax(1)


def _train(model, x, y, steps, objective=None, lr=0.01):
    params = [*model.parameters(), *(objective.parameters() if objective is not None else [])]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        if objective is not None:
            loss, _, _ = objective(model, x, y)
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


def test_distilled_student_beats_student_alone_in_a_plain_loop():
    """Teacher trained on 3000 samples; students see only 40 labelled ones (Hinton et al.'s point:
    soft targets carry far more information per example than hard labels)."""
    x_big, y_big = _task(3000, seed=1)
    x_few, y_few = _task(40, seed=2)
    x_test, y_test = _task(2000, seed=3)
    torch.manual_seed(0)
    teacher = _train(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)), x_big, y_big, 300)
    assert _accuracy(teacher, x_test, y_test) > 0.9

    def student():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))

    alone = _train(student(), x_few, y_few, 300)
    distilled = student()
    objective = DistillationObjective(distilled, teacher, T=4.0, alpha=0.9, features=[("0", "0", "hint", 0.1)],
                                      example_inputs=x_few)
    _train(distilled.train(), x_few, y_few, 300, objective)
    acc_alone, acc_distilled = _accuracy(alone, x_test, y_test), _accuracy(distilled, x_test, y_test)
    assert acc_distilled > acc_alone + 0.08, (acc_alone, acc_distilled)


def test_distillation_after_channel_removal_recovers_the_teacher():
    tp = pytest.importorskip("torch_pruning")
    x, _ = _task(256, seed=4, dim=64)
    x = x.view(-1, 1, 8, 8)
    torch.manual_seed(0)
    teacher = ConvNet(8, 16)
    y = teacher(x).argmax(1).detach()  # the teacher's own labels: a pruned copy can recover them
    student = copy.deepcopy(teacher)
    dg = tp.DependencyGraph().build_dependency(student, example_inputs=x[:1])
    dg.get_pruning_group(student.conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2, 3]).prune()
    dg.get_pruning_group(student.conv2, tp.prune_conv_out_channels, idxs=list(range(8))).prune()
    assert student.conv1.out_channels == 4 and student.conv2.out_channels == 8
    objective = DistillationObjective(student, teacher.eval(), T=2.0, alpha=1.0,
                                      features=[("conv1", "conv1", "hint", 1.0), ("conv2", "conv2", "attention", 1.0)],
                                      example_inputs=x[:2])
    assert tuple(objective.feature_losses[0].adapter.conv.weight.shape) == (8, 4, 1, 1)
    agree_before = (student(x).argmax(1) == y).float().mean().item()
    first = objective(student, x, y)[0].item()
    _train(student, x, y, 150, objective)
    last = objective(student, x, y)[0].item()
    agree_after = (student(x).argmax(1) == y).float().mean().item()
    assert last < 0.5 * first
    assert agree_after > max(agree_before, 0.8)
    assert all_hooks(student) == all_hooks(teacher) == 0


def test_distill_stage_trains_through_lightning_and_leaves_nothing_behind(synthetic_dm, tmp_path):
    from compress.stages.distill import DistillStage

    torch.manual_seed(0)
    model = ConvNet(8, 16)
    reference = copy.deepcopy(model).eval()
    keys = set(model.state_dict())
    ctx = Context(synthetic_dm, reference_model=reference, trainer={"progress_bar": False})
    stage = DistillStage({"distill": {"teacher": "self", "T": 2.0, "alpha": 0.5,
                                      "features": [{"student": "conv2", "teacher": "conv2"}]},
                          "finetune": {"epochs": 3, "optimizer": {"lr": 0.1}}}, key="stages[1]")
    assert stage.plan(model)[1] == "hint: student conv2 <- teacher conv2 (weight 1)"
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ce_before = float(F.cross_entropy(model.eval()(synthetic_dm.train_tensors[0]), synthetic_dm.train_tensors[1]))
    result = stage.apply(model, ctx)
    assert result.model is model and set(model.state_dict()) == keys  # no adapter left on the model
    tx, ty = synthetic_dm.train_tensors
    with torch.no_grad():
        ce_after = float(F.cross_entropy(model.eval()(tx), ty))
    assert ce_after < ce_before - 0.01  # three epochs half on the hard labels (alpha 0.5) lower the training loss
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())  # teacher untouched
    assert all_hooks(model) == all_hooks(reference) == 0
    assert {"finetune"} <= set(result.info) and result.info["teacher"] == "self"
    logged = result.info["finetune"]
    assert any("loss_soft" in k for k in logged) and any("loss_feat/conv2" in k for k in logged)


def test_captured_outputs_take_the_first_tensor_of_a_structured_output_and_are_cloned():
    """Modules returning tuples or dicts (RNNs, attention, Hugging Face blocks): the first tensor is the feature."""
    from compress.distill import capture_outputs

    class Pair(nn.Module):
        def forward(self, x):
            return (None, x * 2, x * 3)

    class Named(nn.Module):
        def forward(self, x):
            return {"mask": None, "hidden": x + 1}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair, self.named, self.act = Pair(), Named(), nn.ReLU(inplace=True)

        def forward(self, x):
            return self.act(self.named(self.pair(x)[1])["hidden"])

    x = torch.tensor([[-3.0, 1.0]])
    net = Net()
    with capture_outputs(net, ["pair", "named", "pair"]) as feats:
        net(x)
        assert torch.equal(feats["pair"], x * 2)
        assert torch.equal(feats["named"], x * 2 + 1)  # cloned: the in-place ReLU after it did not touch it
        assert set(feats) == {"pair", "named"}
    assert feats == {} and not net.pair._forward_hooks and not net.named._forward_hooks

    class Empty(nn.Module):
        def forward(self, x):
            return {"nothing": None}

    holder = nn.Sequential(Empty())
    with pytest.raises(TypeError, match="holds no tensor"), capture_outputs(holder, ["0"]):
        holder(x)
