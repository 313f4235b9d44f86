"""Bad input: one line on stderr naming the key, exit status 2, no traceback, nothing trained."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.conftest import ROOT, quick_recipe


def write(tmp_path: Path, recipe: dict | str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def stage(i: int, **over) -> list:
    stages = quick_recipe(Path("."))["stages"]
    stages[i].update(over)
    return stages


CASES = [
    ("unknown stage type", {"stages": [{"type": "prune.unstructred", "sparsity": 0.5}]},
     r"stages\[0\]\.type: unknown stage type 'prune.unstructred'.*did you mean 'prune.unstructured'"),
    ("misspelt stage key", {"stages": [{"type": "prune.unstructured", "sparsty": 0.5}]},
     r"stages\[0\]\.sparsty: unknown key 'sparsty'.*did you mean 'sparsity'"),
    ("misspelt top-level key", {"trainr": {"devices": 1}}, r"trainr: unknown key 'trainr'.*did you mean 'trainer'"),
    ("ratio outside [0,1)", {"stages": [{"type": "prune.unstructured", "sparsity": 1.5}]},
     r"stages\[0\]\.sparsity: 1.5 is outside \[0, 1\)"),
    ("layer glob matching nothing", {"stages": [{"type": "prune.unstructured", "sparsity": 0.5, "layers": {"conv*": 0.9}}]},
     r"stages\[0\]\.layers: 'conv\*' matches no layer"),
    ("missing checkpoint file", {"model": {"name": "lenet300", "checkpoint": "nowhere.ckpt"}},
     r"model.checkpoint: file 'nowhere.ckpt' not found"),
    ("unknown model", {"model": {"name": "lenet30"}}, r"model.name: unknown model 'lenet30'.*did you mean 'lenet300'"),
    ("unknown dataset", {"data": {"name": "mnsit"}}, r"data.name: unknown dataset 'mnsit'.*did you mean 'mnist'"),
    ("wrong type", {"stages": [{"type": "train", "epochs": "ten"}]}, r"stages\[0\]\.epochs: Value 'ten'"),
    ("negative epochs", {"stages": [{"type": "train", "epochs": -1}]}, r"^error: stages\[0\]\.epochs: -1 must be >= 0$"),
    ("negative fine-tuning epochs", {"stages": [{"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": -1}}]},
     r"^error: stages\[0\]\.finetune\.epochs: -1 must be >= 0$"),
    ("NaN learning rate", {"stages": [{"type": "train", "epochs": 1, "optimizer": {"lr": float("nan")}}]},
     r"stages\[0\]\.optimizer\.lr: nan is not a finite number"),
    ("unknown optimizer", {"stages": [{"type": "train", "epochs": 1, "optimizer": {"name": "sgdd"}}]},
     r"optimizer.name: 'sgdd' is not valid.*did you mean 'sgd'"),
    ("unknown logger", {"logger": {"mlflow": {}}}, r"logger.mlflow: unknown key 'mlflow'; valid: csv, wandb"),
    ("bad wandb mode", {"logger": {"wandb": {"mode": "offlne"}}}, r"logger.wandb.mode: 'offlne' is not valid"),
    ("unresolvable interpolation", {"out_dir": "runs/${nme}"}, r"out_dir: interpolation does not resolve"),
    ("unknown model argument", {"model": {"name": "mlp", "hiden": [10]}}, r"model.hiden: not an argument of MLP.*hidden"),
    ("missing MNIST files", {"data": {"name": "mnist", "root": "/nonexistent"}},
     r"data.root: MNIST file 'train-images-idx3-ubyte\[.gz\]' not found under '/nonexistent'"),
    ("stage not a mapping", {"stages": ["train"]}, r"stages\[0\]: a stage is a mapping with a 'type'"),
    ("bad index width", {"encoding": {"index_bits": "five"}}, r"encoding.index_bits: 'five' is not a width.*'auto'"),
    ("share bits out of range", {"stages": [{"type": "share", "bits": 40}]}, r"stages\[0\]\.bits: 40 bits is outside \[1, 16\]"),
]


@pytest.mark.parametrize("what, change, match", CASES, ids=[c[0] for c in CASES])
def test_recipe_errors_exit_2_with_one_line(tmp_path, capsys, what, change, match):
    recipe = quick_recipe(tmp_path)
    recipe.update(change)
    code, err = run_cli(capsys, write(tmp_path, recipe))
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "run" / "report.json").exists()


def test_missing_recipe_file(capsys):
    code, err = run_cli(capsys, "recipes/nope.yaml")
    assert code == 2 and "recipes/nope.yaml: recipe file not found" in err


def test_yaml_syntax_error_names_line(tmp_path, capsys):
    path = write(tmp_path, "name: x\nstages:\n  - {type: train, epochs: 3\n")
    code, err = run_cli(capsys, path)
    assert code == 2 and "recipe.yaml:4:" in err and "YAML syntax error" in err


def test_bad_override(tmp_path, capsys):
    path = write(tmp_path, quick_recipe(tmp_path))
    code, err = run_cli(capsys, path, "stages.7.sparsity=0.5")
    assert code == 2 and "index '7' is out of range" in err
    code, err = run_cli(capsys, path, "stages.1.sparsity=2")
    assert code == 2 and "stages[1].sparsity: 2.0 is outside [0, 1)" in err


@pytest.mark.parametrize("override, expected", [
    ("seed", "override 'seed': expected key=value, e.g. trainer.max_epochs=1"),
    ("=3", "override '=3': expected key=value, e.g. trainer.max_epochs=1"),
    ("stages.x.sparsity=0.5", "override 'stages.x.sparsity': 'stages' has 3 items; index 'x' is out of range"),
    ("seed=-1", "seed: -1 must be >= 0"),
    ("eval.latency_repeats=0", "eval.latency_repeats: 0 must be >= 1"),
    ("out_dir=", "out_dir: must not be empty"),
    ("trainer=3", "trainer: expected a mapping (keys: accelerator, devices, num_nodes, strategy, precision, "
                  "gradient_clip_val, log_every_n_steps, progress_bar), got 3"),
    ("logger.wandb=offline", "logger.wandb: expected a mapping (keys: mode, project, entity, group, tags, log_model), "
                             "got 'offline'"),
])
def test_override_and_top_level_errors_are_exactly_one_line(tmp_path, capsys, override, expected):
    code, err = run_cli(capsys, write(tmp_path, quick_recipe(tmp_path)), override)
    assert (code, err) == (2, f"error: {expected}")
    assert not (tmp_path / "run").exists()


def test_top_level_scalar_for_a_section_in_the_file_is_one_line(tmp_path, capsys):
    # before the fix OmegaConf's merge failed with an empty key: "error: : None"
    code, err = run_cli(capsys, write(tmp_path, "model: {name: lenet300}\ndata: {name: digits}\nencoding: 5\n"))
    assert (code, err) == (2, "error: encoding: expected a mapping (keys: index_bits), got 5")


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text("{}")
    code, err = run_cli(capsys, write(tmp_path, quick_recipe(tmp_path)))
    assert code == 2 and "already holds a run; pass --resume to continue it, --overwrite" in err
    assert (tmp_path / "run" / "report.json").read_text() == "{}"


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    recipe = quick_recipe(tmp_path)
    recipe["stages"][1]["sparsity"] = 1.0
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), write(tmp_path, recipe)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: stages[1].sparsity: 1.0 is outside [0, 1)"
    assert "Traceback" not in proc.stderr + proc.stdout


def test_dry_run_prints_plan_and_trains_nothing(tmp_path, capsys):
    code = main([write(tmp_path, quick_recipe(tmp_path)), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "plan:" in out and "features.0 -> 0.50" in out and "fc_out -> 0.80" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, expected", [
    ("stages:\n  train: {epochs: 1}\n", "error: stages: expected a list (YAML items like - {type: train, epochs: 10}), got a mapping"),
    ("", "error: {path}: the recipe is empty; give at least model, data and stages (recipes/quickstart.yaml is a complete example)"),
    ("# comments only\n", "error: {path}: the recipe is empty; give at least model, data and stages (recipes/quickstart.yaml is a complete example)"),
    ("model: {name: lenet300}\ndata: {name: digits}\nhardware: cpu-local\n", "error: hardware: expected a list (YAML items like [a, b]), got 'cpu-local'"),
])
def test_recipes_of_the_wrong_shape_are_one_line_exit_2(tmp_path, capsys, monkeypatch, text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main([str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == expected.replace("{path}", str(path))
    assert not (tmp_path / "runs").exists()


def test_latency_threads_below_one_is_refused_at_load(tmp_path):
    from compress.errors import UserError
    from compress.recipe import load_recipe

    with pytest.raises(UserError, match=r"^eval\.latency_threads: 0 must be >= 1 \(torch intra-op threads\)$"):
        load_recipe(quick_recipe(tmp_path, eval={"latency_threads": 0}))


def test_recipe_keys_types_and_ranges_are_checked_before_torch_loads(tmp_path):
    """A mistake in any key, type or range (top level or in a stage block) answers without importing
    torch (a fresh process: this one has torch already). Registry names are looked up after, with torch
    (test_recipe_errors_exit_2_with_one_line)."""
    recipe = write(tmp_path, quick_recipe(tmp_path, stages=[
        {"type": "train", "epochs": 1},
        {"type": "prune.structured", "ratio": 0.5, "global": True},
        {"type": "distill", "distill": {"teacher": "self"}},
        {"type": "quantize", "mode": "qat", "finetune": {"epochs": 1}},
    ]))
    overrides = ["typo_key=1", "eval.latency_repeats=0", "stages.0.epochs=ten", "stages.1.ratio=1.5",
                 "stages.1.global_pruning=true", "stages.2.distill.T=0", "stages.3.calibration_batches=0",
                 "stages.0.optimizer.lr=-1"]
    code = f"""
import sys
from compress.errors import UserError
from compress.recipe import load_recipe
for override in {overrides!r}:
    try:
        load_recipe({recipe!r}, [override])
    except UserError as e:
        print(e)
print('torch' in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "typo_key: unknown key 'typo_key'; valid: data, encoding, eval, hardware, logger, model, name, out_dir, "
        "search, seed, stages, task, teachers_dir, trainer",
        "eval.latency_repeats: 0 must be >= 1",
        "stages[0].epochs: Value 'ten' of type 'str' could not be converted to Integer",
        "stages[1].ratio: 1.5 is outside [0, 1)",
        "stages[1].global: give `global` or `global_pruning`, not both",
        "stages[2].distill.T: 0.0 must be > 0",
        "stages[3].calibration_batches: 0 must be >= 1",
        "stages[0].optimizer.lr: -1.0 must be > 0",
        "False"]
