"""Attention heads in structured pruning: find them, tell Torch-Pruning, keep the modules true.

Torch-Pruning removes whole heads or dimensions of every head when it is told how many heads each
attention projection holds (``num_heads``, ``prune_num_heads`` / ``prune_head_dims``,
``head_pruning_ratio``). An attention module also describes its heads in plain attributes that its
forward reads (timm: ``num_heads``, ``head_dim``, ``scale``; Hugging Face: ``num_attention_heads``,
``attention_head_size`` or ``head_dim``, ``all_head_size``, ``scaling``); those must follow the
new widths after every pruning step, and be restored when a checkpoint is loaded into a freshly
built model (widths alone cannot tell two heads of 32 from four of 16). This module holds:

* :data:`ATTENTION_KINDS`: how each family of attention modules stores its heads (timm-style
  fused ``qkv``; Hugging Face-style ``query``/``key``/``value`` or ``q_proj``/``k_proj``/``v_proj``;
  ``nn.MultiheadAttention``), found automatically; another family registers from Python;
* :func:`find_attention` and :func:`plan_heads`: every attention module of a model, and a pruning
  checked against them before the model is touched (a :class:`~compress.errors.UserError` names
  the recipe key), with the pruner's arguments;
* :class:`HeadPruner`: Torch-Pruning's ``BasePruner``, removing exactly the planned heads per step;
* :func:`attention_state` / :func:`restore_attention`: the attributes as plain data for checkpoints.

The three ``heads`` modes: ``prune`` removes whole heads (each module keeps its head width),
``dims`` removes the same dimensions from every head (each module keeps its heads), ``keep``
leaves every head and head width alone (the projections' outputs are ignored by the pruner).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch_pruning as tp
from torch import nn

from compress.errors import UserError
from compress.plumbing.restorers import RESTORERS, Restorer
from compress.registry import Registry

__all__ = ["HEAD_MODES", "ATTENTION_KINDS", "AttentionKind", "FusedQKV", "SeparateQKV", "TorchMHA", "Attention",
           "HeadPlan", "HeadPruner", "find_attention", "plan_heads", "attention_state", "restore_attention"]

HEAD_MODES = ("prune", "dims", "keep")


class AttentionKind:
    """One family of attention modules: where its heads are and which attributes describe them.

    A subclass says whether a module is of the family (:meth:`matches`), which layers' outputs are
    split into heads (:meth:`projections`), how many heads there are (:meth:`heads`, a ``ValueError``
    saying why when the module does not tell), whether its widths agree with its attributes
    (:meth:`problem`) and how to set the attributes from the widths (:meth:`update`).
    """

    label = "attention"
    modes: tuple[str, ...] = HEAD_MODES  # the ``heads`` modes the family can take
    attrs: tuple[str, ...] = ()  # attributes saved in checkpoints, where the module has them

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def projections(self, module: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def heads(self, module: nn.Module) -> int:
        raise NotImplementedError

    def head_dim(self, module: nn.Module) -> int:
        raise NotImplementedError

    def problem(self, module: nn.Module) -> str | None:
        """Why the module's widths disagree with its head attributes (None: they agree)."""
        raise NotImplementedError

    def update(self, module: nn.Module, num_heads: int) -> None:
        raise NotImplementedError

    def refuses(self, module: nn.Module, mode: str) -> str | None:
        """Why ``mode`` cannot be applied to this module (None: it can)."""
        if mode not in self.modes:
            return f"cannot be pruned with heads: {mode}"
        return None


def _int_attr(module: nn.Module, names: Iterable[str]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


def _rescale(module: nn.Module, names: Iterable[str], old_dim: int, new_dim: int) -> None:
    """A softmax scale that was ``old_dim ** -0.5`` becomes ``new_dim ** -0.5``; a custom one stays."""
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, float) and old_dim > 0 and math.isclose(value, old_dim ** -0.5, rel_tol=1e-6):
            setattr(module, name, new_dim ** -0.5)


