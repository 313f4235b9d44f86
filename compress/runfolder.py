"""A run folder's layout: which files a run writes there, and outputs that must not replace them.

Orchestration layer, kept apart from the pipeline so that ``export`` and ``compare`` check their
``--out`` without loading Lightning.
"""

from __future__ import annotations

import csv
import fnmatch
import shutil
import warnings
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.files import LOCK_NAME, PID_NAME, check_writable

__all__ = ["OWN_FILES", "OWN_DIRS", "RUN_FILES", "holds_run", "check_output", "clear_run", "first_difference",
           "keep_curves"]

OWN_FILES = ("recipe.yaml", "report.json", "report.md", "metrics.csv", "run.json")
OWN_DIRS = ("lightning", "curves", "wandb")
# what a run writes into its folder, relative to it: an output (export --out, compare --out) never replaces one
RUN_FILES = (*OWN_FILES, "report.html", "stage-*.ckpt", LOCK_NAME, PID_NAME, *(f"{d}/*" for d in OWN_DIRS),
             "sensitivity/*")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run (its recipe, its report or a stage checkpoint)."""
    return any((folder / n).exists() for n in ("recipe.yaml", "report.json")) or any(folder.glob("stage-*.ckpt"))


def check_output(path: str | Path, key: str = "--out") -> Path:
    """Before any work: an output path that is writable and replaces no file a run wrote (its checkpoints,
    reports, recipe, curves); a one-line UserError otherwise. Earlier exports (``model.dc``) may be replaced."""
    path = check_writable(path, key)
    target = path.resolve()  # a symlink onto a run's file is that file
    for folder in target.parents:
        if holds_run(folder):
            rel = target.relative_to(folder).as_posix()
            if target.exists() and any(fnmatch.fnmatch(rel, pattern) for pattern in RUN_FILES):
                raise UserError(f"{key}: '{path}' is a file of the run in '{folder}' ({rel}); an output never replaces "
                                "what a run wrote: write it elsewhere, e.g. --out model.onnx")
            break
    return path


def clear_run(folder: Path) -> None:
    """Delete what a run wrote in ``folder`` (``--overwrite``); anything else there stays."""
    for f in [*(folder / n for n in OWN_FILES), *folder.glob("stage-*.ckpt")]:
        f.unlink(missing_ok=True)
    for d in OWN_DIRS:
        shutil.rmtree(folder / d, ignore_errors=True)


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two plain containers differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}".lstrip(".")
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d is not None:
                return d.lstrip(".")
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return path.lstrip(".") or "stages"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else path.lstrip(".")


def keep_curves(logger: Any) -> None:
    """Keep the curves a resumed run logged before: Lightning's CSV writer deletes the
    ``metrics.csv`` it finds when it starts, and writes a header of only the keys it has seen.

    The file is read first, put back once the writer has started, and its header seeded into the
    writer's keys, so the next save appends (or rewrites with the union of the headers).
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return
    text = path.read_text()
    with warnings.catch_warnings():  # its warning says the file will be deleted: it is put back
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment  # starting the writer deletes the file
    path.write_text(text)
    header = next(csv.reader(text.splitlines()[:1]), [])
    writer.metrics_keys = sorted(set(writer.metrics_keys) | {k for k in header if k})
