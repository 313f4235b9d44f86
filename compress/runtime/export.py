"""ONNX export: fp32 graphs, and int8 QDQ graphs of a model quantised by :mod:`compress.quant`.

Exporter: torch's TorchScript-based exporter (``dynamo=False``). With torch 2.13 both exporters
export every zoo model, pruned ones included, with equal outputs; the TorchScript one does it in
0.1-0.5 s against 1-8 s for ``torch.export`` (which also needs ``onnxscript``), gives the
dynamic batch axis from ``dynamic_axes`` without shape guards, folds BatchNorm into the
convolutions, and names nodes by module scope. It is deprecated upstream; when it goes,
``dynamo=True`` with ``dynamic_shapes`` is the drop-in replacement (the checks here stay).

int8: the float graph is quantised by ONNX Runtime's ``quantize_static`` (QDQ format, symmetric
per-channel int8 weights, uint8 activations, MinMax calibration), after its ``quant_pre_process``
cleanup so every convolution fuses into an int8 kernel; weights the torch model keeps float (layers
left float, a bare parameter given to ``F.linear``) are excluded, and Gemm/MatMul outputs are not
rounded (the torch model rounds layer inputs only). See :mod:`compress.quant` for why.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from compress.calls import batch_size, cat, forward
from compress.errors import UserError
from compress.metrics.counting import weight_reads
from compress.quant import float_copy, is_quantized, quantized_layers
from compress.runtime.ort import OrtModel, feeds, ort_evaluate, require
from compress.tasks import build_task

__all__ = ["export_onnx", "FP32_TOLERANCE", "INT8_AGREEMENT", "OPSET"]

OPSET = 17
FP32_TOLERANCE = 1e-4  # max |ORT - torch| on the logits, times max(1, max |torch logits|)
DEFAULT_MAX_ACCURACY_DROP = 0.01  # the int8 gate's tolerance when export_onnx is given a test split and no drop
INT8_AGREEMENT = 0.99  # top-1 agreement of the int8 graph with the torch fake-quantised model (or: _check_int8)
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_LAYER_OPS = ("Conv", "Gemm", "MatMul")  # what quantisable layers export to (Conv1D: Gemm or MatMul + Add)
# The torch functions that read a weight and export to one of those nodes (metrics.counting.WEIGHT_OPS names them)
# (multi_head_attention_forward reads its in- and out-projection weights in the order their nodes run)
EXPORTED_WEIGHT_OPS = frozenset({"linear", "addmm", "mm", "matmul", "__matmul__", "__rmatmul__", "conv1d", "conv2d",
                                 "conv3d", "multi_head_attention_forward"})
# What ORT may quantise: the layers, and ops that only move or clip values (int8 flows through them
# into the next layer). Not ops that compute new values from float tables or statistics (Gather of an
# embedding, LayerNormalization, ...): the torch model keeps those float, so the int8 graph does too.
QDQ_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "AveragePool", "BatchNormalization",
           "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Pad", "Resize")


def _as_batch(x: Any) -> Any:
    """A batch of inputs on the CPU: a tensor (floating point as float32) or a mapping of tensors
    (token ids keep their integer type); an ``(inputs, targets)`` pair or a one-tensor tuple gives its inputs."""
    if isinstance(x, list | tuple):
        x = x[0]
    if isinstance(x, Mapping) and x and all(isinstance(v, Tensor) for v in x.values()):
        return {str(k): _cpu(v) for k, v in x.items()}
    if not isinstance(x, Tensor):
        raise UserError(f"export: example inputs must be a tensor or a mapping of tensors, got {type(x).__name__}")
    return _cpu(x)


def _cpu(t: Tensor) -> Tensor:
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t


def input_names(example: Any) -> list[str]:
    """The graph's input names: ``input`` for one tensor, the mapping's keys for keyword inputs."""
    return list(example) if isinstance(example, Mapping) else [INPUT_NAME]


class _Logits(nn.Module):
    """The model with its logits as the one output (:func:`compress.calls.logits_of`), called with
    keyword arguments for a mapping of inputs: what the exporter traces."""

    def __init__(self, model: nn.Module, names: list[str] | None):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: Tensor) -> Tensor:
        inputs = dict(zip(self.names, args, strict=True)) if self.names else args[0]
        return forward(self.model, inputs)


def _export_float(model: nn.Module, example: Any, path: Path, opset: int) -> None:
    names = input_names(example)
    args = tuple(example.values()) if isinstance(example, Mapping) else (example,)
    wrapped = _Logits(model, names if isinstance(example, Mapping) else None)
    wrapped.train(model.training)  # the exporter restores the wrapper's mode on every submodule after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(wrapped, args, str(path), dynamo=False, opset_version=opset,
                          input_names=names, output_names=[OUTPUT_NAME],
                          dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT_NAME: {0: "batch"}})


def _weight_nodes(graph: Any, weights: bool = True) -> list[Any]:
    """Conv/Gemm/MatMul nodes that multiply by a weight (an initializer: what a layer exports to), or
    with ``weights=False`` the MatMuls of two activations (attention's q @ k^T and weights @ v)."""
    inits = {i.name for i in graph.initializer}
    return [n for n in graph.node if n.op_type in ONNX_LAYER_OPS
            and any(i in inits for i in n.input[:2]) == weights]


def _float_nodes(model: nn.Module, example: Any, onnx_path: Path, quantized: Collection[str]) -> list[str]:
    """The graph's Conv/Gemm/MatMul nodes whose weight no ``quantized`` layer holds (a layer kept in float,
    a bare parameter given to ``F.linear``, a tied table), which ONNX Runtime must leave float as the torch
    model does: the weight reads of one forward (:func:`compress.metrics.weight_reads`) matched to the
    nodes by order of execution (the order the exporter traced)."""
    reads = [owner for owner, op in weight_reads(model, example) if op in EXPORTED_WEIGHT_OPS]
    if all(owner in quantized for owner in reads):
        return []
    nodes = [n.name for n in _weight_nodes(require("onnx").load(str(onnx_path), load_external_data=False).graph)]
    if len(nodes) != len(reads):
        raise UserError(f"export: cannot match the {len(reads)} weight reads to the {len(nodes)} Conv/Gemm/MatMul "
                        "nodes of the graph, so layers kept in float cannot be excluded; quantise every layer")
    return [node for owner, node in zip(reads, nodes, strict=True) if owner not in quantized]


def _quantize_graph(fp32: Path, out: Path, calibration: list[Tensor], exclude: Sequence[str]) -> None:
    quantization = require("onnxruntime.quantization")
    pre = fp32.with_name(fp32.stem + ".pre.onnx")
    # Constant folding and identity removal: the TorchScript exporter shares equal initializers through
    # Identity nodes, which would otherwise keep convolutions out of ORT's QDQ -> QLinearConv fusion.
    quantization.quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    batches = iter([feeds(b) for b in calibration])

    class Reader(quantization.CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    quantization.quantize_static(
        str(pre), str(out), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax, nodes_to_exclude=list(exclude),
        op_types_to_quantize=list(QDQ_OPS),
        # the torch model rounds a layer's input, never a linear layer's output: ORT would round it too (GPT-2's
        # c_attn output, split for attention's float matmuls) and flip low-margin predictions the torch model keeps
        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                       "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"]})


