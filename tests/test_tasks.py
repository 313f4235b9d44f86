"""Tasks (compress/tasks): each built-in task's loss, metrics and distillation against hand values and
torchmetrics called directly; recipe overrides; the byte-level text data."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from compress.data import TextDataModule, build_datamodule
from compress.distill.losses import KDLoss, kd_loss
from compress.errors import UserError
from compress.tasks import DISTILL_FORMS, LOSSES, TASKS, Task, build_task, evaluate_model, label_targets
from compress.tasks.base import MetricSpec


def batches_of(outputs: torch.Tensor, targets: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(outputs as 'inputs', targets) batches; evaluated with predict = identity."""
    return [(outputs[i:i + size], targets[i:i + size]) for i in range(0, len(targets), size)]


def scores(task: Task, outputs: torch.Tensor, targets: torch.Tensor, size: int = 7) -> dict[str, float]:
    return task.evaluate(lambda x: x, batches_of(outputs, targets, size))


# -- classification -------------------------------------------------------------------------------

def test_classification_is_the_default_and_scores_as_before():
    torch.manual_seed(0)
    logits, y = torch.randn(30, 10), torch.randint(0, 10, (30,))
    task = build_task(None)
    assert task.name == "classification" and task.primary == "accuracy" and task.higher_is_better and task.has_classes
    s = scores(task, logits, y)
    top1 = (logits.argmax(1) == y).float().mean().item()
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert s["accuracy"] == s["metric"] == s["metrics/accuracy"] == pytest.approx(top1)
    assert s["metrics/top5"] == pytest.approx(top5) and 0 < top1 < top5 < 1
    assert s["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_classification_top5_only_with_five_classes_or_more():
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    assert "metrics/top5" not in scores(build_task({}), logits, y)


def test_classification_per_position_outputs():
    """(N, C, H, W) logits against (N, H, W) targets, as a segmenter's: every pixel is counted."""
    torch.manual_seed(1)
    logits, y = torch.randn(6, 3, 4, 4), torch.randint(0, 3, (6, 4, 4))
    s = scores(build_task({}), logits, y, size=4)
    assert s["accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
    rows = build_task({}).distill_rows(logits)
    assert rows.shape == (6 * 16, 3) and torch.equal(rows[1], logits[0, :, 0, 1])


def test_classification_distillation_is_hinton_kd_as_before():
    torch.manual_seed(2)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    got, parts = build_task({}).distill_loss(T=3.0, alpha=0.7)(s, t, y)
    want, want_parts = KDLoss(T=3.0, alpha=0.7)(s, t, y)
    assert torch.allclose(got, want) and torch.allclose(parts["soft"], want_parts["soft"])


# -- multilabel -----------------------------------------------------------------------------------

def test_label_targets_forms():
    idx = torch.tensor([0, 2])
    assert torch.equal(label_targets(idx, 4), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]))
    g = label_targets(torch.tensor([2.0]), 5, sigma=1.25)
    assert g[0, 2] == 1.0 and g[0, 1] == g[0, 3] == pytest.approx(math.exp(-1 / (2 * 1.25 ** 2)))
    assert g[0, 0] == pytest.approx(math.exp(-4 / (2 * 1.25 ** 2)))
    frac = label_targets(torch.tensor([1.5]), 4, sigma=1.0)  # an exact pitch between two bins
    assert frac[0, 1] == frac[0, 2] == pytest.approx(math.exp(-0.125))
    soft = torch.rand(3, 4)
    assert torch.equal(label_targets(soft, 4), soft)
    assert label_targets(torch.tensor([[1, 0, 1]]), 3).dtype == torch.float32


def test_multilabel_scores_against_torchmetrics():
    torch.manual_seed(3)
    logits, y = torch.randn(40, 6), (torch.rand(40, 6) > 0.6).long()
    task = build_task({"name": "multilabel"})
    s = scores(task, logits, y)
    p = torch.sigmoid(logits)
    assert s["metrics/f1"] == pytest.approx(MultilabelF1Score(num_labels=6, average="micro")(p, y).item())
    assert s["metric"] == s["metrics/map"] == pytest.approx(
        MultilabelAveragePrecision(num_labels=6, average="micro")(p, y).item())
    assert s["loss"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, y.float()).item(), rel=1e-5)
    assert "accuracy" not in s


