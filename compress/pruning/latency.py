"""Structured pruning to a latency target on a named runtime or hardware profile.

The MAC ratio is a poor guide to speed (a memory-bound layer saves little when its channels go;
channel counts that leave SIMD lanes idle can make a pruned model slower than the dense one), so
the amount each layer loses is chosen from its latency, as NetAdapt (Yang et al. 2018, section
3.2: per-layer latency lookup tables) and HALP (Shen et al. 2022, eq. 3: latency saved against
importance lost) do:

1. every layer whose width pruning changes gets a latency table over (input, output) widths,
   filled lazily on the target (:class:`LatencyTable`): the layer alone (conv + BN + ReLU, or
   linear) at its input resolution and the latency batch, timed in the runtime or eager torch,
   or simulated on a hardware profile (:func:`latency_backend`);
2. channel groups (Torch-Pruning's dependency graph: a conv's filters, the next layers' inputs,
   BN, both sides of a residual add) are narrowed greedily, one ``round_to`` step at a time, the
   step with the most latency saved per unit of importance lost first, until the tables say the
   target is met (:func:`allocate_widths`);
3. the lowest-importance channels of each group are removed through Torch-Pruning, the whole
   model's speedup is measured (or simulated) against the input model, and the table estimate is
   recalibrated on that figure (the parts no table holds: element-wise ops, pooling, dispatch),
   for up to ``MAX_ROUNDS`` rounds until the target is reached within the tolerance.

Tables are cached in memory per layer geometry, width pair, target and batch, and for measured
targets also on disk under ``$COMPRESS_CACHE`` (default ``~/.cache/compress``) ``/latency``, keyed
by CPU, torch (and runtime) version and thread count: a second run with the same target and
batch measures nothing it already knows, whatever model the layer belongs to.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from compress.calls import batch_size, call, take
from compress.errors import UserError
from compress.files import write_json
from compress.hardware import aligned_channels, load_profile, priced_at, simulate_model
from compress.hardware.calibrate import cache_root, cpu_model, simd_lanes_fp32
from compress.metrics.latency import compare_latency, latency_ms
from compress.plumbing.masks import deployed_copy, make_permanent, masked_modules, prunable_layers
from compress.pruning.attention import plan_heads
from compress.pruning.selfcheck import StepCheck, check_batches
from compress.pruning.structured import (
    PruneResult,
    StepCallback,
    StepLoop,
    accumulate_gradients,
    channel_counts,
    clear_grads,
    count_macs,
    faulty_groups,
    needs_gradients,
    output_layers,
    resolve_importance,
    trace_logits,
)
from compress.runtime import RUNTIMES, check_runtimes, feeds
from compress.schema import match_layers

__all__ = ["LatencyBackend", "latency_backend", "check_latency_target", "resolve_round_to", "auto_alignments",
           "LatencyTable", "LayerSpec", "allocate_widths", "prune_to_latency", "LatencyPruneResult", "TORCH", "MAX_ROUNDS"]

TORCH = "torch"  # eager PyTorch, as the pipeline's measured_* keys time it
MAX_ROUNDS = 5  # prune-and-measure rounds per step before a target counts as unreachable
FIRST_ROUND_SHARE = 0.5  # of the way left to a step's target (log speedup) in each of the first two rounds
MAX_JUMP = 3  # steps a move may take at once to get past widths that save nothing
DEFAULT_STEPS_PER_LAYER = 16  # without round_to: a group narrows in steps of 1/16 of its width
# A measured table entry is the fastest of this many medians: on a shared machine one median of five
# caught a preemption (ONNX Runtime, 3x3 conv 16->8 at 32x32, batch 32: 9.97 ms cached, 1.83 ms
# re-measured) and, cached, it hid ResNet's first stage from the allocation for good.
MEASURED_SAMPLES = 2
TABLE_FORMAT = 2  # in the disk cache's key: entries of format 1 (one median) are not reused


# ---------------------------------------------------------------------------------------------
# Where latency is taken: a runtime, eager torch, or a simulated hardware profile
# ---------------------------------------------------------------------------------------------
@dataclass
class LatencyBackend:
    """How to time a model on one target.

    Attributes:
        name: the ``latency_on`` value (``onnxruntime``, ``torch``, a profile name or path).
        how: one line for the report (``simulated on jetson-tx2 (fp16)``, ``measured in ...``).
        lanes: the channel multiple the target rewards (what ``round_to: auto`` resolves to).
        deterministic: simulated (the same figures every run) rather than measured.
        layer_ms: latency of a small module on a batch (fills the tables).
        model_ms: latency of a whole model on a batch.
        speedup: ``speedup(model, base, x)``: ``base``'s latency over ``model``'s, measured in
            alternating rounds where timing is involved.
        cache_key: what a measured table depends on besides the layer (None: not cached on disk).
    """

    name: str
    how: str
    lanes: int
    deterministic: bool
    layer_ms: Callable[[nn.Module, Tensor], float]
    model_ms: Callable[[nn.Module, Tensor], float]
    speedup: Callable[[nn.Module, nn.Module, Tensor], float]
    cache_key: dict[str, Any] | None = None


def check_latency_target(name: str, key: str = "latency_on") -> str:
    """Validate a ``latency_on`` value without measuring anything; returns its kind (runtime, torch, profile)."""
    if not isinstance(name, str) or not name:
        raise UserError(f"{key}: expected a runtime ({', '.join([TORCH, *RUNTIMES.names()])}) or a hardware "
                        f"profile name or YAML path, got {name!r}")
    if name == TORCH:
        return TORCH
    if name in RUNTIMES:
        check_runtimes([name], key)
        return "runtime"
    try:
        load_profile(name, key, calibrate=False)
    except UserError as e:
        raise UserError(f"{e} (or a runtime: {', '.join([TORCH, *RUNTIMES.names()])})") from None
    return "profile"


def latency_backend(name: str, *, threads: int = 1, key: str = "latency_on") -> LatencyBackend:
    """The :class:`LatencyBackend` for a ``latency_on`` value (a runtime, ``torch`` or a profile)."""
    kind = check_latency_target(name, key)
    if kind == "profile":
        return _profile_backend(name, key)
    if kind == TORCH:
        return _torch_backend(threads)
    return _runtime_backend(name, threads)


def _profile_backend(name: str, key: str) -> LatencyBackend:
    profile, _ = priced_at(load_profile(name, key), "fp32")  # structured pruning runs before quantize

    def sim_ms(m: nn.Module, x: Tensor) -> float:
        return simulate_model(m, x, [profile])[profile.name].latency_ms

    return LatencyBackend(name=profile.name, how=f"simulated on {profile.name} ({profile.dtype}, "
                          f"{profile.lanes} lanes)", lanes=aligned_channels(profile), deterministic=True,
                          layer_ms=sim_ms, model_ms=sim_ms, speedup=lambda m, b, x: sim_ms(b, x) / sim_ms(m, x))


def _torch_backend(threads: int) -> LatencyBackend:
    @torch.inference_mode()
    def ms(m: nn.Module, x: Tensor) -> float:
        m = m.eval()
        return latency_ms(lambda: call(m, x), repeats=5, warmup=2, threads=threads)

    @torch.inference_mode()
    def speedup(m: nn.Module, b: nn.Module, x: Tensor) -> float:
        dm, db = deployed_copy(m).eval(), deployed_copy(b).eval()
        return compare_latency(lambda: call(dm, x), lambda: call(db, x), rounds=8, repeats=3, warmup=3, threads=threads).speedup

    return LatencyBackend(name=TORCH, how=f"measured in eager torch ({threads} thread(s), A/B rounds)",
                          lanes=simd_lanes_fp32(), deterministic=False, layer_ms=ms, model_ms=ms, speedup=speedup,
                          cache_key={"torch": torch.__version__, "threads": threads, "cpu": cpu_model()})


def _runtime_backend(name: str, threads: int) -> LatencyBackend:
    deploy = RUNTIMES.get(name)

    def session(m: nn.Module, x: Tensor, folder: str, tag: str) -> Callable[[], Any]:
        s = deploy(deployed_copy(m).eval(), Path(folder) / f"{tag}.onnx", take(x, 1), threads=threads)
        a = feeds(x)
        return lambda: s.run(a)

    def ms(m: nn.Module, x: Tensor) -> float:
        with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
            return latency_ms(session(m, x, tmp, "layer"), repeats=5, warmup=2, threads=threads)

    def speedup(m: nn.Module, b: nn.Module, x: Tensor) -> float:
        with tempfile.TemporaryDirectory(prefix="compress-latency-") as tmp:
            return compare_latency(session(m, x, tmp, "model"), session(b, x, tmp, "base"), rounds=8, repeats=3,
                                   warmup=3, threads=threads).speedup

    try:
        import onnxruntime  # noqa: F401  (the version keys the cache; the package was checked)
        version = onnxruntime.__version__
    except ImportError:  # pragma: no cover - check_runtimes refused it already
        version = "?"
    # ONNX Runtime's CPU convolutions (MLAS NCHWc) compute channels in blocks of the SIMD width.
    return LatencyBackend(name=name, how=f"measured in {name} ({threads} thread(s), A/B rounds)",
                          lanes=simd_lanes_fp32(), deterministic=False, layer_ms=ms, model_ms=ms, speedup=speedup,
                          cache_key={"runtime": name, "version": version, "torch": torch.__version__,
                                     "threads": threads, "cpu": cpu_model()})


def resolve_round_to(round_to: int | str | None, backend: LatencyBackend | None) -> int | None:
    """``round_to: auto``: the target's lanes with a latency target, no rounding without one.

    With a latency target, :func:`prune_to_latency` takes ``"auto"`` itself (:func:`auto_alignments`):
    this is the first alignment it tries.
    """
    if round_to == "auto":
        return backend.lanes if backend is not None and backend.lanes > 1 else None
    return None if round_to is None else int(round_to)


def auto_alignments(backend: LatencyBackend) -> list[tuple[int | None, int | None]]:
    """The ``(round_to, small_round_to)`` pairs ``round_to: auto`` tries, in order, with a latency target.

    The target's lanes first; then the same with half of them for groups narrower than two lane
    blocks (ResNet's first stage is 16 channels wide: in steps of 16 it cannot lose any, and at
    32x32 it costs as much as each later stage); then half the lanes everywhere. The first pair
    whose tables can reach the target is used (measured on this CPU, ONNX Runtime at batch 32:
    ResNet-20/56 reach at most ~1.6x/~1.7x in steps of 16).
    """
    lanes = backend.lanes if backend.lanes > 1 else None
    if lanes is None or lanes < 4:
        return [(lanes, None)]
    return [(lanes, None), (lanes, lanes // 2), (lanes // 2, None)]


# ---------------------------------------------------------------------------------------------
# Per-layer latency tables
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSpec:
    """A conv/linear layer apart from its widths: what its latency table is keyed by."""

    kind: str  # conv | depthwise | linear
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    spatial: tuple[int, ...] = ()  # input (H, W) of a conv; leading dims of a linear's input

    def build(self, c_in: int, c_out: int, batch: int) -> tuple[nn.Module, Tensor]:
        """The layer alone at these widths (conv + BN + ReLU, as the model runs it) and an input batch."""
        torch.manual_seed(0)
        if self.kind == "linear":
            return nn.Linear(c_in, c_out).eval(), torch.randn(batch, *self.spatial, c_in)
        groups = c_out if self.kind == "depthwise" else 1
        conv = nn.Conv2d(c_out if groups > 1 else c_in, c_out, self.kernel, self.stride, self.padding, self.dilation,
                         groups=groups, bias=False)
        module = nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU()).eval()
        return module, torch.randn(batch, conv.in_channels, *self.spatial)

    def as_key(self, c_in: int, c_out: int, batch: int) -> str:
        geo = "x".join(map(str, self.kernel)) + f"s{self.stride}p{self.padding}d{self.dilation}@{self.spatial}"
        return f"{self.kind}:{geo}:{c_in}->{c_out}:b{batch}".replace(" ", "")


def _layer_spec(module: nn.Module, input_shape: tuple[int, ...]) -> LayerSpec | None:
    if isinstance(module, nn.Conv2d):
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        if module.groups > 1 and not depthwise:
            return None  # grouped (not depthwise) convolutions keep their widths here
        pad = module.padding if isinstance(module.padding, tuple) else None
        if pad is None:  # padding="same"/"valid"
            return None
        return LayerSpec("depthwise" if depthwise else "conv", tuple(module.kernel_size), tuple(module.stride), pad,
                         tuple(module.dilation), tuple(input_shape[2:]))
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", spatial=tuple(input_shape[1:-1]))
    return None


class LatencyTable:
    """Latency (ms) of one layer geometry at given widths on one target and batch, filled on demand.

    Args:
        backend: where latencies come from.
        batch: the batch size they are taken at.
        cache: read and write measured entries under ``$COMPRESS_CACHE/latency`` (simulated ones are
            cheap and never stored).
    """

    def __init__(self, backend: LatencyBackend, batch: int, cache: bool = True):
        self.backend, self.batch = backend, batch
        self.entries: dict[str, float] = {}
        self.measured = 0  # entries computed in this process (not from the disk cache)
        self.path: Path | None = None
        if cache and backend.cache_key is not None:
            key = {**backend.cache_key, "batch": batch, "format": TABLE_FORMAT}
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
            self.path = cache_root() / "latency" / f"{backend.name}-b{batch}-{digest}.json"
            try:
                data = json.loads(self.path.read_text())
                if data.get("key") == key:
                    self.entries.update({k: float(v) for k, v in data["entries"].items()})
            except (OSError, ValueError, KeyError, AttributeError):
                pass
            self.key = key

    def ms(self, spec: LayerSpec, c_in: int, c_out: int) -> float:
        """The layer's latency at ``c_in`` -> ``c_out`` channels (features)."""
        k = spec.as_key(c_in, c_out, self.batch)
        if k not in self.entries:
            module, x = spec.build(c_in, c_out, self.batch)
            samples = 1 if self.backend.deterministic else MEASURED_SAMPLES
            self.entries[k] = min(float(self.backend.layer_ms(module, x)) for _ in range(samples))
            self.measured += 1
        return self.entries[k]

    def save(self) -> None:
        """Write measured entries to the disk cache (a no-op for simulated targets)."""
        if self.path is None or not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path, {"key": self.key, "entries": self.entries}, indent=0)


