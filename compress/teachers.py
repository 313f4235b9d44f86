"""Training a named teacher: run the recipe its spec names, then record sha256 and accuracy.

Orchestration layer (it runs a pipeline); resolving and loading teachers is :mod:`compress.distill.teacher`.
"""

from __future__ import annotations

from pathlib import Path

from compress.distill.teacher import (
    load_teacher_spec,
    record_teacher,
    teacher_checkpoint_path,
    teacher_spec_path,
)
from compress.errors import UserError
from compress.pipeline import Pipeline
from compress.recipe import load_recipe

__all__ = ["train_teacher"]


def train_teacher(name: str, teachers_dir: str | Path = "teachers", *, overrides: tuple[str, ...] = (),
                  quiet: bool = False, record: bool = True) -> Path:
    """Run the recipe that trains teacher ``name``; its last checkpoint lands where the spec says.

    The recipe's ``out_dir`` is set to the checkpoint's folder. Returns the checkpoint path.
    """
    spec_path = teacher_spec_path(name, teachers_dir)
    ts = load_teacher_spec(spec_path)
    ckpt = teacher_checkpoint_path(ts, spec_path)
    recipe = load_recipe(ts.recipe, [f"out_dir={ckpt.parent}", *overrides])
    pipeline = Pipeline(recipe, overwrite=True, quiet=quiet)
    pipeline.run()
    if not ckpt.is_file():
        written = sorted(p.name for p in ckpt.parent.glob("stage-*.ckpt"))
        raise UserError(f"{spec_path}: checkpoint: {ts.recipe} wrote {', '.join(written) or 'no checkpoint'} in "
                        f"{ckpt.parent}, not {ckpt.name}; fix the spec's checkpoint or the recipe's stage names")
    if record:
        record_teacher(name, teachers_dir)
    return ckpt
