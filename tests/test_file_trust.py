"""A model file is data (issue 22): loading a checkpoint or a ``.dc`` file never imports or calls the code
its spec names, on any load path, unless the caller supplies that code (its recipe) or opts in."""

from __future__ import annotations

import json
import re
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from compress.batches import output_field
from compress.checkpoint import load_model, read_checkpoint, save_checkpoint
from compress.cli import main
from compress.encoding import read_compressed, write_compressed
from compress.errors import UserError
from compress.models import build_from_spec, build_model
from tests.conftest import quick_recipe

IMPORT_MODEL = {"name": "import:tests.conftest:factory_net", "num_classes": 10, "width": 12}


def hostile(marker: Path) -> dict:
    """The issue's spec: it runs a shell command when a loader calls what it names."""
    return {"name": "import:os:system", "kwargs": {"command": f"touch {marker}"}}


def refused(path: Path) -> str:
    return (f"error: {path}: refused to build its model: the file asks to run code ('import:os:system'); a model file "
            "is data. If you trust where it comes from, pass --trust-model-code (trust_model_code=True in Python)")


def _run(folder: Path, **over) -> Path:
    recipe = quick_recipe(folder, **{"model": {"name": "mlp", "hidden": [16]},
                                     "stages": [{"type": "train", "epochs": 1},
                                                {"type": "prune.unstructured", "sparsity": 0.5,
                                                 "finetune": {"epochs": 0}}], **over})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--quiet"]) == 0
    return folder / "run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A zoo run (mlp) and a run of user code (``import:``), each two stages or one."""
    tmp = tmp_path_factory.mktemp("trust")
    zoo = _run(tmp / "zoo")
    code = _run(tmp / "code", model=IMPORT_MODEL, stages=[{"type": "train", "epochs": 1}])
    return zoo, code