class FusedQKV(AttentionKind):
    """timm's ``Attention``: one ``qkv`` Linear (3 x heads x head_dim outputs), ``num_heads``,
    ``head_dim``, optionally ``scale`` (``head_dim ** -0.5``) and ``attn_dim`` (heads x head_dim: timm 1.0
    reshapes the heads' output to it)."""

    label = "timm-style attention (qkv)"
    attrs = ("num_heads", "head_dim", "attn_dim", "scale")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "qkv", None), nn.Linear)

    def projections(self, module: nn.Module) -> list[nn.Module]:
        return [module.qkv]

    def heads(self, module: nn.Module) -> int:
        found = _int_attr(module, ("num_heads",))
        if found is None or found[1] < 1:
            raise ValueError("has a qkv Linear but no integer num_heads")
        return found[1]

    def head_dim(self, module: nn.Module) -> int:
        found = _int_attr(module, ("head_dim",))
        if found is None:
            raise ValueError("has no integer head_dim (its forward would derive the head width from its input, "
                             "which pruning changes)")
        return found[1]

    def problem(self, module: nn.Module) -> str | None:
        h, d, out = self.heads(module), self.head_dim(module), module.qkv.out_features
        if out != 3 * h * d or d < 1:
            return f"qkv has {out} outputs, not 3 x num_heads {h} x head_dim {d}"
        found = _int_attr(module, ("attn_dim",))
        if found is not None and found[1] != h * d:
            return f"attn_dim is {found[1]}, not num_heads {h} x head_dim {d}"
        return None

    def update(self, module: nn.Module, num_heads: int) -> None:
        old = module.head_dim
        module.num_heads = num_heads
        module.head_dim = module.qkv.out_features // (3 * num_heads)
        if _int_attr(module, ("attn_dim",)) is not None:  # timm 1.0's forward reshapes to it
            module.attn_dim = num_heads * module.head_dim
        _rescale(module, ("scale",), old, module.head_dim)

    def refuses(self, module: nn.Module, mode: str) -> str | None:
        norms = [n for n in ("q_norm", "k_norm")
                 if isinstance(getattr(module, n, None), nn.Module) and any(getattr(module, n).parameters())]
        if mode == "dims" and norms:
            return f"its {norms[0]} normalises over head_dim, which Torch-Pruning does not shrink with the heads"
        return super().refuses(module, mode)