def test_multilabel_probability_outputs_and_index_targets():
    """A sigmoid model (CREPE's form) judged on class indices with Gaussian targets for the loss."""
    torch.manual_seed(4)
    probs, idx = torch.rand(20, 8) * 0.98 + 0.01, torch.randint(0, 8, (20,))
    task = build_task({"name": "multilabel", "outputs": "probabilities", "label_smoothing_sigma": 1.0})
    target = label_targets(idx, 8, 1.0)
    assert task.loss(probs, idx).item() == pytest.approx(F.binary_cross_entropy(probs, target).item(), rel=1e-4)
    s = scores(task, probs, idx)
    one_hot = F.one_hot(idx, 8)
    assert s["metrics/map"] == pytest.approx(MultilabelAveragePrecision(num_labels=8, average="micro")(probs, one_hot).item())


def test_multilabel_distillation_signal_where_softmax_kl_is_flat():
    """Sigmoid outputs near 0 everywhere but one bin: the softmax over them is nearly flat (KL ~ 0),
    the softened sigmoids are not."""
    teacher = torch.full((4, 360), 0.001)
    teacher[:, 100] = 0.99
    student = torch.full((4, 360), 0.001)
    student[:, 200] = 0.99
    flat_kl = kd_loss(student, teacher, 1.0).item()
    task = build_task({"name": "multilabel", "outputs": "probabilities"})
    st = student.clone().requires_grad_(True)
    _, parts = task.distill_loss(T=2.0, alpha=1.0)(st, teacher, torch.zeros(4, dtype=torch.long))
    bce_floor = DISTILL_FORMS.get("bce")(task.distill_rows(teacher), task.distill_rows(teacher), 2.0).item()
    assert flat_kl < 0.01 and parts["soft"].item() - bce_floor > 5 * flat_kl
    mse = build_task({"name": "multilabel", "outputs": "probabilities", "distill": "mse"})
    _, parts = mse.distill_loss(T=2.0)(student, teacher, torch.zeros(4, dtype=torch.long))
    logit = torch.logit(torch.tensor([0.99, 0.001]))
    assert parts["soft"].item() == pytest.approx(2 * (logit[0] - logit[1]).item() ** 2 / 360, rel=1e-4)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"name": "multilabel", "outputs": "probs"}, r"task\.outputs: 'probs' is not valid.*probabilities"),
    ({"name": "multilabel", "label_smoothing_sigma": 0.0}, r"task\.label_smoothing_sigma: 0.0 must be > 0"),
    ({"name": "regression", "outputs": "logits"}, r"task\.outputs: unknown key 'outputs'"),
])
def test_task_keys_are_checked(cfg, match):
    with pytest.raises(UserError, match=match):
        build_task(cfg)


# -- regression -----------------------------------------------------------------------------------

def test_regression_scores_against_hand_values():
    torch.manual_seed(5)
    y = torch.randn(25)
    out = (y + 0.3 * torch.randn(25))[:, None]  # (N, 1) against (N,)
    task = build_task({"name": "regression"})
    assert task.primary == "mae" and not task.higher_is_better and not task.has_classes
    s = scores(task, out, y)
    err = out[:, 0] - y
    assert s["metric"] == pytest.approx(err.abs().mean().item(), rel=1e-5)
    assert s["metrics/r2"] == pytest.approx(1 - (err ** 2).sum().item() / ((y - y.mean()) ** 2).sum().item(), rel=1e-4)
    assert s["loss"] == pytest.approx((err ** 2).mean().item(), rel=1e-5)
    l1 = build_task({"name": "regression", "loss": "l1"})
    assert l1.loss(out, y).item() == pytest.approx(err.abs().mean().item(), rel=1e-6)
    assert task.drop(0.5, 0.7) == pytest.approx(0.2) and task.better(0.1, 0.2)


def test_regression_multi_output_and_mse_distillation():
    torch.manual_seed(6)
    y = torch.randn(10, 2, 3)
    out = y + 0.1
    s = scores(build_task({"name": "regression"}), out, y, size=10)
    assert s["metrics/mae"] == pytest.approx(0.1, rel=1e-4)
    s_out = torch.randn(4, 2)
    t_out = torch.randn(4, 2)
    _, parts = build_task({"name": "regression"}).distill_loss(T=4.0)(s_out, t_out, torch.randn(4, 2))
    assert parts["soft"].item() == pytest.approx(F.mse_loss(s_out, t_out).item())


