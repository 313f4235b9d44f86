"""What a run writes stays true and readable: non-finite numbers said once and written as null,
bounded inputs, one line for hostile input, training curves kept across --resume (issue 22)."""

import json
import math

import pytest
import torch
from torch import nn

from compress.errors import UserError, shorten
from compress.files import finite, json_text, write_json
from compress.pipeline import Pipeline
from compress.recipe import load_recipe
from compress.report.table import cell
from tests.conftest import quick_recipe


def strict_load(text: str):
    """``json.loads`` that refuses NaN/Infinity, as a browser's ``JSON.parse`` does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


class NanAfterPrune(nn.Module):
    """An MLP for digits whose logits turn NaN once any ``fc1`` weight is exactly zero (log(0) * 0)."""

    def __init__(self, num_classes: int = 10, input_shape=(1, 8, 8)):
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc2(torch.relu(self.fc1(x.flatten(1))))
        return logits + torch.log(self.fc1.weight.abs().min()) * 0


# -- strict JSON -----------------------------------------------------------------------------------
def test_finite_turns_non_finite_numbers_into_none_and_number_likes_into_plain_numbers():
    import numpy as np

    got = finite({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.5], "c": (np.float32(2.5), np.int64(3)),
                  "d": torch.tensor(float("nan")), "e": torch.tensor(0.25), "f": "NaN", "g": True, "h": None,
                  "i": object})
    assert got == {"a": None, "b": [None, None, 1.5], "c": [2.5, 3], "d": None, "e": 0.25, "f": "NaN", "g": True,
                   "h": None, "i": object}
    assert type(got["c"][1]) is int


def test_json_text_and_write_json_are_strict(tmp_path):
    assert json_text({"loss": float("nan"), "x": [1, float("inf")]}) == '{"loss": null, "x": [1, null]}'
    write_json(tmp_path / "r.json", {"v": float("-inf")})
    assert strict_load((tmp_path / "r.json").read_text()) == {"v": None}
    with pytest.raises(TypeError):  # what is not data stays an error, as with json.dumps
        json_text({"f": object()})


def test_cells_say_n_a_for_non_finite_metrics_and_dash_for_absent_ones():
    record = {"index": 1, "name": "s", "metrics": {"loss": float("nan"), "accuracy": None, "sparsity": 0.5}}
    assert cell(record, "loss", "{:.4f}") == "n/a"
    assert cell(record, "accuracy", "{:.2f}") == "n/a"
    assert cell(record, "mac_speedup", "{:.2f}x") == "-"
    assert cell(record, "sparsity", "{:.1f}") == "50.0"


def test_a_model_that_outputs_nan_after_a_stage_is_said_once_and_written_as_null(tmp_path, capsys):
    recipe = quick_recipe(tmp_path, model={"name": "import:tests.test_run_integrity:NanAfterPrune"},
                          eval={"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]},
                          stages=[{"type": "train", "epochs": 1},
                                  {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 0}}])
    records = Pipeline(load_recipe(recipe)).run()  # exit 0 in the CLI: a fact about the model, not an error
    out = tmp_path / "run"
    report = strict_load((out / "report.json").read_text())
    first, pruned = report["stages"][1], report["stages"][2]
    assert first["metrics"]["nonfinite_outputs"] == 0 and "runtime_accuracy/onnxruntime" in first["metrics"]
    assert pruned["metrics"]["nonfinite_outputs"] == 360  # every test input of digits
    assert pruned["metrics"]["loss"] is None and math.isnan(records[2]["metrics"]["loss"])
    assert not any(k.startswith("runtime_") for k in pruned["metrics"])  # not exported: the model is at fault
    assert [n for n in pruned["notes"] if "outputs NaN" in n] == [
        "the model outputs NaN on 360 test inputs: accuracy and loss measure broken arithmetic, runtimes not measured"]
    printed = capsys.readouterr().out
    assert "stage 2: the model outputs NaN on 360 test inputs" in printed
    row = next(line for line in printed.splitlines() if line.lstrip().startswith("2  "))
    assert "n/a" not in row  # the terminal shows acc, not loss; the Markdown table has the loss column
    assert "| n/a |" in (out / "report.md").read_text()
    assert ">n/a<" in (out / "report.html").read_text()
    strict_load(json.loads(json.dumps(torch.load(out / "stage-2-prune.unstructured.ckpt",
                                                 weights_only=True)["extra"]["records"])))


# -- messages --------------------------------------------------------------------------------------
def test_long_values_are_cut_in_every_user_error():
    assert shorten("abc") == "abc"
    cut = shorten("x" * 1000 + "END", 100)
    assert cut.startswith("x" * 80) and cut.endswith("xEND") and "[1,003 characters]" in cut
    e = UserError("model.name: unknown model '" + "y" * 10_000_000 + "'; valid: lenet300, mlp")
    assert len(str(e)) < 500 and str(e).endswith("; valid: lenet300, mlp") and "[10,000,003 characters]" in str(e)  # the value with its quotes and ;
    assert len(str(UserError("word " * 100_000))) < 2100  # long in words, not in one value


# -- bounded inputs --------------------------------------------------------------------------------
def billion_laughs(levels: int = 10) -> str:
    """The classic alias bomb: nine aliases of nine aliases ..., 9**levels strings once expanded."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines + [f"name: *a{levels - 1}"]) + "\n"


