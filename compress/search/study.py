"""``run.py search``: an Optuna study whose trials are ordinary runs of the recipe.

Each worker (``--jobs K``: K processes on this machine; more machines join through ``--storage``)
loops: under ``OUT/search.lock`` it fails the trials of dead workers, counts the trials finished or
running and, while fewer than asked, lets Optuna start one (``study.optimize(n_trials=1)``). A trial
is a :class:`~compress.pipeline.Pipeline` run in ``OUT/trials/<k>/`` on the recipe with the
sampled values, resumed from the longest cached prefix of stage checkpoints
(:class:`~compress.search.cache.PrefixCache`). Latency is measured under ``OUT/timing.lock`` so that
trials never time each other. A trial that raises is recorded as FAIL with its error; a wrong
objective key stops the search (exit 2).
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.files import json_text
from compress.pipeline import Pipeline
from compress.recipe import Recipe, load_recipe
from compress.search._registry import PRUNERS, SAMPLERS
from compress.search.cache import PrefixCache, prefix_keys
from compress.search.results import write_results
from compress.search.space import (
    SearchSpec,
    constraint_violations,
    metric_value,
    parse_search,
    trial_overrides,
)

__all__ = ["SearchRun", "TrialCrashed", "open_study", "counted_trials",
           "fail_dead_trials", "work", "run_search"]

HOST = socket.gethostname()


@contextmanager
def _experimental_ok() -> Iterator[None]:
    """Heartbeats, stale-trial retries and ``fail_stale_trials`` are marked experimental (since Optuna 2.8)
    yet are what a resumable search is built on: their warnings would only repeat on every trial."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class TrialCrashed(Exception):
    """A trial raised: recorded as FAIL (with its ``error`` attribute), the search goes on."""


@dataclass(frozen=True)
class SearchRun:
    """What a worker process needs (plain data: it crosses a process boundary)."""

    recipe: str
    overrides: tuple[str, ...]
    storage: str
    study: str
    trials: int
    jobs: int = 1
    worker: int = 0
    deadline: float | None = None  # time.time() after which no trial starts
    quiet: bool = False


def _storage(url: str) -> Any:
    """An Optuna storage from a URL: ``journal:PATH`` is a journal file, anything
    else an RDB URL (sqlite:///..., postgresql://...) with heartbeats so another machine's dead trials fail."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        with _experimental_ok():
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=30, grace_period=120,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as e:  # sqlalchemy's and Optuna's errors for a bad URL share no base class
        raise UserError(f"--storage: cannot open '{url}' ({str(e).splitlines()[0][:160]}); give an Optuna storage "
                        "URL such as sqlite:///OUT/study.db, postgresql://user@host/db or journal:PATH") from None


def open_study(run: SearchRun, spec: SearchSpec, seed_offset: int = 0) -> Any:
    """The study (created on first use, loaded after: a killed search resumes)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial prints its own line
    sampler = SAMPLERS.get(spec.sampler, "search.sampler")(spec.seed + seed_offset)
    return optuna.create_study(storage=_storage(run.storage), study_name=run.study, sampler=sampler,
                               pruner=PRUNERS.get(spec.pruner, "search.pruner")(),
                               directions=[o.direction for o in spec.objectives], load_if_exists=True)


def _retried(trials: list[Any]) -> set[int]:
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with _experimental_ok():
        return {n for n in (RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials) if n is not None}


