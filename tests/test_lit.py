"""The Lightning system's optimizers and learning-rate schedules, checked against their update rules."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from compress.config import FinetuneConfig
from compress.lit.system import ClassificationSystem


def _system(epochs: int, schedule: str, optimizer: dict) -> ClassificationSystem:
    cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig),
                          {"epochs": epochs, "lr_schedule": schedule, "optimizer": optimizer})
    torch.manual_seed(0)
    return ClassificationSystem(torch.nn.Linear(4, 3), cfg)


def _one_step(system: ClassificationSystem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight before, its gradient, weight after) for one optimizer step on a fixed batch."""
    configured = system.configure_optimizers()
    opt = configured if isinstance(configured, torch.optim.Optimizer) else configured["optimizer"]
    w0 = system.model.weight.detach().clone()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = system.training_step((x, y), 0)
    opt.zero_grad()
    loss.backward()
    grad = system.model.weight.grad.detach().clone()
    opt.step()
    return w0, grad, system.model.weight.detach()


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_take_their_first_step_by_the_papers_rule(name):
    lr, wd, eps = 0.01, 0.1, 1e-8
    system = _system(2, "none", {"name": name, "lr": lr, "weight_decay": wd})
    w0, g, w1 = _one_step(system)
    if name == "adam":  # L2 in the gradient (Kingma & Ba): first bias-corrected step is lr * g / (|g| + eps)
        g = g + wd * w0
        expected = w0 - lr * g / (g.abs() + eps)
    else:  # decoupled decay (Loshchilov & Hutter): shrink the weight, then the same sign-like step
        expected = w0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
    assert torch.allclose(w1, expected, atol=1e-6)
    other = _one_step(_system(2, "none", {"name": "adamw" if name == "adam" else "adam", "lr": lr,
                                          "weight_decay": wd}))[2]
    assert not torch.allclose(w1, other, atol=1e-6)  # the two decays differ


def test_sgd_step_is_minus_lr_times_gradient_without_momentum_history():
    w0, g, w1 = _one_step(_system(2, "none", {"name": "sgd", "lr": 0.1, "momentum": 0.9}))
    assert torch.allclose(w1, w0 - 0.1 * g, atol=1e-7)  # first step: the momentum buffer is the gradient


def _lrs(system: ClassificationSystem, epochs: int) -> list[float]:
    configured = system.configure_optimizers()
    opt, sched = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    assert configured["lr_scheduler"]["interval"] == "epoch"
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_step_schedule_divides_the_lr_by_ten_at_half_and_three_quarters():
    assert _lrs(_system(8, "step", {"lr": 0.4}), 8) == pytest.approx([0.4] * 4 + [0.04] * 2 + [0.004] * 2)


def test_cosine_schedule_follows_half_a_cosine():
    import math

    assert _lrs(_system(4, "cosine", {"lr": 0.4}), 4) == pytest.approx(
        [0.4 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])


def test_no_schedule_keeps_the_lr():
    system = _system(5, "none", {"name": "adamw", "lr": 0.3})
    opt = system.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["lr"] == 0.3


def test_finetune_trains_on_the_objective_it_is_handed(synthetic_dm):
    """The caller builds the loss and hands it to fit (a task's loss later): it is what the steps minimise."""
    from compress.stages import Context

    class Shrink(torch.nn.Module):  # loss = mean squared logit: drives every output towards 0
        calls = 0

        def forward(self, model, x, y):
            self.calls += 1
            logits = model(x)
            loss = logits.pow(2).mean()
            return loss, logits, {"shrink": loss.detach()}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = synthetic_dm.test_tensors[0]
    before = float(model(x).pow(2).mean())
    objective = Shrink()
    cfg = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), {"epochs": 1, "optimizer": {"lr": 0.1}})
    metrics = Context(synthetic_dm, trainer={"progress_bar": False}).finetune(model, cfg, objective=objective)
    assert objective.calls == 256 // 32  # every training batch went through it, none through cross-entropy
    assert "finetune/loss_shrink_epoch" in metrics
    assert float(model(x).pow(2).mean()) < 0.5 * before
