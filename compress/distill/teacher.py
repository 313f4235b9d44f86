"""Teachers: ``self`` (the model before compression), a name under ``teachers/``, or a checkpoint.

A named teacher is a spec file ``<teachers_dir>/<name>.yaml``::

    name: mnist_mlp1200
    description: the 1200-1200 MLP of Hinton et al. (2015)
    model: {name: mlp, hidden: [1200, 1200], dropout: 0.5}   # what the checkpoint holds
    data: mnist
    recipe: recipes/teachers/mnist_mlp1200.yaml                # the recipe that trains it
    checkpoint: runs/mnist_mlp1200/stage-1-train.ckpt          # relative to the spec's folder
    sha256: null                                               # checked when set
    accuracy: null                                             # test accuracy, for the record

:func:`compress.teachers.train_teacher` (``python run.py teacher NAME``) runs the spec's recipe so
that its last checkpoint lands where the spec says, then :func:`record_teacher` writes the file's
sha256 and test accuracy into the spec.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING
from torch import nn

from compress.checkpoint import load_model, read_checkpoint
from compress.errors import UserError, suggest
from compress.files import finite
from compress.schema import merge_structured, read_yaml

__all__ = ["TeacherSpec", "resolve_teacher", "teacher_spec_path", "load_teacher_spec", "check_teacher",
           "record_teacher", "sha256_file", "teacher_checkpoint_path"]

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


@dataclass
class TeacherSpec:
    name: str = MISSING
    model: dict[str, Any] = field(default_factory=dict)  # the recipe's model block, for the reader
    data: str = ""
    recipe: str = MISSING  # the recipe that trains it (python run.py <recipe>)
    checkpoint: str = MISSING  # relative to the spec file's folder, or absolute
    sha256: str | None = None
    accuracy: float | None = None
    description: str = ""


def _is_path(spec: str) -> bool:
    return "/" in spec or "\\" in spec or spec.endswith(CHECKPOINT_SUFFIXES)


def teacher_spec_path(name: str, teachers_dir: str | Path, key: str = "teacher") -> Path:
    """``<teachers_dir>/<name>.yaml``, or a UserError listing the valid teacher names."""
    path = Path(teachers_dir) / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in Path(teachers_dir).glob("*.yaml")) if Path(teachers_dir).is_dir() else []
        raise UserError(f"{key}: unknown teacher '{name}' (no {path}); use 'self', a checkpoint path, or a name; "
                        f"{suggest(name, ['self', *names])}")
    return path


def load_teacher_spec(path: str | Path) -> TeacherSpec:
    """Read and validate a teacher spec file."""
    import yaml

    path = Path(path)
    try:
        data = read_yaml(path)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: YAML syntax error: {str(e).splitlines()[0]}") from None
    from omegaconf import OmegaConf

    return OmegaConf.to_object(merge_structured(TeacherSpec, data, str(path)))


def teacher_checkpoint_path(spec: TeacherSpec, spec_path: Path) -> Path:
    ckpt = Path(spec.checkpoint)
    return ckpt if ckpt.is_absolute() else spec_path.parent / ckpt


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_teacher(spec: str, teachers_dir: str | Path = "teachers", key: str = "teacher") -> Path | None:
    """Check that a teacher can be loaded, without loading it; returns its checkpoint (None: ``self``).

    For an early, pre-training check (``--dry-run``). Raises UserError as :func:`resolve_teacher` would.
    """
    if spec == "self":
        return None
    if _is_path(spec):
        if not Path(spec).is_file():
            raise UserError(f"{key}: teacher checkpoint '{spec}' not found (a name would be looked up in {teachers_dir}/)")
        return Path(spec)
    spec_path = teacher_spec_path(spec, teachers_dir, key)
    ts = load_teacher_spec(spec_path)
    ckpt = teacher_checkpoint_path(ts, spec_path)
    if not ckpt.is_file():
        raise UserError(f"{key}: teacher '{spec}' is not trained yet (no {ckpt}); train it with "
                        f"`python run.py {ts.recipe}`")
    if ts.sha256 and sha256_file(ckpt) != ts.sha256:
        raise UserError(f"{key}: teacher '{spec}': {ckpt} does not match the sha256 in {spec_path} (retrained or "
                        f"corrupt?); retrain with `python run.py {ts.recipe}` or update sha256 there")
    return ckpt


def resolve_teacher(spec: str | nn.Module, ctx: Any = None, key: str = "teacher") -> nn.Module:
    """The teacher module for ``spec``: a module as is, ``self``, a checkpoint path or a name.

    ``self`` is ``ctx.reference_model`` (the model before the compression stages). Named teachers
    are looked up in ``ctx.teachers_dir`` (default ``teachers/``). Checkpoints are compress
    checkpoints, loaded with ``weights_only=True`` by :func:`compress.checkpoint.load_model`; a
    checkpoint whose model runs code (``import:``, ``transformers``) is rebuilt only when it is the code
    ``ctx.model_spec`` (the recipe's model block) names, or with ``ctx.trust_model_code``.
    """
    if isinstance(spec, nn.Module):
        return spec
    spec = str(spec)
    if spec == "self":
        ref = getattr(ctx, "reference_model", None)
        if ref is None:
            raise UserError(f"{key}: 'self' is the model before compression, but there is none here; in Python pass "
                            "Context(reference_model=...) or a teacher module / name / checkpoint path")
        return ref
    ckpt = check_teacher(spec, getattr(ctx, "teachers_dir", "teachers"), key)
    # The file is data: code it names is built only if the recipe's own model block names that code
    # (ctx.model_spec) or the caller opted in (--trust-model-code).
    own = (getattr(ctx, "model_spec", None) or {}).get("name")
    return load_model(ckpt, trust_model_code=getattr(ctx, "trust_model_code", False),
                      trusted=(own,) if own else ())


def record_teacher(name: str, teachers_dir: str | Path = "teachers") -> TeacherSpec:
    """Write the checkpoint's sha256 and stored test accuracy into the spec (other lines kept)."""
    spec_path = teacher_spec_path(name, teachers_dir)
    ts = load_teacher_spec(spec_path)
    ckpt = teacher_checkpoint_path(ts, spec_path)
    if not ckpt.is_file():
        raise UserError(f"teacher '{name}' is not trained yet (no {ckpt}), so there is nothing to record; train it "
                        f"with `python run.py teacher {name}`")
    digest = sha256_file(ckpt)
    accuracy = read_checkpoint(ckpt).get("metrics", {}).get("accuracy")
    text = spec_path.read_text()
    for field_name, value in (("sha256", digest), ("accuracy", None if finite(accuracy) is None else round(float(accuracy), 6))):
        line = f"{field_name}: {'null' if value is None else value}"
        pattern = re.compile(rf"^{field_name}:.*$", re.MULTILINE)
        text = pattern.sub(line, text, count=1) if pattern.search(text) else text.rstrip("\n") + "\n" + line + "\n"
    spec_path.write_text(text)
    return load_teacher_spec(spec_path)
