"""Parameters, zeros and multiply-accumulates, per layer and in total.

MACs of a convolution or linear layer (Hugging Face's ``Conv1D`` too) = weight elements x output
positions per sample (``C_out * C_in/groups * kh * kw * H_out * W_out``; tokens for a linear); effective MACs skip zero weights, the work
left for hardware that exploits unstructured sparsity. Counted from one traced forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from compress.calls import call, eval_mode, take
from compress.plumbing.masks import out_width, weight_layers
from compress.quant.quantizers import WeightQuantizer

__all__ = ["LayerStats", "count_layers", "summarize", "weight_reads", "owner", "weight_readers", "untouched_share",
           "untouched_note", "listed_layers"]

# Ops that read a tensor as a weight: a parameter (2-D or more) passed to one of them is a layer's
# weight whatever the module's class (Hugging Face's Conv1D reads its weight with addmm; a bare
# parameter given to F.linear). ``nn.MultiheadAttention`` hands its projections to one function, whose inner
# ``linear`` calls the mode does not see: its ``in_proj_weight`` and ``out_proj.weight`` are read there.
WEIGHT_OPS = frozenset({"linear", "bilinear", "addmm", "mm", "matmul", "bmm", "baddbmm", "addbmm", "einsum",
                        "__matmul__", "__rmatmul__", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
                        "conv_transpose2d", "conv_transpose3d", "convolution", "_convolution",
                        "multi_head_attention_forward"})


@dataclass
class LayerStats:
    name: str
    type: str
    params: int  # the layer's weight elements (the pruned tensor)
    nonzero: int
    sparsity: float
    macs: int  # per sample
    effective_macs: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _output_positions(model: nn.Module, layers: dict[str, nn.Module], example: Tensor) -> dict[str, int]:
    """Output positions per sample of each layer (H_out*W_out for conv, tokens for linear)."""
    positions: dict[str, int] = {}
    handles = []
    for name, m in layers.items():
        def hook(mod: nn.Module, inp: Any, out: Tensor, name: str = name) -> None:
            positions[name] = out.numel() // out_width(mod)  # the model runs on one sample: all of it is that sample's
        handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            call(model, take(example, 1))
    finally:
        for h in handles:
            h.remove()
    return positions


def _unquantized_weight(module: nn.Module) -> Tensor:
    """The weight as the layer computes it, but before int8 rounding: a weight rounded to zero is no
    pruned weight (no sparsity, no MACs saved), while a mask's or a codebook's zeros are."""
    if not (hasattr(module, "parametrizations") and "weight" in module.parametrizations):
        return module.weight
    chain = module.parametrizations["weight"]
    if not any(isinstance(p, WeightQuantizer) for p in chain):
        return module.weight
    w = chain.original
    for p in chain:
        if not isinstance(p, WeightQuantizer):
            w = p(w)
    return w


def count_layers(model: nn.Module, example: Tensor) -> list[LayerStats]:
    """Per-layer statistics of the weight layers (conv, linear, ``Conv1D``) in forward order."""
    layers = weight_layers(model)
    positions = _output_positions(model, layers, example)
    missing = [n for n in layers if n not in positions]
    if missing:  # a weight its parent reads without calling the layer (nn.MultiheadAttention's out_proj)
        outputs = _traced_reads(model, example).outputs
        for name in missing:
            if f"{name}.weight" in outputs:
                positions[name] = outputs[f"{name}.weight"] // out_width(layers[name])
    stats = []
    for name, m in layers.items():
        if name not in positions:  # not on the forward path
            continue
        with torch.no_grad():
            w = _unquantized_weight(m)
            n, nz = w.numel(), int(torch.count_nonzero(w))
        pos = positions[name]
        stats.append(LayerStats(name, type(m).__name__, n, nz, 1.0 - nz / n if n else 0.0, n * pos, nz * pos))
    return stats


def summarize(model: nn.Module, layers: list[LayerStats]) -> dict[str, Any]:
    """Model-wide counts: every parameter (biases, BN too) plus the layer totals.

    ``sparsity`` is the fraction of zeros among the prunable layers' weights, the quantity
    pruning targets set; ``params``/``nonzero_params`` count every parameter.
    """
    params = nonzero = 0
    for t in _logical_params(model):
        params += t.numel()
        nonzero += int(torch.count_nonzero(t))
    w_total = sum(s.params for s in layers)
    w_nonzero = sum(s.nonzero for s in layers)
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": 1.0 - w_nonzero / w_total if w_total else 0.0,
        "macs": sum(s.macs for s in layers),
        "effective_macs": sum(s.effective_macs for s in layers),
        "dense_bytes": params * 4,
    }


def _logical_params(model: nn.Module) -> list[Tensor]:
    """Parameters as the model computes them (a masked or shared weight counts once, as used)."""
    out = []
    with torch.no_grad():
        for path, m in model.named_modules():
            if "parametrizations" in path.split("."):  # a parametrization's own state (original, mask)
                continue
            names = set(dict(m.named_parameters(recurse=False)))
            parametrized = set(m.parametrizations.keys()) if hasattr(m, "parametrizations") else set()
            for n in sorted(names | parametrized):
                if n == "parametrizations":
                    continue
                out.append(getattr(m, n))
    return out


class _WeightReads(TorchFunctionMode):
    """Records, in the order they run, the torch functions that read one of the model's parameters as a weight."""

    def __init__(self, params: dict[int, str]):
        super().__init__()
        self.params = params  # id of a weight tensor -> its parameter name
        self.reads: list[tuple[str, str, int]] = []  # (parameter name, function name, elements), one per read
        self.outputs: dict[str, int] = {}  # parameter name -> elements of the output of the op that first read it

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = getattr(func, "__name__", "")
        if op in WEIGHT_OPS:
            first = out[0] if isinstance(out, tuple) else out
            for a in (*args, *kwargs.values()):
                if isinstance(a, Tensor) and a.dim() >= 2 and id(a) in self.params:
                    name = self.params[id(a)]
                    self.reads.append((name, op, a.numel()))
                    if isinstance(first, Tensor):
                        self.outputs.setdefault(name, first.numel())
        return out


