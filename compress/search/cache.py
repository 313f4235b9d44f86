"""The prefix cache: trials whose leading stages resolve to the same configuration share them.

Stage ``j``'s checkpoint (``stage-j-<name>.ckpt``, ``j = 0`` the input model) is keyed by a hash of
everything that decides it: the resolved recipe without ``name``, ``out_dir``, ``logger`` and
``search``, and with only the first ``j`` stages. A trial links every cached checkpoint of its
longest cached prefix into its own folder and continues with the pipeline's ``--resume``
machinery, so a dense model trained once serves every trial that starts from it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["prefix_keys", "PrefixCache", "NOT_IN_KEY"]

NOT_IN_KEY = ("name", "out_dir", "logger", "search")  # what changes no stage's weights or records


def prefix_keys(recipe: dict[str, Any]) -> list[str]:
    """One key per stage index 0..len(stages): the hash of the recipe's prefix up to that stage."""
    base = {k: v for k, v in recipe.items() if k not in NOT_IN_KEY and k != "stages"}
    stages = recipe.get("stages", [])
    return [hashlib.sha256(json.dumps({**base, "stages": stages[:j]}, sort_keys=True, default=str).encode())
            .hexdigest()[:20] for j in range(len(stages) + 1)]


def checkpoint_names(recipe: dict[str, Any]) -> list[str]:
    """The pipeline's checkpoint file of each stage index (stage 0: the input model)."""
    names = ["input"] + [str(s["name"]) for s in recipe.get("stages", [])]
    return [f"stage-{j}-{n.replace('/', '_')}.ckpt" for j, n in enumerate(names)]


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` (a hard link where the file system allows, else a copy), atomically."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class PrefixCache:
    """Finished stage checkpoints under ``root/<prefix key>/``, shared by every trial of a study."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str, ckpt: str) -> Path:
        return self.root / key / ckpt

    def cached_stages(self, recipe: dict[str, Any]) -> int:
        """How many leading stage indices (0 = input) the cache holds for this recipe."""
        n = 0
        for key, ckpt in zip(prefix_keys(recipe), checkpoint_names(recipe), strict=True):
            if not self.path(key, ckpt).is_file():
                break
            n += 1
        return n

    def restore(self, recipe: dict[str, Any], run_dir: Path) -> int:
        """Link the longest cached prefix's checkpoints into ``run_dir``; returns how many."""
        n = self.cached_stages(recipe)
        run_dir.mkdir(parents=True, exist_ok=True)
        for key, ckpt in list(zip(prefix_keys(recipe), checkpoint_names(recipe), strict=True))[:n]:
            _link(self.path(key, ckpt), run_dir / ckpt)
        return n

    def publish(self, recipe: dict[str, Any], run_dir: Path, index: int) -> bool:
        """Offer stage ``index``'s finished checkpoint of ``run_dir``; False if the cache had it."""
        key, ckpt = prefix_keys(recipe)[index], checkpoint_names(recipe)[index]
        target = self.path(key, ckpt)
        if target.is_file() or not (run_dir / ckpt).is_file():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        _link(run_dir / ckpt, target)
        return True

    def lock(self, recipe: dict[str, Any], index: int) -> Any:
        """An inter-process lock on building the prefix that ends at stage ``index``."""
        from filelock import FileLock

        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{prefix_keys(recipe)[index]}.lock"))