def _shorten_tensor_names(path: Path) -> None:
    """Rename intermediate tensors and initializers ``t0, t1, ...``, in place; node names (module scopes) stay.

    ORT's quantiser derives names like ``onnx::Conv_2041_quantized_zero_point``; in a small int8
    graph they are ~7% of the file, the gap between a 3.3x and a 3.5x smaller file than fp32.
    """
    onnx = require("onnx")
    model = onnx.load(str(path))
    graph = model.graph
    keep = {v.name for v in (*graph.input, *graph.output)}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for value in graph.value_info:
        value.name = short(value.name)
    onnx.save(model, str(path))


def _check_fp32(reference: nn.Module, path: Path, inputs: Any) -> None:
    with torch.no_grad():
        expected = forward(reference, inputs)
    got = OrtModel(path)(inputs)
    err = float((got - expected).abs().max())
    tol = FP32_TOLERANCE * max(1.0, float(expected.abs().max()))
    if not err <= tol:
        raise UserError(f"export: ONNX Runtime fp32 outputs differ from PyTorch by {err:.3g} (> {tol:.3g}); "
                        f"the graph is not faithful, file not written")


def _check_int8_metric(reference: nn.Module, float_model: nn.Module, path: Path, inputs: Any, targets: Any,
                       task: Any, max_drop: float | None = None) -> float:
    """The int8 graph judged by the task, on labelled check inputs: its primary metric is within
    ``max_drop`` of the float model's (the recipe's ``max_accuracy_drop``), or within
    ``(1 - INT8_AGREEMENT) * max(1, |metric|)`` (1 point of an accuracy) of the PyTorch quantised
    model's, or no further from the float model's than the PyTorch quantised model is, plus that.
    A sigmoid or regression model's top-1 agreement says nothing of its quality; its metric does."""
    with torch.no_grad():
        outputs = {"quantised": forward(reference, inputs), "float": forward(float_model, inputs)}
    outputs["int8"] = OrtModel(path)(inputs)
    score = {k: task.evaluate(lambda _x, out=out: out, [(inputs, targets)])["metric"] for k, out in outputs.items()}
    q, f, o = score["quantised"], score["float"], score["int8"]
    tol = (1 - INT8_AGREEMENT) * max(1.0, abs(q))
    if task.name == "classification" and isinstance(inputs, Tensor):
        # a test set of n distinct inputs cannot show a change smaller than one of them (64 synthetic
        # samples: 1.6 points); one prediction flipped by rounding is the resolution, not a broken graph
        tol = max(tol, 1.0 / len(torch.unique(inputs.flatten(1), dim=0)) + 1e-9)
    within_recipe = max_drop is not None and task.drop(f, o) <= max_drop
    if not within_recipe and task.drop(q, o) > tol and task.drop(f, o) > task.drop(f, q) + tol:
        allowed = "" if max_drop is None else f" and more than max_accuracy_drop {max_drop:g} below float"
        raise UserError(f"export: int8 ONNX Runtime {task.primary} is {o:.4g} on {batch_size(inputs)} check inputs, "
                        f"the PyTorch quantised model's {q:.4g} (float: {f:.4g}): more than {tol:.3g} worse{allowed}; "
                        "file not written")
    return o


