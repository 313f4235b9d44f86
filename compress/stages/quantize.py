"""Stage ``quantize``: int8 weights (per-channel, symmetric) and activations (per-tensor).

``mode: ptq`` calibrates activation ranges on ``calibration_batches`` training batches;
``mode: qat`` then fine-tunes through fake quantisation (Jacob et al. 2018) with the stage's
``finetune`` block, where ``distill`` is the objective as in any stage (``teacher: self`` is the
float model before compression). The model stays a plain module (see :mod:`compress.quant`); the
int8 graph a runtime runs is written by ``export --format onnx`` and measured after the stage when
``eval.runtimes`` names a runtime.

``max_accuracy_drop: D`` (alias ``max_metric_drop``; in the units of the task's primary metric: for
``accuracy`` a fraction, 0.005 is half a point; for perplexity or MAE their own units) puts layers
back to float, most sensitive first, until the int8 model's primary metric measured in ONNX Runtime
is within D of the float model's in the same runtime, in the metric's direction (NNCF's
accuracy-control idea).
Sensitivity: how far each layer's quantisation alone moves the logits on calibration data.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from compress.calls import cat, forward, take
from compress.errors import UserError
from compress.quant import (
    SUPPORTED_BITS,
    check_bits,
    dequantize_layer,
    freeze,
    prepare_qat,
    quantizable_layers,
    quantize_ptq,
    quantized_layers,
    unreached_layers,
)
from compress.runtime import export_onnx, int8_accuracy_gate, ort_evaluate
from compress.schema import match_layers
from compress.stage_configs import QuantizeConfig
from compress.stages.base import STAGES, Context, Stage, StageResult, listed_layers, untouched_notes

__all__ = ["QuantizeStage"]


@STAGES.register("quantize")
class QuantizeStage(Stage):
    """``QuantizeStage(mode="qat", finetune={"epochs": 2, "distill": {"teacher": "self"}}).apply(model, ctx)``."""

    Config = QuantizeConfig
    type_name = "quantize"

    def validate(self) -> None:
        super().validate()
        if self.config.bits not in SUPPORTED_BITS:
            check_bits(self.config.bits, f"{self.key}.bits")

    @property
    def max_drop(self) -> float | None:
        """``max_accuracy_drop`` or its alias ``max_metric_drop``."""
        c = self.config
        return c.max_accuracy_drop if c.max_accuracy_drop is not None else c.max_metric_drop

    def layers(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        """The layers this stage quantises: every Linear/Conv/Conv1D not ignored (and, given ``example_inputs``,
        called as a layer in the forward pass: :func:`compress.quant.unreached_layers` stay float)."""
        names = quantizable_layers(model)
        ignored = match_layers(names, list(self.config.ignore), f"{self.key}.ignore") if self.config.ignore else {}
        unreached = set(unreached_layers(model, example_inputs)) if example_inputs is not None else set()
        return [n for n in names if n not in ignored and n not in unreached]

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        layers = self.layers(model, example_inputs)
        if not layers:
            raise UserError(f"{self.key}.ignore: every Linear/Conv layer is ignored or never called; nothing to "
                            "quantise")
        return [f"{n} -> int{self.config.bits}" for n in layers] + [f"{n} -> float (never called as a layer)"
                                                                     for n in self._unreached(model, example_inputs)]

    def _unreached(self, model: nn.Module, example_inputs: Any) -> list[str]:
        return [] if example_inputs is None else unreached_layers(model, example_inputs)

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        c = self.config
        batches = ctx.training_inputs(c.calibration_batches)
        example = take(batches[0], 1)
        self.plan(model, example)  # refuses before touching the model
        unreached = self._unreached(model, example)  # left float: no input of theirs to calibrate
        reference = copy.deepcopy(model).eval() if self.max_drop is not None else None
        if c.mode == "ptq":
            quantize_ptq(model, batches, ignore=[*c.ignore, *unreached], bits=c.bits)
            logged: dict[str, float] = {}
        else:
            prepare_qat(model, ignore=[*c.ignore, *unreached], bits=c.bits, calibration=batches)
            logged = ctx.finetune(model, self.finetune_config, tag=self.name)
            freeze(model)
        info: dict[str, Any] = {"mode": c.mode, "bits": c.bits, "calibration_batches": len(batches),
                                "quantized": list(quantized_layers(model)), "finetune": logged}
        if reference is not None:
            which = "max_accuracy_drop" if c.max_accuracy_drop is not None else "max_metric_drop"
            info["accuracy_control"] = control_accuracy(model, reference, ctx, batches, self.max_drop,
                                                        f"{self.key}.{which}")
        info["float_layers"] = [n for n in quantizable_layers(model) if n not in quantized_layers(model)]
        notes = [] if not unreached else [
            f"{listed_layers(model, unreached)} left float: never called as a layer (the parent module reads the weight "
            "itself, as nn.MultiheadAttention does out_proj's), so no input range of theirs can be calibrated"]
        notes += untouched_notes(model, ctx, [n for n in quantizable_layers(model) if n not in unreached])
        if notes:
            info["notes"] = notes
        return StageResult(model, info)


@torch.no_grad()
def layer_sensitivity(model: nn.Module, reference: nn.Module, batches: list[Tensor]) -> list[tuple[str, float]]:
    """Quantised layers, most sensitive first: the logit MSE against ``reference`` when only that layer
    is quantised (its calibrated ranges kept)."""
    x = take(cat(batches), 256)
    expected = forward(reference, x)
    scores = []
    for name in quantized_layers(model):
        alone = copy.deepcopy(model).eval()
        for other in [n for n in quantized_layers(alone) if n != name]:
            dequantize_layer(alone, other)
        scores.append((name, float(((forward(alone, x) - expected) ** 2).mean())))
    return sorted(scores, key=lambda s: -s[1])


def control_accuracy(model: nn.Module, reference: nn.Module, ctx: Any, batches: list[Tensor], max_drop: float,
                     key: str) -> dict[str, Any]:
    """Put layers back to float, most sensitive first, until the int8 graph's primary metric (``ctx.task``'s,
    computed by ONNX Runtime) is within ``max_drop`` of the float graph's, in the metric's direction."""
    task = ctx.task
    test = ctx.datamodule.test_dataloader()
    example = take(batches[0], 1)
    with tempfile.TemporaryDirectory(prefix="compress-quantize-") as tmp:
        float_metric = ort_evaluate(export_onnx(reference, Path(tmp) / "float.onnx", example), test, task)["metric"]

        def int8_metric() -> float:
            # no export check: this loop applies the gate itself (int8_accuracy_gate, the rule export
            # applies), on the whole test split, to the very graphs it exists to repair
            path = export_onnx(model, Path(tmp) / "int8.onnx", example, calibration=batches, check=False)
            return int8_accuracy_gate(path, test, float_metric, max_drop, task)["runtime_metric"]

        history = [{"float_layers": [], "runtime_metric": int8_metric()}]
        order = [name for name, _ in layer_sensitivity(model, reference, batches)]
        restored: list[str] = []
        while task.drop(float_metric, history[-1]["runtime_metric"]) > max_drop and len(order) > 1:
            name = order.pop(0)
            dequantize_layer(model, name)
            restored.append(name)
            history.append({"float_layers": list(restored), "runtime_metric": int8_metric()})
    drop = task.drop(float_metric, history[-1]["runtime_metric"])
    met = drop <= max_drop
    out = {"metric": task.primary, "higher_is_better": task.higher_is_better, "float_runtime_metric": float_metric,
           "max_drop": max_drop, "met": met, "steps": history,
           "note": None if met else f"{key}: int8 {task.primary} stays {drop:.4f} worse than float with only one "
                                    "layer left quantised"}
    if task.name == "classification":  # the keys this info has always had, the metric being accuracy
        out["float_runtime_accuracy"] = float_metric
        for step in history:
            step["runtime_accuracy"] = step["runtime_metric"]
    return out
