"""The self-check of a structural change: a pruned model must compute what it was meant to.

Removing channel ``c`` of a layer is meant to give the function of the original model whose channel
``c`` is zero wherever it is produced: the consumers then read a zero there, so dropping their
matching input columns changes nothing. Torch-Pruning finds those columns by tracing the graph; where
its index mapping is wrong (a ``permute`` before a ``flatten``, a channel shuffle), it removes other
columns and the model silently computes something else. So every pruning step is checked against
that reference on real batches:

* :class:`RemovalLog` records, from Torch-Pruning's groups, which *original* output channels each
  producing module (and unwrapped parameter) lost, across the fine steps of a search;
* :func:`zeroed` makes a model, for the length of a ``with``, compute the reference: those outputs
  zeroed by forward hooks (a LayerNorm normalises over its kept channels only, as the pruned one will);
* :func:`relative_error` compares two models' logits: the largest difference over the largest logit;
* :func:`probe` prunes a few channels of every group on one traced copy and checks once; only when that
  check fails does it bisect the groups (on fresh copies) for the first one at fault. So the groups
  Torch-Pruning maps wrongly (left out, with a note) and the modules whose forward cannot take fewer
  channels (a refusal naming the module) are known before any work, at the cost of one trace and one
  forward for a model Torch-Pruning maps right.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.calls import forward, take
from compress.errors import UserError
from compress.metrics.counting import weight_readers
from compress.plumbing.masks import make_permanent

__all__ = ["TOLERANCE", "RemovalLog", "zeroed", "relative_error", "outputs_error", "failing_module", "Fault", "ProbeResult", "probe",
           "check_batches", "StepCheck", "leave_out_faults"]

# Largest |difference| / largest |logit|. Removing zero channels reorders fp32 sums (~1e-6 relative);
# a wrong column mapping moves logits by a sizeable fraction of their scale (the 0.92).
TOLERANCE = 1e-3
# Modules whose pruning changes more than their outputs: nn.MultiheadAttention narrows every head inside
# (and its softmax scale with them), which no zeroing of outputs reproduces. Groups holding one are run
# (a forward that fails is still caught) but not compared, and a note says so.
UNCOMPARED = (nn.MultiheadAttention,)


class RemovalLog:
    """Original indices of the output channels each module lost, over any number of pruning groups."""

    def __init__(self, model: nn.Module, key: str = "prune"):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.key = key  # recipe path for a refusal
        self.removed: dict[str, list[int]] = {}  # module or parameter name -> sorted original indices
        self.widths: dict[str, int] = {}  # module name -> its output channels before the first removal
        self.param_dims: dict[str, int] = {}  # unwrapped parameter name -> the dimension pruned
        self.roots: list[str] = []  # root layer of every group recorded, in order
        self.uncompared: list[str] = []  # modules of UNCOMPARED kinds among the removals

    def record(self, group: Any) -> None:
        """Note the out-channel removals of a Torch-Pruning group (call before ``group.prune()``)."""
        graph = group._DG
        root = self.names.get(id(group[0].dep.target.module))
        if root is not None:
            self.roots.append(root)
        for dep, idxs in group:
            if not graph.is_out_channel_pruning_fn(dep.handler):
                continue
            target = dep.target
            if target.type == tp.ops.OPTYPE.PARAMETER:
                name = graph._param_to_name.get(target.module)
                if name is None:
                    continue
                self.param_dims[name] = int(graph.module2node[target.module].pruning_dim)
            else:
                name = self.names.get(id(target.module))
                if name is None:  # one of Torch-Pruning's stand-ins for a functional op
                    continue
                if isinstance(target.module, UNCOMPARED) and name not in self.uncompared:
                    self.uncompared.append(name)
                width = graph.get_out_channels(target.module)
                if width is not None:
                    self.widths.setdefault(name, int(width) + len(self.removed.get(name, [])))
            self._remove(name, sorted({int(getattr(i, "idx", i)) for i in idxs}))

    def _remove(self, name: str, current: list[int]) -> None:
        done = self.removed.setdefault(name, [])
        originals = []
        for i in current:  # the i-th channel still there is the i-th original index not yet removed
            o = i
            for r in done:
                if r <= o:
                    o += 1
                else:
                    break
            originals.append(o)
        self.removed[name] = sorted(set(done) | set(originals))

    def __bool__(self) -> bool:
        return bool(self.removed)


def _own_forward(module: nn.Module) -> bool:
    """Whether the module runs torch's own forward for its class (not a subclass's, which may permute)."""
    return type(module).forward.__module__.startswith("torch.nn.")


def _width_dims(shape: Sequence[int], width: int | None) -> list[int]:
    """The dimensions of an output of ``shape`` as wide as the module's channels (not the batch's, when there are others)."""
    return [d for d in range(min(1, len(shape) - 1), len(shape)) if shape[d] == width]


def _unreadable(log: RemovalLog, name: str, module: nn.Module, shape: Sequence[int], width: int | None) -> UserError:
    return UserError(f"{log.key}: the self-check cannot tell which dimension of the output of '{name}' "
                     f"({type(module).__name__}, shape {tuple(shape)}) holds its {width} channels; keep them (list "
                     f"the layers that write them in {log.key}.ignore) or leave this model out of structured pruning")


def _channel_dim(module: nn.Module, shape: Sequence[int], width: int | None) -> int | None:
    """The dimension of a module's output its channels run along: with torch's own forward, 1 for convolutions
    and norms and the last for the rest; with a forward of its own (a permute inside), the one dimension as wide
    as its channels (None: none, or several)."""
    first = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.PReLU)
    if _own_forward(module) or width is None:
        return 1 if isinstance(module, first) else -1
    dims = _width_dims(shape, width)
    if len(dims) > 1 and 1 in dims and isinstance(module, nn.modules.batchnorm._NormBase):
        # a BatchNorm normalises dim 1 itself, so a subclass has no reason to permute (timm's BatchNormAct2d
        # adds an activation); a convolution subclass may return channels last
        return 1
    return dims[0] if len(dims) == 1 else None


def _zero_hook(log: RemovalLog, name: str, idx: Tensor) -> Any:
    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        first = out[0] if isinstance(out, tuple) else out
        if not isinstance(first, Tensor):
            return None
        dim = _channel_dim(module, first.shape, log.widths.get(name))
        if dim is None:
            raise _unreadable(log, name, module, first.shape, log.widths.get(name))
        first = first.index_fill(dim, idx.to(first.device), 0.0)
        return (first, *out[1:]) if isinstance(out, tuple) else first
    return hook


def _layer_norm_along(module: nn.LayerNorm, x: Tensor, dim: int, keep: Tensor | None = None) -> Tensor:
    """``module``'s layer norm over dimension ``dim`` of ``x``, of the ``keep`` channels only (zeros elsewhere)."""
    x = x.movedim(dim, -1)
    keep = torch.ones(x.shape[-1], dtype=torch.bool, device=x.device) if keep is None else keep
    w = module.weight[keep] if module.weight is not None else None
    b = module.bias[keep] if module.bias is not None else None
    y = torch.zeros_like(x)
    y[..., keep] = F.layer_norm(x[..., keep], (int(keep.sum()),), w, b, module.eps)
    return y.movedim(-1, dim)


