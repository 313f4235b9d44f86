"""Files a run writes: atomic writes (readers and a resumed run never see a half-written file) and
one run per folder (an OS lock held for the whole run).

JSON is written strict (RFC 8259): a non-finite number becomes ``null``, since a bare ``NaN`` is
what Python's ``json`` writes by default and what browsers' ``JSON.parse`` refuses.

Foundation layer: imports only :mod:`compress.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import numbers
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from compress.errors import UserError

__all__ = ["plain_data", "atomic_write", "check_writable", "hold_folder", "LOCK_NAME", "PID_NAME", "finite", "json_text",
           "write_json"]


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


LOCK_NAME = ".run.lock"  # the OS lock (flock through filelock): it dies with its process, kill -9 included
PID_NAME = ".run.pid"  # beside it, who holds it: the lock file itself may be truncated by a contender


def _holder(pid_file: Path, wait_s: float = 1.0) -> str:
    """Who holds a folder's lock, from its pid sidecar; a holder that has just taken the lock gets a
    moment to write it (runs started together meet exactly there)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return f"process {int(pid_file.read_text().split()[0])}"
        except (OSError, ValueError, IndexError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


@contextlib.contextmanager
def hold_folder(folder: str | Path, key: str = "out_dir") -> Iterator[Path]:
    """Hold an OS-level lock on ``folder`` for the block: one run per folder.

    Taken before anything else is written (the folder is created for it, and removed again on the way
    out when nothing but the lock landed there). A second holder is refused at once with a one-line
    :class:`UserError` naming the folder and the process that holds it. The lock is the operating
    system's (``flock``), so a run killed with SIGKILL leaves nothing that blocks ``--resume``.
    """
    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{key}: cannot create '{folder}' ({e.strerror or e}); choose another folder") from None
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = _holder(folder / PID_NAME)
        raise UserError(f"{key}: '{folder}' is in use by another run ({holder}); wait for it to finish, or choose "
                        "another folder: out_dir=runs/NEW") from None
    except OSError as e:
        raise UserError(f"{key}: cannot lock '{folder}' ({e.strerror or e}); choose another folder") from None
    pid_file = folder / PID_NAME
    try:
        pid_file.write_text(f"{os.getpid()}\n")
        yield folder
    finally:
        pid_file.unlink(missing_ok=True)
        # a folder this run created and left empty (it stopped before writing) goes again; otherwise the
        # lock file stays for filelock to manage (removing it could let two runs lock two inodes)
        empty = created and {f.name for f in folder.iterdir()} <= {LOCK_NAME}
        if empty:
            (folder / LOCK_NAME).unlink(missing_ok=True)
        lock.release()
        if empty:
            with contextlib.suppress(OSError):
                folder.rmdir()


def check_writable(path: str | Path, key: str = "--out") -> Path:
    """Before any work: ``path`` names a file that can be written (not a directory, not under a file, in
    a place this process may write); a one-line :class:`UserError` otherwise."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key}: '{path}' is a directory; name a file in it")
    ancestor = path.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{key}: '{path}' lies under '{ancestor}', which is a file; choose another place")
    try:  # the one reliable test (root ignores permission bits, read-only mounts ignore them too)
        fd, probe = tempfile.mkstemp(dir=ancestor, prefix=".compress-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{key}: cannot write '{path}' ({e.strerror or e}); choose a writable place") from None
    return path


def plain_data(obj: Any) -> Any:
    """JSON-friendly copy of a stage's info: tensors and arrays become lists, numbers stay numbers,
    anything else its ``str``."""
    if isinstance(obj, dict):
        return {str(k): plain_data(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_data(v) for v in obj]
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    if callable(getattr(obj, "tolist", None)):  # a torch tensor or a numpy array (no torch import here)
        return obj.tolist()
    return str(obj)
