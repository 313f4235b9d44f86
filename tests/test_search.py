"""``run.py search``: Optuna trials as pipeline runs on digits (a second or two per trial), the prefix
cache, constraints, crashes, resuming after kill -9, two worker processes, the results and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from compress.cli import main
from compress.errors import UserError
from compress.recipe import load_recipe
from compress.search import PRUNERS, parse_search, run_search
from compress.stages.prune_unstructured import UnstructuredPruningStage
from compress.stages.train import TrainStage
from tests.conftest import ROOT, quick_recipe

LIMIT = 65_000  # stored_bytes: lenet300 pruned to about 0.7 and beyond fits, less sparse does not


def search_recipe(tmp_path, **search) -> dict:
    """Train once (1 epoch), then prune to a searched sparsity; accuracy against stored size."""
    recipe = quick_recipe(tmp_path, stages=[
        {"type": "train", "epochs": 1, "optimizer": {"lr": 0.05}},
        {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}}}])
    recipe["out_dir"] = str(tmp_path / "out")
    recipe["search"] = {"space": {"stages.1.sparsity": {"low": 0.3, "high": 0.95}},
                        "objectives": [{"maximize": "accuracy"}, {"minimize": "stored_bytes"}],
                        "sampler": "random", "trials": 3, **search}
    return recipe


def write(tmp_path, recipe: dict, name: str = "search.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def load_study(out, name="t"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def count_calls(monkeypatch, cls, fail_on: int | None = None) -> list:
    """Count ``cls.apply`` calls (the ``fail_on``-th one raises)."""
    calls = []
    original = cls.apply

    def apply(self, model, ctx=None):
        calls.append(self.name)
        if len(calls) == fail_on:
            raise RuntimeError("boom in this trial")
        return original(self, model, ctx)

    monkeypatch.setattr(cls, "apply", apply)
    return calls


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """Four trials in-process: the third pruning raises; a stored-size limit some trials miss."""
    tmp = tmp_path_factory.mktemp("search")
    mp = pytest.MonkeyPatch()
    trains = count_calls(mp, TrainStage)
    count_calls(mp, UnstructuredPruningStage, fail_on=3)
    try:
        path = write(tmp, search_recipe(tmp, constraints={"stored_bytes": {"max": LIMIT}}))
        summary = run_search(str(path), trials=4, quiet=True)
    finally:
        mp.undo()
    return tmp / "out", summary, trains, path


def test_trials_are_runs_that_share_the_dense_model_trained_once(searched):
    out, summary, trains, _ = searched
    assert trains == ["train"]  # one prefix build; no trial trains the dense model again
    study = load_study(out)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and summary["cache_hits"] == 4  # the crashed trial started from the cache too
    for t in done:
        assert t.user_attrs["cached_stages"] == 2  # input and train linked from the cache
        report = json.loads((out / "trials" / str(t.number) / "report.json").read_text())
        assert [s["type"] for s in report["stages"]] == ["input", "train", "prune.unstructured"]
        last = report["stages"][-1]["metrics"]
        assert t.values == [last["accuracy"], last["stored_bytes"]]
        assert last["sparsity"] == pytest.approx(t.params["stages.1.sparsity"], abs=0.01)
    assert len(list((out / "cache").glob("*.run"))) == 1
    assert summary["prefix_builds"] == 1 and trials[0].user_attrs["built_prefix"] == 1


def test_a_crashed_trial_is_recorded_and_the_search_goes_on(searched):
    out, summary, _, _ = searched
    failed = [t for t in load_study(out).get_trials() if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [2]
    assert failed[0].user_attrs["error"] == "RuntimeError: boom in this trial"
    assert summary["trials_detail"][2]["error"] == "RuntimeError: boom in this trial"


def test_the_pareto_front_holds_only_trials_within_the_constraints(searched):
    out, summary, _, _ = searched
    trials = [t for t in load_study(out).get_trials() if t.state.name == "COMPLETE"]
    ok = [t for t in trials if t.values[1] <= LIMIT]
    assert ok and len(ok) < len(trials), "the seed should give trials on both sides of the limit"
    front = {p["trial"] for p in summary["pareto"]}
    assert front and front <= {t.number for t in ok}
    for t in ok:  # a feasible trial off the front is dominated by one on it
        if t.number not in front:
            assert any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] for o in ok if o.number in front)
    assert sorted(int(p.stem) for p in (out / "pareto").glob("*.yaml")) == sorted(front)
    k = min(front)
    again = load_recipe(out / "pareto" / f"{k}.yaml")  # re-runnable: a valid recipe with its own out_dir
    assert again.cfg.stages[1].sparsity == pytest.approx(load_study(out).trials[k].params["stages.1.sparsity"])
    assert again.cfg.out_dir == str(out / "pareto" / f"run-{k}") and "search" not in again.cfg


def test_search_html_holds_optuna_figures_and_every_trial(searched, capsys):
    out, _, _, _ = searched
    page = (out / "search.html").read_text()
    for title in ("Pareto-front Plot", "Optimization History Plot: accuracy", "Hyperparameter Importances: stored_bytes"):
        assert title in page
    assert "boom in this trial" in page
    assert "Infeasible Trial" in page  # Optuna greys the trials over the limit (Trial.set_constraint)
    assert "<script src=" not in page  # plotly.js inlined (the browser test refuses any network request)


def test_terminal_table_marks_the_front_the_violations_and_the_failure(searched, capsys):
    from compress.search.results import write_results

    out, summary, _, path = searched
    recipe = load_recipe(path)
    again = write_results(load_study(out), parse_search(recipe), recipe, out, wall_s=1.0)
    assert again["pareto"] == summary["pareto"]  # writing the results twice changes nothing
    lines = capsys.readouterr().out.splitlines()
    rows = {int(line.split()[0]): line.split()[1] for line in lines if line.strip()[:1].isdigit()}
    front = {p["trial"] for p in summary["pareto"]}
    assert {k for k, state in rows.items() if state == "pareto"} == front
    assert rows[2] == "fail" and "violates" in rows.values()
    assert any("boom in this trial" in line for line in lines)


# -- bad input: one line, exit 2 ------------------------------------------------------------------------
@pytest.mark.parametrize("search, match", [
    ({"space": {"stages.1.sparsty": {"low": 0.1, "high": 0.5}}},
     r"search.space.stages.1.sparsty: not a key of the resolved recipe: 'stages.1' has no key 'sparsty'"),
    ({"space": {"stages.5.sparsity": [0.5]}}, r"'stages' has 2 items; index '5' does not exist"),
    ({"space": {"stages.0.optimizer.name": {"low": 1, "high": 2}}},
     r"search.space.stages.0.optimizer.name: a range needs a numeric key, and stages.0.optimizer.name is 'sgd'"),
    ({"space": {"stages.1.sparsity": {"low": 0.5, "high": 1.5}}},
     r"search.space.stages.1.sparsity: 1.5 makes an invalid recipe: stages\[1\].sparsity"),
    ({"space": {"stages.0.epochs": {"low": 1.5, "high": 3}}}, r"stages.0.epochs is an integer \(1\)"),
    ({"space": {"stages.1.sparsity": {"low": 0.9, "high": 0.5}}}, r"low 0.9 must be below high 0.5"),
    ({"space": {"stages.1.sparsity": {"low": 0, "high": 0.5, "log": True}}}, r"a log range needs low > 0"),
    ({"space": {"stages.1.sparsity": [[0.5]]}}, r"choice \[0.5\] is not a number"),
    ({"space": {"stages.1.sparsity": []}}, r"an empty list of choices"),
    ({"space": {"stages.1.sparsity": {"low": 0.1}}}, r"expected a range \{low: L, high: H"),
    ({"space": {}}, r"search.space: empty"),
    ({"space": {"stages.0.epochs.x": [1]}}, r"'stages.0.epochs' is 1, not a section"),
    ({"space": {"logger.wandb.entity": {"low": 0.1, "high": 0.5}}},
     r"a range needs a numeric key, and logger.wandb.entity is not one \(0.1 became '0.1'\)"),
    ({"space": {"stages.1.sparsity": {"low": "a", "high": 0.5}}}, r"search.space.stages.1.sparsity.low: 'a' is not"),
    ({"space": {"stages.1.sparsity": {"low": 0.1, "high": 0.5, "log": "yes"}}}, r"\.log: 'yes' must be true or false"),
    ({"space": {"stages.1.sparsity": {"low": 0.1, "high": 0.5, "log": True, "step": 0.1}}},
     r"log and step cannot go together"),
    ({"space": {"stages.1.sparsity": {"low": 0.1, "high": 0.5, "step": -0.1}}}, r"\.step: -0.1 must be > 0"),
    ({"objectives": []}, r"search.objectives: required"),
    ({"objectives": [{"maximise": "accuracy"}]}, r"search.objectives\[0\]: expected \{maximize: KEY\}"),
    ({"objectives": [{"maximize": "accuracy"}, {"minimize": "accuracy"}]}, r"a key appears twice"),
    ({"constraints": {"stored_bytes": {"below": 3}}}, r"search.constraints.stored_bytes: expected \{max: V\}"),
    ({"constraints": {"stored_bytes": {"max": "small"}}}, r"search.constraints.stored_bytes.max: 'small' is not a number"),
    ({"sampler": "cmaes"}, r"search.sampler: unknown sampler 'cmaes'"),
    ({"pruner": "median"}, r"search.pruner: 'median' needs one objective"),
    ({"trials": 0}, r"search.trials: 0 must be >= 1"),
    ({"budget": 3}, r"search.budget: unknown key 'budget'; valid: constraints, objectives"),
])
def test_a_bad_search_section_is_one_line_naming_the_key(tmp_path, search, match):
    with pytest.raises(UserError, match=match):
        parse_search(load_recipe(search_recipe(tmp_path, **search)))


def test_the_cli_refuses_bad_input_with_one_line_and_status_2(tmp_path, capsys):
    recipe = search_recipe(tmp_path, space={"stages.1.sparsty": [0.5]})
    assert main(["search", str(write(tmp_path, recipe))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search.space.stages.1.sparsty:") and err.count("\n") == 1
    del recipe["search"]
    assert main(["search", str(write(tmp_path, recipe))]) == 2
    assert "search: the recipe has no search section" in capsys.readouterr().err
    good = write(tmp_path, search_recipe(tmp_path))
    assert main(["search", str(good), "--jobs", "0"]) == 2
    assert "--jobs: 0 must be >= 1" in capsys.readouterr().err
    assert main(["search", str(good), "--timeout", "0"]) == 2
    assert "--timeout: 0.0 must be > 0 seconds" in capsys.readouterr().err
    assert main(["search", str(good), "--storage", "nosuch://x"]) == 2
    assert "error: --storage: cannot open 'nosuch://x'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "trials").exists()  # nothing ran


def test_a_plain_run_of_a_search_recipe_ignores_the_section(tmp_path):
    recipe = load_recipe(search_recipe(tmp_path))
    assert recipe.cfg.search.trials == 3
    assert "search" not in load_recipe(quick_recipe(tmp_path)).to_container()  # absent unless given


def test_an_objective_no_stage_reports_stops_the_search_after_the_first_trial(tmp_path, capsys):
    recipe = search_recipe(tmp_path, objectives=[{"maximize": "acuracy"}])
    assert main(["search", str(write(tmp_path, recipe)), "--trials", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: search.objectives[0] (maximize: acuracy): the last stage reports no number 'acuracy'" in err
    assert "accuracy" in err and err.count("\n") == 1
    assert [t.state.name for t in load_study(tmp_path / "out").get_trials()] == ["FAIL"]


def test_a_constraint_nobody_meets_names_the_closest_trial_after_writing_the_results(tmp_path, capsys):
    recipe = search_recipe(tmp_path, constraints={"stored_bytes": {"max": 1000}, "accuracy": {"min": 0.5}})
    storage = tmp_path / "journal.log"  # Optuna's journal file storage (a shared file system's path)
    assert main(["search", str(write(tmp_path, recipe)), "--trials", "2", "--storage", f"journal:{storage}",
                 "--study", "tight"]) == 2
    captured = capsys.readouterr()
    import optuna
    from optuna.storages.journal import JournalFileBackend

    trials = optuna.load_study(study_name="tight", storage=optuna.storages.JournalStorage(
        JournalFileBackend(str(storage)))).get_trials()
    closest = min(trials, key=lambda t: t.values[0] if False else t.user_attrs["metrics"]["stored_bytes"])
    assert f"closest: trial {closest.number} (stored_bytes " in captured.err
    assert "> max 1000" in captured.err and "accuracy" not in captured.err.split("closest:")[1].split(";")[0]
    assert (tmp_path / "out" / "search.html").is_file() and not list((tmp_path / "out" / "pareto").glob("*.yaml"))
    assert "violates" in captured.out


def test_a_pruner_stops_a_trial_after_a_stage_and_records_it(tmp_path, capsys):
    import optuna

    PRUNERS.register("test-always", lambda: optuna.pruners.ThresholdPruner(lower=2.0))  # accuracy < 2: prune
    try:
        recipe = search_recipe(tmp_path, objectives=[{"maximize": "accuracy"}], pruner="test-always")
        summary = run_search(str(write(tmp_path, recipe)), trials=1)
    finally:
        PRUNERS._items.pop("test-always")
    (trial,) = load_study(tmp_path / "out").get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [2]  # stage 2 (0, 1 were cached)
    assert summary["pareto"] == [] and "trial 0: pruned after 2 stages" in capsys.readouterr().out


def test_the_trials_of_a_dead_worker_are_failed_and_enqueued_again():
    import optuna

    from compress.search.study import HOST, counted_trials, fail_dead_trials

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study()
    running = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    running.set_user_attr("worker", f"{HOST}:{dead.pid}")
    alive = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    alive.set_user_attr("worker", f"{HOST}:{__import__('os').getpid()}")
    elsewhere = study.ask()
    elsewhere.set_user_attr("worker", "another-host:1")
    assert counted_trials(study) == 3
    assert fail_dead_trials(study) == [0]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["FAIL", "RUNNING", "RUNNING", "WAITING"]
    assert study.get_trials()[3].params == running.params  # the same values again
    assert counted_trials(study) == 3  # the retry takes the failed trial's place


# -- parallel and resumable -----------------------------------------------------------------------------
def test_two_jobs_over_sqlite_finish_the_count_with_no_duplicate_work(tmp_path):
    path = write(tmp_path, search_recipe(tmp_path))
    summary = run_search(str(path), trials=4, jobs=2, quiet=True)
    out = tmp_path / "out"
    trials = load_study(out).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3] and summary["states"] == {"COMPLETE": 4}
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both worker processes ran trials
    assert sorted(int(p.name) for p in (out / "trials").iterdir()) == [0, 1, 2, 3]
    assert len(list((out / "cache").glob("*.run"))) == 1  # the shared train stage was built once
    assert all(t.user_attrs["cached_stages"] == 2 for t in trials)
    # The trained model each trial started from is the one in the cache, byte for byte (links).
    ckpts = [out / "trials" / str(t.number) / "stage-1-train.ckpt" for t in trials]
    assert len({p.stat().st_ino for p in ckpts}) == 1


def test_kill_9_then_resume_completes_the_count(tmp_path, monkeypatch):
    import os

    path = write(tmp_path, search_recipe(tmp_path))
    # SIGKILL in the first trial's pruning stage (stage 2, epoch 0, batch 3): the shared train stage is cached by then.
    killed = subprocess.run([sys.executable, str(ROOT / "run.py"), "search", str(path), "--trials", "2", "--quiet"],
                            env=dict(os.environ, COMPRESS_KILL_AT="2:0:3"), capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    out = tmp_path / "out"
    assert [t.state.name for t in load_study(out).get_trials()] == ["RUNNING"]
    trains = count_calls(monkeypatch, TrainStage)
    assert main(["search", str(path), "--trials", "2", "--quiet"]) == 0
    trials = load_study(out).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params  # the killed trial ran again with its values
    assert trains == []  # the dense model of the killed search served the resumed one


def test_the_study_logs_to_wandb_in_its_own_group(searched, tmp_path):
    from compress.search.results import _log_wandb, search_figures

    out, _, _, path = searched
    recipe = load_recipe(path, ["logger.wandb.mode=offline", f"out_dir={tmp_path}"])
    study = load_study(out)
    _log_wandb(recipe, study, search_figures(study, parse_search(recipe)), [], tmp_path)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert any(run.glob("*.wandb"))


@pytest.mark.browser
def test_search_html_renders_every_figure_in_chromium(searched, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    from compress.report.browser import chromium_path, inspect_page

    if chromium_path() is None:
        pytest.skip("no chromium on the PATH (apt-get install chromium)")
    out, _, _, _ = searched
    alone = tmp_path / "search.html"  # alone in a folder: nothing beside it is needed
    alone.write_text((out / "search.html").read_text())
    seen = inspect_page(alone, screenshot=tmp_path / "search.png")
    assert seen["errors"] == [] and seen["blocked"] == [], seen
    titles = [c["title"] for c in seen["charts"]]
    for expected in ("Pareto-front Plot", "Optimization History Plot: accuracy",
                     "Optimization History Plot: stored_bytes", "Hyperparameter Importances: accuracy"):
        assert expected in titles, titles
    for chart in seen["charts"]:
        assert chart["with_points"] >= 1 and chart["drawn"] >= chart["with_points"], chart


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("search_*.yaml")), ids=lambda p: p.name)
def test_shipped_search_recipes_validate_and_share_their_train_stage(path):
    from compress.search.cache import prefix_keys

    recipe = load_recipe(path)
    spec = parse_search(recipe)
    assert spec.shared_stages >= 1 and recipe.stages[0].type_name == "train"
    # search_lenet5 starts from deploy_lenet5_int8's trained model (bench/search.py hands it over)
    deploy = load_recipe(ROOT / "recipes" / "deploy_lenet5_int8.yaml").to_container()
    assert prefix_keys(recipe.to_container())[:2] == prefix_keys(deploy)[:2]


def test_each_kind_of_param_asks_optuna_for_its_kind_of_value(tmp_path):
    import optuna

    spec = parse_search(load_recipe(search_recipe(tmp_path, space={
        "stages.0.epochs": {"low": 1, "high": 5, "step": 2}, "stages.1.sparsity": {"low": 0.1, "high": 0.8, "log": True},
        "stages.0.optimizer.name": ["sgd", "adam"]})))
    epochs, sparsity, name = spec.params
    assert (epochs.integer, sparsity.integer, name.choices) == (True, False, ("sgd", "adam"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    values = [p.suggest(trial) for p in spec.params]
    assert values[0] in (1, 3, 5) and 0.1 <= values[1] <= 0.8 and values[2] in ("sgd", "adam")
    dists = study.trials[0].distributions
    assert dists["stages.0.epochs"] == optuna.distributions.IntDistribution(1, 5, step=2)
    assert dists["stages.1.sparsity"] == optuna.distributions.FloatDistribution(0.1, 0.8, log=True)
    assert spec.shared_stages == 0  # the train stage itself is searched: nothing is shared


def test_a_search_can_choose_whether_a_stage_runs(tmp_path):
    recipe = search_recipe(tmp_path, space={"stages.1.enabled": [True, False]})
    spec = parse_search(load_recipe(recipe))
    assert spec.params[0].choices == (True, False) and spec.shared_stages == 1
    ran = load_recipe(recipe, ["stages.1.enabled=false"])
    assert [s.type_name for s in ran.stages] == ["train"]
    with pytest.raises(UserError, match=r"^search\.space\.stages\.2\.enabled: not a key"):
        parse_search(load_recipe(search_recipe(tmp_path, space={"stages.2.enabled": [True, False]})))
