"""The graph a roofline needs: every aten op of one forward pass, attributed to the module that ran it.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees each op after autograd and
decompositions (``linear`` arrives as ``t`` + ``addmm``), so residual adds, concatenations,
activations, pooling and reshapes are all there, not only the conv and linear layers. Forward
hooks keep a stack of module names, so an op is attributed to the innermost module running it
(a residual add to its block). Tensors are followed by storage: an op reads the values its
arguments hold and writes new ones; a view writes nothing; an in-place op writes a new value into
the storage it read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from compress.calls import call, eval_mode
from compress.plumbing.masks import weight_layers

__all__ = ["Op", "Trace", "trace_ops", "op_kind"]

_KINDS = {
    "conv": ("convolution", "_convolution", "mkldnn_convolution", "conv2d", "conv1d", "conv3d", "_conv_depthwise2d",
             "conv_transpose2d", "slow_conv2d_forward", "thnn_conv2d"),
    "matmul": ("addmm", "mm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"),
    "norm": ("_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm", "batch_norm",
             "native_layer_norm", "layer_norm", "native_group_norm", "group_norm"),
    "pool": ("max_pool2d_with_indices", "max_pool2d", "max_pool1d", "avg_pool2d", "avg_pool1d", "adaptive_avg_pool2d",
             "_adaptive_avg_pool2d", "adaptive_max_pool2d", "mkldnn_max_pool2d"),
    "reduce": ("mean", "sum", "amax", "amin", "max", "min", "_softmax", "softmax", "_log_softmax", "log_softmax",
               "argmax", "var_mean", "std", "var"),
    "activation": ("relu", "relu6", "hardtanh", "clamp", "clamp_min", "clamp_max", "sigmoid", "silu", "gelu", "tanh",
                   "leaky_relu", "hardswish", "hardsigmoid", "elu", "threshold", "mish"),
    "copy": ("cat", "stack", "copy", "clone", "contiguous", "constant_pad_nd", "_to_copy", "index_select", "gather",
             "pad", "reflection_pad2d", "replication_pad2d", "flip", "roll"),
}
_KIND_OF = {name: kind for kind, names in _KINDS.items() for name in names}


def op_kind(name: str) -> str:
    """conv | matmul | norm | pool | reduce | activation | copy | elementwise (anything else)."""
    return _KIND_OF.get(name.rstrip("_"), _KIND_OF.get(name, "elementwise"))


@dataclass
class Op:
    """One aten op of the forward pass."""

    index: int
    module: str  # qualified name of the innermost module running it ("" is the model itself)
    module_type: str
    leaf: bool  # that module has no children (a layer, not a block)
    name: str  # aten op name, e.g. "convolution", "addmm", "relu_"
    kind: str  # see op_kind, plus "view" and "grouped_conv"
    flops: int = 0
    reads: list[tuple[int, int, int]] = field(default_factory=list)  # (value id, elements, bytes/elem or 0=float)
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    weight: str | None = None  # the conv/linear weight it reads (qualified parameter name)
    params: list[tuple[str, int]] = field(default_factory=list)  # other parameters/buffers read (name, elements)
    # conv / matmul shape: reduction length per output (C_in/groups * k), output channels, groups
    reduction: int = 0
    out_channels: int = 0
    in_channels: int = 0
    groups: int = 1
    kernel: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        """The name a report shows: the layer for a leaf's ops, ``block.op`` for a block's own ops."""
        base = self.name.rstrip("_")
        if self.leaf and self.module:
            return self.module
        return f"{self.module}.{base}" if self.module else base


@dataclass
class Trace:
    ops: list[Op]
    module_calls: int  # nn.Module.__call__ count (eager PyTorch pays for each)
    input_ids: set[int]  # values that came from outside the model (its inputs)
    output_ids: set[int]  # values the model returned
    weights: dict[str, nn.Module]  # qualified weight name -> its layer (conv / linear / Conv1D)


class _Recorder(TorchDispatchMode):
    def __init__(self, params: dict[int, str], stack: list[tuple[str, nn.Module]]):
        super().__init__()
        self.params = params
        self.stack = stack
        self.ops: list[Op] = []
        self.current: dict[int, int] = {}  # storage pointer -> value id it holds now
        self.external: set[int] = set()
        self.next_id = 0

    def _new_value(self) -> int:
        self.next_id += 1
        return self.next_id

    def _read(self, t: Tensor) -> int:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.current:
            self.current[ptr] = vid = self._new_value()
            self.external.add(vid)
        return self.current[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        module, mod = self.stack[-1] if self.stack else ("", None)
        leaf = mod is not None and next(iter(mod.children()), None) is None
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        mutable = func._schema.is_mutable
        aliased = any(t.untyped_storage().data_ptr() in in_ptrs for t in outs)
        op = Op(len(self.ops), module, type(mod).__name__ if mod is not None else "", leaf, name, op_kind(name))
        if aliased and not mutable:  # a view: metadata only, no data moved
            op.kind = "view"
            self.ops.append(op)
            return out
        seen: set[int] = set()
        for t in ins:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            pname = self.params.get(ptr)
            if pname is not None:
                if op.kind in ("conv", "matmul") and t.dim() >= 2 and op.weight is None and pname.endswith("weight"):
                    op.weight = pname
                else:
                    op.params.append((pname, t.numel()))
                continue
            op.reads.append((self._read(t), t.numel(), 0 if t.is_floating_point() else t.element_size()))
        for t in outs:
            if not t.is_floating_point() and op.kind == "pool":
                continue  # max-pool indices: only training needs them
            vid = self._new_value()
            self.current[t.untyped_storage().data_ptr()] = vid
            op.writes.append((vid, t.numel(), 0 if t.is_floating_point() else t.element_size()))
        _count(op, func, args, kwargs, outs)
        self.ops.append(op)
        return out


def _count(op: Op, func: Any, args: tuple, kwargs: dict, outs: list[Tensor]) -> None:
    """FLOPs (a multiply-add is 2) and, for conv/matmul, the shape figures the roofline uses."""
    bound = dict(zip([a.name for a in func._schema.arguments], args, strict=False))
    bound.update(kwargs)
    out_numel = sum(t.numel() for t in outs)
    y = outs[0] if outs else None
    if op.kind == "conv":
        x, w = bound["input"], bound["weight"]
        op.groups = int(bound.get("groups", 1) or 1)
        op.out_channels, op.in_channels = int(w.shape[0]), int(x.shape[1])
        op.reduction = int(w[0].numel())
        op.kernel = tuple(int(s) for s in w.shape[2:])
        op.flops = 2 * y.numel() * op.reduction + (y.numel() if bound.get("bias") is not None else 0)
        if op.groups > 1:
            op.kind = "grouped_conv"
    elif op.kind == "matmul":
        if op.name == "linear":  # (B, K) x (N, K)^T
            w = bound["weight"]
            op.in_channels, op.out_channels = int(w.shape[1]), int(w.shape[0])
            bias = bound.get("bias") is not None
        else:  # addmm(bias, mat1 (M, K), mat2 (K, N)), mm/bmm(self, mat2), baddbmm(bias, batch1, batch2),
            # matmul(self, other): attention's q @ k^T and weights @ v
            a = next(bound[k] for k in ("mat1", "batch1", "self") if bound.get(k) is not None)
            b = next(bound[k] for k in ("mat2", "batch2", "other") if bound.get(k) is not None)
            op.in_channels, op.out_channels = int(a.shape[-1]), int(b.shape[-1])
            bias = op.name in ("addmm", "baddbmm", "_addmm_activation")
        op.reduction = op.in_channels
        op.flops = 2 * y.numel() * op.reduction + (y.numel() if bias else 0)
    elif op.kind == "norm":
        op.flops = 2 * out_numel
    elif op.kind == "pool":
        x = bound.get("self", bound.get("input"))
        window = 1
        if "adaptive" in op.name:
            window = max(1, x.numel() // max(1, y.numel()))
        else:
            k = bound.get("kernel_size", [1])
            k = list(k) if isinstance(k, list | tuple) else [k]
            for d in k:
                window *= int(d)
            if len(k) == 1 and x.dim() == 4:  # a square window given once
                window *= int(k[0])
        op.flops = y.numel() * window
    elif op.kind == "reduce":
        x = bound.get("self", bound.get("input"))
        op.flops = int(x.numel()) if isinstance(x, Tensor) else out_numel
    elif op.kind == "copy":
        op.flops = 0
    else:
        op.flops = out_numel


@torch.inference_mode()
def trace_ops(model: nn.Module, example: Any) -> Trace:
    """Run ``model(example)`` (or ``model(**example)``: :func:`compress.calls.call`) once (eval mode) and record every op.

    ``model`` should hold plain weights (``deployed_copy``), so a weight is one tensor the
    conv/linear reads; the layers' stored formats are looked up by the weight names returned.
    """
    params: dict[int, str] = {}
    for mname, m in model.named_modules():
        for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            params.setdefault(p.untyped_storage().data_ptr(), f"{mname}.{pname}" if mname else pname)
    weights = {f"{n}.weight" if n else "weight": m for n, m in weight_layers(model).items()}
    stack: list[tuple[str, nn.Module]] = []
    calls = [0]
    handles = []
    for mname, m in model.named_modules():
        def pre(mod: nn.Module, inp: Any, mname: str = mname) -> None:
            stack.append((mname, mod))
            calls[0] += 1

        def post(mod: nn.Module, inp: Any, out: Any) -> None:
            stack.pop()

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    recorder = _Recorder(params, stack)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the values are not what is measured: keep the trace off the other cores
    try:
        with eval_mode(model), recorder:
            out = call(model, example)
    finally:
        torch.set_num_threads(threads)
        for h in handles:
            h.remove()
    outputs = {recorder.current.get(t.untyped_storage().data_ptr(), -1)
               for t in tree_leaves(out) if isinstance(t, Tensor)}
    return Trace(recorder.ops, calls[0], recorder.external, outputs, weights)
