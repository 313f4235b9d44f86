"""What a search leaves behind: ``OUT/search.html``, ``OUT/pareto/<k>.yaml``, ``OUT/search.json``,
a terminal table and a wandb run in the study's group.

The Pareto front is taken over the trials that finished and met every constraint (a trial's
``constraints`` attribute, Optuna's convention: <= 0 met); the page draws every trial, the
violating ones grey (Optuna's ``plot_pareto_front`` with the same ``constraints_func``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import yaml

from compress.errors import UserError
from compress.files import atomic_write, json_text
from compress.recipe import Recipe
from compress.report import Column, TextTable, cell
from compress.report.html import _div, _page, _table
from compress.search.space import SearchSpec

__all__ = ["feasible", "pareto_trials", "closest_trial", "search_figures", "search_page", "write_results"]


def feasible(trial: Any) -> bool:
    """Finished and within every constraint."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in trial.user_attrs.get("constraints", []))


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    return all(s * x >= s * y for x, y, s in zip(a, b, signs, strict=True)) and a != b


def pareto_trials(trials: list[Any], spec: SearchSpec) -> list[Any]:
    """The feasible trials no other feasible trial dominates (for one objective: the best ones)."""
    signs = [1.0 if o.direction == "maximize" else -1.0 for o in spec.objectives]
    ok = [t for t in trials if feasible(t)]
    return [t for t in ok if not any(_dominates(o.values, t.values, signs) for o in ok)]


def closest_trial(trials: list[Any], spec: SearchSpec) -> Any | None:
    """The finished trial that misses the constraints least (violations relative to each limit)."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("constraints")]

    def miss(t: Any) -> float:
        return sum(max(0.0, v) / max(abs(c.value), 1e-12) for v, c in zip(t.user_attrs["constraints"],
                                                                            spec.constraints, strict=True))
    return min(done, key=miss, default=None)


def _figure_or_none(draw: Any) -> Any:
    try:
        return draw()
    except (ValueError, RuntimeError, ZeroDivisionError):  # too few finished trials for this figure
        return None


def search_figures(study: Any, spec: SearchSpec) -> dict[str, Any]:
    """Optuna's figures of the study: the Pareto front (violations grey), history and parameter
    importances per objective. A figure needing more finished trials than there are is left out."""
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import plot_optimization_history, plot_param_importances, plot_pareto_front

    names = [o.key for o in spec.objectives]
    figs: dict[str, Any] = {}
    if len(names) > 1:
        figs["pareto"] = _figure_or_none(lambda: plot_pareto_front(
            study, target_names=names[:2], targets=lambda t: t.values[:2]))
    for i, name in enumerate(names):
        figs[f"history-{i}"] = _figure_or_none(lambda i=i, name=name: plot_optimization_history(
            study, target=lambda t: t.values[i], target_name=name))
        # fANOVA: variance explained, the same for a maximised and a minimised key
        figs[f"importance-{i}"] = _figure_or_none(lambda i=i, name=name: plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=0), target=lambda t: t.values[i], target_name=name))
    for key, fig in figs.items():
        if fig is not None:
            title = fig.layout.title.text or key
            if key.startswith(("history", "importance")):
                title = f"{title}: {names[int(key.rsplit('-', 1)[1])]}"
            fig.update_layout(title={"text": title}, height=420, template="plotly_white")
    return {k: f for k, f in figs.items() if f is not None}


def _rows(trials: list[Any], spec: SearchSpec, front: set[int]) -> list[dict[str, Any]]:
    """One record per trial in the shape the report tables format (``index``, ``name``, ``metrics``)."""
    out = []
    for t in trials:
        metrics = {f"param:{p.key}": t.params.get(p.key) for p in spec.params}
        metrics.update(t.user_attrs.get("metrics", {}))
        metrics["cached_stages"] = t.user_attrs.get("cached_stages")
        state = ("pareto" if t.number in front else "complete" if feasible(t) else "violates") \
            if t.state.name == "COMPLETE" else t.state.name.lower()
        out.append({"index": t.number, "name": state, "metrics": metrics, "error": t.user_attrs.get("error", "")})
    return out


def _columns(spec: SearchSpec) -> list[Column]:
    cols = [Column("", "trial", "index", "{}"), Column("", "state", "name", "{}", left=True, width=9)]
    cols += [Column("", p.key.rsplit(".", 1)[-1][:14], f"param:{p.key}", "{}" if p.choices else "{:.4g}")
             for p in spec.params]
    keys = [o.key for o in spec.objectives] + [c.key for c in spec.constraints if c.key not in
                                               [o.key for o in spec.objectives]]
    for key in dict.fromkeys(keys):
        base, _, variant = key.partition("/")
        fmt = "{:.2f}" if base.endswith("accuracy") else "{:.1f}" if base == "stored_bytes" else "{:.4g}"
        cols.append(Column(base[:16], variant[:16], key, fmt))
    return cols + [Column("cached", "stages", "cached_stages", "{}")]


def search_page(study: Any, spec: SearchSpec, front: list[Any], figs: dict[str, Any]) -> str:
    """``search.html``: the figures, every trial in a table (state ``pareto``: on the front), the front's recipes."""
    trials = study.get_trials(deepcopy=False)
    numbers = {t.number for t in front}
    cols = _columns(spec)
    rows = _rows(trials, spec, numbers)
    header = [c.header for c in cols] + ["error"]
    body = [[cell(r, c.key, c.fmt) for c in cols] + [r["error"]] for r in rows]
    objectives = ", ".join(f"{o.direction} {o.key}" for o in spec.objectives)
    limits = ", ".join(f"{c.key} {c.bound} {c.value:g}" for c in spec.constraints) or "none"
    front_text = ", ".join(f"trial {t.number} (pareto/{t.number}.yaml)" for t in front) or "none yet"
    charts = '<div class="grid">' + "".join(_div(f, f"search-{k}") for k, f in figs.items()) + "</div>"
    body_html = (f"<h1>Search: {html.escape(study.study_name)}</h1>"
                 f"<p>{len(trials)} trials; objectives: {html.escape(objectives)}; constraints: {html.escape(limits)}; "
                 f"sampler {spec.sampler}, pruner {spec.pruner}. Pareto front: {html.escape(front_text)}.</p>"
                 f"{charts}<h2>Trials</h2>{_table(header, body)}")
    return _page(f"search: {study.study_name}", body_html)