class SeparateQKV(AttentionKind):
    """Hugging Face self-attention: ``query``/``key``/``value`` (BERT), ``q_proj``/``k_proj``/``v_proj``
    (ViT, CLIP, ... in transformers 5) or ``q_lin``/``k_lin``/``v_lin`` (DistilBERT), ``num_attention_heads``
    (or ``num_heads``, ``n_heads``),
    ``attention_head_size`` (or ``head_dim``), optionally ``all_head_size`` and ``scaling``/``scale``."""

    label = "Hugging Face-style attention (query/key/value)"
    NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))  # DistilBERT
    HEADS = ("num_attention_heads", "num_heads", "n_heads")
    SIZE = ("attention_head_size", "head_dim")
    SCALE = ("scaling", "scale")
    attrs = HEADS + SIZE + ("all_head_size",) + SCALE

    def _names(self, module: nn.Module) -> tuple[str, str, str] | None:
        for names in self.NAMES:
            if all(isinstance(getattr(module, n, None), nn.Linear) for n in names):
                return names
        return None

    def matches(self, module: nn.Module) -> bool:
        return self._names(module) is not None

    def projections(self, module: nn.Module) -> list[nn.Module]:
        return [getattr(module, n) for n in self._names(module)]

    def heads(self, module: nn.Module) -> int:
        found = _int_attr(module, self.HEADS)
        if found is None or found[1] < 1:
            raise ValueError(f"has {'/'.join(self._names(module))} Linears but no integer "
                             f"{' or '.join(self.HEADS)}")
        return found[1]

    def head_dim(self, module: nn.Module) -> int:
        found = _int_attr(module, self.SIZE)
        if found is None:
            raise ValueError(f"has no integer {' or '.join(self.SIZE)}")
        return found[1]

    def problem(self, module: nn.Module) -> str | None:
        h, d = self.heads(module), self.head_dim(module)
        q, k, v = (p.out_features for p in self.projections(module))
        if not q == k == v:
            return f"query/key/value have {q}/{k}/{v} outputs (grouped-query attention is not supported)"
        if q != h * d or d < 1:
            return f"query has {q} outputs, not heads {h} x head size {d}"
        total = getattr(module, "all_head_size", q)
        if total != q:
            return f"all_head_size is {total}, query has {q} outputs"
        return None

    def update(self, module: nn.Module, num_heads: int) -> None:
        width = self.projections(module)[0].out_features
        heads_attr = _int_attr(module, self.HEADS)[0]
        size_attr, old = _int_attr(module, self.SIZE)
        setattr(module, heads_attr, num_heads)
        setattr(module, size_attr, width // num_heads)
        if hasattr(module, "all_head_size"):
            module.all_head_size = width
        _rescale(module, self.SCALE, old, width // num_heads)


class TorchMHA(AttentionKind):
    """``nn.MultiheadAttention``: its ``embed_dim`` is both the head width x heads and the width of
    the stream it reads and writes, so Torch-Pruning can only narrow every head together with that
    stream (``dims``); it cannot remove whole heads."""

    label = "nn.MultiheadAttention"
    modes = ("dims", "keep")
    attrs = ("num_heads", "head_dim", "embed_dim", "kdim", "vdim", "_qkv_same_embed_dim")

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def projections(self, module: nn.Module) -> list[nn.Module]:
        return [module]

    def heads(self, module: nn.Module) -> int:
        return int(module.num_heads)

    def head_dim(self, module: nn.Module) -> int:
        return int(module.head_dim)

    def problem(self, module: nn.Module) -> str | None:
        e, h = module.embed_dim, module.num_heads
        w = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        if e % h or module.head_dim * h != e or w.shape[0] != (3 * e if module._qkv_same_embed_dim else e):
            return f"embed_dim {e} is not num_heads {h} x head_dim {module.head_dim} (weights {tuple(w.shape)})"
        return None

    def update(self, module: nn.Module, num_heads: int) -> None:
        if module._qkv_same_embed_dim:
            module.embed_dim = module.kdim = module.vdim = int(module.in_proj_weight.shape[1])
        module.num_heads = num_heads
        module.head_dim = module.embed_dim // num_heads

    def refuses(self, module: nn.Module, mode: str) -> str | None:
        if mode == "prune":
            return ("cannot lose whole heads: its embed_dim is also the width of the stream around it, and "
                    "Torch-Pruning narrows every head instead")
        if mode == "dims" and not module._qkv_same_embed_dim:
            return "has kdim/vdim unlike embed_dim, which Torch-Pruning cannot narrow"
        return super().refuses(module, mode)


ATTENTION_KINDS: Registry[AttentionKind] = Registry("attention kind")
ATTENTION_KINDS.register("mha", TorchMHA())
ATTENTION_KINDS.register("qkv", FusedQKV())
ATTENTION_KINDS.register("query_key_value", SeparateQKV())


@dataclass
class Attention:
    """An attention module found in a model."""

    name: str
    module: nn.Module
    kind: AttentionKind

    @property
    def projections(self) -> list[nn.Module]:
        return self.kind.projections(self.module)

    def heads(self) -> int:
        return self.kind.heads(self.module)


def find_attention(model: nn.Module) -> list[Attention]:
    """Every attention module of ``model`` (outermost first), by the kinds in :data:`ATTENTION_KINDS`."""
    found = []
    for name, module in model.named_modules():
        for kind_name in ATTENTION_KINDS.names():
            kind = ATTENTION_KINDS.get(kind_name)
            if kind.matches(module):
                found.append(Attention(name, module, kind))
                break
    return found


@dataclass
class HeadPlan:
    """What structured pruning does to a model's attention heads: checked, with the pruner's arguments."""

    mode: str
    pruned: list[Attention] = field(default_factory=list)  # modules that lose heads or head dims
    kept: list[Attention] = field(default_factory=list)  # modules left alone (heads: keep, or ignored)
    head_ratios: dict[str, float] = field(default_factory=dict)  # prune: fraction of each module's heads
    heads_before: dict[str, int] = field(default_factory=dict)

    @property
    def found(self) -> list[Attention]:
        return self.pruned + self.kept

    def ignored_layers(self) -> list[nn.Module]:
        """Layers whose outputs the pruner must keep: every projection of a kept module."""
        return [p for a in self.kept for p in a.projections]

    def pruner_kwargs(self) -> dict[str, Any]:
        """Arguments for :class:`HeadPruner` (fresh dicts: Torch-Pruning updates them in place)."""
        num_heads: dict[nn.Module, int] = {}
        groups: dict[nn.Module, int] = {}
        head_ratios: dict[nn.Module, float] = {}
        for a in self.pruned:
            if isinstance(a.kind, TorchMHA):  # narrowed as a grouped channel: the same dims of every head
                groups[a.module] = a.heads()
                continue
            for p in a.projections:
                num_heads[p] = a.heads()
                head_ratios[p] = self.head_ratios.get(a.name, 0.0)
        return dict(num_heads=num_heads, prune_num_heads=self.mode == "prune" and bool(num_heads),
                    prune_head_dims=self.mode != "prune", head_ratios=head_ratios,
                    head_pruning_ratio=max(head_ratios.values(), default=0.0),  # the global ranking's
                    out_channel_groups=dict(groups), in_channel_groups=dict(groups))

    def gates(self) -> dict[nn.Module, float]:
        """``heads: prune``: a channel ratio for each module's projections. Torch-Pruning removes heads only
        from a group it would prune, and with ``prune_head_dims`` off this ratio removes nothing else."""
        if self.mode != "prune":
            return {}
        return {p: r for a in self.pruned if (r := self.head_ratios.get(a.name, 0.0)) > 0
                and not isinstance(a.kind, TorchMHA) for p in a.projections}

    def update(self, pruner: Any) -> None:
        """Set every pruned module's attributes from its new widths (after each pruner step)."""
        for a in self.pruned:
            first = a.projections[0]
            heads = int(pruner.num_heads.get(first, a.heads()))
            if heads >= 1 and _width(first) >= heads:
                a.kind.update(a.module, heads)

    def problems(self) -> list[str]:
        """Modules whose widths and attributes disagree, or with no head (or head width) left."""
        out = []
        for a in self.pruned:
            heads, dim = a.heads(), a.kind.head_dim(a.module)
            why = a.kind.problem(a.module) if heads >= 1 and dim >= 1 else f"{heads} heads of width {dim} left"
            if why:
                out.append(f"'{a.name}': {why}")
        return out

    def on_copy(self, model: nn.Module, ratio: float) -> HeadPlan:
        """This plan for ``model``, a copy of the model it was made for, with every pruned module but
        ``nn.MultiheadAttention`` (pruned with the stream around it, not alone) losing ``ratio`` of its heads
        (``prune``) or of every head's width (``dims``); the others kept."""
        def there(a: Attention) -> Attention:
            return Attention(a.name, model.get_submodule(a.name), a.kind)

        alone = [a for a in self.pruned if not isinstance(a.kind, TorchMHA)]
        return HeadPlan(self.mode, [there(a) for a in alone], [there(a) for a in self.found if a not in alone],
                        {a.name: ratio for a in alone} if self.mode == "prune" else {},
                        {a.name: n for a in self.found if (n := self.heads_before.get(a.name)) is not None})

    def heads(self) -> dict[str, int]:
        """Heads of every attention module now (0 where a kept module does not say)."""
        return {a.name: _heads_or_zero(a) for a in self.found}


def _width(layer: nn.Module) -> int:
    return int(getattr(layer, "out_features", getattr(layer, "embed_dim", 0)))


def _kept_dims(head_dim: int, ratio: float) -> int:
    """Head width left by Torch-Pruning at channel ratio ``ratio`` (it keeps ``int(n * (1 - ratio))``)."""
    return int(head_dim * (1 - ratio))


def plan_heads(model: nn.Module, mode: str, *, ratio: float | None = None,
               layer_ratios: Mapping[nn.Module, float] | None = None, head_ratio: float | None = None,
               ignored: Iterable[nn.Module] = (), round_to: int | None = None, max_layer_ratio: float = 1.0,
               global_pruning: bool = False, key: str = "prune") -> HeadPlan:
    """Check a pruning against every attention module of ``model``; touches nothing.

    Args:
        mode: ``prune`` (whole heads), ``dims`` (head dimensions) or ``keep`` (neither).
        ratio: the channel ratio of layers without one of their own (None: a ``mac_speedup`` search,
            whose heads follow its channel schedule up to ``max_layer_ratio``).
        layer_ratios: ``{layer: ratio}`` for layers given their own.
        head_ratio: ``prune``: the fraction of each module's heads removed (default: its projection's ratio).
        ignored: layers whose outputs are kept; an attention module with an ignored projection is kept.
        round_to: channel rounding; refused with ``dims``, which Torch-Pruning would round across heads.
        max_layer_ratio: no module loses more than this fraction of its heads (or head width).
        global_pruning: ``ratio`` is overall, not per module (the head width left is not known before).
        key: recipe path for error messages.

    Raises:
        UserError: one line naming ``{key}.heads`` (or ``round_to``/``head_ratio``) and the module.
    """
    if mode not in HEAD_MODES:
        raise UserError(f"{key}.heads: '{mode}' is not valid; valid: {', '.join(HEAD_MODES)}")
    ignored = set(ignored)
    layer_ratios = layer_ratios or {}
    plan = HeadPlan(mode)
    for a in find_attention(model):
        if mode == "keep" or any(p in ignored for p in a.projections):
            plan.kept.append(a)
            continue
        why = a.kind.refuses(a.module, mode)
        others = [m for m in a.kind.modes if m != mode]
        try:
            why = why or a.kind.problem(a.module)
            heads, dim = a.heads(), a.kind.head_dim(a.module)
        except ValueError as e:
            why, others = why or str(e), ["keep"]
        if why:
            raise UserError(f"{key}.heads: '{a.name}' ({a.kind.label}) {why}; use heads: {' or '.join(others)}")
        layer_ratio = layer_ratios.get(a.projections[0], ratio)
        r = min(max_layer_ratio, layer_ratio if layer_ratio is not None else max_layer_ratio)
        if mode == "prune":
            plan.head_ratios[a.name] = min(max_layer_ratio, head_ratio) if head_ratio is not None else r
        elif not global_pruning and (ratio is not None or a.projections[0] in layer_ratios):
            if _kept_dims(dim, r) < 1:
                raise UserError(f"{key}.heads: dims at ratio {r:g} would leave '{a.name}' heads of width 0 "
                                f"(head width {dim}); lower the ratio or use heads: prune")
        plan.pruned.append(a)
        plan.heads_before[a.name] = heads
    if mode == "dims" and round_to and round_to > 1 and plan.pruned:
        a = plan.pruned[0]
        raise UserError(f"{key}.round_to: {round_to} with heads: dims: Torch-Pruning rounds the width of all heads "
                        f"together, not each head ('{a.name}' has {a.heads()} heads of {a.kind.head_dim(a.module)}); "
                        "set round_to: null or heads: prune")
    for a in plan.kept:
        plan.heads_before[a.name] = _heads_or_zero(a)
    return plan


def _heads_or_zero(a: Attention) -> int:
    try:
        return a.heads()
    except ValueError:
        return 0


class HeadPruner(tp.pruner.BasePruner):
    """Torch-Pruning's ``BasePruner`` with each attention module losing exactly its planned heads.

    ``BasePruner`` (1.6) removes ``ceil(step ratio * current heads)`` heads per step although the step
    ratio is cumulative (four steps to half of 8 heads leave 1, not 4), and its global head ranking
    fails on a step where no head is due. Here the step's ratio is turned into the number of heads
    still to go: a module's heads after step ``s`` of ``S`` are ``H0 - round(ratio * H0 * s / S)``
    (at least one left); with ``global_pruning`` heads are ranked across modules as before, and
    asked for only on steps where some are due.
    """

    def __init__(self, *args: Any, head_ratios: Mapping[nn.Module, float] | None = None, **kwargs: Any):
        self.head_ratios = dict(head_ratios or {})
        self._due: tuple[int, bool] = (-1, False)
        super().__init__(*args, **kwargs)

    def get_target_head_pruning_ratio(self, module: nn.Module) -> float:
        if self.global_pruning:
            return self.per_step_head_pruning_ratio[self.current_step] if self._heads_due() else 0.0
        initial, current = self.init_num_heads[module], self.num_heads[module]
        ratio = self.head_ratios.get(module, 0.0) * self.current_step / self.iterative_steps
        target = min(initial - 1, math.floor(ratio * initial + 0.5 + 1e-9))  # heads removed by now
        still = target - (initial - current)
        return (still - 0.5) / current if still > 0 else 0.0  # Torch-Pruning takes ceil(this * current)

    def _heads_due(self) -> bool:
        """Global ranking: whether Torch-Pruning will find heads to remove this step (else it fails)."""
        if self._due[0] != self.current_step:
            total = 0
            for group in self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                root_module_types=self.root_module_types):
                is_attention, qkv = self._is_atten_group(group)
                if is_attention and self._check_pruning_ratio(group):
                    total += max(self.num_heads[m] for m in qkv)
            target = self.per_step_head_pruning_ratio[self.current_step]
            self._due = (self.current_step, total > int(self.initial_total_heads * (1 - target)))
        return self._due[1]


# ---------------------------------------------------------------------------------------------
# Checkpoints: the attributes as plain data
# ---------------------------------------------------------------------------------------------
def attention_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: {attribute: value}}`` of every attention module (ints, floats, bools)."""
    out: dict[str, dict[str, Any]] = {}
    for a in find_attention(model):
        values = {n: getattr(a.module, n) for n in a.kind.attrs
                  if isinstance(getattr(a.module, n, None), (int, float, bool))}
        if values:
            out[a.name] = values
    return out


def restore_attention(model: nn.Module, state: Mapping[str, Mapping[str, Any]] | None, where: str = "checkpoint") -> None:
    """Give a freshly built model's attention modules the attributes in ``state`` (from
    :func:`attention_state`); an absent or empty state (an older checkpoint) changes nothing."""
    for name, values in (state or {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{where}: checkpoint is of another architecture (no attention module '{name}')") from None
        for attr, value in values.items():
            setattr(module, attr, value)


# A checkpoint keeps the head attributes under "attention" and gives them back to a fresh model.
RESTORERS.register("attention", Restorer(restore=lambda model, saved, _state, where: restore_attention(model, saved, where),
                                         state=attention_state))