def _hostile_copy(run: Path, dest: Path, spec: dict | None) -> Path:
    """A copy of ``run`` whose checkpoints carry ``spec`` (None: no model_spec at all); its recipe.yaml
    names the copy, so ``resume`` is not refused for another out_dir."""
    shutil.copytree(run, dest)
    for ckpt in dest.glob("stage-*.ckpt"):
        data = torch.load(ckpt, weights_only=True)
        if spec is None:
            del data["model_spec"]
        else:
            data["model_spec"] = spec
        torch.save(data, ckpt)
    recipe = yaml.safe_load((dest / "recipe.yaml").read_text())
    recipe["out_dir"] = str(dest)
    (dest / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return dest


def test_a_hostile_checkpoint_runs_nothing_on_export_or_load_model(runs, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = _hostile_copy(runs[0], tmp_path / "h", hostile(marker))
    last = run / "stage-2-prune.unstructured.ckpt"
    assert main(["export", str(run), "--out", str(tmp_path / "m.dc")]) == 2
    assert capsys.readouterr().err.strip() == refused(last)
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    with pytest.raises(UserError, match=re.escape(refused(last)[len("error: "):])):
        load_model(last)
    assert not marker.exists() and not (tmp_path / "m.dc").exists() and not (tmp_path / "m.onnx").exists()


def test_a_hostile_teacher_checkpoint_runs_nothing(runs, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    teacher = _hostile_copy(runs[0], tmp_path / "h", hostile(marker)) / "stage-1-train.ckpt"
    recipe = quick_recipe(tmp_path, model={"name": "mlp", "hidden": [16]}, stages=[
        {"type": "distill", "distill": {"teacher": str(teacher)}, "finetune": {"epochs": 1}}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == refused(teacher)
    assert not marker.exists()
    assert (tmp_path / "run" / "stage-0-input.ckpt").is_file()  # what was measured before the teacher stays


def test_a_hostile_checkpoint_is_never_built_on_resume(runs, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = _hostile_copy(runs[0], tmp_path / "h", hostile(marker))
    (run / "stage-2-prune.unstructured.ckpt").unlink()
    assert main(["resume", str(run), "--quiet", "--trust-model-code"]) == 2  # even trusted: the recipe's model is built
    assert capsys.readouterr().err.strip() == (
        f"error: {run / 'stage-1-train.ckpt'}: a checkpoint of another model (model_spec.name differs from the "
        "recipe's model block); resume with the recipe that wrote it, or pass --overwrite")
    assert not marker.exists()


def test_a_hostile_dc_file_runs_nothing(runs, tmp_path):
    marker = tmp_path / "MARKER"
    good, bad = tmp_path / "good.dc", tmp_path / "bad.dc"
    assert main(["export", str(runs[0]), "--out", str(good)]) == 0
    raw = good.read_bytes()
    (length,) = struct.unpack("<I", raw[5:9])
    head = json.loads(zlib.decompress(raw[9:9 + length]))
    head["spec"] = hostile(marker)
    text = zlib.compress(json.dumps(head).encode(), 9)
    bad.write_bytes(raw[:5] + struct.pack("<I", len(text)) + text + raw[9 + length:])
    with pytest.raises(UserError, match=re.escape(refused(bad)[len("error: "):])):
        read_compressed(bad)
    assert not marker.exists()
    head_list = zlib.compress(b"[1, 2]", 9)
    (tmp_path / "list.dc").write_bytes(raw[:5] + struct.pack("<I", len(head_list)) + head_list)
    with pytest.raises(UserError, match="its header is a list, not a mapping"):
        read_compressed(tmp_path / "list.dc")


def test_user_code_loads_with_the_opt_in_or_when_the_recipe_names_it(runs, tmp_path, capsys):
    _, code = runs
    ckpt = code / "stage-1-train.ckpt"
    with pytest.raises(UserError, match=r"asks to run code \('import:tests.conftest:factory_net'\)"):
        load_model(ckpt)
    model = load_model(ckpt, trust_model_code=True)
    assert type(model).__name__ == "FactoryNet" and model.head.in_features == 12
    assert main(["export", str(code), "--out", str(tmp_path / "m.dc")]) == 2
    assert "--trust-model-code" in capsys.readouterr().err
    assert main(["export", str(code), "--out", str(tmp_path / "m.dc"), "--trust-model-code"]) == 0
    with pytest.raises(UserError, match="asks to run code"):
        read_compressed(tmp_path / "m.dc")
    decoded = read_compressed(tmp_path / "m.dc", trust_model_code=True)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(decoded(x), model(x))
    assert load_model(ckpt, trusted=["import:tests.conftest:factory_net"]).head.in_features == 12


def test_a_teacher_of_user_code_loads_when_the_recipe_names_that_code_or_on_opt_in(runs, tmp_path, capsys):
    _, code = runs
    teacher = str(code / "stage-1-train.ckpt")
    distill = [{"type": "distill", "distill": {"teacher": teacher}, "finetune": {"epochs": 1}}]
    own = tmp_path / "own.yaml"  # the student is the same code (a narrower one): the recipe supplies it
    own.write_text(yaml.safe_dump(quick_recipe(tmp_path / "a", model={**IMPORT_MODEL, "width": 8}, stages=distill)))
    assert main([str(own), "--quiet"]) == 0
    other = tmp_path / "other.yaml"  # a zoo student: the teacher's code is nobody's but the file's
    other.write_text(yaml.safe_dump(quick_recipe(tmp_path / "b", model={"name": "mlp", "hidden": [16]}, stages=distill)))
    assert main([str(other), "--quiet"]) == 2
    assert "asks to run code ('import:tests.conftest:factory_net')" in capsys.readouterr().err
    assert main([str(other), "--quiet", "--overwrite", "--trust-model-code"]) == 0


def test_a_run_of_user_code_resumes_without_the_opt_in(runs, tmp_path):
    run = _hostile_copy(runs[1], tmp_path / "c", read_checkpoint(runs[1] / "stage-1-train.ckpt")["model_spec"])
    (run / "stage-1-train.ckpt").unlink()
    assert main(["resume", str(run), "--quiet"]) == 0
    assert (run / "stage-1-train.ckpt").is_file()


def test_a_checkpoint_without_model_spec_is_one_line(runs, tmp_path, capsys):
    run = _hostile_copy(runs[0], tmp_path / "n", None)
    assert main(["export", str(run), "--out", str(tmp_path / "m.dc")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {run / 'stage-2-prune.unstructured.ckpt'}: holds no model spec (model_spec with a name), so its "
        "model cannot be rebuilt; load its state_dict into a model you build (compress.checkpoint.load_into)")


@pytest.mark.parametrize("spec, message", [
    ({"name": "mlp", "kwargs": {"hidden": torch.tensor([4])}}, r"model_spec\.kwargs\.hidden: a Tensor where only data"),
    ({"name": "mlp", "kwargs": {"hidden": [print]}}, r"model_spec\.kwargs\.hidden\[0\]: a builtin_function_or_method"),
    ({"name": "mlp", "kwargs": {"hidden": {1: 2}}}, r"model_spec\.kwargs\.hidden: a key of type int"),
    ({"name": "mlp", "kwargs": [4]}, r"model_spec\.kwargs is a list, not a mapping"),
    ({"name": "mlp", "output": 1.5}, r"model_spec\.output is a float"),
    ({"name": "mlp", "output": True}, r"model_spec\.output is a bool"),
    ({"name": "transformers", "kwargs": {"pretrained": "some/folder"}}, r"refused to build its model: the file asks to run code \('transformers'\)"),
    ({"name": "import:" + "x" * 300}, r"refused to build its model: .* \('import:x{93}\.\.\.'\)"),
    ("mlp", "holds no model spec"),
])
def test_a_file_spec_is_plain_data_and_names_no_code(spec, message):
    with pytest.raises(UserError, match=r"^f\.ckpt: " + message):
        build_from_spec(spec, "f.ckpt")


def test_a_zoo_spec_builds_with_its_data_and_output():
    model = build_from_spec({"name": "mlp", "kwargs": {"hidden": [4], "input_shape": [1, 2, 2], "num_classes": 3},
                             "output": "pred"}, "f.ckpt")
    assert output_field(model) == "pred" and model.features[0].out_features == 4 and model.fc_out.out_features == 3
    with pytest.raises(UserError, match=r"^f\.ckpt: model_spec\.name: unknown model 'nope'"):
        build_from_spec({"name": "nope"}, "f.ckpt")


def test_save_then_load_of_a_zoo_model_needs_no_opt_in(tmp_path):
    model = build_model("mlp", hidden=[4], input_shape=(1, 2, 2), num_classes=3)
    save_checkpoint(tmp_path / "a.ckpt", model, model_spec={"name": "mlp", "kwargs": {
        "hidden": [4], "input_shape": [1, 2, 2], "num_classes": 3}})
    write_compressed(model, tmp_path / "a.dc", {"name": "mlp", "kwargs": {"hidden": [4], "input_shape": [1, 2, 2],
                                                                         "num_classes": 3}})
    x = torch.randn(2, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "a.ckpt")(x), model.eval()(x))
        assert torch.equal(read_compressed(tmp_path / "a.dc")(x), model(x))
