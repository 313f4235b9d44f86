"""Prepare, calibrate, save, restore and size an int8 (fake-quantised) model, in place.

A quantised layer (``Linear``, ``Conv1d/2d/3d``, Hugging Face's ``Conv1D``) gets two things: a :class:`WeightQuantizer`
parametrization on ``weight`` and an ``input_quantizer`` submodule applied by a forward pre-hook.
Everything else in the model is untouched, so the model stays a plain ``nn.Module`` that trains,
deep-copies and checkpoints like any other; its quantisation is described by :func:`quant_state`
(JSON-able) plus the ``state_dict``, and :func:`restore_quant` rebuilds it on a fresh float model.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from compress.calls import call, eval_mode, to_device
from compress.errors import UserError
from compress.plumbing.masks import is_hf_conv1d, make_permanent, output_dim
from compress.plumbing.restorers import PARAMETRIZATIONS, RESTORERS, Restorer
from compress.quant.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "QUANTIZABLE", "SUPPORTED_BITS", "is_quantizable", "quantizable_layers", "check_bits", "prepare", "calibrate", "freeze", "quantize_ptq",
    "prepare_qat", "is_quantized", "quantized_layers", "dequantize_layer", "strip_quant", "float_copy",
    "quant_state", "restore_quant", "int8_storage_bytes", "unreached_layers",
]

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # and Hugging Face's Conv1D: is_quantizable
SUPPORTED_BITS = (8,)
INPUT_QUANTIZER = "input_quantizer"
STATE_FORMAT = "compress.int8/1"
QAT_AVERAGING = 0.01  # EMA of activation ranges during QAT, torch's MovingAverageMinMaxObserver default


def check_bits(bits: int, key: str = "bits") -> None:
    """Raise a one-line :class:`UserError` unless ``bits`` is a supported width."""
    if bits not in SUPPORTED_BITS:
        raise UserError(f"{key}: {bits} is not supported; only 8-bit (int8) quantisation is implemented (use bits: 8)")


def is_quantizable(module: nn.Module) -> bool:
    """A layer this module quantises: one of :data:`QUANTIZABLE` or Hugging Face's ``Conv1D``."""
    return isinstance(module, QUANTIZABLE) or is_hf_conv1d(module)


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the model's quantisable layers, in module order."""
    return [n for n, m in model.named_modules() if is_quantizable(m)]


def _quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # A module-level function (not a closure or bound method), so deepcopy and pickling keep the hook.
    return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])


def _is_quantized_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, INPUT_QUANTIZER, None), ActivationQuantizer)


def _install(module: nn.Module, averaging_constant: float) -> None:
    parametrize.register_parametrization(module, "weight", WeightQuantizer(output_dim(module)))  # after any Mask
    module.add_module(INPUT_QUANTIZER, ActivationQuantizer(averaging_constant))
    module.register_forward_pre_hook(_quantize_input)


def _select(model: nn.Module, ignore: Sequence[str]) -> list[str]:
    names = quantizable_layers(model)
    unknown = [p for p in ignore if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise UserError(f"ignore: '{unknown[0]}' matches no quantisable layer; layers: {', '.join(names)}")
    return [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in ignore)]


def prepare(model: nn.Module, *, ignore: Sequence[str] = (), bits: int = 8, layers: Sequence[str] | None = None,
            averaging_constant: float = 0.0) -> nn.Module:
    """Insert fake quantisation into every ``Linear``/``Conv`` layer except those ``ignore`` names.

    Args:
        model: a float model (possibly pruned: masks are kept and applied before quantisation).
        ignore: layer names or ``fnmatch`` globs kept in float.
        bits: weight and activation width; only 8.
        layers: exact layer names to quantise instead of all but ``ignore`` (used by :func:`restore_quant`).
        averaging_constant: 0 keeps the all-time min/max of activations (PTQ); > 0 an EMA (QAT).

    Returns:
        ``model``, modified in place; its activation quantizers observe and do not quantise yet.
    """
    check_bits(bits)
    if is_quantized(model):
        raise UserError("quantize: the model is already quantised")
    names = list(layers) if layers is not None else _select(model, list(ignore))
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not is_quantizable(modules[name]):
            raise UserError(f"quantize: '{name}' is not a Linear/Conv layer of this model")
        _install(modules[name], averaging_constant)
    return model