def _traced_reads(model: nn.Module, example: Any) -> _WeightReads:
    """One forward pass of a sample of ``example`` with every weight read recorded."""
    with eval_mode(model), torch.no_grad(), parametrize.cached():
        params = {id(p): n for n, p in model.named_parameters()}
        # a masked, shared or quantised weight is computed: while cached, the forward reads this very tensor
        params |= {id(m.weight): f"{n}.weight" for n, m in model.named_modules()
                   if parametrize.is_parametrized(m, "weight")}
        mode = _WeightReads(params)
        with mode:
            call(model, take(example, 1))
    return mode


def owner(parameter: str) -> str:
    """The module a parameter name belongs to: ``'a.b.weight'`` -> ``'a.b'`` (the root: ``''``)."""
    return parameter.rsplit(".", 1)[0] if "." in parameter else ""


def weight_reads(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """``(module name, function name)`` of every matmul or convolution that reads a module's weight in one
    forward pass (whatever module holds it: found by what it computes; a masked, shared or quantised weight
    counts as its layer's), in the order the pass runs them (a weight read twice, e.g. tied, appears twice)."""
    return [(owner(name), op) for name, op, _ in _traced_reads(model, example).reads]


def weight_readers(model: nn.Module, example: Any) -> dict[str, int]:
    """``{module name: weight elements}`` of every module whose own parameter :func:`weight_reads` finds."""
    sizes = {name: n for name, _, n in _traced_reads(model, example).reads}  # each once, however often read
    out: dict[str, int] = {}
    for name, n in sizes.items():
        out[owner(name)] = out.get(owner(name), 0) + n
    return out


def untouched_share(model: nn.Module, example: Any, touched: Any) -> tuple[float, list[str]]:
    """The fraction of all parameters in weight-reading modules outside ``touched`` (names), and those modules."""
    touched = set(touched)
    readers = weight_readers(model, example)
    left = {n: k for n, k in readers.items() if n not in touched}
    total = sum(t.numel() for t in _logical_params(model))  # as the model computes (a shared weight is a buffer)
    return (sum(left.values()) / total if total else 0.0), sorted(left)


def listed_layers(model: nn.Module, names: Sequence[str]) -> str:
    """``'a' (Linear), 'b' (Conv2d) and 3 more``: the first two of ``names`` with their classes, for a note."""
    shown = ", ".join(f"'{n}' ({type(model.get_submodule(n)).__name__})" for n in names[:2])
    return shown + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def untouched_note(model: nn.Module, example: Any, touched: Any, who: str = "this stage cannot touch") -> str | None:
    """One note naming the share of parameters in weight-reading modules outside ``touched`` (names), or None."""
    share, names = untouched_share(model, example, touched)
    if not names:
        return None
    return (f"{share:.0%} of the parameters are in layers {who} ({listed_layers(model, names)}): its sparsity and "
            "MAC figures leave them out")
