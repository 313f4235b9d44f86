"""Stage ``prune.unstructured``: magnitude pruning with masks, one-shot or gradual.

Targets per layer (name or glob), per model (``sparsity``) layer-wise or with one global
threshold (``scope: global``), or Han et al.'s "quality x std" threshold (Learning both Weights
and Connections, 2015, section 3.3). Gradual schedules prune during fine-tuning: ``iterative``
(linear steps) or ``agp`` (Zhu & Gupta 2017, eq. 1: s_t = s_f + (s_i - s_f)(1 - t/n)^3).
Masks are parametrizations (compress.pruning.masks): pruned weights stay zero afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from compress.plumbing.masks import get_mask, set_mask, weight_layers
from compress.schema import match_layers
from compress.stage_configs import UnstructuredConfig
from compress.stages.base import STAGES, Context, Stage, StageResult, untouched_notes

__all__ = ["UnstructuredPruningStage", "agp_sparsity", "magnitude_masks", "std_masks", "GradualPruningCallback"]


def agp_sparsity(step: int, steps: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017) eq. 1 at pruning step ``step`` of ``steps`` (step 0: ``initial``)."""
    if steps <= 0:
        return final
    t = min(max(step, 0), steps) / steps
    return final + (initial - final) * (1.0 - t) ** 3


def linear_sparsity(step: int, steps: int, initial: float, final: float) -> float:
    if steps <= 0:
        return final
    return initial + (final - initial) * min(max(step, 0), steps) / steps


def _k_smallest_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean keep-mask with exactly ``k`` False entries at the smallest scores."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        keep[idx] = False
    return keep.view_as(scores)


def magnitude_masks(layers: dict[str, nn.Module], targets: dict[str, float], global_target: float | None) -> dict[str, Tensor]:
    """Keep-masks that zero the smallest |w|: per layer for ``targets``, and one threshold over the
    remaining layers for ``global_target`` (None: those layers are left alone)."""
    masks: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, s in targets.items():
            w = layers[name].weight.detach().abs()
            masks[name] = _k_smallest_mask(w, round(s * w.numel()))
        rest = [n for n in layers if n not in targets]
        if global_target is not None and rest:
            flat = torch.cat([layers[n].weight.detach().abs().flatten() for n in rest])
            keep = _k_smallest_mask(flat, round(global_target * flat.numel()))
            offset = 0
            for n in rest:
                w = layers[n].weight
                masks[n] = keep[offset: offset + w.numel()].view_as(w)
                offset += w.numel()
    return masks


def std_masks(layers: dict[str, nn.Module], quality: float) -> dict[str, Tensor]:
    """Han et al. 2015: prune |w| below ``quality`` x the layer's weight standard deviation."""
    with torch.no_grad():
        return {n: m.weight.detach().abs() >= quality * m.weight.detach().std() for n, m in layers.items()}


