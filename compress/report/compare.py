"""Runs side by side: read each run folder's report.json, refuse runs that do not compare, write compare.html."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.files import atomic_write
from compress.report.html import compare_page
from compress.report.table import TextTable, terminal_columns
from compress.schema import read_yaml
from compress.tasks import build_task

__all__ = ["Run", "load_run", "run_names", "check_comparable", "compare_runs"]


@dataclass
class Run:
    """A finished (or partly finished) run: its folder, resolved recipe and stage records."""

    path: Path
    recipe: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def model(self) -> str:
        return str((self.recipe.get("model") or {}).get("name", "?"))

    @property
    def data(self) -> str:
        return str((self.recipe.get("data") or {}).get("name", "?"))

    @property
    def task(self) -> str:
        """The task's name and primary metric: runs judged by different metrics share no front."""
        task = self.recipe.get("task") or {}
        return f"{task.get('name', 'classification')} ({task.get('primary') or 'default metric'})"


def load_run(run_dir: str | Path) -> Run:
    """The run in ``run_dir``, from its report.json (the recipe from recipe.yaml if the report lacks it)."""
    path = Path(run_dir)
    report_file = path / "report.json"
    if not report_file.is_file():
        raise UserError(f"{run_dir}: no report.json there; is it a run folder (out_dir of a recipe)?")
    try:
        report = json.loads(report_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{report_file}: not readable JSON ({e})") from e
    stages = report.get("stages") if isinstance(report, dict) else None
    if not isinstance(stages, list) or not all(
            isinstance(s, dict) and isinstance(s.get("metrics"), dict) and "index" in s and "name" in s for s in stages):
        raise UserError(f"{report_file}: not a run's report (expected {{\"recipe\": ..., \"stages\": [{{\"index\", "
                        "\"name\", \"metrics\": {...}}, ...]}, as `python run.py RECIPE` writes)")
    recipe = report.get("recipe")
    if not recipe and (path / "recipe.yaml").is_file():
        import yaml

        try:
            recipe = read_yaml(path / "recipe.yaml")
        except yaml.YAMLError as e:
            raise UserError(f"{path / 'recipe.yaml'}: YAML syntax error: {str(e).splitlines()[0]}") from None
    if not isinstance(recipe, dict | None):
        raise UserError(f"{report_file}: its recipe is a {type(recipe).__name__}, not a mapping of keys")
    if not stages:
        raise UserError(f"{report_file}: no finished stage in it")
    return Run(path, recipe or {}, report["stages"])


def run_names(paths: list[Path]) -> list[str]:
    """Each run named by its folder; by as many parent folders as it takes when folder names repeat."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        names = ["/".join(ps[-depth:]) for ps in parts]
        if len(set(names)) == len(names) or depth >= max(len(ps) for ps in parts):
            return names
        depth += 1


def check_comparable(runs: dict[str, Run]) -> None:
    """Raise UserError (one line) when the runs differ in model or data set."""
    for what in ("model", "data", "task"):
        values = {name: getattr(run, what) for name, run in runs.items()}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in values.items())
            raise UserError(f"the runs differ in {'data set' if what == 'data' else what} ({listed}); "
                            "compare them anyway with --force")


def compare_runs(run_dirs: list[str | Path], out: str | Path, force: bool = False, width: int = 120) -> str:
    """Write compare.html for ``run_dirs`` and return the terminal table of their final metrics.

    Args:
        run_dirs: run folders (each with report.json).
        out: the HTML file to write.
        force: compare runs of different models or data sets.
        width: the widest line of the returned table.
    """
    if len(run_dirs) < 1:
        raise UserError("compare needs at least one run folder")
    loaded = [load_run(d) for d in run_dirs]
    runs = dict(zip(run_names([r.path for r in loaded]), loaded, strict=True))
    if not force:
        check_comparable(runs)
    task = build_task(next(iter(runs.values())).recipe.get("task"))  # one task: check_comparable says so
    page = compare_page({name: run.records for name, run in runs.items()},
                        {name: run.recipe for name, run in runs.items()}, (task.primary, task.higher_is_better))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    finals = [{**run.records[-1], "name": name} for name, run in runs.items()]
    columns, left_out = terminal_columns(finals[0], width, name_header="run",
                                         name_width=max(len(n) for n in runs))
    columns[0].top, columns[0].width = "last", max(columns[0].width, 4)  # the final stage's index
    table = TextTable(columns)
    lines = [table.header()] + [table.row(r) for r in finals]
    if left_out:
        lines.append(f"not shown: {', '.join(left_out)}; every final metric is in {out}")
    return "\n".join(lines)
