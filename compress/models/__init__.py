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
from compress.models import crepe, hf, lenet, mlp, mobilenet, resnet, vit  # noqa: F401  (imported for their registrations)
from compress.models._registry import MODELS
from compress.registry import IMPORT_PREFIX

__all__ = ["MODELS", "CODE_MODELS", "build_model", "build_from_spec", "model_class", "model_kwargs", "runs_code"]

# Zoo entries that import a library and read files their arguments name (Hugging Face's loaders): built
# from a file's spec only on trust, as import: code is.
CODE_MODELS = ("transformers",)


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


def runs_code(name: str) -> bool:
    """Whether building the model ``name`` imports or calls code beyond the zoo's own classes."""
    return name.startswith(IMPORT_PREFIX) or name in CODE_MODELS


def _check_data(value: Any, key: str) -> None:
    """A file's constructor arguments are data: None, bool, int, float, str, and lists and dicts of them."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_data(v, f"{key}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise UserError(f"{key}: a key of type {type(k).__name__}; a model's arguments are named by strings")
            _check_data(v, f"{key}.{k}")
        return
    raise UserError(f"{key}: a {type(value).__name__} where only data (numbers, strings, lists, dicts) may stand")


def build_from_spec(spec: Any, source: str, *, trust_model_code: bool = False,
                    trusted: Sequence[str] = ()) -> nn.Module:
    """Rebuild the architecture a file describes (a checkpoint's ``model_spec``, a ``.dc`` header's spec).

    A file is data: a zoo name builds as usual, but a spec whose name runs code (``import:...``, or
    ``transformers``, which imports a library and reads the folder it names) is built only when the
    caller supplies that code itself: its name is in ``trusted`` (the model block of the recipe being
    resumed or naming a teacher) or ``trust_model_code`` is set (``--trust-model-code``, as Hugging
    Face's ``trust_remote_code``). Arguments are checked to be plain data before anything is built.

    Args:
        spec: ``{"name", "kwargs", "output"}`` as read from the file.
        source: the file, named in every error.
        trust_model_code: build whatever code the spec names.
        trusted: model names the caller's own recipe names.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UserError(f"{source}: holds no model spec (model_spec with a name), so its model cannot be rebuilt; "
                        "load its state_dict into a model you build (compress.checkpoint.load_into)")
    name, kwargs, output = spec["name"], spec.get("kwargs") or {}, spec.get("output")
    if not isinstance(kwargs, dict):
        raise UserError(f"{source}: model_spec.kwargs is a {type(kwargs).__name__}, not a mapping of arguments")
    if output is not None and (isinstance(output, bool) or not isinstance(output, str | int)):
        raise UserError(f"{source}: model_spec.output is a {type(output).__name__}; a key, an attribute or an index")
    _check_data(kwargs, f"{source}: model_spec.kwargs")
    if runs_code(name) and not trust_model_code and name not in trusted:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise UserError(f"{source}: refused to build its model: the file asks to run code ({shown!r}); a model "
                        "file is data. If you trust where it comes from, pass --trust-model-code "
                        "(trust_model_code=True in Python)")
    return build_model(name, key=f"{source}: model_spec", output=output, **kwargs)
