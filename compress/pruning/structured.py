"""Structured pruning that removes channels, on Torch-Pruning's dependency graph.

Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) traces the
model, groups every coupled parameter (a conv's filters, the next layer's input channels, the
BatchNorm between them, both sides of a residual add or a concatenation, depthwise groups) and
removes whole groups, so the tensors really get smaller. This module is a thin adapter over it:

* :data:`IMPORTANCES`: the group importance criteria by name (accept a name or an object);
* :func:`prune_model`: prune in place by a channel ratio (overall or per layer) or until a target
  MAC speedup is reached, one-shot or in steps with a callback (fine-tuning) between them;
* :class:`SparsityRegularizer`: sparsity-inducing training before pruning (DepGraph's group-norm
  regulariser, or Network Slimming's L1 on BN scales) as a Lightning callback;
* :func:`restore_structure`: give a freshly built model the layer shapes stored in a state_dict,
  so the checkpoint of a pruned model loads in a new process with ``weights_only=True``.

Attention modules are found and checked by :mod:`compress.pruning.attention` (``heads``: whole
heads, head dimensions, or neither); their attributes follow every pruning step. A pruning that
fails part-way (an attention module whose forward cannot take the new widths) leaves the model as
it came in. Inputs and outputs of any form (a mapping of tensors, a Hugging Face ``ModelOutput``)
go through :mod:`compress.batches`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.calls import call, eval_mode, forward, take
from compress.errors import UserError
from compress.plumbing.masks import get_mask, make_permanent, masked_modules, prunable_layers, set_mask
from compress.plumbing.restorers import RESTORERS, Restorer
from compress.pruning.attention import HeadPlan, HeadPruner, attention_state, plan_heads
from compress.pruning.selfcheck import (
    TOLERANCE,
    StepCheck,
    check_batches,
    failing_module,
    leave_out_faults,
    relative_error,
    zeroed,
)
from compress.registry import Registry
from compress.schema import match_layers

__all__ = ["IMPORTANCES", "resolve_importance", "PruneResult", "prune_model", "count_macs", "output_layers", "trace_logits",
           "channel_counts", "SparsityRegularizer", "restore_structure", "mask_shapes_ok", "faulty_groups", "check_heads", "StepLoop",
           "needs_gradients", "accumulate_gradients", "clear_grads", "next_search_step", "SEARCH_JUMP", "SEARCH_FINE"]

# ---------------------------------------------------------------------------------------------
# Importance criteria: factories returning a Torch-Pruning ``Importance`` (callable on a group).
# ---------------------------------------------------------------------------------------------
IMPORTANCES: Registry[Callable[[], Any]] = Registry("importance")


@IMPORTANCES.register("l1")
def l1_importance() -> tp.importance.Importance:
    """Group L1 norm of every coupled weight (Li et al. 2017, "Pruning Filters for Efficient ConvNets")."""
    return tp.importance.GroupMagnitudeImportance(p=1)


@IMPORTANCES.register("l2")
def l2_importance() -> tp.importance.Importance:
    """Group L2 norm (DepGraph, eq. 4): the squared norms of all coupled parameters, averaged."""
    return tp.importance.GroupMagnitudeImportance(p=2)


@IMPORTANCES.register("bn_scale")
def bn_scale_importance() -> tp.importance.Importance:
    """|gamma| of the BatchNorms in the group (Liu et al. 2017, "Network Slimming", section 3.1)."""
    return tp.importance.BNScaleImportance()


@IMPORTANCES.register("taylor")
def taylor_importance() -> tp.importance.Importance:
    """First-order Taylor |w * dL/dw| summed per channel (Molchanov et al. 2019, eq. 8); needs gradients."""
    return tp.importance.GroupTaylorImportance()


@IMPORTANCES.register("lamp")
def lamp_importance() -> tp.importance.Importance:
    """Layer-adaptive magnitude scores (Lee et al. 2021, "LAMP", eq. 2), comparable across layers."""
    return tp.importance.LAMPImportance()


@IMPORTANCES.register("random")
def random_importance() -> tp.importance.Importance:
    """Uniformly random scores: the baseline every criterion should beat."""
    return tp.importance.RandomImportance()


def resolve_importance(importance: Any, key: str = "importance") -> Any:
    """A registered name (instantiated), an ``Importance`` class (instantiated) or a ready callable."""
    if isinstance(importance, str):
        return IMPORTANCES.get(importance, key)()
    if isinstance(importance, type):
        return importance()
    if not callable(importance):
        raise UserError(f"{key}: expected an importance name or a callable on a group, got {type(importance).__name__}")
    return importance


def needs_gradients(importance: Any) -> bool:
    """Whether ``importance`` reads gradients (Taylor, Hessian): the MAC and latency searches feed it batches."""
    return isinstance(importance, (tp.importance.GroupTaylorImportance, tp.importance.GroupHessianImportance))


# ---------------------------------------------------------------------------------------------
# Model facts: MACs, the output layer, channel counts, name matching
# ---------------------------------------------------------------------------------------------
def count_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(MACs, params) for one forward of the first sample of ``example_inputs``, by Torch-Pruning's op counter."""
    was_training = model.training
    with contextlib.redirect_stdout(io.StringIO()):  # its "no positional inputs, assuming batch size 1" for kwargs
        macs, params = tp.utils.count_ops_and_params(model, take(example_inputs, 1))
    model.train(was_training)
    return int(macs), int(params)