# ---------------------------------------------------------------------------------------------
# The model as groups of channels, and the greedy allocation over them
# ---------------------------------------------------------------------------------------------
_OUT = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
_IN = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)


@dataclass
class _Group:
    root: str  # the layer whose outputs define the group
    module: nn.Module
    handler: Any
    width: int  # channels now
    floor: int  # fewest channels allowed (max_layer_ratio, round_to)
    step: int  # width step (round_to, or small_round_to for a narrow group)
    order: list[int]  # channel indices, least important first
    cost: list[float]  # cost[k]: importance of the k least important channels
    outs: dict[str, int] = field(default_factory=dict)  # layer -> its output channels in this group
    ins: dict[str, int] = field(default_factory=dict)  # layer -> its input channels (features) in this group


@dataclass
class _Layer:
    name: str
    spec: LayerSpec
    c_in: int
    c_out: int
    out_groups: dict[int, int] = field(default_factory=dict)  # group index -> channels from it
    in_groups: dict[int, int] = field(default_factory=dict)


@dataclass
class _Analysis:
    groups: list[_Group]
    layers: list[_Layer]
    graph: Any  # the Torch-Pruning DependencyGraph the groups came from

    def widths(self, w: Sequence[int]) -> list[tuple[int, int]]:
        """(c_in, c_out) of every layer when group i has width ``w[i]``."""
        out = []
        for lay in self.layers:
            c_out = lay.c_out + sum(k * w[g] // self.groups[g].width - k for g, k in lay.out_groups.items())
            c_in = c_out if lay.spec.kind == "depthwise" else \
                lay.c_in + sum(k * w[g] // self.groups[g].width - k for g, k in lay.in_groups.items())
            out.append((max(1, c_in), max(1, c_out)))
        return out


def _input_shapes(model: nn.Module, x: Tensor, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    layers = prunable_layers(model)
    shapes: dict[str, tuple[int, ...]] = {}
    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return record

    hooks = [layers[n].register_forward_hook(hook(n)) for n in names if n in layers]
    try:
        with torch.no_grad():
            call(model, take(x, 1))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _analyze(model: nn.Module, x: Tensor, imp: Any, ignored: Sequence[str], widths0: dict[str, int],
             round_to: int | None, max_layer_ratio: float, small_round_to: int | None = None) -> _Analysis:
    """Torch-Pruning's groups with their importance order, and the layers their widths reach."""
    layers = prunable_layers(model)
    name_of = {m: n for n, m in layers.items()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=take(x, 1), forward_fn=trace_logits)
    groups: list[_Group] = []
    for group in graph.get_all_groups(ignored_layers=[layers[n] for n in ignored if n in layers],
                                      root_module_types=(nn.Conv2d, nn.Linear)):
        root_dep = group[0].dep
        root = name_of.get(root_dep.target.module)
        if root is None:
            continue
        outs: dict[str, int] = {}
        ins: dict[str, int] = {}
        grouped = False
        for dep, idxs in group:
            target = dep.target.module
            if isinstance(target, nn.Conv2d) and target.groups > 1 and not (
                    target.groups == target.in_channels == target.out_channels):
                grouped = True  # Torch-Pruning's channel_groups case: left to ratio pruning
            layer = name_of.get(target)
            if layer is None:
                continue
            if dep.handler in _OUT:
                outs[layer] = len(idxs)
            elif dep.handler in _IN:
                ins[layer] = len(idxs)
        width = int(getattr(root_dep.target.module, "out_channels", getattr(root_dep.target.module, "out_features", 0)))
        if grouped or width < 2:
            continue
        scores = imp(group)
        if scores is None or len(scores) != width:
            continue
        # Torch-Pruning normalises a group's scores to mean 1, so a channel of a residual stream that
        # feeds twelve layers would count as much as one feeding two: weigh by the layers it reaches.
        scores = scores.detach().float().cpu() * max(1, len(outs) + len(ins))
        order = torch.argsort(scores, stable=True).tolist()
        cum = [0.0] + torch.cumsum(scores[order].clamp_min(0), 0).tolist()
        width0 = widths0.get(root, width)
        step = round_to or max(1, round(width0 / DEFAULT_STEPS_PER_LAYER))
        if round_to and small_round_to and width0 < 2 * round_to:  # one lane block: it could not narrow at all
            step = small_round_to
        keep = math.ceil(width0 * (1 - max_layer_ratio) - 1e-9)
        floor = max(step, -(-keep // step) * step) if round_to else max(1, keep)
        groups.append(_Group(root, root_dep.target.module, root_dep.handler, width, floor, step, order, cum, outs, ins))

    touched = {n for g in groups for n in (*g.outs, *g.ins)}
    shapes = _input_shapes(model, x, touched)
    table_layers = []
    for name in sorted(touched, key=list(layers).index):
        spec = _layer_spec(layers[name], shapes.get(name, ()))
        if spec is None or name not in shapes:
            continue
        m = layers[name]
        c_in = int(getattr(m, "in_channels", getattr(m, "in_features", 0)))
        c_out = int(getattr(m, "out_channels", getattr(m, "out_features", 0)))
        lay = _Layer(name, spec, c_in, c_out)
        for i, g in enumerate(groups):
            if name in g.outs:
                lay.out_groups[i] = g.outs[name]
            if name in g.ins:
                lay.in_groups[i] = g.ins[name]
        table_layers.append(lay)
    return _Analysis(groups, table_layers, graph)


def _next_width(g: _Group, width: int) -> int | None:
    w = (width - 1) // g.step * g.step if g.step > 1 else width - g.step
    return w if w >= g.floor and w > 0 else None


def allocate_widths(analysis: _Analysis, table: LatencyTable, goal_ms: float,
                    start: Sequence[int] | None = None, trace: list[list[int]] | None = None) -> tuple[list[int], float]:
    """Narrow groups greedily until the tables' sum reaches ``goal_ms`` (or nothing is left to narrow).

    Each move takes one group one step narrower: the one whose step saves the most table latency per
    unit of importance lost (HALP, Shen et al. 2022, eq. 3, solved greedily as NetAdapt does).
    A step that saves no latency (a width inside the same lane block) is extended by up to
    ``MAX_JUMP`` steps; a group none of whose jumps saves anything is left as it is. The last move
    is the one that reaches the goal losing the least importance (no needless overshoot).

    Args:
        trace: if given, the widths after every move are appended to it (the path, for backtracking).

    Returns:
        (width of every group, the tables' sum at those widths).
    """
    a, layers = analysis, analysis.layers
    w = list(start) if start is not None else [g.width for g in a.groups]
    layers_of = [[j for j, lay in enumerate(layers) if i in lay.out_groups or i in lay.in_groups]
                 for i in range(len(a.groups))]

    def layer_ms(widths: list[tuple[int, int]], j: int) -> float:
        return table.ms(layers[j].spec, *widths[j])

    current = a.widths(w)
    total = sum(layer_ms(current, j) for j in range(len(layers)))
    while total > goal_ms:
        best: tuple[float, int, int, float] | None = None
        finish: tuple[float, float, int, int] | None = None  # the cheapest move that reaches the goal
        for i, g in enumerate(a.groups):
            nxt, saved = w[i], 0.0
            for _ in range(MAX_JUMP):  # a step inside a lane block saves nothing: look one further
                nxt = _next_width(g, nxt)
                if nxt is None:
                    break
                trial = a.widths([*w[:i], nxt, *w[i + 1:]])
                saved = sum(layer_ms(current, j) - layer_ms(trial, j) for j in layers_of[i])
                if saved > 0:
                    break
            if nxt is None or saved <= 0:
                continue
            lost = g.cost[g.width - nxt] - g.cost[g.width - w[i]]
            score = saved / max(lost, 1e-12)
            if best is None or score > best[0]:
                best = (score, i, nxt, saved)
            if total - saved <= goal_ms and (finish is None or (lost, saved) < finish[:2]):
                finish = (lost, saved, i, nxt)
        if best is None:
            break
        _, i, nxt, saved = best
        if finish is not None:  # last move: the one losing least importance, not overshooting most
            _, saved, i, nxt = finish
        w[i] = nxt
        current = a.widths(w)
        total -= saved
        if trace is not None:
            trace.append(list(w))
    return w, total


def _table_ms(analysis: _Analysis, table: LatencyTable, w: Sequence[int] | None = None) -> float:
    widths = analysis.widths(w if w is not None else [g.width for g in analysis.groups])
    return sum(table.ms(lay.spec, *cw) for lay, cw in zip(analysis.layers, widths, strict=True))


def _prune_groups(analysis: _Analysis, widths: Sequence[int], check: StepCheck | None = None) -> None:
    """Remove each group's least important channels down to its width, through Torch-Pruning."""
    for g, w in zip(analysis.groups, widths, strict=True):
        if w >= g.width:
            continue
        idxs = sorted(g.order[: g.width - w])
        group = analysis.graph.get_pruning_group(g.module, g.handler, idxs)
        if analysis.graph.check_pruning_group(group):
            if check is not None:
                check.record(group)
            group.prune()


def _pruned_copy(model: nn.Module, analysis: _Analysis, widths: Sequence[int], x: Tensor) -> nn.Module:
    """A copy of ``model`` pruned to ``widths`` (the same channels :func:`_prune_groups` would remove)."""
    trial = copy.deepcopy(model)
    layers = prunable_layers(trial)
    graph = tp.DependencyGraph().build_dependency(trial, example_inputs=take(x, 1), forward_fn=trace_logits)
    for g, w in zip(analysis.groups, widths, strict=True):
        if w < g.width:
            group = graph.get_pruning_group(layers[g.root], g.handler, sorted(g.order[: g.width - w]))
            if graph.check_pruning_group(group):
                group.prune()
    return trial


def _backtrack(model: nn.Module, base: nn.Module, analysis: _Analysis, path: list[list[int]], x: Tensor,
               xb: Tensor, backend: LatencyBackend, goal: float, tolerance: float) -> tuple[list[int], float] | None:
    """The shortest prefix of the allocation's ``path`` whose whole-model speedup reaches ``goal``.

    A layer alone misses effects of the whole model: on a profile, a narrower layer's activations can
    start to fit on chip and the simulated model jumps past the target (MobileNetV2 on jetson-tx2:
    the tables aimed at 2x, the model simulated 2.34x; at 3x, 5.5x). Bisected on pruned copies (the
    speedup grows along the path, bar timing noise), so no channel is removed before the widths are
    known. Returns None when the full path does not overshoot ``goal * (1 + tolerance)``.
    """
    def speedup(k: int) -> float:
        if k not in seen:
            seen[k] = backend.speedup(_pruned_copy(model, analysis, path[k - 1], x), base, xb)
        return seen[k]

    seen: dict[int, float] = {}
    hi = len(path)
    if not path or speedup(hi) <= goal * (1 + tolerance):
        return None
    lo = 0  # prefix 0: nothing pruned this round (below the goal: the caller got here because it was)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if speedup(mid) >= goal:
            hi = mid
        else:
            lo = mid
    # the last move may jump from below the tolerance band to well above it: take the nearer side if in band
    if lo > 0 and speedup(lo) >= goal * (1 - tolerance) and goal / speedup(lo) < speedup(hi) / goal:
        hi = lo
    return path[hi - 1], speedup(hi)


# ---------------------------------------------------------------------------------------------
# Pruning to the target
# ---------------------------------------------------------------------------------------------
@dataclass
class LatencyPruneResult(PruneResult):
    """:class:`PruneResult` plus what the latency target asked for and got."""

    target: float = 1.0
    achieved: float = 1.0  # measured (or simulated) speedup against the input model at the latency batch
    estimated: float = 1.0  # what the tables predicted for the final widths
    on: str = ""
    how: str = ""
    batch: int = 1
    round_to: int | None = None
    small_round_to: int | None = None  # the step of groups narrower than two round_to blocks (round_to: auto)
    latency_history: list[float] = field(default_factory=list)  # achieved after each prune-and-measure round
    table_entries: int = 0
    table_measured: int = 0

    def as_dict(self) -> dict[str, Any]:
        out = super().as_dict()
        out.update(latency_speedup_target=self.target, latency_speedup=self.achieved,
                   latency_speedup_estimated=self.estimated, latency_on=self.on, latency_measured=self.how,
                   latency_batch=self.batch, round_to=self.round_to, small_round_to=self.small_round_to,
                   latency_history=self.latency_history,
                   latency_table_entries=self.table_entries, latency_table_measured=self.table_measured)
        return out


def prune_to_latency(model: nn.Module, example_inputs: Tensor, latency_inputs: Tensor, *, target: float,
                     backend: LatencyBackend, importance: Any = "l2", iterative_steps: int = 1,
                     round_to: int | str | None = None, small_round_to: int | None = None,
                     ignore: Sequence[str] = (), max_layer_ratio: float = 0.9,
                     tolerance: float = 0.05, on_step: StepCallback | None = None,
                     gradient_batches: Callable[[], Iterable[tuple[Tensor, Tensor]]] | Iterable | None = None,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy, table: LatencyTable | None = None,
                     check_inputs: Sequence[Any] | None = None, key: str = "prune") -> LatencyPruneResult:
    """Remove channels from ``model`` in place until it runs ``target`` times faster on ``backend``.

    Args:
        model: any ``nn.Module`` Torch-Pruning can trace (masked layers are baked, then re-masked).
        example_inputs: a batch for tracing and MAC counting.
        latency_inputs: a batch at the latency batch size: what the speedup is taken on.
        target: the speedup wanted against the model as it comes in (> 1).
        backend: :func:`latency_backend` (a runtime, ``torch``, a hardware profile).
        importance: a name in ``IMPORTANCES`` or a Torch-Pruning ``Importance``.
        iterative_steps: reach ``target ** (k / steps)`` at step k, calling ``on_step`` after each.
        round_to: channel counts stay multiples of this (and groups narrow in steps of it); ``"auto"``:
            the first of :func:`auto_alignments` whose tables can reach the target.
        small_round_to: the step of groups narrower than ``2 * round_to`` (None: ``round_to``).
        ignore: layer names/globs whose output channels are kept; the output layer always is.
        max_layer_ratio: no group loses more than this fraction of its channels.
        tolerance: a step counts as reached at ``target * (1 - tolerance)`` (timing noise).
        on_step: ``on_step(model, step, steps)`` after each step (the stage fine-tunes there).
        gradient_batches: ``(x, y)`` batches for ``taylor``.
        loss_fn: loss whose gradients ``taylor`` uses.
        table: a :class:`LatencyTable` to reuse (default: a new one on ``backend`` at the latency batch).
        check_inputs: batches the self-check compares outputs on (default: ``example_inputs``), as in
            :func:`compress.pruning.structured.prune_model`.
        key: recipe path for error messages.

    Raises:
        UserError: the target cannot be reached within ``max_layer_ratio`` (before any channel is
            removed when the tables already say so; else after saying how far it got).
    """
    if not target > 1.0:
        raise UserError(f"{key}.latency_speedup: {target} must be > 1 (input latency / pruned latency)")
    imp = resolve_importance(importance, f"{key}.importance")
    if needs_gradients(imp) and gradient_batches is None:
        raise UserError(f"{key}.importance: taylor needs training batches (run the stage with data)")
    batch = batch_size(latency_inputs)
    table = table or LatencyTable(backend, batch)
    masked = list(masked_modules(model))
    make_permanent(model)
    layers = prunable_layers(model)
    ignored = set(output_layers(model, example_inputs))
    if ignore:
        ignored |= set(match_layers(list(layers), list(ignore), f"{key}.ignore"))
    batches = check_batches(example_inputs, check_inputs)
    extra, notes = faulty_groups(model, example_inputs, skip=ignored, plan=plan_heads(model, "keep", key=key),
                                 check_inputs=batches, key=key)
    loop = StepLoop(model, example_inputs, batches, on_step=on_step, masked=masked, key=key, target=target,
                    what=f"latency on {backend.name}")
    search = _Search(model, example_inputs, latency_inputs, imp, sorted(ignored | set(extra)), channel_counts(model),
                     max_layer_ratio, table, deployed_copy(model).eval(), backend, tolerance, gradient_batches, loss_fn,
                     loop.progress)
    model.eval()
    try:
        search.align(target, auto_alignments(backend) if round_to == "auto" else [(round_to, small_round_to)], key)
        for step in range(1, iterative_steps + 1):
            goal = target ** (step / iterative_steps)
            search.reach(goal, loop.begin())
            loop.measure()
            if search.achieved < goal * (1 - tolerance):
                raise UserError(
                    f"{key}.latency_speedup: reached only {search.achieved:.2f}x of {goal:.2f}x on {backend.name} "
                    f"({backend.how}; step {step} of {iterative_steps}, {loop.ratio:.2f}x MACs) within max_layer_ratio "
                    f"{max_layer_ratio} (round_to {_alignment(search.round_to, search.small_round_to)}); lower the "
                    "target, raise max_layer_ratio or ignore fewer layers")
            loop.finish(step, iterative_steps)  # the self-check, then fine-tuning
    finally:
        clear_grads(model)
        model.train(loop.was_training)
        table.save()
    macs, params = count_macs(model, example_inputs)
    return LatencyPruneResult(loop.base_macs, macs, loop.base_params, params, search.before, channel_counts(model),
                              loop.history, iterative_steps, notes=notes + loop.notes(), self_check=max(loop.checks),
                              target=target, achieved=search.achieved, estimated=search.estimated, on=backend.name,
                              how=backend.how, batch=batch, round_to=search.round_to,
                              small_round_to=search.small_round_to, latency_history=search.history,
                              table_entries=len(table.entries), table_measured=table.measured)


@dataclass
class _Search:
    """The state of a latency search: the model, the tables, the alignment, what was measured."""

    model: nn.Module
    example_inputs: Tensor
    latency_inputs: Tensor
    imp: Any
    ignored: list[str]
    before: dict[str, int]
    max_layer_ratio: float
    table: LatencyTable
    base: nn.Module
    backend: LatencyBackend
    tolerance: float
    gradient_batches: Any
    loss_fn: Callable
    progress: Callable[[float], None]
    round_to: int | None = None
    small_round_to: int | None = None
    finer: list[tuple[int | None, int | None]] = field(default_factory=list)
    table0: float = 0.0
    share: float = 1.0
    achieved: float = 1.0
    estimated: float = 1.0
    history: list[float] = field(default_factory=list)

    def analysis(self) -> _Analysis:
        return _analyze(self.model, self.example_inputs, self.imp, self.ignored, self.before, self.round_to,
                        self.max_layer_ratio, self.small_round_to)

    def align(self, target: float, alignments: list[tuple[int | None, int | None]], key: str) -> None:
        """The first alignment whose tables can reach ``target`` (else a refusal before any pruning)."""
        base_ms = self.backend.model_ms(self.base, self.latency_inputs)
        for self.round_to, self.small_round_to in alignments:
            analysis = self.analysis()
            self.table0 = _table_ms(analysis, self.table)
            floor_ms = _table_ms(analysis, self.table, [min(g.width, g.floor) for g in analysis.groups])
            if self.table0 / max(floor_ms, 1e-12) >= target * (1 - self.tolerance):
                break
        # finer alignments auto may still move to when the whole model stops short (multiples of 16 are of 8)
        self.finer = alignments[alignments.index((self.round_to, self.small_round_to)) + 1:]
        if self.table0 / max(floor_ms, 1e-12) < target * (1 - self.tolerance):  # even if nothing but the tables shrank
            raise UserError(f"{key}.latency_speedup: {target}x on {self.backend.name} cannot be reached: the layers it "
                            f"can narrow give at most about {self.table0 / max(floor_ms, 1e-12):.2f}x (max_layer_ratio "
                            f"{self.max_layer_ratio}, round_to {_alignment(self.round_to, self.small_round_to)}, "
                            "ignored layers); nothing was pruned")
        # Whole-model latency ~ base * (1 - share + share * tables / tables at the start): ``share`` is the
        # part of the latency the tables explain, refitted on every measurement.
        self.share = min(1.0, self.table0 / base_ms) if base_ms > 0 else 1.0

    def reach(self, goal: float, check: StepCheck) -> None:
        """Prune-and-measure rounds until ``goal`` is met (within tolerance) or nothing more can be narrowed."""
        for rnd in range(MAX_ROUNDS + len(self.finer)):
            if _gradients_needed(self.imp, self.gradient_batches):
                accumulate_gradients(self.model, self.gradient_batches, self.loss_fn)
            analysis = self.analysis()
            clear_grads(self.model)
            now = _table_ms(analysis, self.table) / self.table0
            if self.achieved > 1.001 and now < 0.999:  # refit on the last measurement (speedups are > 1)
                self.share = min(1.5, max(0.05, (1 - 1 / self.achieved) / (1 - now)))
            # the first two rounds go half the way (in log speedup) before the tables are calibrated on a
            # measurement: a layer alone misses effects of the whole (activations that start to fit in
            # cache), and removed channels cannot come back
            aim = goal if rnd >= 2 or goal / self.achieved < 1.15 else \
                self.achieved * (goal / self.achieved) ** FIRST_ROUND_SHARE
            path: list[list[int]] = []
            widths, est = allocate_widths(analysis, self.table, self.table0 * max(0.0, 1 - (1 - 1 / aim) / self.share),
                                          trace=path)
            if widths == [g.width for g in analysis.groups]:
                if self.finer:  # round_to: auto, stuck at this alignment: go on with the next finer one
                    self.round_to, self.small_round_to = self.finer.pop(0)
                    continue
                break  # nothing more to narrow
            # check the whole model before removing channels: back off along the path if it overshoots
            back = _backtrack(self.model, self.base, analysis, path, self.example_inputs, self.latency_inputs,
                              self.backend, goal, self.tolerance)
            if back is not None:
                widths = back[0]
                est = _table_ms(analysis, self.table, widths)
            self.estimated = 1 / max(1e-9, 1 - self.share * (1 - est / self.table0))
            _prune_groups(analysis, widths, check)
            check.runs(self.model)
            self.achieved = self.backend.speedup(self.model, self.base, self.latency_inputs)
            self.history.append(self.achieved)
            self.progress(self.achieved)
            if self.achieved >= goal * (1 - self.tolerance):
                break


def _alignment(round_to: int | None, small_round_to: int | None) -> str:
    return f"{round_to}" + (f" ({small_round_to} below {2 * round_to} channels)" if small_round_to and round_to else "")


def _gradients_needed(imp: Any, gradient_batches: Any) -> bool:
    return needs_gradients(imp) and gradient_batches is not None
