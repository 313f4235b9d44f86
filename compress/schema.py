"""Schema helpers every layer may use: typed merges, range and choice checks, layer-name matching.

Foundation layer: imports nothing of ``compress`` but :mod:`compress.errors`. Every check raises a
one-line :class:`~compress.errors.UserError` naming the recipe key path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from compress.errors import UserError, nearest, shorten, suggest

__all__ = ["merge_structured", "check_range", "check_choice", "check_finite", "check_index_bits", "match_layers",
           "schema_error", "join_key", "load_yaml", "read_yaml", "check_latency_batch", "MAX_LATENCY_BATCH", "check_out_dir", "MAX_YAML_BYTES", "MAX_YAML_VALUES", "MAX_YAML_DEPTH"]

# Bounds on a YAML document read from the user (recipes, overrides, teacher specs, hardware profiles).
# The largest shipped recipe is about 2 KB and 100 values; these are thousands of times that, yet a
# billion-laughs alias bomb (nine aliases of nine aliases ...) or a million nested brackets is
# refused in milliseconds instead of eating memory for minutes (PyYAML shares an aliased node, but
# OmegaConf and every walk over the data expand it; PyYAML's C composer overflows its stack).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64

# Every stage times its model at the latency batch, and a latency target times every layer width at
# it: at batch 100000 that is minutes without a line of output. Batched latency is a throughput
# figure, and a thousand inputs measure it.
MAX_LATENCY_BATCH = 1024


def join_key(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def schema_error(e: OmegaConfBaseException, prefix: str) -> UserError:
    full_key = join_key(prefix, str(getattr(e, "full_key", "") or ""))
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]  # a merge error of a nested config has no msg
    if isinstance(e, ConfigKeyError) and getattr(e, "parent_node", None) is not None:
        key = str(getattr(e, "key", ""))
        node = e.parent_node
        valid = list(node.keys()) if isinstance(node, DictConfig) else []
        if valid:
            return UserError(f"{full_key}: unknown key '{key}'; {suggest(key, valid)}")
    return UserError(f"{full_key}: {msg}")


def merge_structured(schema: type, values: Any, key: str = "") -> DictConfig:
    """``values`` (dict or DictConfig) merged into ``OmegaConf.structured(schema)``; read-only.

    Unknown keys, wrong types and missing required values raise one-line UserErrors naming
    ``key`` + the path inside.
    """
    if isinstance(values, DictConfig | ListConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UserError(f"{key}: expected a mapping, got {type(values).__name__} ({values!r})")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), values)
    except OmegaConfBaseException as e:
        raise schema_error(e, key) from None
    except TypeError as e:  # OmegaConf's "Cannot merge incompatible container types" names no key: find it
        raise UserError(_container_mismatch(OmegaConf.structured(schema), values, key) or f"{key}: {e}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{join_key(key, missing[0])}: required value is missing")
    check_finite(cfg, key)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _container_mismatch(cfg: DictConfig, values: dict, key: str) -> str | None:
    """The error line for the first value that is a mapping where ``cfg`` has a list, or a list where it has a
    mapping; None if there is none."""
    for k, v in values.items():
        node = cfg._get_node(k) if k in cfg else None
        path = join_key(key, str(k))
        if isinstance(node, ListConfig) and isinstance(v, dict):
            return f"{path}: expected a list (YAML items like [a, b]), got a mapping"
        if isinstance(node, DictConfig) and isinstance(v, list):
            return f"{path}: expected a mapping (like {{key: value}}), got a list"
        if isinstance(node, DictConfig) and isinstance(v, dict) and (inner := _container_mismatch(node, v, path)):
            return inner
    return None


def check_finite(cfg: Any, key: str) -> None:
    """NaN/inf are never meaningful in a recipe (a NaN learning rate trains nothing)."""
    items = cfg.items() if isinstance(cfg, DictConfig) else enumerate(cfg) if isinstance(cfg, ListConfig) else []
    for k, v in items:
        path = join_key(key, f"[{k}]" if isinstance(cfg, ListConfig) else str(k))
        if isinstance(v, DictConfig | ListConfig):
            check_finite(v, path)
        elif isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{path}: {v} is not a finite number")


def check_range(value: float, key: str, lo: float, hi: float, hi_open: bool = True, lo_open: bool = False) -> None:
    """Raise a UserError unless ``lo <= value < hi`` (bounds as chosen)."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise UserError(f"{key}: {value} is outside {interval}")


