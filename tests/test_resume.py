"""Runs that survive: kill the CLI mid-stage, resume, and get the report of an uninterrupted run.

Only the killed runs are processes of their own; the reference and resumed runs are ``main()`` here.
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from tests.conftest import ROOT, quick_recipe

TIMING = {"measured_latency_ms", "measured_latency_ms_batch", "measured_speedup", "measured_speedup_batch", "wall_s",
          "measured_speedup_iqr", "measured_speedup_batch_iqr"}


def comparable(report: dict) -> list:
    return [(s["index"], s["name"], {k: v for k, v in s["metrics"].items() if k not in TIMING}, s["layers"])
            for s in report["stages"]]


def cli(*args, env=None, cwd=None):
    """``run.py ARGS`` in a fresh process: only a process can be killed mid-stage (``COMPRESS_KILL_AT``).

    One torch thread, as in this process (conftest): float sums are ordered by the thread split, and
    a run killed there is resumed and compared here."""
    import os

    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd)


def run_cli(*args: str) -> tuple[int, str]:
    """``compress.cli.main(ARGS)`` in this process: (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, err.getvalue()


def write_recipe(directory: Path, recipe: dict) -> Path:
    path = directory / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """The quick recipe (its AGP stage fine-tuned 3 epochs) and its uninterrupted run, run once for the
    tests here: (recipe file, run folder). Tests that change a run make their own."""
    root = tmp_path_factory.mktemp("resume")
    recipe = quick_recipe(root)
    recipe["stages"][2]["finetune"]["epochs"] = 3
    path = write_recipe(root, recipe)
    code, err = run_cli(str(path), "out_dir=" + str(root / "ref"), "--quiet")
    assert code == 0, err
    return path, root / "ref"


def test_killed_mid_stage_resumes_to_the_same_report(tmp_path, reference):
    recipe_file, ref = reference
    out = tmp_path / "run"
    # SIGKILL in stage 3 (the AGP stage), epoch 1, batch 5: its epoch-0 Lightning checkpoint exists.
    killed = cli(str(recipe_file), "--quiet", f"out_dir={out}", env={"COMPRESS_KILL_AT": "3:1:5"})
    assert killed.returncode == -9
    assert (out / "stage-2-prune.unstructured.ckpt").is_file()
    assert not (out / "stage-3-prune.unstructured-2.ckpt").exists()
    assert (out / "lightning" / "stage-3" / "fit-1" / "last.ckpt").is_file()
    stages_before = json.loads((out / "report.json").read_text())["stages"]
    assert len(stages_before) == 3

    code, err = run_cli(str(recipe_file), "--quiet", f"out_dir={out}")  # without --resume: refused, nothing touched
    assert code == 2 and "--resume" in err

    code, err = run_cli("resume", str(out), "--quiet")
    assert code == 0, err
    got = json.loads((out / "report.json").read_text())
    want = json.loads((ref / "report.json").read_text())
    assert comparable(got) == comparable(want)
    # finished stages were not redone: their wall times are the ones recorded before the kill
    assert [s["metrics"]["wall_s"] for s in got["stages"][:3]] == [s["metrics"]["wall_s"] for s in stages_before]
    assert not (out / "lightning" / "stage-3").exists()


def test_resume_refuses_a_different_recipe(reference):
    recipe_file, ref = reference
    before = (ref / "report.json").read_text()
    code, err = run_cli(str(recipe_file), "--quiet", "--resume", f"out_dir={ref}", "stages.0.epochs=2")
    assert code == 2
    assert "holds a different run (stages[0].epochs differs" in err
    assert (ref / "report.json").read_text() == before


def test_resume_of_a_finished_run_redoes_nothing(reference):
    recipe_file, ref = reference
    before = (ref / "report.json").read_text()
    code, err = run_cli(str(recipe_file), "--quiet", f"out_dir={ref}", "--resume")
    assert code == 0, err
    assert json.loads((ref / "report.json").read_text()) == json.loads(before)


def test_overwrite_replaces_the_run(tmp_path):
    recipe_file = write_recipe(tmp_path, quick_recipe(tmp_path))
    assert run_cli(str(recipe_file), "--quiet", "stages=[{type: train, epochs: 1}]")[0] == 0
    assert run_cli(str(recipe_file), "--quiet", "stages=[]", "--overwrite")[0] == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["stages"]) == 1 and not list((tmp_path / "run").glob("stage-1-*.ckpt"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_finished_stages(tmp_path):
    recipe_file = write_recipe(tmp_path, quick_recipe(tmp_path))
    code, err = run_cli(str(recipe_file), "--quiet", "stages.1.finetune.optimizer.lr=1e12", "stages.1.finetune.epochs=2")
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: prune.unstructured: the training loss became nan")
    assert "Traceback" not in err
    out = tmp_path / "run"
    assert (out / "stage-1-train.ckpt").is_file() and not list(out.glob("stage-2-*.ckpt"))


def test_killed_while_fine_tuning_codebooks_with_distillation_resumes_to_the_same_report(tmp_path):
    """Codebook, adapter and optimizer state all come back from the interrupted stage's checkpoint."""
    recipe = quick_recipe(tmp_path)
    recipe["stages"] = [
        {"type": "train", "epochs": 2, "optimizer": {"lr": 0.05}},
        {"type": "prune.unstructured", "sparsity": 0.8},
        {"type": "share", "bits": 4, "finetune": {
            "epochs": 3, "optimizer": {"lr": 0.001},
            "distill": {"teacher": "self", "T": 4.0,
                        "features": [{"student": "features.1", "teacher": "features.1", "kind": "hint"}]}}},
    ]
    path = write_recipe(tmp_path, recipe)
    code, err = run_cli(str(path), "out_dir=" + str(tmp_path / "ref"), "--quiet")
    assert code == 0, err
    out = tmp_path / "run"
    killed = cli(str(path), "--quiet", env={"COMPRESS_KILL_AT": "3:1:5"})
    assert killed.returncode == -9
    assert (out / "lightning" / "stage-3" / "fit-1" / "last.ckpt").is_file()
    code, err = run_cli("resume", str(out), "--quiet")
    assert code == 0, err
    got = json.loads((out / "report.json").read_text())
    want = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert comparable(got) == comparable(want)
