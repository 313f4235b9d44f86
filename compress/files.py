"""Files a run writes: atomic writes (readers and a resumed run never see a half-written file) and
one run per folder (an OS lock held for the whole run).

Foundation layer: imports only :mod:`compress.errors`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from compress.errors import UserError

__all__ = ["atomic_write", "check_writable", "hold_folder", "LOCK_NAME", "PID_NAME"]


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