def _norm_dim(module: nn.LayerNorm, x: Tensor, out: Tensor) -> int | None:
    """The dimension a LayerNorm normalises: the last with torch's own forward; for a subclass that permutes
    (timm's ``LayerNorm2d`` normalises dim 1 of NCHW), the dimension as wide as it whose layer norm is its output."""
    if _own_forward(module):
        return -1
    for d in _width_dims(x.shape, module.normalized_shape[0]) if out.shape == x.shape else []:
        if torch.allclose(_layer_norm_along(module, x, d), out, rtol=1e-4, atol=1e-5):
            return d
    return None


def _kept_norm_hook(log: RemovalLog, name: str, removed: list[int]) -> Any:
    """A LayerNorm whose removed channels are gone: statistics over the kept ones, zeros elsewhere."""
    def hook(module: nn.LayerNorm, args: Any, out: Tensor) -> Tensor:
        x = args[0]
        dim = _norm_dim(module, x, out)
        if dim is None:
            raise _unreadable(log, name, module, out.shape, module.normalized_shape[0])
        keep = torch.ones(x.shape[dim], dtype=torch.bool, device=x.device)
        keep[removed] = False
        return _layer_norm_along(module, x, dim, keep)
    return hook


@contextlib.contextmanager
def zeroed(model: nn.Module, log: RemovalLog, attrs: dict[str, dict[str, Any]] | None = None) -> Iterator[nn.Module]:
    """``model`` computing the reference of ``log``'s removals inside the ``with``; as it was after.

    ``attrs`` (``{module: {attribute: value}}``) are set for the length of the ``with`` too: an
    attention module's softmax scale that follows its narrowed heads (``heads: dims``).
    """
    handles, saved = [], []
    old_attrs = {name: {a: getattr(model.get_submodule(name), a) for a in values} for name, values in (attrs or {}).items()}
    try:
        for name, values in (attrs or {}).items():
            for a, v in values.items():
                setattr(model.get_submodule(name), a, v)
        for name, removed in log.removed.items():
            idx = torch.tensor(removed, dtype=torch.long)
            if name in log.param_dims:
                p = model.get_parameter(name)
                saved.append((p, p.detach().clone()))
                with torch.no_grad():
                    p.index_fill_(log.param_dims[name], idx.to(p.device), 0.0)
                continue
            module = model.get_submodule(name)
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
                handles.append(module.register_forward_hook(_kept_norm_hook(log, name, removed)))
            else:
                handles.append(module.register_forward_hook(_zero_hook(log, name, idx)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for name, values in old_attrs.items():
            for a, v in values.items():
                setattr(model.get_submodule(name), a, v)
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)


def relative_error(model: nn.Module, reference: nn.Module, batches: Sequence[Any]) -> float:
    """Largest |model - reference| over the largest |reference| of the logits, over ``batches`` (eval mode)."""
    states = (model.training, reference.training)
    model.eval()
    reference.eval()
    try:
        with torch.no_grad():
            pairs = [(forward(model, x), forward(reference, x)) for x in batches]
    finally:
        model.train(states[0])
        reference.train(states[1])
    return outputs_error(pairs)


def outputs_error(pairs: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Largest |output - reference| over the largest |reference| of ``(output, reference)`` pairs (inf: shapes differ)."""
    worst = scale = 0.0
    for a, b in pairs:
        if a.shape != b.shape:
            return float("inf")
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(b.abs().max()) if b.numel() else 0.0)
    return worst / scale if scale > 0 else worst


def failing_module(model: nn.Module, run: Any) -> tuple[str, BaseException] | None:
    """Run ``run()``; on an error, the innermost module whose forward was running and the error."""
    running: list[str] = []  # modules whose forward has started and not returned: the last one failed

    def finished(*_: Any) -> None:
        running.pop()

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda *_, n=name: running.append(n)))
        handles.append(m.register_forward_hook(finished))
    try:
        run()
    except (RuntimeError, ValueError, IndexError, AssertionError, TypeError, ZeroDivisionError) as e:
        return (running[-1] if running else ""), e
    finally:
        for h in handles:
            h.remove()
    return None


def check_batches(example_inputs: Any, extra: Sequence[Any] | None = None) -> list[Any]:
    """The batches a check runs on: ``extra`` if given, else the example batch."""
    return list(extra) if extra else [example_inputs]


@dataclass
class Fault:
    """A group Torch-Pruning cannot remove channels from correctly."""

    root: str  # the group's root layer
    layers: list[str]  # the prunable layers whose outputs the group removes
    why: str  # what went wrong, for the note


@dataclass
class ProbeResult:
    """What :func:`probe` found: the groups to leave out, or the module that cannot take fewer channels."""

    faults: list[Fault] = field(default_factory=list)
    refusal: str | None = None  # one line: the module whose forward fails, and what to do
    groups: int = 0  # groups checked: the faulty ones and those pruned together in the round that passed
    checks: int = 0  # forwards compared (one per round when nothing fails; a bisection adds about log2(groups))
    traces: int = 0  # copies traced by Torch-Pruning (one per round; a failing bisection step adds one)


def _module_text(model: nn.Module, where: str) -> str:
    if not where:
        return f"the model's own forward ({type(model).__name__})"
    return f"'{where}' ({type(model.get_submodule(where)).__name__})"


def _error_text(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def probe(model: nn.Module, example_inputs: Any, batches: Sequence[Any], *, ignored: Sequence[str] = (),
          prunable: Sequence[str] = (), pruner_kwargs: dict[str, Any] | None = None, forward_fn: Any = None,
          key: str = "prune", max_faults: int = 8) -> ProbeResult:
    """Prune the last channel of each channel group of every group on a copy of ``model``, and check.

    All groups are pruned on one copy and checked together; a failed check is bisected to the first
    group at fault (a group that passes with those before it is never blamed), which is left out
    (or refused) before the next round.

    Args:
        model: left untouched.
        example_inputs: the tracing batch.
        batches: the batches the outputs are compared on.
        ignored: names of layers whose outputs are kept (as the real pruning will keep them).
        prunable: names of the layers the pruning acts on (a faulty group is left out through them).
        pruner_kwargs: extra arguments for Torch-Pruning's ``BasePruner`` (channel groups).
        forward_fn: Torch-Pruning's ``forward_fn``.
        key: recipe path for the refusal.
        max_faults: more faulty groups than this is a refusal.

    Returns:
        The faulty groups (each with its layers and why), or a one-line refusal.
    """
    result = ProbeResult()
    skip = list(ignored)
    while True:
        fault = _probe_once(model, example_inputs, batches, skip, set(prunable), pruner_kwargs or {}, forward_fn,
                            key, result)
        if fault is None or result.refusal is not None:
            return result
        result.faults.append(fault)
        if len(result.faults) > max_faults or not fault.layers:
            result.refusal = (f"{key}: Torch-Pruning removes the wrong channels of '{fault.root}' ({fault.why}) and "
                              "they cannot be left out; list the layers that feed it in ignore")
            return result
        skip += fault.layers


class _Probe:
    """One round of :func:`probe`: every group rooted outside ``skip``, pruned in a fixed order on traced copies.

    Groups are pruned many at a time and checked once; only a check that fails is narrowed down, by
    bisecting the order (a prefix that passes is extended on the same copy; a failing one needs a fresh
    copy traced again). Groups holding an :data:`UNCOMPARED` module come last, so the others are compared.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, batches: Sequence[Any], skip: list[str],
                 prunable: set[str], kwargs: dict[str, Any], forward_fn: Any, key: str, result: ProbeResult):
        self.model, self.example_inputs, self.batches, self.key = model, example_inputs, list(batches), key
        self.skip, self.prunable, self.kwargs, self.forward_fn, self.result = skip, prunable, kwargs, forward_fn, result
        self.base = make_permanent(copy.deepcopy(model)).eval()  # the reference, zeroed per check (shared)
        self.order: list[str] = []  # root layers in the order they are pruned (set by the first trace)
        self.members: dict[int, list[str]] = {}  # position in the order -> the prunable layers it removes from

    def trace(self) -> _Copy:
        """A fresh copy of the model with Torch-Pruning's graph of it (raises what Torch-Pruning raises)."""
        work = make_permanent(copy.deepcopy(self.model)).eval()
        layers = dict(work.named_modules())
        kwargs = {k: ({layers[n]: v for n, v in _by_name(self.model, v).items()} if isinstance(v, dict) else v)
                  for k, v in self.kwargs.items()}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.BasePruner(work, self.example_inputs, importance=tp.importance.RandomImportance(),
                                          pruning_ratio=0.5, forward_fn=self.forward_fn,
                                          ignored_layers=[layers[n] for n in self.skip if n in layers], **kwargs)
        graph, names = pruner.DG, {id(m): n for n, m in work.named_modules()}
        roots = {}
        for g in graph.get_all_groups(ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types):
            module = g[0].dep.target.module
            alone = any(isinstance(dep.target.module, UNCOMPARED) for dep, _ in g
                        if graph.is_out_channel_pruning_fn(dep.handler))
            roots[names[id(module)]] = (module, g[0].dep.handler, pruner._get_channel_groups(g), alone)
        if not self.order:
            self.order = sorted(roots, key=lambda n: roots[n][3])  # stable: the compared groups first
        self.result.traces += 1
        return _Copy(work, graph, RemovalLog(work, self.key), roots)

    def advance(self, c: _Copy, to: int) -> Fault | None:
        """Prune the groups at positions ``c.done`` to ``to`` (excluded) of the order on ``c``, unchecked.

        Returns:
            The group Torch-Pruning raises on, if one does (``c`` is then half-pruned: trace again).
        """
        graph, log = c.graph, c.log
        for i in range(c.done, to):
            module, handler, channel_groups, _ = c.roots[self.order[i]]
            n = graph.get_out_channels(module) if graph.is_out_channel_pruning_fn(handler) else \
                graph.get_in_channels(module)
            per = (n or 0) // max(1, channel_groups)
            if per < 2:
                continue
            idxs = [k * per + per - 1 for k in range(channel_groups)]  # the last channel of each channel group
            group = graph.get_pruning_group(module, handler, idxs)
            members = [log.names.get(id(dep.target.module)) for dep, _ in group
                       if graph.is_out_channel_pruning_fn(dep.handler)]
            self.members[i] = sorted({m for m in members if m in self.prunable})
            if not graph.check_pruning_group(group):
                continue
            log.record(group)
            try:
                group.prune()
            except Exception as e:  # noqa: BLE001 - a Torch-Pruning bug on this group: leave the group out
                return Fault(self.order[i], self.members[i], f"Torch-Pruning fails on it: {_error_text(e)}")
            c.pruned += 1
        c.done = max(c.done, to)
        return None

    def check(self, c: _Copy) -> tuple[str, BaseException] | float:
        """The copy's outputs against the zeroed reference (0.0: only run), or the module whose forward fails."""
        self.result.checks += 1
        with torch.no_grad():  # one sample first: a forward that fails is named by its module
            failed = failing_module(c.work, lambda: [forward(c.work, take(x, 1)) for x in self.batches])
        if failed is not None or not c.log or c.log.uncompared:
            return failed if failed is not None else 0.0
        with zeroed(self.base, c.log):
            return relative_error(c.work, self.base, self.batches)

    def first_bad(self, outcome: tuple[str, BaseException] | float, lo: int, hi: int) \
            -> tuple[int, tuple[str, BaseException] | float] | Fault:
        """Bisect the order for the first group whose pruning (after all groups before it) fails the check.

        The groups before ``lo`` pass; those before ``hi`` fail with ``outcome``. Returns the group's position
        and its outcome.
        """
        c = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = c or self.trace()  # a copy pruned up to lo (extended), or a fresh one
            fault = self.advance(c, mid)
            if fault is not None:
                return fault
            now = self.check(c)
            if _passes(now):
                lo = mid
            else:
                hi, outcome, c = mid, now, None
        return hi - 1, outcome


@dataclass
class _Copy:
    """A traced copy of the model and the groups of its graph, pruned up to position ``done`` of the order."""

    work: nn.Module
    graph: Any
    log: RemovalLog
    roots: dict[str, tuple[nn.Module, Any, int, bool]]  # root layer -> (module, handler, channel groups, uncompared)
    done: int = 0
    pruned: int = 0  # groups pruned


def _passes(outcome: tuple[str, BaseException] | float) -> bool:
    return not isinstance(outcome, tuple) and outcome <= TOLERANCE


def _probe_once(model: nn.Module, example_inputs: Any, batches: Sequence[Any], skip: list[str], prunable: set[str],
                kwargs: dict[str, Any], forward_fn: Any, key: str, result: ProbeResult) -> Fault | None:
    p = _Probe(model, example_inputs, batches, skip, prunable, kwargs, forward_fn, key, result)
    try:
        c = p.trace()
    except Exception as e:  # noqa: BLE001 - Torch-Pruning's tracing failed on this graph: nothing can be pruned
        unknown = [n for n in weight_readers(model, example_inputs) if n not in prunable and n not in skip]
        named = ", ".join(f"'{n}' ({type(model.get_submodule(n)).__name__})" for n in unknown[:2])
        why = f"; layers it does not know compute with their own weights: {named}" if unknown else ""
        result.refusal = (f"{key}: Torch-Pruning cannot trace this model's channels ({_error_text(e)}){why}; leave "
                          "this model out of structured pruning")
        return None
    lo = 0
    compared = sum(not c.roots[name][3] for name in p.order)
    for end in sorted({compared, len(p.order)} - {0}):  # the groups compared, then those only run: one check each
        fault = p.advance(c, end)
        if fault is not None:
            return fault
        outcome = p.check(c)
        if not _passes(outcome):
            break
        lo = end
    else:
        result.groups = c.pruned + len(result.faults)
        return None
    found = p.first_bad(outcome, lo, end)
    if isinstance(found, Fault):
        return found
    i, outcome = found
    root, members = p.order[i], p.members[i]
    if isinstance(outcome, tuple):
        where, e = outcome
        keep = members or [root]
        listed = ", ".join(keep[:3]) + (f" and {len(keep) - 3} more" if len(keep) > 3 else "")
        result.refusal = (f"{key}: after removing channels of '{root}', {_module_text(model, where)} fails "
                          f"({_error_text(e)}): its forward needs the width it was traced with; keep those channels "
                          f"({key}.ignore: {listed}), or leave this model out of structured pruning")
        return None
    return Fault(root, members, f"outputs differ by {outcome:.2g} of their scale from the model with those channels "
                                "zeroed")


def _by_name(model: nn.Module, mapping: dict[Any, Any]) -> dict[str, Any]:
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(m)]: v for m, v in mapping.items() if id(m) in names}