def test_an_alias_bomb_recipe_is_refused_at_once(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"bomb.yaml: expands to more than 100,000 values \(YAML aliases"):
        load_recipe(path)
    assert time.perf_counter() - t0 < 5  # milliseconds here; on main it never returned
    with pytest.raises(UserError, match=r"^override 'model': expands to more than 100,000 values"):
        load_recipe(quick_recipe(tmp_path), ["model=" + billion_laughs()])


def test_recipe_bounds_on_size_depth_and_aliases(tmp_path):
    from compress.schema import MAX_YAML_BYTES, load_yaml

    big = tmp_path / "big.yaml"
    big.write_text("name: " + "x" * MAX_YAML_BYTES + "\n")
    with pytest.raises(UserError, match=r"big.yaml: 1,048,583 bytes; a recipe is at most 1,048,576"):
        load_recipe(big)
    with pytest.raises(UserError, match="^s: 1,048,577 characters; a recipe is at most 1,048,576"):
        load_yaml("x" * (MAX_YAML_BYTES + 1), "s")
    with pytest.raises(UserError, match="^s: nested more than 64 levels deep"):
        load_yaml("[" * 1_000_000, "s")  # libyaml's composer would overflow its stack on this
    assert load_yaml("[" * 60 + "]" * 60, "s") is not None
    # aliases within the bound still work, counted as expanded
    assert load_yaml("a: &x [1, 2]\nb: *x\nc: {d: *x}\n", "s") == {"a": [1, 2], "b": [1, 2], "c": {"d": [1, 2]}}
    with pytest.raises(UserError, match="expands to more than"):  # a bomb nested inside an open list
        load_yaml("k: [&a [" + ", ".join(["0"] * 400) + "], " + ", ".join(["*a"] * 300) + "]", "s")


@pytest.mark.parametrize("override, key", [
    ("eval.latency_batch_size=100000", "eval.latency_batch_size"),
    ("stages=[{type: prune.structured, latency_speedup: 1.5, latency_on: onnxruntime, latency_batch: 100000}]",
     r"stages\[0\].latency_batch"),
])
def test_a_latency_batch_beyond_the_bound_is_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(UserError, match=rf"^{key}: 100000 is outside \[1, 1024\]; every stage is timed at this batch"):
        load_recipe(quick_recipe(tmp_path), [override])


# -- resume ----------------------------------------------------------------------------------------
def test_resume_keeps_every_earlier_stages_training_curves(tmp_path):
    import csv

    recipe = quick_recipe(tmp_path, stages=[{"type": "train", "epochs": 2},
                                            {"type": "prune.unstructured", "sparsity": 0.5,
                                             "finetune": {"epochs": 2}}])
    Pipeline(load_recipe(recipe), quiet=True).run()
    curves = tmp_path / "run" / "curves" / "metrics.csv"

    def rows_of(tag):
        with open(curves, newline="") as f:
            return [r for r in csv.DictReader(f) if any(v != "" for k, v in r.items() if k.startswith(tag + "/"))]

    train_rows = rows_of("train")
    assert len(train_rows) >= 2 and len(rows_of("prune.unstructured")) >= 2
    # as after kill -9 in stage 2: its checkpoint never written, the curves file as the run left it
    (tmp_path / "run" / "stage-2-prune.unstructured.ckpt").unlink()
    Pipeline(load_recipe(recipe), resume=True, quiet=True).run()
    assert rows_of("train") == train_rows  # Lightning's CSV writer deleted them before the fix
    assert len(rows_of("prune.unstructured")) >= 2


# -- one line, exit 2 ------------------------------------------------------------------------------
@pytest.mark.parametrize("where, message", [
    ("afile", r"^out_dir: '.*afile' is a file, not a folder; choose another: out_dir=runs/NEW$"),
    ("afile/sub/run", r"^out_dir: '.*afile/sub/run' lies under the file '.*afile', not a folder"),
    ("x" * 256, r"^out_dir: the name 'x{48}\.\.\.\[256 characters\]\.\.\.x{12}' is 256 bytes; a file system allows 255"),
], ids=["a-file", "under-a-file", "name-of-256-bytes"])
def test_an_out_dir_that_cannot_be_a_folder_is_refused_before_any_work(tmp_path, where, message):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(UserError, match=message):
        load_recipe(quick_recipe(tmp_path), [f"out_dir={tmp_path / where}"])


