"""Runs that survive: kill the CLI mid-stage, resume, and get the report of an uninterrupted run."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, quick_recipe

TIMING = {"measured_latency_ms", "measured_latency_ms_batch", "measured_speedup", "measured_speedup_batch", "wall_s",
          "measured_speedup_iqr", "measured_speedup_batch_iqr"}


def comparable(report: dict) -> list:
    return [(s["index"], s["name"], {k: v for k, v in s["metrics"].items() if k not in TIMING}, s["layers"])
            for s in report["stages"]]


def cli(*args, env=None, cwd=None):
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd)


@pytest.fixture
def recipe_file(tmp_path):
    recipe = quick_recipe(tmp_path)
    recipe["stages"][2]["finetune"]["epochs"] = 3
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_killed_mid_stage_resumes_to_the_same_report(tmp_path, recipe_file):
    reference = cli(str(recipe_file), "out_dir=" + str(tmp_path / "ref"), "--quiet")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    # SIGKILL in stage 3 (the AGP stage), epoch 1, batch 5: its epoch-0 Lightning checkpoint exists.
    killed = cli(str(recipe_file), "--quiet", env={"COMPRESS_KILL_AT": "3:1:5"})
    assert killed.returncode == -9
    assert (out / "stage-2-prune.unstructured.ckpt").is_file()
    assert not (out / "stage-3-prune.unstructured-2.ckpt").exists()
    assert (out / "lightning" / "stage-3" / "fit-1" / "last.ckpt").is_file()
    stages_before = json.loads((out / "report.json").read_text())["stages"]
    assert len(stages_before) == 3

    again = cli(str(recipe_file), "--quiet")  # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = cli("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((out / "report.json").read_text())
    want = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert comparable(got) == comparable(want)
    # finished stages were not redone: their wall times are the ones recorded before the kill
    assert [s["metrics"]["wall_s"] for s in got["stages"][:3]] == [s["metrics"]["wall_s"] for s in stages_before]
    assert not (out / "lightning" / "stage-3").exists()


def test_resume_refuses_a_different_recipe(tmp_path, recipe_file):
    first = cli(str(recipe_file), "--quiet", "stages=[{type: train, epochs: 1}]")
    assert first.returncode == 0, first.stderr
    other = cli(str(recipe_file), "--quiet", "--resume", "stages=[{type: train, epochs: 2}]")
    assert other.returncode == 2
    assert "holds a different run (stages[0].epochs differs" in other.stderr


def test_resume_of_a_finished_run_redoes_nothing(tmp_path, recipe_file):
    args = ("--quiet", "stages=[{type: train, epochs: 1}]")
    assert cli(str(recipe_file), *args).returncode == 0
    before = (tmp_path / "run" / "report.json").read_text()
    again = cli(str(recipe_file), *args, "--resume")
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text()) == json.loads(before)


def test_overwrite_replaces_the_run(tmp_path, recipe_file):
    args = ("--quiet", "stages=[{type: train, epochs: 1}]")
    assert cli(str(recipe_file), *args).returncode == 0
    assert cli(str(recipe_file), "--quiet", "stages=[]", "--overwrite").returncode == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["stages"]) == 1 and not list((tmp_path / "run").glob("stage-1-*.ckpt"))


def test_nan_loss_stops_with_a_clear_message_and_keeps_finished_stages(tmp_path, recipe_file):
    proc = cli(str(recipe_file), "--quiet", "stages.1.finetune.optimizer.lr=1e12", "stages.1.finetune.epochs=2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: prune.unstructured: the training loss became nan")
    assert "Traceback" not in proc.stderr
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
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    reference = cli(str(path), "out_dir=" + str(tmp_path / "ref"), "--quiet")
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    killed = cli(str(path), "--quiet", env={"COMPRESS_KILL_AT": "3:1:5"})
    assert killed.returncode == -9
    assert (out / "lightning" / "stage-3" / "fit-1" / "last.ckpt").is_file()
    resumed = cli("resume", str(out), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((out / "report.json").read_text())
    want = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert comparable(got) == comparable(want)