# -- language model -------------------------------------------------------------------------------

def test_language_model_next_token_scores():
    torch.manual_seed(7)
    logits, ids = torch.randn(6, 9, 11), torch.randint(0, 11, (6, 9))
    task = build_task({"name": "language-model"})
    assert task.primary == "perplexity" and not task.higher_is_better
    s = scores(task, logits, ids, size=4)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert s["loss"] == pytest.approx(ce.item(), rel=1e-5)
    assert s["metric"] == pytest.approx(math.exp(ce.item()), rel=1e-4)
    assert s["metrics/accuracy"] == pytest.approx((logits[:, :-1].argmax(-1) == ids[:, 1:]).float().mean().item())


def test_language_model_padding_and_unshifted_targets():
    torch.manual_seed(8)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    padded = ids.clone()
    padded[:, 3:] = -100
    task = build_task({"name": "language-model"})
    want = F.cross_entropy(logits[:, :2].reshape(-1, 7), ids[:, 1:3].reshape(-1))
    assert task.loss(logits, padded).item() == pytest.approx(want.item(), rel=1e-6)
    s = scores(task, logits, padded)
    assert s["metric"] == pytest.approx(math.exp(want.item()), rel=1e-4)
    unshifted = build_task({"name": "language-model", "shift": False})
    assert unshifted.loss(logits, ids).item() == pytest.approx(
        F.cross_entropy(logits.reshape(-1, 7), ids.reshape(-1)).item(), rel=1e-6)


def test_language_model_distillation_is_token_level_kl():
    torch.manual_seed(9)
    s, t, ids = torch.randn(2, 4, 6), torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    _, parts = build_task({"name": "language-model"}).distill_loss(T=2.0)(s, t, ids)
    per_token = [kd_loss(s[b, i:i + 1], t[b, i:i + 1], 2.0) for b in range(2) for i in range(4)]
    assert parts["soft"].item() == pytest.approx(torch.stack(per_token).mean().item(), rel=1e-5)


# -- recipe overrides -----------------------------------------------------------------------------

def test_metrics_override_by_name_with_kwargs_and_width_filled():
    task = build_task({"name": "multilabel", "metrics": {"f1_macro": {"name": "MultilabelF1Score", "average": "macro"},
                                                        "hamming": "MultilabelHammingDistance"},
                       "primary": "f1_macro"})
    built = task.metrics(width=5)
    assert built["f1_macro"].num_labels == 5 and built["f1_macro"].average == "macro"
    assert task.higher_is_better  # from MultilabelF1Score.higher_is_better
    only_hamming = build_task({"name": "multilabel", "metrics": {"hamming": "MultilabelHammingDistance"}})
    assert only_hamming.primary == "hamming" and not only_hamming.higher_is_better


class BiasedMAE(torchmetrics.MeanAbsoluteError):
    """A user's metric class (imported by the recipe)."""


class Directionless(torchmetrics.SumMetric):
    higher_is_better = None


def half_l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * (outputs - targets).abs().mean()


