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

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from compress.batches import repeat_to, take
from compress.config import FinetuneConfig
from compress.errors import UserError
from compress.plumbing.masks import prunable_layers
from compress.pruning.attention import HEAD_MODES, TorchMHA, find_attention, plan_heads
from compress.pruning.latency import check_latency_target, latency_backend, prune_to_latency, resolve_round_to
from compress.pruning.layers import check_drop_layers, drop_layers
from compress.pruning.structured import (
    IMPORTANCES,
    SparsityRegularizer,
    output_layers,
    prune_model,
    resolve_importance,
)
from compress.schema import check_choice, check_range, match_layers
from compress.stages.base import STAGES, Context, Stage, StageResult

__all__ = ["StructuredPruningStage", "StructuredConfig", "RegularizeConfig"]


@dataclass
class RegularizeConfig:
    """Sparsity-inducing training before pruning (off unless ``kind`` is set and epochs > 0)."""

    kind: str = "none"  # none | group_norm | bn_scale
    reg: float = 1e-4  # regularisation coefficient
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class StructuredConfig:
    importance: str = "l2"  # l1 | l2 | bn_scale | taylor | lamp | random | a name registered from Python
    ratio: float | None = None  # fraction of channels removed (per group; overall when global)
    layer_ratios: dict[str, float] = field(default_factory=dict)  # layer name/glob -> ratio (others: `ratio` or 0)
    mac_speedup: float | None = None  # instead of ratios: prune until base MACs / MACs reaches this
    global_pruning: bool = False  # recipe key `global`: rank channels of all layers together
    latency_speedup: float | None = None  # instead: prune until input latency / latency reaches this
    latency_on: str = "onnxruntime"  # where latency_speedup is taken: onnxruntime | torch | a hardware profile
    latency_batch: int | None = None  # batch size it is taken at (default: the pipeline's latency batch)
    latency_tolerance: float = 0.05  # a latency target counts as reached at target * (1 - this)
    iterative_steps: int = 1  # pruning steps, `finetune` after each
    round_to: int | str | None = "auto"  # channel counts multiples of this; auto: what the latency target rewards
    ignore: list[str] = field(default_factory=list)  # layers (names/globs) whose outputs are kept
    max_layer_ratio: float = 0.9  # no layer loses more than this fraction of its channels
    heads: str = "prune"  # attention: prune (whole heads) | dims (dims of every head) | keep (neither)
    drop_layers: list[str] = field(default_factory=list)  # whole blocks removed first: items of a ModuleList
    head_ratio: float | None = None  # heads: prune: fraction of each module's heads removed (default: its ratio)
    taylor_batches: int = 4  # training batches whose gradients the taylor importance uses
    search_steps: int = 200  # resolution of the mac_speedup search (fine pruning steps)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


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

    @classmethod
    def make_config(cls, values: Any, key: str = "") -> Any:
        """As :meth:`Stage.make_config`, with the recipe key ``global`` read as ``global_pruning``."""
        if isinstance(values, DictConfig) and not OmegaConf.is_readonly(values):
            values = OmegaConf.to_container(values, resolve=True)
        if isinstance(values, dict) and "global" in values:
            values = dict(values)
            if "global_pruning" in values:
                raise UserError(f"{key or cls.type_name}.global: give `global` or `global_pruning`, not both")
            values["global_pruning"] = values.pop("global")
        return super().make_config(values, key)

    # -- checks ----------------------------------------------------------------------------------
    def validate(self) -> None:
        c, key = self.config, self.key
        if self.importance_obj is None:
            IMPORTANCES.get(c.importance, f"{key}.importance")
        has_ratio = c.ratio is not None or bool(c.layer_ratios)
        given = [has_ratio, c.mac_speedup is not None, c.latency_speedup is not None]
        if sum(given) != 1:
            raise UserError(f"{key}: give either ratio/layer_ratios (fraction of channels) or mac_speedup or "
                            f"latency_speedup, {'not both' if sum(given) > 1 else 'one of them'}")
        if c.ratio is not None:
            check_range(c.ratio, f"{key}.ratio", 0.0, 1.0)
        for pattern, r in c.layer_ratios.items():
            check_range(r, f"{key}.layer_ratios.{pattern}", 0.0, 1.0)
        if c.mac_speedup is not None and not c.mac_speedup > 1.0:
            raise UserError(f"{key}.mac_speedup: {c.mac_speedup} must be > 1 (base MACs / pruned MACs)")
        if c.latency_speedup is not None:
            if not c.latency_speedup > 1.0:
                raise UserError(f"{key}.latency_speedup: {c.latency_speedup} must be > 1 (input latency / "
                                "pruned latency)")
            check_latency_target(c.latency_on, f"{key}.latency_on")
            if c.global_pruning:
                raise UserError(f"{key}.global: a latency_speedup target ranks layers by latency saved per "
                                "importance lost itself; leave global out")
            if c.latency_batch is not None and c.latency_batch < 1:
                raise UserError(f"{key}.latency_batch: {c.latency_batch} must be >= 1")
            check_range(c.latency_tolerance, f"{key}.latency_tolerance", 0.0, 0.5)
        if c.iterative_steps < 1:
            raise UserError(f"{key}.iterative_steps: {c.iterative_steps} must be >= 1")
        if isinstance(c.round_to, str) and c.round_to != "auto":
            raise UserError(f"{key}.round_to: '{c.round_to}' is not valid; give an integer, auto or null")
        if isinstance(c.round_to, int) and c.round_to < 1:
            raise UserError(f"{key}.round_to: {c.round_to} must be >= 1")
        check_range(c.max_layer_ratio, f"{key}.max_layer_ratio", 0.0, 1.0, lo_open=True)
        check_choice(c.heads, f"{key}.heads", HEAD_MODES)
        if c.head_ratio is not None:
            check_range(c.head_ratio, f"{key}.head_ratio", 0.0, 1.0)
            if c.heads != "prune" or c.ratio is None and not c.layer_ratios:
                raise UserError(f"{key}.head_ratio: only with heads: prune and ratio/layer_ratios (with a speedup "
                                "target, heads are removed in step with the channels)")
        if c.taylor_batches < 1:
            raise UserError(f"{key}.taylor_batches: {c.taylor_batches} must be >= 1")
        if c.search_steps < 2:
            raise UserError(f"{key}.search_steps: {c.search_steps} must be >= 2")
        check_choice(c.regularize.kind, f"{key}.regularize.kind", ("none",) + SparsityRegularizer.KINDS)
        if not c.regularize.reg > 0:
            raise UserError(f"{key}.regularize.reg: {c.regularize.reg} must be > 0")

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

    def plan(self, model: nn.Module) -> list[str]:
        """Layers whose output channels may be removed (coupled layers follow them), and attention modules.

        Without example inputs the output layer is taken to be the last conv/linear defined. What the
        attention modules cannot take is refused here, before the pipeline runs any stage.
        """
        dropped = check_drop_layers(model, list(self.config.drop_layers), f"{self.key}.drop_layers")
        layers = prunable_layers(model)
        names = list(layers)
        outputs = output_layers(model, self.example) if self.example is not None else names[-1:]
        ignored, touched = self._check_layers(model, outputs)
        c = self.config
        if c.latency_speedup is not None:
            self._attention_kept(model)
        else:
            ratio = min(c.ratio, c.max_layer_ratio) if c.ratio is not None else None
            plan_heads(model, c.heads, ratio=ratio, head_ratio=c.head_ratio, ignored=[layers[n] for n in ignored],
                       round_to=c.round_to if isinstance(c.round_to, int) else None,
                       max_layer_ratio=c.max_layer_ratio, global_pruning=c.global_pruning, key=self.key)
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
                                      on_step=on_step, gradient_batches=gradient_batches, loss_fn=ctx.task.loss, key=key)
        else:
            result = prune_model(model, x, importance=importance, ratio=c.ratio,
                                 layer_ratios=dict(c.layer_ratios) or None, mac_speedup=c.mac_speedup,
                                 global_pruning=c.global_pruning, iterative_steps=c.iterative_steps,
                                 round_to=resolve_round_to(c.round_to, None), ignore=ignore,
                                 max_layer_ratio=c.max_layer_ratio, heads=c.heads, head_ratio=c.head_ratio,
                                 on_step=on_step, gradient_batches=gradient_batches, search_steps=c.search_steps,
                                 loss_fn=ctx.task.loss, key=key)  # taylor: the gradients of the task's own loss
        info = result.as_dict()
        info.update(importance=c.importance if self.importance_obj is None else type(self.importance_obj).__name__,
                    output_layers=outputs, dropped_layers=dropped)
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