def check_latency_batch(value: int | None, key: str) -> None:
    """Raise a UserError unless ``value`` is None or in [1, MAX_LATENCY_BATCH]."""
    if value is not None and not 1 <= value <= MAX_LATENCY_BATCH:
        raise UserError(f"{key}: {value} is outside [1, {MAX_LATENCY_BATCH}]; every stage is timed at this batch (a "
                        "latency target times every layer width at it), so a larger one runs for minutes in silence")


def check_out_dir(path: str | Path, key: str) -> None:
    """Raise a UserError unless ``path`` can be a folder to write in: no name in it longer than the
    file system allows, not a file, not under a file, its nearest existing folder writable."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:  # NAME_MAX of ext4, xfs, btrfs, tmpfs, APFS, NTFS
            raise UserError(f"{key}: the name '{shorten(part, 60)}' is {len(os.fsencode(part))} bytes; a file system "
                            "allows 255 per name: choose a shorter out_dir")
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                where = "is a file" if folder == path else f"lies under the file '{folder}'"
                raise UserError(f"{key}: '{path}' {where}, not a folder; choose another: out_dir=runs/NEW")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{key}: '{folder}' is not writable; choose another out_dir or fix its permissions")
            return


def check_choice(value: str, key: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise UserError(f"{key}: '{value}' is not valid; {suggest(value, choices)}")



def check_index_bits(value: Any, key: str) -> None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 16):
        return
    raise UserError(f"{key}: {value!r} is not a width; use an integer in [1, 16] (the paper: 5) or 'auto'")


def match_layers(names: Sequence[str], patterns: Sequence[str] | dict[str, Any], key: str) -> dict[str, str]:
    """Map each layer name to the first pattern (exact name or glob) that matches it.

    A pattern that matches no layer is a recipe mistake: UserError naming ``key`` and the nearest name.
    """
    out: dict[str, str] = {}
    for pattern in patterns:
        hits = [n for n in names if n == pattern or fnmatchcase(n, pattern)]
        if not hits:
            near = nearest(pattern, names)
            hint = f" (did you mean '{near}'?)" if near else ""
            raise UserError(f"{key}: '{pattern}' matches no layer{hint}; layers: {', '.join(names)}")
        for n in hits:
            out.setdefault(n, pattern)
    return out


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)`` within the bounds above, else a one-line :class:`UserError` naming
    ``where``; YAML syntax errors propagate as ``yaml.YAMLError`` for the caller to place.

    The event stream is walked first (libyaml's parser where available, linear in the text): the
    values each alias stands for are counted as if expanded, so nothing is built before the check.
    """
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{where}: {len(text):,} characters; a recipe is at most {MAX_YAML_BYTES:,} (a few KB is usual)")
    try:
        _check_expansion(text, where)
    except yaml.YAMLError:
        pass  # a syntax error: PyYAML's own parser below names it as it always has
    return yaml.safe_load(text)


def _check_expansion(text: str, where: str) -> None:
    """Walk the document's events; a UserError past the depth or the expanded size bound."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    anchored: dict[str, int] = {}
    stack: list[list[Any]] = [[None, 0]]  # per open collection: its anchor, values in it so far
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            if len(stack) > MAX_YAML_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; a recipe needs a few")
            stack.append([event.anchor, 1])
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, size = stack.pop()
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, anchored.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        else:
            continue
        if anchor is not None:
            anchored[anchor] = size
        stack[-1][1] += size
        if stack[0][1] > MAX_YAML_VALUES or size > MAX_YAML_VALUES:
            raise UserError(f"{where}: expands to more than {MAX_YAML_VALUES:,} values (YAML aliases &name/*name "
                            "repeat what they name); a recipe holds a few hundred: write it out without the aliases")


def read_yaml(path: str | Path, where: str | None = None) -> Any:
    """:func:`load_yaml` of a file, its size checked before it is read."""
    path = Path(path)
    where = where or str(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise UserError(f"{where}: {size:,} bytes; a recipe is at most {MAX_YAML_BYTES:,} (a few KB is usual)")
    return load_yaml(path.read_text(), where)