def leave_out_faults(model: nn.Module, example_inputs: Any, batches: Sequence[Any], *, ignored: Sequence[str],
                     prunable: Sequence[str], pruner_kwargs: dict[str, Any] | None = None, forward_fn: Any = None,
                     key: str = "prune") -> tuple[list[str], list[str]]:
    """Before pruning: the layers to leave out (groups Torch-Pruning maps wrongly) and a note for each.

    Raises:
        UserError: a module whose forward fails on fewer channels, named with what to do.
    """
    result = probe(model, example_inputs, batches, ignored=ignored, prunable=prunable, pruner_kwargs=pruner_kwargs,
                   forward_fn=forward_fn, key=key)
    if result.refusal is not None:
        raise UserError(result.refusal)
    notes = [f"self-check: Torch-Pruning would remove the wrong channels of '{f.root}' ({f.why}): "
             f"{', '.join(f.layers)} left unpruned" for f in result.faults]
    return [n for f in result.faults for n in f.layers], notes


class StepCheck:
    """One pruning step checked: the model before it (a copy) with the removals zeroed, against the model after.

    ``record`` every Torch-Pruning group before it is pruned, then ``verify`` before anything (fine-tuning)
    changes the weights.
    """

    def __init__(self, model: nn.Module, batches: Sequence[Any], key: str = "prune"):
        self.base = make_permanent(copy.deepcopy(model)).eval()
        self.log = RemovalLog(model, key)
        self.batches, self.key = list(batches), key

    def record(self, group: Any) -> None:
        self.log.record(group)

    def runs(self, model: nn.Module) -> None:
        """One sample through the pruned model: a UserError naming the module whose forward fails."""
        self._runs(model, lambda: forward(model, take(self.batches[0], 1)))

    def _runs(self, model: nn.Module, run: Any) -> None:
        with torch.no_grad():
            failed = failing_module(model, run)
        if failed is not None:
            where, e = failed
            raise UserError(f"{self.key}: after pruning, {_module_text(model, where)} fails ({_error_text(e)}): its "
                            "forward needs a width it was traced with; the model was put back unpruned; keep the "
                            "channels it reads (ignore the layers that write them)")

    def verify(self, model: nn.Module, attrs: dict[str, dict[str, Any]] | None = None) -> float:
        """The relative error; a UserError (naming the first group's root layer) above :data:`TOLERANCE`.

        ``attrs``: attributes of the pruned model's modules the reference takes over (:func:`zeroed`).
        """
        if not self.log:
            return 0.0
        err = [0.0]

        def compare() -> None:
            with zeroed(self.base, self.log, attrs):
                if self.log.uncompared:  # run only
                    [forward(model, x) for x in self.batches]
                else:
                    err[0] = relative_error(model, self.base, self.batches)

        self._runs(model, compare)
        err = err[0]
        if not err <= TOLERANCE:
            roots = ", ".join(dict.fromkeys(self.log.roots[:3]))
            raise UserError(f"{self.key}: self-check failed: the pruned model's outputs differ by {err:.2g} of their "
                            f"scale from the original with the removed channels zeroed (groups of {roots}); the "
                            "model was not kept; add those layers to ignore")
        return err
