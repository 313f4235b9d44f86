"""Per-layer roofline simulation: time = max(compute time, memory time) + overhead, summed over ops.

For every op of a traced forward pass (:mod:`compress.hardware.trace`) on a
:class:`~compress.hardware.profiles.HardwareProfile`:

* compute time = FLOPs / (peak at the profile's dtype x the kernel's efficiency x the share of
  lanes its channel count fills);
* memory time = bytes moved off chip / DRAM bandwidth + bytes moved on chip / on-chip bandwidth,
  where bytes are the weights at their stored format (dense; CSR values plus relative indices; N:M
  values plus position metadata; codebook indices plus the codebook), the other parameters, and
  the input and output activations at the profile's dtype unless fused away or held on chip;
* overhead = the profile's fixed cost of that kind of op (a launch, eager dispatch).

Williams, Waterman and Patterson, "Roofline: An Insightful Visual Performance Model for Multicore
Architectures" (CACM 2009), applied op by op. A layer's weight format is chosen per profile as a
deployment tool would: the fastest one the hardware supports (sparse formats only where they pay).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from compress.hardware.profiles import HardwareProfile
from compress.hardware.trace import Op, Trace
from compress.plumbing.masks import deployed_copy, output_dim, weight_layers
from compress.sharing.shared import shared_bits

__all__ = ["WeightInfo", "weight_infos", "OpCost", "Simulation", "simulate", "nm_compliant", "FUSIBLE"]

MATRIX_KINDS = ("conv", "grouped_conv", "matmul")
FUSIBLE = ("norm", "activation", "elementwise")  # element-wise in effect (BN at inference is affine)


@dataclass
class WeightInfo:
    """How one conv/linear weight is stored, as the compression stages left it."""

    name: str
    elements: int
    nonzero: int
    rows: int  # output channels
    shared_bits: int | None = None  # codebook index width (weight sharing), None: plain values
    tensor: Tensor | None = field(default=None, repr=False)  # the deployed weight, for N:M checks

    @property
    def density(self) -> float:
        return self.nonzero / max(1, self.elements)


def weight_infos(model: nn.Module, deployed: nn.Module | None = None) -> dict[str, WeightInfo]:
    """Stored-format facts of every weight a conv or matmul of ``model`` may read (masks and codebooks included).

    Zeros are counted on the deployed values (whatever made them: a mask, structured removal,
    a codebook over pruned weights); codebook bits come from ``SharedWeight``. Besides the
    conv/linear layers' weights, every other parameter or buffer of two or more dimensions whose
    name ends in ``weight`` is described (the trace takes those as a matmul's weight).
    """
    deployed = deployed if deployed is not None else deployed_copy(model)
    plain = weight_layers(deployed)
    out: dict[str, WeightInfo] = {}
    with torch.no_grad():
        for name, m in weight_layers(model).items():
            w = plain[name].weight.detach() if name in plain else m.weight.detach()
            w = w.movedim(output_dim(m), 0)  # (out, in, ...): Conv1D stores (in, out)
            key = f"{name}.weight" if name else "weight"
            out[key] = WeightInfo(key, w.numel(), int(torch.count_nonzero(w)),
                                               int(w.shape[0]), shared_bits(m), w)
        # A conv or matmul also reads weights no such layer holds: a bare parameter given to F.linear
        # (MultiheadAttention's in_proj_weight, transformers' Conv1D) or a table tied to an earlier module
        # (GPT-2's lm_head). They are stored plain, under the name the trace gives a tensor: its first holder's.
        first: dict[int, tuple[str, Tensor]] = {}
        for mname, m in deployed.named_modules():
            for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                first.setdefault(p.untyped_storage().data_ptr(), (f"{mname}.{pname}" if mname else pname, p))
        for key, p in first.values():
            if key not in out and key.endswith("weight") and p.dim() >= 2:
                w = p.detach()
                out[key] = WeightInfo(key, w.numel(), int(torch.count_nonzero(w)), int(w.shape[0]), None, w)
    return out


def nm_compliant(w: Tensor, n: int, m: int) -> bool:
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the reduction (input) dim.

    The layout of NVIDIA's 2:4 sparse tensor cores (and Apex ASP's masks): for a conv weight
    (O, I, kh, kw) the groups run along I for each (o, kh, kw); for a linear (O, I) along I.
    """
    if w.dim() < 2:
        return False
    if w.numel() == 0:  # no weights (every channel removed): no group breaks the pattern
        return True
    rows = w.permute(0, *range(2, w.dim()), 1).reshape(-1, w.shape[1]) if w.dim() > 2 else w
    if rows.shape[1] % m:
        return False
    groups = rows.reshape(rows.shape[0], -1, m)  # (rows, I/m, m)
    return bool(((groups != 0).sum(-1) <= n).all())


@dataclass
class OpCost:
    """One row of the simulation: an op, with the element-wise ops fused into it."""

    name: str  # layer (or block.op) label
    module: str
    op: str  # aten op (+ fused ops)
    kind: str
    flops: float  # executed (after sparse formats)
    dram_bytes: float
    chip_bytes: float
    weight_bytes: float
    compute_us: float
    memory_us: float
    overhead_us: float
    time_us: float
    bound: str  # compute | memory | overhead
    weight_format: str = ""  # dense | csr | N:M | shared<bits> (+csr)
    fused: list[str] = field(default_factory=list)
    out_channels: int = 0
    in_channels: int = 0
    groups: int = 1
    kernel: tuple[int, ...] = ()

    def as_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["fused"] = list(self.fused)
        row["kernel"] = list(self.kernel)
        return row


@dataclass
class Simulation:
    profile: str
    ops: list[OpCost]
    framework_us: float  # nn.Module call overhead (eager), not attributed to an op

    @property
    def latency_us(self) -> float:
        return sum(o.time_us for o in self.ops) + self.framework_us

    @property
    def latency_ms(self) -> float:
        return self.latency_us / 1e3

    def share(self, bound: str) -> float:
        total = self.latency_us
        return sum(o.time_us for o in self.ops if o.bound == bound) / total if total else 0.0

    @property
    def overhead_share(self) -> float:
        total = self.latency_us
        return (sum(o.overhead_us for o in self.ops) + self.framework_us) / total if total else 0.0

    def bottlenecks(self, k: int = 5) -> list[OpCost]:
        return sorted(self.ops, key=lambda o: -o.time_us)[:k]

    def by_layer(self) -> dict[str, OpCost]:
        """Op costs keyed by label; repeated calls of one module are summed under its name."""
        out: dict[str, OpCost] = {}
        for o in self.ops:
            if o.name in out:
                prev = out[o.name]
                for f in ("flops", "dram_bytes", "chip_bytes", "weight_bytes", "compute_us", "memory_us",
                          "overhead_us", "time_us"):
                    setattr(prev, f, getattr(prev, f) + getattr(o, f))
            else:
                out[o.name] = OpCost(**{**asdict(o), "fused": list(o.fused), "kernel": tuple(o.kernel)})
        return out


# ---------------------------------------------------------------------------------------------
def _fusion_groups(ops: list[Op], profile: HardwareProfile) -> tuple[dict[int, int], set[int]]:
    """``leader[i]``: the op whose kernel op ``i`` runs in; ``internal``: values never leaving it."""
    producer: dict[int, int] = {}
    consumers: dict[int, int] = {}
    for op in ops:
        for vid, _, _ in op.reads:
            consumers[vid] = consumers.get(vid, 0) + 1
        for vid, _, _ in op.writes:
            producer[vid] = op.index
    leader: dict[int, int] = {}
    followers: dict[int, list[Op]] = {}
    internal: set[int] = set()
    by_index = {op.index: op for op in ops}
    for op in ops:
        leader[op.index] = op.index
        followers[op.index] = []
        if op.kind not in FUSIBLE:
            continue
        for vid, _, _ in op.reads:
            p = producer.get(vid)
            if p is None or consumers.get(vid, 0) != 1:  # a value read twice must be written out
                continue
            head = by_index[leader[p]]
            before = [f.kind for f in followers[head.index]]
            # conv + BN + activation: what cuDNN/TensorRT-style fused kernels cover, in that order.
            conv_chain = (profile.fusion.conv_bn_act and head.kind in MATRIX_KINDS
                          and ((op.kind == "norm" and not before) or (op.kind == "activation" and before in ([], ["norm"]))))
            if conv_chain or profile.fusion.elementwise:
                leader[op.index] = head.index
                followers[head.index].append(op)
                internal.add(vid)
                break
    return leader, internal


def _value_bytes(elements: int, elem: int, profile: HardwareProfile) -> int:
    return elements * (elem or profile.dtype_bytes)


def _residency(ops: list[Op], trace: Trace, internal: set[int], profile: HardwareProfile,
               capacity: float) -> set[int]:
    """Values held on chip: every moment of their life fits in ``capacity`` with the others live."""
    if capacity <= 0:
        return set()
    size: dict[int, int] = {}
    born: dict[int, int] = {}
    last: dict[int, int] = {}
    for op in ops:
        for vid, n, e in op.writes:
            size[vid], born[vid], last[vid] = _value_bytes(n, e, profile), op.index, op.index
        for vid, n, e in op.reads:
            size.setdefault(vid, _value_bytes(n, e, profile))
            born.setdefault(vid, -1)
            last[vid] = op.index
    live = [0.0] * (len(ops) + 1)
    position = {op.index: k for k, op in enumerate(ops)}
    for vid, s in size.items():
        if vid in internal:
            continue
        a = position.get(born[vid], -1) + 1 if born[vid] >= 0 else 0
        b = position.get(last[vid], len(ops) - 1)
        for k in range(a, b + 1):
            live[k] += s
    on_chip = set()
    for vid, s in size.items():
        if vid in trace.input_ids or vid in trace.output_ids or vid in internal:
            continue  # inputs arrive from, and outputs go to, memory
        a = position.get(born[vid], -1) + 1 if born[vid] >= 0 else 0
        b = position.get(last[vid], len(ops) - 1)
        if max(live[a:b + 1] or [s]) <= capacity:
            on_chip.add(vid)
    return on_chip


def _weight_options(info: WeightInfo | None, op: Op, profile: HardwareProfile) -> list[tuple[str, float, float]]:
    """(format, weight bytes, compute FLOP factor) for each format the profile can run."""
    if info is None:
        return [("dense", 0.0, 1.0)]
    bits = profile.dtype_bytes * 8
    fmt = "dense"
    codebook = 0.0
    if info.shared_bits is not None and profile.weight_sharing:
        bits = info.shared_bits
        codebook = (2 ** info.shared_bits) * profile.dtype_bytes
        fmt = f"shared{info.shared_bits}"
    options = [(fmt, info.elements * bits / 8 + codebook, 1.0)]
    u = profile.sparsity.unstructured
    if u.format == "csr" and info.nonzero < info.elements:
        # Han et al.'s CSR with relative indices (Deep Compression sec. 2; EIE): value + index per
        # non-zero, a pointer per row; the kernel does the non-zero MACs at ``efficiency``.
        csr_bytes = info.nonzero * (bits + u.index_bits) / 8 + (info.rows + 1) * 4 + codebook
        options.append((f"{fmt}+csr" if fmt != "dense" else "csr", csr_bytes, info.density / u.efficiency))
    nm = profile.nm_pattern
    if nm is not None and op.kind in ("conv", "matmul") and info.tensor is not None \
            and nm_compliant(info.tensor, *nm):
        n, m = nm
        meta = math.ceil(math.log2(m))
        nm_bytes = info.elements * n / m * (bits + meta) / 8 + codebook
        options.append((f"{n}:{m}" if fmt == "dense" else f"{fmt}+{n}:{m}", nm_bytes, n / m))
    return options


def _lane_fill(channels: int, lanes: int) -> float:
    if lanes <= 1 or channels <= 0:
        return 1.0
    return channels / (math.ceil(channels / lanes) * lanes)


def _overhead_us(kind: str, profile: HardwareProfile) -> float:
    o = profile.overhead_us
    if kind == "view":
        return o.view
    if kind == "grouped_conv":
        return next(v for v in (o.grouped_conv, o.conv, o.op) if v is not None)
    if kind == "conv":
        return o.conv if o.conv is not None else o.op
    if kind == "matmul":
        return o.matmul if o.matmul is not None else o.op
    return o.op


def simulate(trace: Trace, weights: dict[str, WeightInfo], profile: HardwareProfile) -> Simulation:
    """The roofline time of every op (fused groups as one) of ``trace`` on ``profile``."""
    ops = trace.ops
    leader, internal = _fusion_groups(ops, profile)
    # Weights (and other parameters) stay on chip between inferences when they all fit with the
    # activations' peak; otherwise every inference streams them from DRAM.
    param_elems: dict[str, int] = {}
    for op in ops:
        for pname, n in op.params:
            param_elems[pname] = n
    weight_total = sum(min(b for _, b, _ in _weight_options(weights.get(op.weight), op, profile))
                       for op in ops if op.weight) + sum(param_elems.values()) * profile.dtype_bytes
    weights_resident = profile.weights_on_chip and weight_total <= profile.on_chip_bytes
    capacity = profile.on_chip_bytes - (weight_total if weights_resident else 0)
    on_chip = _residency(ops, trace, internal, profile, capacity)
    peak = profile.peak_flops
    eff = profile.efficiency
    chip_bw = profile.on_chip_gbps * 1e9 if profile.on_chip_gbps else math.inf
    dram_bw = profile.memory_gbps * 1e9

    members: dict[int, list[Op]] = {}
    for op in ops:
        members.setdefault(leader[op.index], []).append(op)
    costs: list[OpCost] = []
    for head_index, group in members.items():
        head = group[0]
        assert head.index == head_index
        dram = chip = 0.0
        for op in group:
            for vid, n, e in op.reads + op.writes:
                if vid in internal:
                    continue
                b = _value_bytes(n, e, profile)
                if vid in on_chip:
                    chip += b
                else:
                    dram += b
            folded = profile.fusion.conv_bn_act and op is not head and op.kind == "norm" and head.kind in MATRIX_KINDS
            if not folded:  # BN folded into the conv's weights costs nothing at inference
                pbytes = sum(n for _, n in op.params) * profile.dtype_bytes
                if weights_resident:
                    chip += pbytes
                else:
                    dram += pbytes
        other_flops = sum(op.flops for op in group[1:]
                          if not (profile.fusion.conv_bn_act and op.kind == "norm" and head.kind in MATRIX_KINDS))
        other_compute = other_flops / (peak * eff.elementwise)
        if head.kind in MATRIX_KINDS:
            kind_eff = {"conv": eff.conv, "grouped_conv": eff.grouped_conv, "matmul": eff.matmul}[head.kind]
            fill = _lane_fill(head.out_channels, profile.lanes)
            aligned = profile.lanes <= 1 or (head.out_channels % profile.lanes == 0 and
                                             (head.groups > 1 or head.in_channels % profile.lanes == 0))
            rate = peak * kind_eff * fill * (1.0 if aligned else eff.unaligned)
        else:
            rate = peak * (eff.pool if head.kind == "pool" else eff.elementwise)
        best: tuple[float, ...] | None = None
        for fmt, wbytes, flop_factor in _weight_options(weights.get(head.weight), head, profile):
            flops = head.flops * flop_factor
            compute = flops / rate + other_compute
            w_dram, w_chip = (0.0, wbytes) if weights_resident else (wbytes, 0.0)
            memory = (dram + w_dram) / dram_bw + (chip + w_chip) / chip_bw
            t = max(compute, memory)
            if best is None or t < best[0]:
                best = (t, compute, memory, flops, wbytes, w_dram, w_chip, fmt)
        t, compute, memory, flops, wbytes, w_dram, w_chip, fmt = best  # type: ignore[misc]
        overhead = _overhead_us(head.kind, profile) * 1e-6
        bound = "overhead" if overhead >= t else ("compute" if compute >= memory else "memory")
        costs.append(OpCost(
            name=head.label, module=head.module, op="+".join(o.name.rstrip("_") for o in group), kind=head.kind,
            flops=flops + other_flops, dram_bytes=dram + w_dram, chip_bytes=chip + w_chip, weight_bytes=wbytes,
            compute_us=compute * 1e6, memory_us=memory * 1e6, overhead_us=overhead * 1e6,
            time_us=(t + overhead) * 1e6, bound=bound, weight_format=fmt if head.weight else "",
            fused=[o.label for o in group[1:]], out_channels=head.out_channels, in_channels=head.in_channels,
            groups=head.groups, kernel=head.kernel))
    return Simulation(profile.name, costs, trace.module_calls * profile.overhead_us.module)