def output_layers(model: nn.Module, example_inputs: Any) -> list[str]:
    """Names of the conv/linear layers whose outputs are the model's outputs (the classifier).

    Found by tracing: a layer whose output tensor *is* one of the model's outputs; failing that
    (a softmax or reshape after it), the last layer run whose output has the output's shape.
    """
    layers = prunable_layers(model)
    seen: list[tuple[str, Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append((n, o))) for n, m in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            out = call(model, take(example_inputs, 1))
    finally:
        for h in handles:
            h.remove()
    outs = [t for t in _flatten(out) if isinstance(t, Tensor)]
    names = [n for n, o in seen if isinstance(o, Tensor) and any(o is t for t in outs)]
    if not names:
        shapes = {tuple(t.shape) for t in outs}
        names = [n for n, o in reversed(seen) if isinstance(o, Tensor) and tuple(o.shape) in shapes][:1]
    if not names and seen:
        names = [seen[-1][0]]
    return sorted(set(names))


def trace_logits(model: nn.Module, inputs: Any) -> Tensor:
    """Torch-Pruning's ``forward_fn``: the graph is traced from the logits, whatever the input and output forms."""
    return forward(model, inputs)


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [x for o in obj for x in _flatten(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in _flatten(o)]
    return [obj]


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (conv) or features (linear) of every prunable layer."""
    return {n: int(getattr(m, "out_channels", getattr(m, "out_features", 0))) for n, m in prunable_layers(model).items()}


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """What :func:`prune_model` did."""

    base_macs: int
    macs: int
    base_params: int
    params: int
    channels_before: dict[str, int]
    channels_after: dict[str, int]
    history: list[float] = field(default_factory=list)  # mac speedup after each fine pruning step
    steps: int = 0  # outer steps (callbacks run)
    heads_before: dict[str, int] = field(default_factory=dict)  # attention module -> heads
    heads_after: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # layers the self-check left out, and why
    self_check: float = 0.0  # largest relative output error of a step against the zeroed original

    @property
    def mac_speedup(self) -> float:
        return self.base_macs / max(1, self.macs)

    def as_dict(self) -> dict[str, Any]:
        out = {"mac_speedup": self.mac_speedup, "macs_before": self.base_macs, "macs_after": self.macs,
               "params_before": self.base_params, "params_after": self.params,
               "channels_before": self.channels_before, "channels": self.channels_after,
               "speedup_history": self.history, "steps": self.steps}
        if self.heads_before:
            out.update(heads_before=self.heads_before, heads=self.heads_after)
        out["self_check"] = self.self_check
        if self.notes:
            out["notes"] = list(self.notes)
        return out


GLOBAL_SUBSTEPS = 10  # pruning sub-steps per step of a global ratio (keeps max_layer_ratio)

StepCallback = Callable[[nn.Module, int, int], None]  # (model, step (1-based), steps)


def prune_model(model: nn.Module, example_inputs: Any, *, importance: Any = "l2",
                ratio: float | Mapping[str, float] | None = None, layer_ratios: Mapping[str, float] | None = None,
                mac_speedup: float | None = None,
                global_pruning: bool = False, iterative_steps: int = 1, round_to: int | None = None,
                ignore: Sequence[str] = (), max_layer_ratio: float = 0.9,
                heads: str = "prune", head_ratio: float | None = None,
                on_step: StepCallback | None = None,
                gradient_batches: Callable[[], Iterable[tuple[Any, Tensor]]] | Iterable | None = None,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                search_steps: int = 200, check_inputs: Sequence[Any] | None = None, key: str = "prune") -> PruneResult:
    """Remove channels from ``model`` in place.

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace; masked (parametrized) layers are baked
            before tracing and get masks ``weight != 0`` back afterwards.
        example_inputs: a batch for tracing and MAC counting (a tensor, or a mapping/tuple of
            tensors: :mod:`compress.batches`).
        importance: a name in :data:`IMPORTANCES` or a Torch-Pruning ``Importance``.
        ratio: fraction of channels removed per group (local) or overall (``global_pruning``); a
            mapping is taken as ``layer_ratios`` (the other layers are then untouched).
        layer_ratios: ``{layer name or glob: ratio}``, overriding ``ratio`` for those layers.
        mac_speedup: instead of ``ratio``: prune in small steps until base MACs / MACs reaches it.
        global_pruning: rank all groups together (one threshold) instead of layer by layer.
        iterative_steps: reach the target in this many steps, calling ``on_step`` after each.
        round_to: keep channel counts multiples of this (hardware lanes).
        ignore: layer names/globs whose output channels are kept; the output layer always is.
        max_layer_ratio: no layer loses more than this fraction of its channels (nor a module of its heads).
        heads: attention modules lose whole heads (``prune``), dimensions of every head (``dims``) or
            neither (``keep``): :mod:`compress.pruning.attention`.
        head_ratio: ``heads: prune``: fraction of each module's heads removed (default: the ratio its
            projections get; with ``mac_speedup`` heads follow the channel schedule).
        on_step: ``on_step(model, step, steps)`` after each step (the stage fine-tunes there).
        gradient_batches: ``(x, y)`` batches (or a function returning them) for ``taylor``.
        loss_fn: loss whose gradients ``taylor`` uses.
        search_steps: fine pruning steps a ``mac_speedup`` search may take (its resolution).
        check_inputs: batches the self-check (:mod:`compress.pruning.selfcheck`) runs on (default:
            ``example_inputs``); groups it finds mapped wrongly are left out (``PruneResult.notes``).
        key: recipe path for error messages.

    Raises:
        UserError: a mistake in the arguments, a pruning the attention modules or a module's forward cannot
            take (before the model is touched), a failed self-check (the model put back as it came in).
    """
    imp = resolve_importance(importance, f"{key}.importance")
    if isinstance(ratio, Mapping):
        ratio, layer_ratios = None, {**ratio, **(layer_ratios or {})}
    _check_arguments(imp, ratio, layer_ratios, mac_speedup, iterative_steps, gradient_batches, heads, head_ratio, key)
    layers = prunable_layers(model)
    ignored, ratio_dict, default_ratio = _ratio_targets(model, example_inputs, layers, ratio, layer_ratios, ignore,
                                                        clamp=None if mac_speedup is not None or global_pruning else
                                                        max_layer_ratio, key=key)
    plan = plan_heads(model, heads, ratio=default_ratio if mac_speedup is None else None, layer_ratios=ratio_dict,
                      head_ratio=head_ratio, ignored=[layers[n] for n in ignored], round_to=round_to,
                      max_layer_ratio=max_layer_ratio, global_pruning=global_pruning, key=key)
    batches = check_batches(example_inputs, check_inputs)
    untouched = {n for n, m in layers.items() if ratio is None and mac_speedup is None and m not in ratio_dict}
    extra, notes = faulty_groups(model, example_inputs, skip=ignored | untouched, plan=plan, check_inputs=batches,
                                 key=key)
    ignored |= set(extra)

    snapshot = copy.deepcopy(model)  # put back if a step fails part-way
    masked, was_training, loop = list(masked_modules(model)), model.training, None
    try:
        make_permanent(model)  # Torch-Pruning edits .weight tensors; a parametrization would hide them
        loop = StepLoop(model, example_inputs, batches, on_step=on_step, masked=masked, key=key, target=mac_speedup)
        before = channel_counts(model)
        model.eval()  # tracing must not update BatchNorm statistics
        common = dict(importance=imp, global_pruning=global_pruning, max_pruning_ratio=max_layer_ratio,
                      round_to=round_to, ignored_layers=[layers[n] for n in ignored] + plan.ignored_layers(),
                      forward_fn=trace_logits, **plan.pruner_kwargs())
        step = partial(_pruner_step, model=model, imp=imp, loss_fn=loss_fn, plan=plan, example_inputs=example_inputs,
                       key=key)
        if mac_speedup is None:
            sub = GLOBAL_SUBSTEPS if global_pruning else 1
            pruner = _head_pruner(model, example_inputs, pruning_ratio=default_ratio,
                                  pruning_ratio_dict={**ratio_dict, **plan.gates()} or None,
                                  iterative_steps=iterative_steps * sub, **common)
            for k in range(1, iterative_steps + 1):
                check = loop.begin()
                for i in range(sub):
                    step(pruner, gradient_batches=gradient_batches if i == 0 else None, keep_grads=i < sub - 1,
                         check=check)
                loop.measure()
                loop.finish(k, iterative_steps)
        else:
            pruner = _head_pruner(model, example_inputs, pruning_ratio=max_layer_ratio,
                                  pruning_ratio_dict=plan.gates() or None, iterative_steps=search_steps, **common)
            name = importance if isinstance(importance, str) else type(importance).__name__  # not an object's repr
            why = f"max_layer_ratio {max_layer_ratio}, ignored layers or importance '{name}'"
            _mac_search(loop, pruner, step, mac_speedup, iterative_steps, search_steps, gradient_batches, why)
    except BaseException:
        if loop is None or not loop.in_callback:
            _put_back(model, snapshot)
        raise
    finally:
        clear_grads(model)
        model.train(was_training)
    macs, params = count_macs(model, example_inputs)
    return PruneResult(loop.base_macs, macs, loop.base_params, params, before, channel_counts(model), loop.history,
                       iterative_steps, plan.heads_before, plan.heads(), notes + loop.notes(), max(loop.checks))


def _mac_search(loop: StepLoop, pruner: Any, step: Callable, mac_speedup: float, steps: int, search_steps: int,
                gradient_batches: Any, why: str) -> None:
    """Pruning steps until each outer step's MAC target (``mac_speedup ** (k / steps)``: an equal factor per
    step) is met, ``search_steps`` fine steps of the schedule at most.

    Each step jumps most of the way along the schedule to where the target is predicted
    (:func:`next_search_step`) and the last ones are fine, so the target is met within one fine step, as
    by fine steps alone, with a few importance rankings, forwards and MAC counts instead of one per step.
    """
    reached = [(pruner.current_step, loop.ratio)]
    for k in range(1, steps + 1):
        target = mac_speedup ** (k / steps)
        check, grads = loop.begin(), gradient_batches
        while loop.ratio < target - 1e-9:
            if pruner.current_step >= search_steps:
                raise UserError(f"{loop.key}.mac_speedup: reached only {loop.ratio:.3f}x of {mac_speedup}x ({why} "
                                "leave too few prunable channels)")
            # Torch-Pruning's step s prunes every layer to the schedule's ratio of step s (of its initial channels)
            pruner.current_step = next_search_step(pruner.per_step_pruning_ratio, reached, target, search_steps) - 1
            step(pruner, gradient_batches=grads, keep_grads=True, check=check)
            grads = None  # Torch-Pruning prunes .grad along with the weights: taken once per step
            reached.append((pruner.current_step, loop.measure()))
        clear_grads(loop.model)
        loop.finish(k, steps)


SEARCH_JUMP = 0.8  # fraction of the predicted steps to a MAC target taken at once
SEARCH_FINE = 3  # within this many predicted steps of the target, the search takes single steps


def next_search_step(schedule: Sequence[float], reached: Sequence[tuple[int, float]], target: float,
                     last: int) -> int:
    """The step of a channel-ratio ``schedule`` a MAC search prunes to next: most of the way to the target.

    Removing a fraction r of every layer's input and output channels leaves (1 - r)^2 of its MACs, so
    ``u = sqrt(1 / MAC ratio)`` falls about linearly in r (layers left whole or pruned on one side only
    make it fall slower): along the line from the start through the point reached, or through the last two
    points reached, whichever meets the target sooner. Where it does, the target is predicted;
    :data:`SEARCH_JUMP` of the way there is taken, and single steps within :data:`SEARCH_FINE` of it, so
    the search stops at the first step of the schedule that reaches the target, as one fine step at a time
    would.

    Args:
        schedule: the cumulative channel ratio after each step (index 0: before any).
        reached: ``(step, MAC ratio)`` of the steps taken so far, the last one now (``(0, 1.0)`` first).
        target: the MAC ratio wanted.
        last: the last step the search may take.
    """
    step, ratio = reached[-1]
    u_goal, r1, u1 = target ** -0.5, schedule[step], ratio ** -0.5

    def goal(r0: float, u0: float) -> int:  # where the line through (r0, u0) and (r1, u1) meets the target
        slope = (u0 - u1) / (r1 - r0) if r1 > r0 and u0 > u1 else 1.0  # fall of u per unit of channel ratio
        return next((s for s in range(step + 1, last + 1) if u1 - slope * (schedule[s] - r1) <= u_goal), last)

    # the nearer of two predictions: from the start (0, 1), and from the point before (a single step's small or
    # uneven change, channel counts being whole, would otherwise send a line far past the target)
    near = min([goal(0.0, 1.0)] + [goal(schedule[s0], r0 ** -0.5) for s0, r0 in reached[-2:-1]])
    jump = 1 if near - step <= SEARCH_FINE else int(SEARCH_JUMP * (near - step))
    return min(last, step + jump)


def _check_arguments(imp: Any, ratio: Any, layer_ratios: Any, mac_speedup: float | None, iterative_steps: int,
                     gradient_batches: Any, heads: str, head_ratio: float | None, key: str) -> None:
    if (ratio is None and not layer_ratios) == (mac_speedup is None):
        raise UserError(f"{key}: give either ratio/layer_ratios or mac_speedup")
    if mac_speedup is not None and not mac_speedup > 1.0:
        raise UserError(f"{key}.mac_speedup: {mac_speedup} must be > 1")
    if iterative_steps < 1:
        raise UserError(f"{key}.iterative_steps: {iterative_steps} must be >= 1")
    if needs_gradients(imp) and gradient_batches is None:
        raise UserError(f"{key}.importance: taylor needs training batches (run the stage with data)")
    if head_ratio is not None and (heads != "prune" or mac_speedup is not None):
        raise UserError(f"{key}.head_ratio: only with heads: prune and a ratio (with mac_speedup, heads are "
                        "removed in step with the channels)")


def _ratio_targets(model: nn.Module, example_inputs: Any, layers: dict[str, nn.Module], ratio: float | None,
                   layer_ratios: Mapping[str, float] | None, ignore: Sequence[str], clamp: float | None,
                   key: str) -> tuple[set[str], dict[nn.Module, float], float]:
    """(ignored layer names, per-layer ratios by module, the default ratio); ``clamp``: the local cap."""
    outputs = output_layers(model, example_inputs)
    ignored = set(outputs)
    if ignore:
        ignored |= set(match_layers(list(layers), list(ignore), f"{key}.ignore"))
    ratio_dict: dict[nn.Module, float] = {}
    default_ratio = float(ratio) if ratio is not None else 0.0
    if layer_ratios:
        hits = match_layers(list(layers), list(layer_ratios), f"{key}.layer_ratios")
        bad = sorted(set(hits) & set(outputs))
        if bad:
            raise UserError(f"{key}.layer_ratios: '{hits[bad[0]]}' would prune the output layer '{bad[0]}' "
                            "(its outputs are the classes; it is never pruned)")
        for name, pattern in hits.items():
            if name not in ignored:
                ratio_dict[layers[name]] = float(layer_ratios[pattern])
    if clamp is not None:
        # Torch-Pruning checks max_pruning_ratio only before a step, so one big step could overshoot
        # it: local ratios are clamped; a global ranking goes in sub-steps (overshoot <= one sub-step).
        default_ratio = min(default_ratio, clamp)
        ratio_dict = {m: min(r, clamp) for m, r in ratio_dict.items()}
    return ignored, ratio_dict, default_ratio


class StepLoop:
    """The outer pruning steps every search shares (a ratio, a MAC target, a latency target).

    ``begin`` a step for a :class:`~compress.pruning.selfcheck.StepCheck` that records its removals,
    ``measure`` the MAC ratio after each fine step (kept in ``history``, shown on a progress line on a
    terminal), ``finish`` it: the self-check against the zeroed original, then the masks back and
    ``on_step`` (fine-tuning), which never sees a model that computes something else.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, batches: list[Any], *, on_step: StepCallback | None,
                 masked: list[str], key: str = "prune", target: float | None = None, what: str = "MACs"):
        self.model, self.example_inputs, self.batches, self.key = model, example_inputs, batches, key
        self.on_step, self.masked, self.target, self.what = on_step, masked, target, what
        self.was_training = model.training
        self.base_macs, self.base_params = count_macs(model, example_inputs)
        self.history: list[float] = []
        self.checks: list[float] = [0.0]
        self.uncompared: dict[str, None] = {}
        self.in_callback = False
        self.check: StepCheck | None = None

    @property
    def ratio(self) -> float:
        return self.history[-1] if self.history else 1.0

    def begin(self) -> StepCheck:
        self.check = StepCheck(self.model, self.batches, self.key)
        return self.check

    def measure(self) -> float:
        """Base MACs / MACs now, appended to ``history``."""
        self.history.append(self.base_macs / max(1, count_macs(self.model, self.example_inputs)[0]))
        if self.what == "MACs":  # a latency search shows its measured speedup instead
            self.progress(self.history[-1])
        return self.history[-1]

    def progress(self, value: float) -> None:
        """One line, rewritten in place, on a terminal: the ratio reached (and the target)."""
        if sys.stderr.isatty():
            of = f" of {self.target:g}x" if self.target else ""
            sys.stderr.write(f"\r{self.key}: {value:.3f}x {self.what}{of}   ")
            sys.stderr.flush()

    def finish(self, step: int, steps: int) -> None:
        """Check the step before anything changes the weights, then re-mask and call ``on_step``."""
        assert self.check is not None
        self.checks.append(self.check.verify(self.model, _scales(self.model)))
        self.uncompared.update(dict.fromkeys(self.check.log.uncompared))
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        self.in_callback = True
        _after_step(self.model, self.masked, self.on_step, step, steps, self.was_training)
        self.in_callback = False

    def notes(self) -> list[str]:
        return [f"self-check: nn.MultiheadAttention '{n}' narrows its heads inside, which has no zeroed reference: "
                "its outputs were run, not compared" for n in self.uncompared]


