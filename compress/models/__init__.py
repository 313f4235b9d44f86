"""The model zoo: plain ``nn.Module`` classes registered by name.

Every constructor takes ``input_shape`` (C, H, W) and ``num_classes``; the pipeline fills them
from the data module when the recipe does not set them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from compress.calls import set_output
from compress.errors import UserError
from compress.models import hf, lenet, mlp, mobilenet, resnet, vit  # noqa: F401  (imported for their registrations)
from compress.models._registry import MODELS

__all__ = ["MODELS", "build_model", "model_class", "model_kwargs"]


def model_class(name: str, key: str = "model.name") -> type[nn.Module]:
    """A zoo name or ``import:package.module:Class``."""
    return MODELS.get(name, key)


def model_kwargs(name: str, kwargs: dict[str, Any] | None = None, *, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, key: str = "model") -> dict[str, Any]:
    """The constructor arguments a model gets: ``kwargs`` plus ``input_shape``/``num_classes`` where the
    constructor names them (never through ``**kwargs``: a torchvision or timm factory forwards those to
    a class that does not know ``input_shape``)."""
    kwargs = dict(kwargs or {})
    params = inspect.signature(model_class(name, f"{key}.name")).parameters
    for extra, value in (("input_shape", input_shape), ("num_classes", num_classes)):
        if value is not None and extra not in kwargs and extra in params:
            kwargs[extra] = value if extra == "num_classes" else \
                {str(k): list(v) for k, v in value.items()} if isinstance(value, dict) else list(value)
    return kwargs


def build_model(name: str, *, key: str = "model", output: str | int | None = None, **kwargs: Any) -> nn.Module:
    """Instantiate a zoo model, a class or a factory (``import:pkg.module:fn``) with exactly ``kwargs``
    (:func:`model_kwargs` adds ``input_shape``/``num_classes`` from the data where they belong).

    ``output`` (the recipe's ``model.output``) names the field of a structured output that holds the
    logits (:mod:`compress.calls`); None: the automatic rule."""
    cls = model_class(name, f"{key}.name")
    params = inspect.signature(cls).parameters
    if "input_shape" in kwargs and "input_shape" in params:
        kwargs["input_shape"] = tuple(kwargs["input_shape"])
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params] if not accepts_any else []
    if unknown:
        valid = [p for p in params if p not in ("self", "args", "kwargs")]
        raise UserError(f"{key}.{unknown[0]}: not an argument of {getattr(cls, '__name__', name)}; "
                        f"valid: {', '.join(valid)}")
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{key}: cannot build {getattr(cls, '__name__', name)} ({e})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}.name: {name} returned a {type(model).__name__}, not a torch.nn.Module")
    return set_output(model, output)