def _write_pareto(out: Path, front: list[Any]) -> list[str]:
    """Each Pareto trial's resolved recipe as ``pareto/<k>.yaml``, re-runnable with ``run.py`` (its own out_dir)."""
    folder = out / "pareto"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.yaml"):  # the front of a resumed search may have moved
        old.unlink()
    written = []
    for t in front:
        source = out / "trials" / str(t.number) / "recipe.yaml"
        if not source.is_file():
            continue
        recipe = yaml.safe_load(source.read_text())
        recipe["out_dir"] = str(folder / f"run-{t.number}")
        path = folder / f"{t.number}.yaml"
        text = f"# trial {t.number} of search '{out}': {dict(t.params)}\n" + yaml.safe_dump(recipe, sort_keys=False)
        atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
        written.append(str(path))
    return written


def _log_wandb(recipe: Recipe, study: Any, figs: dict[str, Any], rows: list[dict[str, Any]], out: Path) -> None:
    w = recipe.cfg.logger.wandb
    if w.mode == "disabled":
        return
    import wandb

    run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, group=w.group or study.study_name,
                     name=f"{study.study_name}-search", job_type="search", dir=str(out),
                     config=recipe.to_container().get("search"), settings=wandb.Settings(quiet=True))
    columns = sorted({k for r in rows for k in r["metrics"]})
    run.log({**{f"search/{k}": wandb.Plotly(f) for k, f in figs.items()},
             "search/trials": wandb.Table(columns=["trial", "state", *columns],
                                          data=[[r["index"], r["name"], *[r["metrics"].get(c) for c in columns]]
                                                for r in rows])})
    run.finish()


def write_results(study: Any, spec: SearchSpec, recipe: Recipe, out: Path, *, wall_s: float,
                  quiet: bool = False) -> dict[str, Any]:
    """search.html, pareto/*.yaml, search.json, the terminal table and wandb; then, if no trial met the
    constraints, a UserError naming the closest one (after everything is written)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    front = pareto_trials(trials, spec)
    figs = search_figures(study, spec)
    atomic_write(out / "search.html", lambda tmp: Path(tmp).write_text(search_page(study, spec, front, figs)))
    pareto = _write_pareto(out, front)
    rows = _rows(trials, spec, {t.number for t in front})
    states = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState if any(t.state == s for t in trials)}
    summary = {"study": study.study_name, "trials": len(trials), "states": states, "wall_s": wall_s,
               "pareto": [{"trial": t.number, "params": t.params, "values": t.values,
                           "metrics": t.user_attrs.get("metrics", {})} for t in front],
               "cache_hits": sum(1 for t in trials if (t.user_attrs.get("cached_stages") or 0) > 1),
               "prefix_builds": sum(1 for t in trials if t.user_attrs.get("built_prefix")),
               "trials_detail": [{"trial": r["index"], "state": trials[i].state.name, "params": trials[i].params,
                                  "values": trials[i].values, "cached_stages": r["metrics"]["cached_stages"],
                                  "error": r["error"] or None} for i, r in enumerate(rows)]}
    text = json_text(summary, indent=1, default=str)
    atomic_write(out / "search.json", lambda tmp: Path(tmp).write_text(text))
    if not quiet:
        table = TextTable(_columns(spec))
        print(table.header())
        for r in rows:
            print(table.row(r) + (f"  {r['error'][:60]}" if r["error"] else ""))
        print(f"search: {out / 'search.html'}; Pareto front ({len(front)}): "
              f"{', '.join(pareto) or 'none'}; {summary['cache_hits']} trials started from cached stages")
    _log_wandb(recipe, study, figs, rows, out)
    if spec.constraints and not front and any(t.state == TrialState.COMPLETE for t in trials):
        near = closest_trial(trials, spec)
        missed = "; ".join(c.describe(near.user_attrs["metrics"]) for c, v in
                           zip(spec.constraints, near.user_attrs["constraints"], strict=True) if v > 0)
        raise UserError(f"search.constraints: no trial met them after {len(trials)} trials; closest: trial "
                        f"{near.number} ({missed}; recipe in {out / 'trials' / str(near.number) / 'recipe.yaml'}); "
                        "relax the limits or widen search.space")
    return summary
