"""One generic registry, one instance per extension point (stages, models, data, losses, ...)."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from compress.errors import UserError, suggest

__all__ = ["Registry", "import_object", "IMPORT_PREFIX"]

IMPORT_PREFIX = "import:"  # the one door for user code in a recipe: import:package.module:Name


def import_object(spec: str, key: str = "") -> Any:
    """``import:package.module:Name`` -> that object; any problem is a one-line UserError naming ``key``."""
    where = f"{key}: " if key else ""
    module_name, _, attr = spec[len(IMPORT_PREFIX):].partition(":")
    if not module_name or not attr:
        raise UserError(f"{where}'{spec}' must look like import:package.module:Name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{where}cannot import module '{module_name}' ({e}); is it installed or on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{where}module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects (classes or factories).

    ``register("name")`` is a decorator; ``get(name)`` raises :class:`UserError` listing the
    valid names and the nearest match; a duplicate name raises ``KeyError`` (a programming error).
    """

    def __init__(self, kind: str, allow_import: bool = False):
        self.kind = kind
        self.allow_import = allow_import  # names may also be import:package.module:Name (user code)
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Any:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} '{name}' is already registered")
            self._items[name] = item
            return item

        return add(obj) if obj is not None else add

    def get(self, name: str, key: str | None = None) -> T:
        """The object registered as ``name``; ``key`` is the recipe path named in the error."""
        if self.allow_import and isinstance(name, str) and name.startswith(IMPORT_PREFIX):
            return import_object(name, key or "")
        if name not in self._items:
            where = f"{key}: " if key else ""
            raise UserError(f"{where}unknown {self.kind} '{name}'; {suggest(name, self._items)}")
        return self._items[name]

    def resolve(self, name_or_obj: Any, key: str | None = None) -> Any:
        """Accept a registry name or a ready object (timm's get_act_layer idiom)."""
        return self.get(name_or_obj, key) if isinstance(name_or_obj, str) else name_or_obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"