@torch.no_grad()
def unreached_layers(model: nn.Module, example: Any) -> list[str]:
    """Layers (:func:`quantizable_layers`) one forward pass of ``example`` never calls: their parent reads the weight
    itself (``nn.MultiheadAttention`` hands ``out_proj.weight`` to a function), so their input is never seen
    and cannot be calibrated; or they are off the forward path."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda *_, n=n: called.add(n))
               for n, m in model.named_modules() if is_quantizable(m)]
    try:
        with eval_mode(model):
            call(model, to_device(example, next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return [n for n in quantizable_layers(model) if n not in called]


def _quantizers(model: nn.Module) -> list[ActivationQuantizer]:
    return [m for m in model.modules() if isinstance(m, ActivationQuantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Any], max_batches: int | None = None) -> nn.Module:
    """Run ``batches`` (tensors, or ``(inputs, targets)`` pairs) through the model to set activation ranges."""
    device = next(model.parameters()).device
    seen = 0
    weights = [p for p in model.modules() if isinstance(p, WeightQuantizer)]
    # The ranges of the float model, as ONNX Runtime calibrates the float graph: with int8 weights the
    # activations of every later layer would move, and the two int8 models would round differently.
    for p in weights:
        p.enabled = False
    try:
        with eval_mode(model):
            for batch in batches:
                if max_batches is not None and seen >= max_batches:
                    break
                x = batch[0] if isinstance(batch, list | tuple) else batch
                call(model, to_device(x, device))
                seen += 1
    finally:
        for p in weights:
            p.enabled = True
    if seen == 0:
        raise UserError("quantize: no calibration batches")
    return model


def freeze(model: nn.Module) -> nn.Module:
    """Stop observing and quantise with the ranges seen so far."""
    for q in _quantizers(model):
        if not q.calibrated:
            raise UserError("quantize: a layer saw no calibration data (is it reached by forward?)")
        q.observing.fill_(False)
        q.enabled.fill_(True)
    return model


def quantize_ptq(model: nn.Module, batches: Iterable[Any], *, ignore: Sequence[str] = (), bits: int = 8,
                 max_batches: int | None = None) -> nn.Module:
    """Post-training static quantisation in place: prepare, calibrate on ``batches``, freeze."""
    prepare(model, ignore=ignore, bits=bits)
    calibrate(model, batches, max_batches)
    return freeze(model)


def prepare_qat(model: nn.Module, *, ignore: Sequence[str] = (), bits: int = 8,
                calibration: Iterable[Any] | None = None, averaging_constant: float = QAT_AVERAGING) -> nn.Module:
    """Quantisation-aware training in place: a model any training loop fine-tunes through fake quantisation.

    Activation ranges start from ``calibration`` batches when given (otherwise from the first training
    batch) and then follow an EMA in ``train()`` mode only; ``eval()`` forwards use them unchanged.
    Call :func:`freeze` after training to fix them.
    """
    prepare(model, ignore=ignore, bits=bits, averaging_constant=averaging_constant)
    if calibration is not None:
        calibrate(model, calibration)
    for q in _quantizers(model):
        q.enabled.fill_(True)
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(_is_quantized_layer(m) for m in model.modules())


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The quantised layers by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if _is_quantized_layer(m)}


def _remove_weight_quantizer(module: nn.Module) -> None:
    plist = module.parametrizations["weight"]
    if len(plist) > 1:  # keep the pruning mask (or other parametrizations): drop only the quantizer
        index = next(i for i, p in enumerate(plist) if isinstance(p, WeightQuantizer))
        del plist[index]
        return
    # The only parametrization: swap this module's class back, as masks.make_permanent does (and for the
    # same reason: remove_parametrizations would break the class deep copies share), keeping the latent value.
    original = plist.original.detach().clone()
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    module.register_parameter("weight", nn.Parameter(original, requires_grad=plist.original.requires_grad))


def dequantize_layer(model: nn.Module, name: str) -> None:
    """Put one quantised layer back to float (its float weights are the latent ones), in place."""
    module = quantized_layers(model).get(name)
    if module is None:
        raise UserError(f"quantize: '{name}' is not a quantised layer; quantised: {', '.join(quantized_layers(model))}")
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _quantize_input:
            del module._forward_pre_hooks[key]
    del module._modules[INPUT_QUANTIZER]
    _remove_weight_quantizer(module)


def strip_quant(model: nn.Module) -> nn.Module:
    """Put every layer back to float, in place."""
    for name in list(quantized_layers(model)):
        dequantize_layer(model, name)
    return model


def float_copy(model: nn.Module) -> nn.Module:
    """A float copy for export: quantisation removed, masks and codebooks baked in; ``model`` is untouched."""
    return make_permanent(strip_quant(copy.deepcopy(model)))


def quant_state(model: nn.Module) -> dict[str, Any]:
    """The JSON-able description :func:`restore_quant` needs; tensors live in the ``state_dict``."""
    layers = quantized_layers(model)
    averaging = {getattr(m, INPUT_QUANTIZER).averaging_constant for m in layers.values()}
    return {"format": STATE_FORMAT, "bits": 8, "layers": list(layers),
            "averaging_constant": float(max(averaging, default=0.0))}


def restore_quant(model: nn.Module, state: dict[str, Any], state_dict: dict[str, Tensor] | None = None) -> nn.Module:
    """Rebuild the quantisation of :func:`quant_state` on a fresh float model, then load ``state_dict`` if given.

    The model must already have the saved architecture (pruned shapes, masks); the ``state_dict``
    restores weights, activation ranges and the observe/enable switches exactly.
    """
    if state.get("format") != STATE_FORMAT:
        raise UserError(f"quantize: unknown quantisation state format {state.get('format')!r}; expected {STATE_FORMAT}")
    check_bits(int(state["bits"]))
    prepare(model, layers=state["layers"], averaging_constant=float(state.get("averaging_constant", 0.0)))
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


# A checkpoint keeps the quantisation under "quantization" (None for a float model) and re-installs it
# after masks and codebooks, since the weight quantizer reads the masked weight; the quantizer
# parametrization itself comes back with it, so the parametrization replay skips it.
RESTORERS.register("quantization", Restorer(
    restore=lambda model, saved, _state, _where: restore_quant(model, saved) if saved else None,
    state=lambda model: quant_state(model) if is_quantized(model) else None, after_parametrizations=True))
PARAMETRIZATIONS.register("WeightQuantizer", lambda *_: None)


def int8_storage_bytes(model: nn.Module) -> int:
    """Bytes of the deployed int8 weights.

    Quantised layers: 1 byte per weight, a float32 scale and an int8 zero point per output channel,
    float32 biases, and a scale and zero point for the input. Every other parameter (ignored layers,
    normalisation) at its float size. Pruned zeros are counted: this is the dense int8 tensor layout.
    """
    quantized = set(quantized_layers(model))
    deployed = float_copy(model)
    total = 0
    for name, module in deployed.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if name in quantized and pname == "weight":
                total += p.numel() + p.shape[output_dim(module)] * (4 + 1)
            else:
                total += p.numel() * p.element_size()
        if name in quantized:
            total += 4 + 1
    return total
