"""Atomic file writes: readers (and a resumed run) never see a half-written file.

JSON is written strict (RFC 8259): a non-finite number becomes ``null``, since a bare ``NaN`` is
what Python's ``json`` writes by default and what browsers' ``JSON.parse`` refuses.

Foundation layer: imports nothing of ``compress``.
"""

from __future__ import annotations

import errno
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "finite", "json_text", "write_json"]


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    A writer that fails on a full disk without saying so (``torch.save`` raises a RuntimeError
    with no errno) is reported as ``OSError(ENOSPC)``, and an OSError without a file name (a
    ``write`` call's) gets ``path``, so the caller can tell the user which file and what to do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make every checkpoint private
        os.replace(tmp, path)
    except BaseException as e:
        full = not isinstance(e, OSError | KeyboardInterrupt) and _disk_full(path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def _disk_full(folder: Path) -> bool:
    """Less than 1 MiB left for this user where ``folder`` is (a failed write has filled it)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def finite(obj: Any) -> Any:
    """A plain copy of ``obj`` for JSON: non-finite numbers become None, number-likes (numpy, 0-d
    tensors) plain ints and floats, tuples lists; anything else stays as it is."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real) or hasattr(obj, "__float__"):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def json_text(obj: Any, **kwargs: Any) -> str:
    """Strict JSON of ``obj`` (``json.dumps`` keywords pass through): non-finite numbers as ``null``."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """``obj`` as strict JSON at ``path``, atomically."""
    text = json_text(obj, indent=indent)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