def counted_trials(study: Any) -> int:
    """Trials that count towards ``--trials``: finished, running or waiting, but not a failure that is
    being retried (a trial of a killed search)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = _retried(trials)
    return sum(1 for t in trials if not (t.state == TrialState.FAIL and t.number in retried))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fail_dead_trials(study: Any) -> list[int]:
    """RUNNING trials whose worker is gone (heartbeat too old, or a dead process on this host) become
    FAIL and are enqueued again with the same values; returns their numbers."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    dead = []
    with _experimental_ok():
        optuna.storages.fail_stale_trials(study)  # RDB heartbeats (other machines); retried by the storage callback
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
            if host == HOST and pid.isdigit() and not _alive(int(pid)):
                study.tell(t.number, state=TrialState.FAIL)
                RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study.get_trials(deepcopy=False)[t.number])
                dead.append(t.number)
    return dead


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Objective:
    """Runs one trial: sample, build the trial's recipe, restore the cached prefix, run, judge."""

    def __init__(self, run: SearchRun, recipe: Recipe, spec: SearchSpec):
        from filelock import FileLock

        self.run, self.spec = run, spec
        self.base = recipe.to_container()
        self.base.pop("search", None)
        self.out = Path(recipe.cfg.out_dir)
        self.cache = PrefixCache(self.out / "cache")
        self.timing_lock = FileLock(str(self.out / "timing.lock"))
        self.release: Callable[[], None] = lambda: None

    def _log(self, text: str) -> None:
        if not self.run.quiet:
            print(text, flush=True)

    def _after_stage(self, trial: Any, container: dict[str, Any], run_dir: Path, index: int,
                     metrics: dict[str, Any]) -> None:
        import optuna

        self.cache.publish(container, run_dir, index)
        if self.spec.pruner == "none":
            return
        key = self.spec.objectives[0].key
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            trial.report(float(value), index)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{key} {value:g} after stage {index} is dominated by earlier trials")

    def _build_prefix(self, container: dict[str, Any], stages: int) -> bool:
        """Run the shared leading stages once, in the cache's own folder, under a lock per prefix;
        False if the cache had them."""
        need = stages + 1  # stage indices 0..stages
        if self.cache.cached_stages(container) >= need:
            return False
        with self.cache.lock(container, stages):
            if self.cache.cached_stages(container) >= need:  # another worker built it meanwhile
                return False
            prefix = {**container, "stages": container["stages"][:stages],
                      "out_dir": str(self.cache.root / f"{prefix_keys(container)[stages]}.run"),
                      "logger": {**container["logger"], "wandb": {**container["logger"]["wandb"], "mode": "disabled"}}}
            self._log(f"prefix: stages 1-{stages} ({', '.join(s['name'] for s in prefix['stages'])}) run once, "
                      f"shared by every trial")
            recipe = load_recipe(prefix)
            pipeline = Pipeline(recipe, resume=True, quiet=True, timing_lock=self.timing_lock,
                                     after_stage=lambda i, m: self.cache.publish(prefix, Path(prefix["out_dir"]), i))
            pipeline.run()
            return True

    def __call__(self, trial: Any) -> list[float]:
        import optuna

        self.release()  # the trial exists in the storage now: other workers may count it
        trial.set_user_attr("worker", f"{HOST}:{os.getpid()}")
        params = {p.key: p.suggest(trial) for p in self.spec.params}
        k = trial.number
        run_dir = self.out / "trials" / str(k)
        shutil.rmtree(run_dir, ignore_errors=True)  # a trial number is never reused: anything there is stale
        t0 = time.perf_counter()
        try:
            wandb = self.base["logger"]["wandb"]
            name = f"{self.base['name']}-trial-{k}"
            recipe = load_recipe(self.base, trial_overrides(params) + [
                f"out_dir={json_text(str(run_dir))}", f"name={json_text(name)}",
                f"logger.wandb.group={json_text(wandb.get('group') or self.run.study)}"])
            container = recipe.to_container()
            if self.spec.shared_stages and self._build_prefix(container, self.spec.shared_stages):
                trial.set_user_attr("built_prefix", self.spec.shared_stages)
            cached = self.cache.restore(container, run_dir)
            trial.set_user_attr("cached_stages", cached)
            pipeline = Pipeline(recipe, resume=cached > 0, quiet=True, timing_lock=self.timing_lock,
                                     after_stage=lambda i, m: self._after_stage(trial, container, run_dir, i, m))
            records = pipeline.run()
        except optuna.TrialPruned:  # raised by _after_stage, inside pipeline.run()
            for sink in pipeline.sinks:
                sink.close(pipeline.records, None)
            self._log(f"trial {k}: pruned after {len(pipeline.records) - 1} stages")
            raise
        except Exception as e:  # a crash of one trial is recorded, not fatal
            trial.set_user_attr("error", _one_line(e))
            self._log(f"trial {k}: FAIL ({_one_line(e)})")
            raise TrialCrashed(_one_line(e)) from e
        last = records[-1]["metrics"]
        values = [metric_value(last, o.key, f"search.objectives[{i}] ({o.direction}: {o.key})")
                  for i, o in enumerate(self.spec.objectives)]
        violations = constraint_violations(self.spec, last)
        trial.set_user_attr("constraints", violations)
        for c, v in zip(self.spec.constraints, violations, strict=True):
            trial.set_constraint(f"{c.key} {c.bound}", v)  # TPE and NSGA-II prefer feasible trials; plots grey the rest
        trial.set_user_attr("metrics", {key: v for key, v in last.items()
                                        if isinstance(v, int | float) and not isinstance(v, bool)})
        trial.set_user_attr("wall_s", time.perf_counter() - t0)
        shown = ", ".join(f"{o.key} {v:.4g}" for o, v in zip(self.spec.objectives, values, strict=True))
        self._log(f"trial {k}: {shown} ({cached} stages cached, {time.perf_counter() - t0:.1f} s)")
        return values


