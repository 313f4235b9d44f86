"""A run folder cannot mix (issue 22): one run per folder under an OS lock, and outputs (``export --out``,
``compare --out``) that never replace a run's files, a directory, or land where nothing can be written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

from compress.checkpoint import save_checkpoint
from compress.cli import main
from compress.errors import UserError
from compress.files import LOCK_NAME, PID_NAME, check_writable, hold_folder
from compress.models import build_model
from tests.conftest import ROOT, quick_recipe

ONE_STAGE = [{"type": "train", "epochs": 1}]


def _recipe(tmp_path: Path, name: str = "r.yaml", **over) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(quick_recipe(tmp_path, **{"model": {"name": "mlp", "hidden": [16]},
                                                             "stages": ONE_STAGE, **over})))
    return path


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled")


# -- one run per folder -------------------------------------------------------------------------------
def test_two_runs_started_together_into_one_folder_exactly_one_runs(tmp_path):
    """Both processes load everything first, then start on the same signal (a file): the lock decides."""
    recipe = _recipe(tmp_path, stages=[])
    go = tmp_path / "go"
    code = ("import sys, time, pathlib; from compress.cli import main; import compress.pipeline\n"
            f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
            f"sys.exit(main([{str(recipe)!r}, '--quiet'] + sys.argv[1:]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, *extra], env=_env(), cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for extra in ([], ["seed=1"])]  # the case: two different runs into one folder
    go.touch()
    results = [(p.wait(timeout=300), p.stderr.read(), p.pid) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    (_, err, _), = [r for r in results if r[0] == 2]
    (_, _, winner), = [r for r in results if r[0] == 0]
    assert err.strip() == (f"error: out_dir: '{tmp_path / 'run'}' is in use by another run (process {winner}); wait "
                           "for it to finish, or choose another folder: out_dir=runs/NEW")
    assert not (tmp_path / "run" / PID_NAME).exists()  # the winner let go of it


def test_a_lock_left_by_a_killed_run_does_not_block_resume(tmp_path, capsys):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from compress.files import hold_folder\n"
        f"with hold_folder({str(folder)!r}):\n    print('held', flush=True); time.sleep(120)")],
        env=_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = _recipe(tmp_path)
        assert main([str(recipe), "--quiet"]) == 2
        assert f"is in use by another run (process {holder.pid})" in capsys.readouterr().err
        assert {f.name for f in folder.iterdir()} <= {LOCK_NAME, PID_NAME}  # nothing written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert (folder / PID_NAME).exists()  # the dead run's sidecar stays; the OS lock died with it
    assert main([str(recipe), "--quiet", "--resume"]) == 0
    assert (folder / "stage-1-train.ckpt").is_file()


def test_a_held_lock_without_a_pid_names_another_process(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with FileLock(str(folder / LOCK_NAME), timeout=0):  # flock: a second descriptor conflicts, in-process too
        with pytest.raises(UserError, match=r"in use by another run \(another process\)"):
            with hold_folder(folder):
                pass


def test_a_run_that_stops_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    recipe = _recipe(tmp_path, model={"name": "mlp", "hidden": [16], "num_classes": 3})
    assert main([str(recipe), "--quiet"]) == 2
    assert "it predicts 3 classes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_that_cannot_be_made_or_locked_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^out_dir: cannot create '.*file/run' \(Not a directory\); choose another"):
        with hold_folder(tmp_path / "file" / "run"):
            pass

    def refuse(self, *args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(FileLock, "acquire", refuse)
    with pytest.raises(UserError, match=r"^out_dir: cannot lock '.*' \(Read-only file system\)"):
        with hold_folder(tmp_path / "ro"):
            pass


# -- outputs never overwrite inputs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    assert main([str(_recipe(tmp)), "--quiet"]) == 0
    return tmp / "run"


@pytest.mark.parametrize("command, target", [
    (["export", "{run}", "--format", "onnx"], "stage-1-train.ckpt"),
    (["export", "{run}"], "recipe.yaml"),
    (["export", "{run}"], "curves/metrics.csv"),
    (["compare", "{run}", "{run}"], "report.json"),
    (["compare", "{run}", "{run}"], "report.html"),
])
def test_an_output_onto_a_file_of_a_run_is_refused_before_any_work(run, capsys, command, target):
    before = (run / target).read_bytes()
    args = [a.format(run=run) for a in command]
    assert main([*args, "--out", str(run / target)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out: '{run / target}' is a file of the run in '{run}' ({target}); an output never replaces what a "
        "run wrote: write it elsewhere, e.g. --out model.onnx")
    assert (run / target).read_bytes() == before


def test_a_symlink_onto_a_run_file_is_that_file(run, tmp_path, capsys):
    link = tmp_path / "link.onnx"
    link.symlink_to(run / "stage-1-train.ckpt")
    assert main(["export", str(run), "--format", "onnx", "--out", str(link)]) == 2
    assert "is a file of the run in" in capsys.readouterr().err


def test_an_earlier_export_in_the_run_folder_may_be_replaced(run, capsys):
    assert main(["export", str(run)]) == 0
    assert main(["export", str(run), "--out", str(run / "model.dc")]) == 0
    assert capsys.readouterr().out.count("bytes on disk") == 2


@pytest.mark.parametrize("command", [["export", "{run}"], ["compare", "{run}"]])
def test_an_output_that_is_a_directory_or_unwritable_is_one_line(run, tmp_path, capsys, command):
    args = [a.format(run=run) for a in command]
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    assert main([*args, "--out", str(tmp_path / "dir")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out: '{tmp_path / 'dir'}' is a directory; name a file in it"
    assert main([*args, "--out", str(tmp_path / "file" / "deeper" / "x.out")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: --out: '{tmp_path / 'file' / 'deeper' / 'x.out'}' lies under "
                                               f"'{tmp_path / 'file'}', which is a file; choose another place")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # nothing written


def test_an_unwritable_place_is_found_by_trying(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("compress.files.tempfile.mkstemp", denied)  # root ignores mode bits: ask the OS
    with pytest.raises(UserError, match=r"^--out: cannot write '.*x\.dc' \(Permission denied\); choose a writable"):
        check_writable(tmp_path / "new" / "x.dc")


# -- export's own refusals ----------------------------------------------------------------------------
def test_export_deep_of_a_quantised_model_is_refused(tmp_path, capsys):
    from compress.quant import quantize_ptq

    model = build_model("mlp", hidden=[8], input_shape=(1, 8, 8), num_classes=10)
    quantize_ptq(model, [torch.randn(16, 1, 8, 8)])
    ckpt = tmp_path / "run" / "stage-1-quantize.ckpt"
    save_checkpoint(ckpt, model, model_spec={"name": "mlp", "kwargs": {"hidden": [8], "input_shape": [1, 8, 8],
                                                                        "num_classes": 10}})
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "q.dc")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ckpt}: the model is quantised (int8) and a Deep Compression file stores float or shared weights; "
        "export it with --format onnx (int8 QDQ), or a stage before quantize with --stage")
    assert not (tmp_path / "q.dc").exists()


def test_export_ignores_a_checkpoint_that_is_not_a_stage(run, tmp_path, capsys):
    (run / "stage-final.ckpt").write_bytes((run / "stage-1-train.ckpt").read_bytes())
    try:
        assert main(["export", str(run), "--out", str(tmp_path / "m.dc")]) == 0
        assert "from stage-1-train.ckpt" in capsys.readouterr().out
    finally:
        (run / "stage-final.ckpt").unlink()
