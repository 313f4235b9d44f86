"""A run folder's layout: which files a run writes there, and outputs that must not replace them.

Orchestration layer, kept apart from the pipeline so that ``export`` and ``compare`` check their
``--out`` without loading Lightning.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from compress.errors import UserError
from compress.files import LOCK_NAME, PID_NAME, check_writable

__all__ = ["OWN_FILES", "OWN_DIRS", "RUN_FILES", "holds_run", "check_output"]

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