def work(run: SearchRun) -> int:
    """One worker: start trials until the study holds ``run.trials`` of them (or the deadline passes);
    returns how many it ran."""
    from filelock import FileLock

    if run.jobs > 1:  # each of K workers gets its share of the cores for training
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // run.jobs))
    recipe = load_recipe(run.recipe, list(run.overrides))
    spec = parse_search(recipe)
    out = Path(recipe.cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    objective = Objective(run, recipe, spec)
    study = open_study(run, spec, seed_offset=1000 * run.worker + len(_storage_trials(run, spec)))
    lock = FileLock(str(out / "search.lock"))
    ran = 0
    while run.deadline is None or time.time() < run.deadline:
        lock.acquire()
        objective.release = lock.release
        try:
            for number in fail_dead_trials(study):
                objective._log(f"trial {number}: its worker died; failed, and enqueued again")
            if counted_trials(study) >= run.trials:
                break
            study.optimize(objective, n_trials=1, catch=(TrialCrashed,))
            ran += 1
        finally:
            objective.release = lambda: None
            if lock.is_locked:
                lock.release()
    return ran


def _storage_trials(run: SearchRun, spec: SearchSpec) -> list[Any]:
    import optuna

    try:
        return optuna.load_study(study_name=run.study, storage=_storage(run.storage)).get_trials(deepcopy=False)
    except KeyError:  # no such study yet
        return []


def run_search(recipe_path: str, overrides: list[str] | tuple[str, ...] = (), *, trials: int | None = None,
               jobs: int = 1, storage: str | None = None, study: str | None = None, timeout: float | None = None,
               quiet: bool = False) -> dict[str, Any]:
    """The whole search: validate, run ``jobs`` workers, write the results (``OUT/search.html``,
    ``OUT/pareto/<k>.yaml``, ``OUT/search.json``); returns the summary."""
    recipe = load_recipe(recipe_path, list(overrides))
    spec = parse_search(recipe)
    if jobs < 1:
        raise UserError(f"--jobs: {jobs} must be >= 1")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout: {timeout} must be > 0 seconds")
    out = Path(recipe.cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = SearchRun(str(recipe_path), tuple(overrides), storage or f"sqlite:///{(out / 'study.db').resolve()}",
                    study or str(recipe.cfg.name), trials or spec.trials, jobs,
                    deadline=time.time() + timeout if timeout else None, quiet=quiet)
    open_study(run, spec)  # a bad --storage answers before any worker starts
    t0 = time.perf_counter()
    if jobs == 1:
        work(run)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from dataclasses import replace

        # spawn: a fresh interpreter per worker (no forked torch/Lightning state)
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(work, replace(run, worker=w)) for w in range(jobs)]:
                future.result()
    return write_results(open_study(run, spec), spec, recipe, out, wall_s=time.perf_counter() - t0, quiet=quiet)