def test_user_loss_and_metric_by_import():
    task = build_task({"name": "regression", "loss": "import:tests.test_tasks:half_l1",
                       "metrics": {"mine": "import:tests.test_tasks:BiasedMAE"}})
    y = torch.tensor([1.0, 2.0, 4.0])
    out = torch.tensor([[1.5], [2.0], [3.0]])
    assert task.loss(out, y).item() == pytest.approx(0.25)
    s = scores(task, out, y)
    assert s["metric"] == s["metrics/mine"] == pytest.approx(0.5) and task.primary == "mine"
    module_loss = build_task({"name": "regression", "loss": "import:torch.nn:L1Loss"})
    assert isinstance(module_loss.loss_fn, nn.L1Loss)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"name": "clasification"}, r"task\.name: unknown task 'clasification'.*did you mean 'classification'"),
    ({"name": 3}, r"task\.name: expected a task name"),
    ({"name": "import:tests.test_tasks:half_l1"}, r"task\.name: .* is not a compress.tasks.Task subclass"),
    ({"loss": "crossentropy"}, r"task\.loss: unknown loss 'crossentropy'.*did you mean 'cross_entropy'"),
    ({"loss": "import:math:pi"}, r"task\.loss: .import:math:pi. is not callable"),
    ({"distill": "kld"}, r"task\.distill: unknown distillation form 'kld'.*did you mean 'kl'"),
    ({"metrics": {}}, r"task\.metrics: no metric given"),
    ({"metrics": {"a": "MeanAbsoluteEror"}}, r"task\.metrics\.a: torchmetrics has no metric 'MeanAbsoluteEror'; did you "
                                             r"mean 'MeanAbsoluteError'"),
    ({"metrics": {"a": "Zzzzqqq"}}, r"task\.metrics\.a: torchmetrics has no metric 'Zzzzqqq'; give a class name"),
    ({"metrics": {"a": {"average": "macro"}}}, r"task\.metrics\.a\.name: required value is missing"),
    ({"metrics": {"a": 3}}, r"task\.metrics\.a: expected a torchmetrics class name"),
    ({"metrics": {"a": "import:tests.test_tasks:half_l1"}}, r"task\.metrics\.a: .* is not a torchmetrics.Metric class"),
    ({"metrics": {"a": "MeanAbsoluteError"}, "primary": "b"}, r"task\.primary: 'b' is not one of the task's metrics"),
    ({"metrics": {"a": "import:tests.test_tasks:Directionless"}}, r"task\.higher_is_better: the metric 'a' does not say"),
    ({"primary": "acc"}, r"task\.primary: 'acc' is not one of .*did you mean 'accuracy'"),
    ({"T": 2}, r"task\.T: unknown key 'T'"),
])
def test_bad_task_sections_are_one_line_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        build_task(cfg)


def test_direction_given_by_the_recipe_wins():
    task = build_task({"name": "regression", "metrics": {"s": "import:tests.test_tasks:Directionless"},
                       "higher_is_better": True})
    assert task.higher_is_better and task.drop(0.7, 0.5) == pytest.approx(0.2)


def test_distill_none_is_the_task_loss_alone():
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1, 2])
    loss, parts = build_task({"distill": "none"}).distill_loss(T=4.0, alpha=0.9)(s, t, y)
    assert loss.item() == pytest.approx(F.cross_entropy(s, y).item()) and parts["soft"].item() == 0.0
    for bad in ({"T": 0.0}, {"alpha": 1.5}):
        with pytest.raises(ValueError):
            build_task({}).distill_loss(**bad)


def test_registries_name_the_built_ins():
    assert TASKS.names() == ["classification", "language-model", "multilabel", "regression"]
    assert {"cross_entropy", "bce", "mse", "l1", "smooth_l1"} <= set(LOSSES.names())
    assert DISTILL_FORMS.names() == ["bce", "kl", "mse", "none"]
    assert LOSSES.get("smooth_l1")(torch.tensor([0.0]), torch.tensor([3.0])).item() == pytest.approx(2.5)


def test_a_task_without_default_metrics_asks_for_them():
    class Bare(Task):
        pass

    with pytest.raises(NotImplementedError, match="give task.metrics"):
        Bare({})
    bare = Bare({"metrics": {"m": "MeanSquaredError"}})
    assert bare.width(torch.zeros(2, 3)) is None and bare.distill_rows(torch.zeros(2, 3, 4)).shape == (2, 12)
    assert MetricSpec(torchmetrics.MeanSquaredError).build(None).__class__ is torchmetrics.MeanSquaredError


def test_evaluate_model_restores_the_mode_and_refuses_no_batches():
    model = nn.Linear(3, 4).train()
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))
    s = evaluate_model(build_task({}), model, [(x, y)])
    assert model.training and s["accuracy"] == pytest.approx((model(x).argmax(1) == y).float().mean().item())
    with pytest.raises(UserError, match="yielded no batches"):
        evaluate_model(build_task({}), model, [])
    assert evaluate_model(build_task({}), model, [(x, y), (x[:0], y[:0])], max_batches=1)["loss"] > 0


# -- text data ------------------------------------------------------------------------------------