def _scales(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What the zeroed reference takes over from every attention module: its float attributes (the softmax scale,
    which follows narrowed heads), and timm's ``fused_attn`` off: ``scaled_dot_product_attention`` ignores ``scale``
    and takes its own from the width it is given, which the reference's zeroed head dims still have."""
    out: dict[str, dict[str, Any]] = {}
    for n, values in attention_state(model).items():
        out[n] = {a: v for a, v in values.items() if isinstance(v, float)}
        if isinstance(getattr(model.get_submodule(n), "fused_attn", None), bool):
            out[n]["fused_attn"] = False
    return out


def faulty_groups(model: nn.Module, example_inputs: Any, *, skip: Iterable[str], plan: HeadPlan,
                  check_inputs: Sequence[Any] | None = None, key: str = "prune") -> tuple[list[str], list[str]]:
    """The layers to leave out because Torch-Pruning maps their channels wrongly, and a note for each.

    Every group rooted outside ``skip`` (ignored and untouched layers) is probed on a copy
    (:func:`compress.pruning.selfcheck.probe`); attention projections have their own check (:func:`check_heads`).

    Raises:
        UserError: a module whose forward needs the width it was traced with, named with what to do.
    """
    layers = prunable_layers(model)
    projections = {id(p) for a in plan.found for p in a.projections}
    names = {id(m): n for n, m in model.named_modules()}
    kept = {names[id(m)] for m in plan.ignored_layers() if id(m) in names}  # kept attention (nn.MultiheadAttention)
    skip = set(skip) | kept | {n for n, m in layers.items() if id(m) in projections}
    kwargs = {k: v for k, v in plan.pruner_kwargs().items() if k in ("out_channel_groups", "in_channel_groups")}
    batches = check_batches(example_inputs, check_inputs)
    found = leave_out_faults(model, example_inputs, batches, ignored=sorted(skip),
                             prunable=[n for n in layers if n not in skip], pruner_kwargs=kwargs,
                             forward_fn=trace_logits, key=key)
    # after the channels: a forward that needs the stream's width is refused naming the channels, which
    # heads: keep would not help
    check_heads(model, example_inputs, plan, batches, key=key)
    return found


PROBE_HEAD_RATIO = 0.5  # the share of each module's heads (or head width) :func:`check_heads` removes on its copy


def check_heads(model: nn.Module, example_inputs: Any, plan: HeadPlan, batches: Sequence[Any],
                key: str = "prune") -> None:
    """Before any work: the attention modules ``plan`` prunes lose heads (or head dims) on a copy of ``model``.

    One pruning step as the stage takes it (:class:`HeadPruner` with the plan's arguments, the modules'
    attributes updated after it), the other layers left alone (the channel probe checks those); then one
    forward, and the outputs compared with the original whose removed heads are zeroed. So a module whose
    forward reads a width pruning does not update (timm 1.0's ``attn_dim`` before it was known) is refused
    at ``--dry-run``, not after a whole search. ``nn.MultiheadAttention`` is pruned only with the stream
    around it, which the channel probe runs.

    Raises:
        UserError: one line naming the module and ``heads: keep``.
    """
    work = make_permanent(copy.deepcopy(model)).eval()
    heads = plan.on_copy(work, PROBE_HEAD_RATIO)
    if not heads.pruned:
        return
    projections = {id(p) for a in heads.pruned for p in a.projections}
    others = [m for m in prunable_layers(work).values() if id(m) not in projections]
    check = StepCheck(work, batches, key)
    imp = l2_importance()
    pruner = _head_pruner(work, example_inputs, importance=imp, pruning_ratio=PROBE_HEAD_RATIO,
                          pruning_ratio_dict={p: PROBE_HEAD_RATIO for a in heads.pruned for p in a.projections},
                          iterative_steps=1, ignored_layers=others + heads.ignored_layers(), forward_fn=trace_logits,
                          **heads.pruner_kwargs())
    _pruner_step(pruner, model=work, imp=imp, gradient_batches=None, loss_fn=F.cross_entropy, plan=heads,
                 example_inputs=example_inputs, key=key, check=check, done="found on a copy before any work")
    with zeroed(check.base, check.log, _scales(work)):
        err = relative_error(work, check.base, check.batches)
    if not err <= TOLERANCE:
        names = {id(p): a.name for a in heads.pruned for p in a.projections}
        roots = {id(m) for n, m in work.named_modules() if n in check.log.roots}
        where = next((names[i] for i in names if i in roots), heads.pruned[0].name)
        raise UserError(f"{key}.heads: removing {'heads' if plan.mode == 'prune' else 'head dims'} of '{where}' "
                        f"({heads.pruned[0].kind.label}) changes what the model computes (outputs differ by {err:.2g} "
                        "of their scale from the original with them zeroed; found on a copy before any work); use "
                        f"heads: {'keep' if plan.mode == 'prune' else 'prune or keep'}")


def _head_pruner(model: nn.Module, example_inputs: Any, **kwargs: Any) -> HeadPruner:
    with warnings.catch_warnings():
        # A ViT's cls_token/pos_embed: Torch-Pruning prunes their last dimension, the embedding, as it should.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return HeadPruner(model, example_inputs, **kwargs)


def _put_back(model: nn.Module, snapshot: nn.Module) -> None:
    """Make ``model`` the copy taken before pruning (its submodules are the copy's from now on)."""
    model.__dict__.clear()
    model.__dict__.update(snapshot.__dict__)


def _pruner_step(pruner: Any, *, model: nn.Module, imp: Any, gradient_batches: Any, loss_fn: Callable,
                 keep_grads: bool = False, plan: HeadPlan | None = None, example_inputs: Any = None,
                 key: str = "prune", check: StepCheck | None = None,
                 done: str = "the model was put back unpruned") -> None:
    if needs_gradients(imp) and gradient_batches is not None:
        accumulate_gradients(model, gradient_batches, loss_fn)
    for group in pruner.step(interactive=True):
        if check is not None:
            check.record(group)
        group.prune()
    if plan is not None and plan.found:
        plan.update(pruner)  # before anything runs the model again
        _check_attention(model, plan, example_inputs, key, done)
    elif check is not None:
        check.runs(model)
    if not keep_grads:
        clear_grads(model)


def _check_attention(model: nn.Module, plan: HeadPlan, example_inputs: Any, key: str,
                     done: str = "the model was put back unpruned") -> None:
    """After a step: every attention module's widths agree with its attributes, and the model runs."""
    problems = plan.problems()
    if problems:
        raise UserError(f"{key}.heads: pruning left {problems[0]} ({done})")
    with torch.no_grad():
        failed = failing_module(model, lambda: forward(model, take(example_inputs, 1)))
    if failed is not None:
        where, e = failed
        kind = next((a.kind.label for a in plan.found if a.name == where), type(model.get_submodule(where)).__name__)
        message = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        hint = "heads: keep leaves its heads alone" if plan.mode != "keep" else \
            "its forward may need its input width: ignore the layers that write it"
        raise UserError(f"{key}.heads: after pruning, '{where}' ({kind}) fails in its forward ({message}); "
                        f"{done}; {hint}")


def _after_step(model: nn.Module, masked: list[str], on_step: StepCallback | None, step: int, steps: int,
                was_training: bool) -> None:
    """Re-install masks (so fine-tuning keeps the zeros), run the callback, bake them again."""
    _reinstall_masks(model, masked)
    if on_step is not None:
        model.train(was_training)
        on_step(model, step, steps)
        model.eval()
    if step < steps:
        make_permanent(model)


def accumulate_gradients(model: nn.Module, batches: Any, loss_fn: Callable) -> None:
    """Gradients of ``loss_fn`` summed over ``batches`` (Taylor importance reads ``.grad``)."""
    clear_grads(model)
    batches = batches() if callable(batches) else batches
    with torch.enable_grad():
        for x, y in batches:
            loss_fn(forward(model, x), y).backward()


def clear_grads(model: nn.Module) -> None:
    """Drop every parameter's ``.grad`` (gradients of one pruning step never leak into the next)."""
    for p in model.parameters():
        p.grad = None


def _reinstall_masks(model: nn.Module, names: list[str]) -> None:
    for name in names:
        module = model.get_submodule(name)
        with torch.no_grad():
            set_mask(module, module.weight != 0)


# ---------------------------------------------------------------------------------------------
# Sparsity-inducing training before pruning
# ---------------------------------------------------------------------------------------------
class SparsityRegularizer:
    """Adds a sparsity gradient after every backward pass, so pruning later removes little.

    ``kind="group_norm"``: DepGraph's group regulariser (Fang et al. 2023, eq. 6), through
    ``tp.pruner.GroupNormPruner.regularize``; ``kind="bn_scale"``: L1 on BatchNorm scales (Network
    Slimming, Liu et al. 2017, eq. 1), through ``tp.pruner.BNScalePruner.regularize``. The pruner is
    built on the trained module at fit start (so it follows the copy a strategy may make).
    """

    KINDS = ("group_norm", "bn_scale")

    def __init__(self, kind: str, example_inputs: Tensor, reg: float = 1e-4, ignore: Sequence[str] = (),
                 model: nn.Module | None = None):
        if kind not in self.KINDS:
            raise UserError(f"regularize: unknown kind '{kind}'; valid: {', '.join(self.KINDS)}")
        self.kind, self.example_inputs, self.reg, self.ignore = kind, example_inputs, reg, list(ignore)
        self.model = model
        self.pruner: Any = None
        self.calls = 0

    def build(self, model: nn.Module) -> None:
        layers = prunable_layers(model)
        ignored = set(output_layers(model, self.example_inputs)) | set(self.ignore)
        common = dict(model=model, example_inputs=self.example_inputs, forward_fn=trace_logits,
                      in_channel_groups={}, out_channel_groups={},  # Torch-Pruning fills them in place
                      ignored_layers=[layers[n] for n in ignored if n in layers])
        was_training = model.training
        model.eval()
        if self.kind == "group_norm":
            self.pruner = tp.pruner.GroupNormPruner(importance=tp.importance.GroupMagnitudeImportance(p=2),
                                                    reg=self.reg, **common)
            # GroupNormPruner.regularize (Torch-Pruning 1.6) indexes out of range on the input side of a
            # grouped (not depthwise) conv; those weights go unregularised, the rest of the group is.
            for group in self.pruner._groups:
                group._group = [item for item in group._group
                                if not (item.dep.handler == tp.prune_conv_in_channels
                                        and getattr(item.dep.target.module, "groups", 1) > 1)]
        else:
            self.pruner = tp.pruner.BNScalePruner(importance=tp.importance.BNScaleImportance(), reg=self.reg, **common)
        model.train(was_training)
        self.model = model

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.build(getattr(pl_module, "model", pl_module))

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self.regularize()

    def regularize(self) -> None:
        """Add the regulariser's gradient; call after ``loss.backward()``."""
        if self.pruner is None:
            raise RuntimeError("SparsityRegularizer.build(model) must run first")
        self.pruner.regularize(self.model)
        self.calls += 1


# ---------------------------------------------------------------------------------------------
# Reloading a pruned model: shapes from the state_dict
# ---------------------------------------------------------------------------------------------
def restore_structure(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Reshape ``model``'s layers to the tensor shapes in ``state_dict`` (a pruned model's), in place.

    Every parameter and buffer whose stored shape differs is replaced by an empty tensor of the
    stored shape (``load_state_dict`` fills it), and the layer attributes that describe shapes
    (``in_channels``/``out_channels``/``groups``, ``in_features``/``out_features``,
    ``num_features``, ...) are recomputed from the weights. Keys of masked layers
    (``<layer>.parametrizations.weight.original``) count as the layer's weight. Groups follow
    Torch-Pruning's rule: a depthwise conv (``groups == out_channels``) stays depthwise; any
    other grouped conv keeps its number of groups.

    Returns:
        The names of the modules that were reshaped.
    """
    changed: list[str] = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        old = _shape_attrs(module)
        touched = False
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for t_name, t in list(tensors.items()):
                if t is None:
                    continue
                stored = state_dict.get(prefix + t_name)
                if stored is None and kind == "_parameters":
                    stored = state_dict.get(f"{prefix}parametrizations.{t_name}.original")
                if stored is None or tuple(stored.shape) == tuple(t.shape):
                    continue
                empty = torch.empty(stored.shape, dtype=t.dtype, device=t.device)
                tensors[t_name] = nn.Parameter(empty, requires_grad=t.requires_grad) if kind == "_parameters" else empty
                touched = True
        if touched and "parametrizations" not in name.split("."):
            _fix_shape_attrs(module, old, state_dict, prefix)
            changed.append(name)
        elif touched:
            changed.append(name)
    # A parametrized layer's own attributes follow its (reshaped) ``original``.
    for module in model.modules():
        if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
            w = module.parametrizations["weight"].original
            if _weight_shape_of(module) != tuple(w.shape):
                _fix_shape_attrs(module, _shape_attrs(module), {"weight": w}, "")
    return changed


# A checkpoint's removed channels come back from the stored tensor shapes (nothing saved beside them).
RESTORERS.register("structure", Restorer(restore=lambda model, _saved, state, _where: restore_structure(model, state)))


def _weight_shape_of(module: nn.Module) -> tuple[int, ...] | None:
    if isinstance(module, nn.modules.conv._ConvNd):
        shape = (module.in_channels, module.out_channels // module.groups) if module.transposed else \
            (module.out_channels, module.in_channels // module.groups)
        return shape + tuple(module.kernel_size)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    return None


def _shape_attrs(module: nn.Module) -> dict[str, Any]:
    return {a: getattr(module, a) for a in ("in_channels", "out_channels", "groups") if hasattr(module, a)}


def _fix_shape_attrs(module: nn.Module, old: dict[str, Any], state: Mapping[str, Tensor], prefix: str) -> None:
    def stored(t_name: str) -> Tensor | None:
        t = state.get(prefix + t_name)
        return t if t is not None else state.get(f"{prefix}parametrizations.{t_name}.original")

    w = stored("weight")
    if isinstance(module, nn.modules.conv._ConvNd) and w is not None:
        depthwise = old["groups"] == old["out_channels"] and old["out_channels"] > 1  # tp.ops.module2type
        if module.transposed:  # weight (in, out/groups, *k)
            module.in_channels = int(w.shape[0])
            module.groups = module.in_channels if depthwise else old["groups"]
            module.out_channels = int(w.shape[1]) * module.groups
        else:  # weight (out, in/groups, *k)
            module.out_channels = int(w.shape[0])
            module.groups = module.out_channels if depthwise else old["groups"]
            module.in_channels = int(w.shape[1]) * module.groups
    elif isinstance(module, nn.Linear) and w is not None:
        module.out_features, module.in_features = (int(s) for s in w.shape)
    elif isinstance(module, nn.Bilinear) and w is not None:
        module.out_features, module.in1_features, module.in2_features = (int(s) for s in w.shape)
    elif isinstance(module, (nn.modules.batchnorm._NormBase,)):
        t = w if w is not None else stored("running_mean")
        if t is not None:
            module.num_features = int(t.shape[0])
    elif isinstance(module, nn.GroupNorm) and w is not None:
        module.num_channels = int(w.shape[0])
    elif isinstance(module, nn.LayerNorm) and w is not None:
        module.normalized_shape = tuple(int(s) for s in w.shape)
    elif isinstance(module, nn.PReLU) and w is not None:
        module.num_parameters = int(w.numel())
    elif isinstance(module, nn.Embedding) and w is not None:
        module.num_embeddings, module.embedding_dim = (int(s) for s in w.shape)


def mask_shapes_ok(model: nn.Module) -> bool:
    """Every mask has its weight's shape (a check after structured pruning of a masked model)."""
    for m in masked_modules(model).values():
        mask = get_mask(m)
        if mask is None or tuple(mask.shape) != tuple(m.parametrizations.weight.original.shape):
            return False
    return True
