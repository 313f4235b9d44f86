"""Stage ``prune.structured``: remove channels (filters) with Torch-Pruning's dependency graph.

The amount is a channel ``ratio`` (per group, or overall with ``global: true``), per-layer
``layer_ratios`` (names or globs), a target ``mac_speedup`` reached by pruning in small steps
(DepGraph's progressive pruning, Fang et al. 2023, section 4), or a target ``latency_speedup`` on
a runtime or hardware profile (``latency_on``) at ``latency_batch``, allocated per layer from
latency tables (:mod:`compress.pruning.latency`). ``iterative_steps`` > 1 prunes in
steps with ``finetune`` after each; ``regularize`` trains with a sparsity regulariser first
(group norm: DepGraph eq. 6; BN scale: Network Slimming, Liu et al. 2017, eq. 1).
The classifier's outputs are never pruned (the output layer is found by tracing).

Attention modules are found automatically (timm-style ``qkv`` + ``num_heads``; Hugging Face
``query``/``key``/``value`` or ``q_proj``/``k_proj``/``v_proj`` + ``num_attention_heads``;
``nn.MultiheadAttention``) and ``heads`` says what happens to them:

* ``prune`` (the default): whole heads go, the least important first; each module loses
  ``head_ratio`` of its heads (default: the ratio its projections get, i.e. ``ratio`` or their
  ``layer_ratios``), rounded to the nearest head, at least one kept; with ``mac_speedup`` heads
  follow the channel schedule; with ``global: true`` heads are ranked across modules. Each head
  keeps its width. ``nn.MultiheadAttention`` cannot lose whole heads (refused: use ``dims``).
* ``dims``: every head keeps, and loses the same dimensions, at the channel ratio.
* ``keep``: heads and head widths stay (the query/key/value projections' outputs are ignored).

In every mode the MLPs and the residual stream (the embedding width) are pruned at the channel
ratio like any other layer (``ignore`` the layers that write the stream to keep it). The modules'
attributes (``num_heads``, ``head_dim``, ``scale``; ``num_attention_heads``, ``attention_head_size``,
``all_head_size``, ``scaling``; ``embed_dim``, ...) follow every pruning step, are saved in the
checkpoint and restored on reload. A pruning the attention modules cannot take is refused before
the model is touched (a one-line error naming the key); a forward that fails on the new widths puts
the model back as it came in. ``latency_speedup`` takes only ``heads: keep``.

``round_to: auto`` (the default) aligns channel counts to the width the latency target rewards:
the profile's ``lanes`` (what the simulator's lane notes name), or the CPU's fp32 SIMD width for
``onnxruntime`` and ``torch`` (16 with AVX-512, else 8: their convolutions compute channels in
blocks of it). Where the tables say the target cannot be reached in those steps, ``auto`` tries
half the lanes for groups narrower than two lane blocks, then half the lanes everywhere
(:func:`compress.pruning.latency.auto_alignments`; ResNet's 16-channel first stage in ONNX Runtime).
Without a latency target, ``auto`` means no rounding, as before it existed.
``latency_batch`` defaults to the pipeline's latency batch (``eval.latency_batch_size``, else the
data batch size), which the pipeline puts on the :class:`Context`; from Python without one, the
data module's batch size, else 1.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from compress.calls import repeat_to, take
from compress.errors import UserError
from compress.plumbing.masks import prunable_layers
from compress.pruning.attention import HEAD_MODES, TorchMHA, find_attention, plan_heads
from compress.pruning.batchnorm import frozen_batchnorms, reestimate_batchnorm
from compress.pruning.latency import check_latency_target, latency_backend, prune_to_latency, resolve_round_to
from compress.pruning.layers import check_drop_layers, drop_layers
from compress.pruning.structured import (
    IMPORTANCES,
    SparsityRegularizer,
    faulty_groups,
    output_layers,
    prune_model,
    resolve_importance,
)
from compress.schema import check_choice, match_layers
from compress.stage_configs import RegularizeConfig, StructuredConfig
from compress.stages.base import STAGES, Context, Stage, StageResult, untouched_notes

__all__ = ["StructuredPruningStage", "StructuredConfig", "RegularizeConfig"]

CHECK_SAMPLES = 16  # test samples the self-check compares the pruned model's outputs on
BN_BATCHES = 8  # training batches BatchNorm statistics are re-estimated on after each pruning step


@STAGES.register("prune.structured")
class StructuredPruningStage(Stage):
    """``StructuredPruningStage(mac_speedup=2.0).apply(model, Context(dm))``.

    From Python, ``importance`` may also be a Torch-Pruning ``Importance`` object, and
    ``example_inputs`` a tensor for tracing when there is no data module.
    """

    Config = StructuredConfig
    type_name = "prune.structured"

    def __init__(self, config: Any = None, /, *, key: str = "", name: str = "", **kwargs: Any):
        self.importance_obj = None
        self.example = kwargs.pop("example_inputs", None)
        values = config if config is not None else kwargs
        if isinstance(values, dict) and not isinstance(values.get("importance", ""), str):
            values = dict(values)
            self.importance_obj = values.pop("importance")
        super().__init__(values, key=key, name=name)

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        c, key = self.config, self.key
        if self.importance_obj is None:
            IMPORTANCES.get(c.importance, f"{key}.importance")
        if c.latency_speedup is not None:
            check_latency_target(c.latency_on, f"{key}.latency_on")
        check_choice(c.heads, f"{key}.heads", HEAD_MODES)
        check_choice(c.regularize.kind, f"{key}.regularize.kind", ("none",) + SparsityRegularizer.KINDS)

    def _check_layers(self, model: nn.Module, outputs: list[str]) -> tuple[list[str], list[str]]:
        """(ignored, touched) layer names; dead globs and a ratio on the output layer are UserErrors."""
        c, key = self.config, self.key
        names = list(prunable_layers(model))
        ignored = set(outputs)
        if c.ignore:
            ignored |= set(match_layers(names, list(c.ignore), f"{key}.ignore"))
        if c.layer_ratios:
            hits = match_layers(names, list(c.layer_ratios), f"{key}.layer_ratios")
            for out in outputs:
                if out in hits:
                    raise UserError(f"{key}.layer_ratios.{hits[out]}: would prune the output layer '{out}' "
                                    "(its outputs are the classes; it is never pruned)")
            if c.ratio is None:
                return sorted(ignored), [n for n in names if n in hits and n not in ignored]
        return sorted(ignored), [n for n in names if n not in ignored]

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """Layers whose output channels may be removed (coupled layers follow them), and attention modules.

        Without example inputs the output layer is taken to be the last conv/linear defined. What the
        attention modules cannot take is refused here, before the pipeline runs any stage; with example
        inputs, so is a module whose forward needs the width it was traced with, and the groups
        Torch-Pruning would map wrongly are listed (the self-check leaves them out).
        """
        x = example_inputs if example_inputs is not None else self.example
        dropped = check_drop_layers(model, list(self.config.drop_layers), f"{self.key}.drop_layers")
        layers = prunable_layers(model)
        names = list(layers)
        outputs = output_layers(model, x) if x is not None else names[-1:]
        ignored, touched = self._check_layers(model, outputs)
        c = self.config
        if c.latency_speedup is not None:
            self._attention_kept(model)
            heads = plan_heads(model, "keep", key=self.key)
        else:
            ratio = min(c.ratio, c.max_layer_ratio) if c.ratio is not None else None
            heads = plan_heads(model, c.heads, ratio=ratio, head_ratio=c.head_ratio,
                               ignored=[layers[n] for n in ignored],
                               round_to=c.round_to if isinstance(c.round_to, int) else None,
                               max_layer_ratio=c.max_layer_ratio, global_pruning=c.global_pruning, key=self.key)
        notes = faulty_groups(model, x, skip=set(names) - set(touched), plan=heads, key=self.key)[1] \
            if x is not None else []
        return self._plan_lines(model, touched, dropped) + notes

    def _plan_lines(self, model: nn.Module, touched: list[str], dropped: dict[str, list[int]]) -> list[str]:
        c = self.config
        by_pattern = {n: c.layer_ratios[p] for p in c.layer_ratios for n in touched if n == p or fnmatchcase(n, p)}
        heads = [f"{a.name} -> heads: {c.heads} ({a.kind.label})" for a in find_attention(model)]
        heads += [f"{parent}.{i} -> dropped" for parent, indices in dropped.items() for i in indices]
        if c.mac_speedup is not None:
            return [f"{n} -> until {c.mac_speedup:g}x MACs" for n in touched] + heads
        if c.latency_speedup is not None:
            return [f"{n} -> until {c.latency_speedup:g}x latency on {c.latency_on}" for n in touched] + heads
        return [f"{n} -> {by_pattern.get(n, c.ratio):.2f} of channels" for n in touched] + heads

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        c, key = self.config, self.key
        dropped = drop_layers(model, list(c.drop_layers), f"{key}.drop_layers")  # whole blocks first
        x = self.example if self.example is not None else ctx.example_inputs(batch_size=2)
        # the self-check compares outputs on more real samples than the tracing batch holds
        checked = [self.example] if self.example is not None else [ctx.example_inputs(batch_size=CHECK_SAMPLES)]
        outputs = output_layers(model, x)
        ignored, _ = self._check_layers(model, outputs)
        importance = self.importance_obj if self.importance_obj is not None else \
            resolve_importance(c.importance, f"{key}.importance")

        if c.regularize.kind != "none" and c.regularize.finetune.epochs > 0:
            regularizer = SparsityRegularizer(c.regularize.kind, x, c.regularize.reg, ignore=ignored)
            ctx.finetune(model, c.regularize.finetune, callbacks=[regularizer], tag=f"{self.name}/regularize")

        gradient_batches = None
        if c.importance == "taylor" and self.importance_obj is None:
            if ctx.datamodule is None:
                raise UserError(f"{key}.importance: taylor needs training data: pass Context(datamodule=...)")
            gradient_batches = lambda: _first_batches(ctx.datamodule, c.taylor_batches)  # noqa: E731

        def on_step(m: nn.Module, step: int, steps: int) -> None:
            if ctx.datamodule is not None:  # the self-check has passed: statistics of what the model now is
                reestimate_batchnorm(m, ctx.training_inputs(BN_BATCHES))
            ctx.finetune(m, c.finetune, tag=self.name if steps == 1 else f"{self.name}/step{step}")

        torch.manual_seed(ctx.seed + 1000 * ctx.stage_index)  # random/taylor choices replay on resume
        ignore = [n for n in ignored if n not in outputs]
        if c.latency_speedup is not None:
            ignore += self._attention_kept(model)
            backend = latency_backend(c.latency_on, threads=ctx.latency_threads, key=f"{key}.latency_on")
            batch = self._latency_batch(ctx)
            xb = repeat_to(take(x, 1), batch) if ctx.datamodule is None else \
                ctx.example_inputs(batch_size=batch)
            result = prune_to_latency(model, x, xb, target=c.latency_speedup, backend=backend, importance=importance,
                                      iterative_steps=c.iterative_steps,
                                      round_to=c.round_to if c.round_to in ("auto", None) else int(c.round_to),
                                      ignore=ignore,
                                      max_layer_ratio=c.max_layer_ratio, tolerance=c.latency_tolerance,
                                      on_step=on_step, gradient_batches=gradient_batches, check_inputs=checked,
                                      loss_fn=ctx.task.loss, key=key)  # taylor: the gradients of the task's own loss
        else:
            result = prune_model(model, x, importance=importance, ratio=c.ratio,
                                 layer_ratios=dict(c.layer_ratios) or None, mac_speedup=c.mac_speedup,
                                 global_pruning=c.global_pruning, iterative_steps=c.iterative_steps,
                                 round_to=resolve_round_to(c.round_to, None), ignore=ignore,
                                 max_layer_ratio=c.max_layer_ratio, heads=c.heads, head_ratio=c.head_ratio,
                                 on_step=on_step, gradient_batches=gradient_batches, search_steps=c.search_steps,
                                 check_inputs=checked, loss_fn=ctx.task.loss, key=key)
        info = result.as_dict()
        info.update(importance=c.importance if self.importance_obj is None else type(self.importance_obj).__name__,
                    output_layers=outputs, dropped_layers=dropped)
        # Torch-Pruning narrows an nn.MultiheadAttention's in_proj_weight with the channels it reads
        touched = [*prunable_layers(model), *(n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention))]
        notes = info.get("notes", []) + untouched_notes(model, ctx, touched, x)
        frozen = frozen_batchnorms(model)
        if frozen:
            notes.append(f"BatchNorm {', '.join(repr(n) for n in frozen[:3])}{' and more' if len(frozen) > 3 else ''} "
                         "has momentum 0: its running statistics never update in fine-tuning"
                         + (" (re-estimated once after pruning)" if ctx.datamodule is not None else ""))
        if notes:
            info["notes"] = notes
        return StageResult(model, info)

    def _attention_kept(self, model: nn.Module) -> list[str]:
        """A latency target's tables know no heads: the attention projections are left alone (heads: keep)."""
        found = find_attention(model)
        if not found:
            return []
        key = self.key
        if self.config.heads != "keep":
            raise UserError(f"{key}.heads: latency_speedup prunes by per-layer latency tables, which know no attention "
                            f"heads ('{found[0].name}'); set heads: keep, or use ratio or mac_speedup")
        plan = plan_heads(model, "keep", key=key)
        names = {m: n for n, m in model.named_modules()}
        mha = [a.name for a in plan.kept if isinstance(a.kind, TorchMHA)]
        if mha:
            raise UserError(f"{key}.latency_speedup: nn.MultiheadAttention '{mha[0]}' cannot be left out of a latency "
                            "target; use ratio or mac_speedup")
        return [names[p] for p in plan.ignored_layers()]

    def _latency_batch(self, ctx: Context) -> int:
        """``latency_batch``, else the pipeline's latency batch, else the data batch size, else 1."""
        if self.config.latency_batch is not None:
            return int(self.config.latency_batch)
        if ctx.latency_batch is not None:
            return int(ctx.latency_batch)
        config = getattr(ctx.datamodule, "config", None)
        return int(getattr(config, "batch_size", 1) or 1)


def _first_batches(datamodule: Any, n: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``n`` training batches (gradients for the taylor importance)."""
    datamodule.setup("fit")
    out = []
    for xb, yb in datamodule.train_dataloader():
        if len(out) >= n:
            break
        out.append((xb, yb))
    return out