def test_text_data_is_byte_windows(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(bytes(range(40)))
    b.write_text("héllo world, " * 3)
    dm = build_datamodule({"name": "text", "files": [str(a), str(b)], "seq_len": 8, "test_fraction": 0.25,
                           "batch_size": 4}, seed=1)
    stream = a.read_bytes() + b.read_bytes()
    n = len(stream) // 8
    x, y = next(iter(dm.test_dataloader()))
    assert isinstance(dm, TextDataModule) and dm.input_shape == (8,) and dm.vocab_size == 256
    assert torch.equal(x, y) and x.dtype == torch.int64
    assert x[0].tolist() == list(stream[(n - round(n * 0.25)) * 8:][:8])
    train = torch.cat([b[0] for b in dm.train_dataloader()])
    assert len(train) == n - round(n * 0.25) and sorted(map(tuple, train.tolist())) == sorted(
        tuple(stream[i * 8:(i + 1) * 8]) for i in range(len(train)))
    assert not hasattr(dm, "num_classes")
    limited = build_datamodule({"name": "text", "files": [str(a)], "seq_len": 4, "limit_train": 2})
    assert sum(len(b[0]) for b in limited.train_dataloader()) == 2


@pytest.mark.parametrize(("cfg", "match"), [
    ({"files": []}, r"data\.files: no text file given"),
    ({"files": ["MISSING"]}, r"data\.files\[0\]: MISSING is not a file"),
    ({"tokenizer": "gpt2"}, r"data\.tokenizer: 'gpt2' is not valid; valid: bytes"),
    ({"seq_len": 1}, r"data\.seq_len: 1 must be >= 2"),
    ({"batch_size": 0}, r"data\.batch_size: 0 must be >= 1"),
    ({"test_fraction": 1.0}, r"data\.test_fraction: 1.0 is outside"),
    ({"seq_len": 64}, r"data\.files: 1 windows of 64 bytes leave none to train on"),
])
def test_text_data_errors(tmp_path, cfg, match):
    f = tmp_path / "t.txt"
    f.write_bytes(b"x" * 100)
    with pytest.raises(UserError, match=match):
        build_datamodule({"name": "text", "files": [str(f)], **cfg}).setup()


def test_a_task_from_a_recipe_section_says_what_it_is():
    from omegaconf import OmegaConf

    task = build_task(OmegaConf.create({"name": "regression", "loss": "l1"}))
    assert repr(task) == "RegressionTask(primary=mae, higher_is_better=False)"
    assert repr(task.distill_loss(T=2.0, alpha=0.5)).endswith("(form=mse, T=2, alpha=0.5)")


@pytest.mark.parametrize("name", sorted(TASKS.names()))
def test_default_metric_directions_are_the_classes_own(name):
    """The directions written beside the default metrics (so a recipe loads without torchmetrics) are
    the metric classes' own ``higher_is_better``."""
    for spec in TASKS.get(name)({"name": name}).specs.values():
        assert spec.higher_is_better is not None and spec.higher_is_better == spec.metric_class.higher_is_better


def test_building_a_task_does_not_import_torchmetrics():
    import subprocess
    import sys

    code = ("import sys; from compress.tasks import build_task; build_task({'name': 'multilabel'}); "
            "print('torchmetrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# -- tones data -----------------------------------------------------------------------------------

def test_tones_are_pure_tones_at_their_fractional_bins():
    from compress.data.tones import bin_to_hz

    dm = build_datamodule({"name": "tones", "train_size": 16, "test_size": 4, "frame": 4096})
    x, y = dm.train_tensors
    assert x.shape == (16, 4096) and y.dtype == torch.float32 and dm.num_classes == 360
    assert ((40 <= y) & (y <= 300)).all() and (y != y.round()).all()  # exact pitches, between bins
    assert torch.allclose(x.mean(1), torch.zeros(16), atol=1e-5) and torch.allclose(x.std(1), torch.ones(16))
    peak_hz = torch.fft.rfft(x.double(), n=16 * 4096).abs().argmax(1) * 16000 / (16 * 4096)
    assert torch.allclose(peak_hz.float(), bin_to_hz(y), rtol=2e-3)
    assert bin_to_hz(torch.tensor(0.0)).item() == pytest.approx(31.70, abs=0.01)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"min_bin": 300, "max_bin": 40}, r"data.min_bin, data.max_bin: 300, 40; need 0 <= min_bin < max_bin <= 359"),
    ({"max_bin": 359, "sample_rate": 2000}, r"data.max_bin: 359 is above the Nyquist frequency"),
])
def test_tones_errors(cfg, match):
    with pytest.raises(UserError, match=match):
        build_datamodule({"name": "tones", "train_size": 4, "test_size": 2, **cfg}).setup()