@STAGES.register("prune.unstructured")
class UnstructuredPruningStage(Stage):
    """``UnstructuredPruningStage(sparsity=0.8).apply(model)`` works on any ``nn.Module``."""

    Config = UnstructuredConfig
    type_name = "prune.unstructured"

    # -- which layers, which targets -------------------------------------------------------
    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        layers = weight_layers(model)
        if self.config.ignore:
            ignored = match_layers(list(layers), list(self.config.ignore), f"{self.key}.ignore")
            layers = {n: m for n, m in layers.items() if n not in ignored}
        return layers

    def _targets(self, layers: dict[str, nn.Module]) -> tuple[dict[str, float], float | None]:
        """Per-layer targets and the shared (global or default) target for the others."""
        c = self.config
        by_pattern = match_layers(list(layers), list(c.layers), f"{self.key}.layers") if c.layers else {}
        targets = {n: float(c.layers[p]) for n, p in by_pattern.items()}
        if c.scope == "layer" and c.sparsity is not None:
            targets.update({n: float(c.sparsity) for n in layers if n not in targets})
            return targets, None
        return targets, (float(c.sparsity) if c.sparsity is not None else None)

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        layers = self._layers(model)
        targets, shared = self._targets(layers)
        return [f"{n} -> {targets[n]:.2f}" if n in targets else f"{n} -> global {shared:.2f}"
                for n in layers if n in targets or shared is not None] if self.config.criterion == "magnitude" \
            else [f"{n} -> |w| < {self.config.quality} std" for n in layers]

    # -- the four verbs: prepare (masks), step (schedule), report, finalize -------------------
    def prune_to(self, model: nn.Module, step: int = 1, steps: int = 1) -> dict[str, float]:
        """Install masks for pruning step ``step`` of ``steps`` (``steps`` of ``steps``: the targets).

        Gradual schedules start from the sparsity each layer had when the stage began.
        """
        layers = self._layers(model)
        c = self.config
        if c.criterion == "std":
            masks = std_masks(layers, c.quality * step / steps)
        else:
            sched = agp_sparsity if c.schedule == "agp" else linear_sparsity
            start = getattr(self, "_start", {})
            targets, shared = self._targets(layers)
            per_layer = {n: sched(step, steps, start.get(n, 0.0), s) for n, s in targets.items()}
            glob = None if shared is None else sched(step, steps, start.get("*", 0.0), shared)
            masks = magnitude_masks(layers, per_layer, glob)
        for name, keep in masks.items():
            old = get_mask(layers[name])
            set_mask(layers[name], keep if old is None else keep & old)
        return self.report(model)

    def report(self, model: nn.Module) -> dict[str, float]:
        out = {}
        with torch.no_grad():
            for name, m in self._layers(model).items():
                out[name] = 1.0 - float(torch.count_nonzero(m.weight)) / m.weight.numel()
        return out

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        c = self.config
        self._start = self.report(model)
        rest = [m.weight for n, m in self._layers(model).items() if n not in self._targets(self._layers(model))[0]]
        if rest:
            self._start["*"] = 1.0 - sum(int(torch.count_nonzero(w)) for w in rest) / sum(w.numel() for w in rest)
        gradual = c.schedule != "oneshot" and c.finetune.epochs > 0
        if not gradual:
            self.prune_to(model)
            ctx.finetune(model, c.finetune, tag=self.name)
        else:
            steps = c.steps or max(1, round(c.ramp * c.finetune.epochs))
            # Step 1 happens before training starts, so the masks exist before Lightning wraps the
            # model (DDP registers its parameters then); later steps only change mask buffers.
            self.prune_to(model, 1, steps)
            callback = GradualPruningCallback(self, model, steps, c.ramp)
            callback.done = 1
            ctx.finetune(model, c.finetune, callbacks=[callback], tag=self.name)
            self.prune_to(model)  # the schedule ends exactly at the targets
        info: dict[str, Any] = {"layer_sparsity": self.report(model)}
        notes = untouched_notes(model, ctx, weight_layers(model))
        if notes:
            info["notes"] = notes
        return StageResult(model, info)


class GradualPruningCallback:
    """Raises the sparsity in ``steps`` steps over the first ``ramp`` of training (step 1 at the start).

    A plain object with Lightning's hook names: :func:`compress.lit.fit.fit` adapts it, so this module
    needs no Lightning.
    """

    def __init__(self, stage: UnstructuredPruningStage, model: nn.Module, steps: int, ramp: float):
        self.stage, self.model, self.steps, self.ramp = stage, model, steps, ramp
        self.done = 0

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state["done"])

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        per_epoch = max(1, int(trainer.num_training_batches))
        progress = (trainer.current_epoch + batch_idx / per_epoch) / max(1e-9, self.ramp * trainer.max_epochs)
        step = min(self.steps, int(progress * self.steps) + 1)
        if step > self.done:
            self.done = step
            self.stage.prune_to(self.model, step, self.steps)