def test_an_out_dir_in_a_folder_without_write_permission_is_refused(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path / "ro"))  # root may write anywhere
    (tmp_path / "ro").mkdir()
    with pytest.raises(UserError, match=r"^out_dir: '.*ro' is not writable; choose another out_dir"):
        load_recipe(quick_recipe(tmp_path), [f"out_dir={tmp_path / 'ro' / 'run'}"])


@pytest.mark.parametrize("report", [[1, 2, 3], {"stages": [1, 2]}, {"stages": [{"index": 0, "name": "input"}]},
                                    {"stages": "all"}])
def test_compare_refuses_a_report_of_the_wrong_shape_in_one_line(tmp_path, report, capsys):
    from compress.cli import main

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    assert main(["compare", str(tmp_path / "r"), str(tmp_path / "r"), "--out", str(tmp_path / "c.html")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {tmp_path / 'r' / 'report.json'}: not a run's report")
    assert not (tmp_path / "c.html").exists()


def test_compare_refuses_a_recipe_that_is_not_a_mapping(tmp_path):
    from compress.report.compare import load_run

    (tmp_path / "report.json").write_text(json.dumps({"stages": [{"index": 0, "name": "input", "metrics": {}}]}))
    (tmp_path / "recipe.yaml").write_text("- a list\n")
    with pytest.raises(UserError, match="report.json: its recipe is a list, not a mapping of keys"):
        load_run(tmp_path)
    (tmp_path / "recipe.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="recipe.yaml: YAML syntax error"):
        load_run(tmp_path)


def test_an_unreadable_image_in_an_imagefolder_is_one_line_naming_the_file(tmp_path):
    from PIL import Image

    from compress.data import build_datamodule

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("L", (8, 8), 40).save(tmp_path / split / c / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_text("not an image")
    dm = build_datamodule({"name": "imagefolder", "root": str(tmp_path), "size": 8, "channels": 1})
    dm.setup("fit")
    dataset = dm.train_dataloader().dataset
    bad = next(i for i, (path, _) in enumerate(dataset.items) if path.name == "1.png")
    assert dataset[bad - 1][0].shape == (1, 8, 8)
    with pytest.raises(UserError, match=r"^data.root: .*train/a/1.png is not an image Pillow can read \(cannot "
                                        r"identify image file .*\); remove or replace it$"):
        dataset[bad]


def two_stage_recipe(tmp_path) -> str:
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(quick_recipe(tmp_path, stages=[
        {"type": "train", "epochs": 1}, {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 1}}])))
    return str(path)


def test_a_full_disk_is_one_line_exit_2_and_resume_then_finishes(tmp_path, monkeypatch, capsys):
    import errno

    import compress.pipeline as pipeline
    from compress.cli import main

    real = pipeline.save_checkpoint

    def full_at_stage_2(path, *args, **kwargs):
        if path.name.startswith("stage-2"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline, "save_checkpoint", full_at_stage_2)
    recipe = two_stage_recipe(tmp_path)
    assert main([recipe, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'run' / 'stage-2-prune.unstructured.ckpt'}: No space left on device; free some "
                   "space (finished stages kept their checkpoints: `python run.py resume OUT_DIR` continues)\n")
    assert sorted(p.name for p in (tmp_path / "run").glob("stage-*")) == ["stage-0-input.ckpt", "stage-1-train.ckpt"]
    monkeypatch.setattr(pipeline, "save_checkpoint", real)
    assert main([recipe, "--quiet", "--resume"]) == 0
    assert [s["name"] for s in strict_load((tmp_path / "run" / "report.json").read_text())["stages"]] == [
        "input", "train", "prune.unstructured"]


def test_an_os_error_that_is_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    import errno

    import compress.cli as cli

    def broken(argv):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setitem(cli.COMMANDS, "compare", broken)
    with pytest.raises(OSError, match="Bad file descriptor"):
        cli.main(["compare", "x"])


def test_torch_save_on_a_full_disk_becomes_enospc(tmp_path, monkeypatch):
    """torch.save says only "unexpected pos" when the disk fills; atomic_write names it ENOSPC."""
    import errno
    import os
    from types import SimpleNamespace

    from compress.files import atomic_write

    def torch_like(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(os, "statvfs", lambda folder: SimpleNamespace(f_bavail=3, f_frsize=4096))
    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "m.ckpt", torch_like)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "m.ckpt")
    assert list(tmp_path.iterdir()) == []  # the partial file is gone
    monkeypatch.setattr(os, "statvfs", lambda folder: SimpleNamespace(f_bavail=10**6, f_frsize=4096))
    with pytest.raises(RuntimeError, match="unexpected pos"):  # a disk with room: the error as it was
        atomic_write(tmp_path / "m.ckpt", torch_like)

    def write_like(tmp):  # file.write on a full disk: an errno, no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "r.json", write_like)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "r.json")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs the test mounts (root only; skipped elsewhere), unmounted after."""
    import subprocess

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_run_that_fills_a_real_disk_says_so_in_one_line_and_resumes_once_there_is_room(tmp_path, small_disk, capsys):
    import subprocess

    from compress.cli import main

    recipe = two_stage_recipe(tmp_path)
    out = small_disk / "run"
    assert main([recipe, f"out_dir={out}", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out}/") and "No space left on device; free some space" in err
    kept = sorted(p.name for p in out.glob("stage-*.ckpt"))
    assert kept[0] == "stage-0-input.ckpt" and not list(out.glob(".*.tmp"))  # no partial file left behind
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main([recipe, f"out_dir={out}", "--quiet", "--resume"]) == 0
    stages = strict_load((out / "report.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["input", "train", "prune.unstructured"]


def test_every_json_the_project_writes_goes_through_the_strict_writer():
    """``json.dump(s)`` outside compress/files.py only to hash a key or to print: files are written
    by ``write_json``/``json_text`` (non-finite numbers as null, ``allow_nan=False``)."""
    import re

    from tests.conftest import ROOT

    allowed = re.compile(r"hashlib\.\w+\(json\.dumps\(|print\(json\.dumps\(")
    offenders = []
    for path in sorted([*(ROOT / "compress").rglob("*.py"), *(ROOT / "bench").glob("*.py"), ROOT / "run.py"]):
        if path == ROOT / "compress" / "files.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\bjson\.dumps?\(", line) and not allowed.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert offenders == []


def test_the_cli_refuses_an_alias_bomb_before_torch_loads(tmp_path, capsys):
    """In a fresh interpreter: one line, exit 2, torch never imported (the refusal takes milliseconds)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    (tmp_path / "bomb.yaml").write_text(billion_laughs())
    (tmp_path / "syntax.yaml").write_text("stages: [\n")
    code = ("import sys; from compress.cli import main; rc = main(sys.argv[1:]); "
            "print('torch' in sys.modules); sys.exit(rc)")
    bomb = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bomb.yaml")], capture_output=True, text=True,
                          cwd=ROOT)
    assert bomb.returncode == 2 and bomb.stdout == "False\n"
    assert bomb.stderr.startswith(f"error: {tmp_path / 'bomb.yaml'}: expands to") and bomb.stderr.count("\n") == 1
    from compress.cli import main  # a syntax error passes the early check and is placed by load_recipe

    assert main([str(tmp_path / "syntax.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'syntax.yaml'}:2:1: YAML syntax error: expected the node content, but found '<stream end>'\n"


def test_compare_table_says_n_a_for_a_final_metric_that_is_not_finite():
    from compress.report.html import final_table

    runs = {"a": [{"metrics": {"accuracy": 0.9, "loss": 0.3}}],
            "b": [{"metrics": {"accuracy": 0.1, "loss": None}}],
            "c": [{"metrics": {"accuracy": 0.1, "loss": float("nan")}}]}
    _, rows = final_table(runs)
    assert ["loss", "0.3", "n/a", "n/a"] in rows and ["accuracy", "0.9", "0.1", "0.1"] in rows


def test_no_nearest_name_is_searched_for_a_value_longer_than_any_name():
    from compress.errors import nearest

    assert nearest("lenet30", ["lenet300"]) == "lenet300"
    assert nearest("lenet300" * 100, ["lenet300"]) is None


def test_a_failed_write_where_the_disk_cannot_be_asked_is_reported_as_it_was(tmp_path, monkeypatch):
    import os

    from compress.files import atomic_write

    def no_statvfs(folder):
        raise OSError("no statvfs")

    def failing(tmp):
        raise RuntimeError("writer failed")

    monkeypatch.setattr(os, "statvfs", no_statvfs)
    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(tmp_path / "f", failing)


def test_keep_curves_without_earlier_curves_leaves_the_logger_unstarted(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    from compress.runfolder import keep_curves

    logger = CSVLogger(str(tmp_path), name="curves", version="")
    keep_curves(logger)
    assert not (tmp_path / "curves").exists()  # the writer, which makes the folder, was not started