def _check_int8(reference: nn.Module, float_model: nn.Module, path: Path, inputs: Any) -> float:
    """Top-1 agreement of the int8 graph with the PyTorch quantised model, which must be at least
    ``INT8_AGREEMENT``; where quantisation itself moves predictions (low-margin models: a small ViT),
    it passes too if the graph agrees with the float model within ``1 - INT8_AGREEMENT`` of how well the
    PyTorch quantised model does (two int8 approximations of one float model; a broken graph misses both)."""
    with torch.no_grad():
        expected = forward(reference, inputs).argmax(1)
        floats = forward(float_model, inputs).argmax(1)
    got = OrtModel(path)(inputs).argmax(1)
    agreement = float((got == expected).float().mean())
    sim, ort = float((expected == floats).float().mean()), float((got == floats).float().mean())
    if agreement < INT8_AGREEMENT and ort < sim - (1 - INT8_AGREEMENT):
        raise UserError(f"export: int8 ONNX Runtime top-1 agrees with the PyTorch quantised model on {agreement:.1%} "
                        f"of {batch_size(inputs)} inputs (< {INT8_AGREEMENT:.0%}) and with the float model on {ort:.1%} "
                        f"(the PyTorch quantised model: {sim:.1%}); file not written")
    return agreement


def int8_accuracy_gate(int8_graph: str | Path | OrtModel, test: Iterable[Any], float_metric: float,
                       max_drop: float, task: Any = None) -> dict[str, Any]:
    """The one int8 quality rule, for the ``quantize`` stage and for ``export`` alike: the int8 graph's
    primary metric of ``task`` (default: classification's accuracy) in ONNX Runtime on the test split
    is at most ``max_drop`` worse than the float model's ``float_metric``, in the metric's direction."""
    task = task if task is not None else build_task(None)
    metric = ort_evaluate(int8_graph, test, task)["metric"]
    drop = task.drop(float_metric, metric)
    out = {"runtime_metric": metric, "float_runtime_metric": float_metric, "drop": drop, "max_drop": max_drop,
           "met": drop <= max_drop + 1e-12}
    if task.name == "classification":  # the keys this result has always had, the metric being accuracy
        out.update(runtime_accuracy=metric, float_runtime_accuracy=float_metric)
    return out


def export_onnx(model: nn.Module, path: str | Path, example_inputs: Tensor | tuple[Tensor, ...], *,
                int8: bool | None = None, calibration: Iterable[Any] | None = None,
                check_inputs: Tensor | None = None, check: bool = True, opset: int = OPSET,
                test: Iterable[Any] | None = None, max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
                check_targets: Any = None, task: Any = None, max_drop: float | None = None) -> Path:
    """Write ``model`` as an ONNX file ONNX Runtime runs, with a dynamic batch axis; atomic.

    Masks and codebooks are baked in and pruned shapes are the real ones. ``model`` is not modified.

    Args:
        model: a float model, or one quantised by :mod:`compress.quant`.
        path: the ``.onnx`` file to write (its folder is created).
        example_inputs: a batch ``(B, ...)`` to trace with (or a one-tensor tuple), or a mapping of
            tensors passed as keyword arguments (``input_ids``, ``attention_mask``: graph inputs of those
            names). A model whose output is a structure exports its logits (:mod:`compress.calls`).
        int8: write the int8 QDQ graph; None means "if ``model`` is quantised". False on a quantised
            model writes its float version.
        calibration: batches (tensors or ``(inputs, targets)``) ORT calibrates activation ranges on;
            pass the ones the model was calibrated on. Default: ``example_inputs``.
        check_inputs: the batch the checks run on; default ``example_inputs`` (int8: with the
            calibration batches).
        check: fp32: ORT logits equal PyTorch's within ``FP32_TOLERANCE`` (relative to the logit scale
            above 1); int8 with ``test``: :func:`int8_accuracy_gate` (the rule the quantize stage
            applies), by ``task``'s primary metric; without ``test``, given ``task`` and ``check_targets``
            (the labels of ``check_inputs``): the task's primary metric of the graph is within 1% (1
            point of an accuracy) of the torch quantised model's, or within ``max_drop`` of the float
            model's; with neither: top-1 agrees with the torch quantised model on >= 99% of the check inputs.
        test: labelled ``(inputs, targets)`` batches (the test split) for the int8 gate.
        max_accuracy_drop: the gate's tolerance (the run's ``max_accuracy_drop``), in the task's metric.
        check_targets: the targets of ``check_inputs`` (needs ``check_inputs``).
        task: a :class:`compress.tasks.Task` that judges the int8 graph (default: classification).
        max_drop: with ``task`` and ``check_targets``: the int8 graph passes too when its primary metric
            is within this of the float model's (the recipe's ``max_accuracy_drop``).

    Returns:
        The path written.

    Raises:
        UserError: one line, when onnx/onnxruntime is missing, export fails or a check fails (nothing written).
    """
    require("onnx")
    require("onnxruntime")
    path = Path(path)
    example = _as_batch(example_inputs)
    quantized = is_quantized(model)
    int8 = quantized if int8 is None else int8
    if int8 and not quantized:
        raise UserError("export: int8 needs a model quantised by compress.quant (quantize_ptq or prepare_qat) first")
    deployed = float_copy(model).cpu().eval()  # quantisation removed, masks/codebooks baked in
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        try:
            _export_float(deployed, example, fp32, opset)
        except Exception as e:  # the exporter raises many types; the first line names the op
            raise UserError(f"export: torch.onnx.export failed ({str(e).strip().splitlines()[0]})") from None
        if not int8:
            if check:
                _check_fp32(deployed, fp32, _as_batch(check_inputs) if check_inputs is not None else example)
            os.replace(fp32, path)
            return path
        reference = copy.deepcopy(model).cpu().eval()  # eval: observers frozen, fake quantisation on
        if not all(bool(m.input_quantizer.enabled) for m in quantized_layers(reference).values()):
            raise UserError("export: the model is quantised but not calibrated; run calibrate and freeze first")
        batches = [_as_batch(b) for b in calibration] if calibration is not None else [example]
        if not batches:
            raise UserError("export: no calibration batches")
        exclude = _float_nodes(deployed, example, fp32, set(quantized_layers(reference)))
        # the torch model quantises layers only: products of two activations stay float in ONNX too
        exclude += [n.name for n in _weight_nodes(require("onnx").load(str(fp32)).graph, weights=False)]
        int8_path = Path(tmp) / "int8.onnx"
        _quantize_graph(fp32, int8_path, batches, exclude)
        _shorten_tensor_names(int8_path)
        if check and test is not None:
            gate = int8_accuracy_gate(int8_path, test, ort_evaluate(fp32, test, task or build_task(None))["metric"],
                                      max_accuracy_drop, task)
            if not gate["met"]:
                name = (task or build_task(None)).primary
                raise UserError(f"export: int8 {name} in ONNX Runtime {gate['runtime_metric']:.4f} is "
                                f"{gate['drop']:.4f} worse than the float model's {gate['float_runtime_metric']:.4f} on "
                                f"the test split (max_accuracy_drop {max_accuracy_drop:g}; export --max-accuracy-drop "
                                "or the quantize stage's max_accuracy_drop sets it); file not written")
        elif check and task is not None and check_targets is not None:
            if check_inputs is None:
                raise ValueError("check_targets needs the check_inputs they label")
            _check_int8_metric(reference, deployed, int8_path, _as_batch(check_inputs), check_targets, task, max_drop)
        elif check:
            inputs = _as_batch(check_inputs) if check_inputs is not None else cat([example, *batches])
            _check_int8(reference, deployed, int8_path, inputs)
        os.replace(int8_path, path)
    return path
