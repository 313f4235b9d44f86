"""The CLI's subcommands."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from compress.cli import main
from tests.conftest import quick_recipe


def test_sensitivity_writes_csv_plot_and_suggests_ratios(tmp_path, capsys):
    recipe = quick_recipe(tmp_path, stages=[{"type": "train", "epochs": 1},
                                            {"type": "prune.structured", "ratio": 0.5}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["sensitivity", str(path), "--ratios", "0.25", "0.75", "--max-drop", "0.5"]) == 0
    out = capsys.readouterr().out
    folder = Path(recipe["out_dir"]) / "sensitivity"
    assert (folder / "sensitivity.png").stat().st_size > 1000
    rows = (folder / "sensitivity.csv").read_text().splitlines()
    assert len(rows) >= 1 + 2 * 2  # header + two layers x two ratios
    assert "layer_ratios:" in out and "features.0:" in out


def test_sensitivity_bad_ratio_is_exit_2(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(quick_recipe(tmp_path, stages=[])))
    assert main(["sensitivity", str(path), "--ratios", "1.5"]) == 2
    assert "sensitivity.ratios: 1.5 is outside (0, 1)" in capsys.readouterr().err
def test_structured_after_share_is_refused_up_front(tmp_path, capsys):
    stages = [{"type": "share", "bits": 4}, {"type": "prune.structured", "ratio": 0.5}]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(quick_recipe(tmp_path, stages=stages)))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages[1].type: 'prune.structured' after 'share' (stages[0])" in err
    assert not (tmp_path / "run").exists()


# -- commands on a finished run: export, resume, teacher, model.checkpoint ----------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A trained MLP (digits) pruned to 80% without weight sharing: its layers are stored as CSR only."""
    tmp = tmp_path_factory.mktemp("small")
    recipe = quick_recipe(tmp, model={"name": "mlp", "hidden": [32]}, stages=[
        {"type": "train", "epochs": 2, "optimizer": {"lr": 0.05}},
        {"type": "prune.unstructured", "sparsity": 0.8, "finetune": {"epochs": 0}}])
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--quiet"]) == 0
    return tmp / "run", path


def _deployed_weights(model) -> dict:
    from compress.pruning.masks import deployed_copy, prunable_layers

    return {n: m.weight.detach() for n, m in prunable_layers(deployed_copy(model)).items()}


@pytest.mark.parametrize("index_bits", ["3", "auto"])
def test_export_of_pruned_unshared_layers_is_csr_and_decodes_to_the_checkpoint(small_run, tmp_path, capsys,
                                                                                index_bits):
    from compress.checkpoint import load_model
    from compress.encoding import model_storage, read_compressed

    run, _ = small_run
    out = tmp_path / "m.dc"
    assert main(["export", str(run), "--out", str(out), "--index-bits", index_bits]) == 0
    printed = capsys.readouterr().out
    model = load_model(run / "stage-2-prune.unstructured.ckpt")
    storage = model_storage(model, int(index_bits) if index_bits.isdigit() else index_bits)
    assert {layer["format"] for layer in storage["layers"].values()} == {"csr"}
    if index_bits == "3":
        assert {layer["index_bits"] for layer in storage["layers"].values()} == {3}
    size = out.stat().st_size
    assert f"{out}: {size:,} bytes on disk from stage-2-prune.unstructured.ckpt" in printed
    assert f"reported compressed_bytes {storage['total']['compressed_bytes']:,}" in printed
    decoded = read_compressed(out)
    want = _deployed_weights(model)
    got = _deployed_weights(decoded)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert all(float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.01) for w in got.values())
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(decoded(x), model.eval()(x))


def test_export_stage_picks_that_checkpoint_and_a_missing_stage_is_one_line(small_run, tmp_path, capsys):
    from compress.checkpoint import load_model
    from compress.encoding import read_compressed

    run, _ = small_run
    out = tmp_path / "train.dc"
    assert main(["export", str(run), "--stage", "1", "--out", str(out)]) == 0
    assert "from stage-1-train.ckpt" in capsys.readouterr().out
    want = _deployed_weights(load_model(run / "stage-1-train.ckpt"))
    got = _deployed_weights(read_compressed(out))
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert all(int((w == 0).sum()) == 0 for w in got.values())  # the dense stage, not the pruned one
    assert main(["export", str(run), "--stage", "7"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {run}: no stage checkpoint for --stage 7 there; is it a run "
                                               "folder (out_dir of a recipe)?")
    assert main(["export", str(run), "--index-bits", "40", "--out", str(tmp_path / "x.dc")]) == 2
    assert capsys.readouterr().err.startswith("error: --index-bits: ")
    assert main(["export", str(run), "--format", "onnx", "--max-accuracy-drop", "1.5",
                 "--out", str(tmp_path / "x.onnx")]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-accuracy-drop: 1.5 must be in [0, 1) (a fraction: 0.005 "
                                               "is half a point)")
    assert not (tmp_path / "x.dc").exists()


def test_resume_on_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert main(["resume", str(tmp_path / "stuff")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'stuff'}: no recipe.yaml there; is it a run "
                                               "folder (out_dir of a recipe)?")
    assert list((tmp_path / "stuff").iterdir()) == []


def test_resume_of_a_finished_run_trains_nothing_and_keeps_its_report(small_run, capsys):
    run, _ = small_run
    before = json.loads((run / "report.json").read_text())
    stamps = {p.name: p.stat().st_mtime_ns for p in run.glob("stage-*.ckpt")}
    assert main(["resume", str(run), "--quiet"]) == 0
    after = json.loads((run / "report.json").read_text())
    assert [s["metrics"]["accuracy"] for s in after["stages"]] == [s["metrics"]["accuracy"] for s in before["stages"]]
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("stage-*.ckpt")} == stamps  # nothing re-run


@pytest.mark.parametrize("kind", ["compress", "state_dict", "lightning"])
def test_model_checkpoint_loads_a_compress_checkpoint_or_a_plain_state_dict(small_run, tmp_path, kind):
    from compress.checkpoint import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    run, recipe_path = small_run
    source = run / "stage-1-train.ckpt"
    trained = load_model(source)
    if kind == "compress":
        path = source
    else:
        path = tmp_path / "weights.pt"
        state = trained.state_dict()
        torch.save(state if kind == "state_dict" else {"state_dict": state, "epoch": 3}, path)
    recipe = load_recipe(recipe_path, [f"model.checkpoint={path}", f"out_dir={tmp_path / 'new'}"])
    model, _ = Pipeline(recipe, quiet=True).prepare()
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained(x))


def test_model_checkpoint_of_another_architecture_is_one_line(small_run, tmp_path, capsys):
    run, recipe_path = small_run
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["model"] = {"name": "lenet300", "checkpoint": str(run / "stage-1-train.ckpt")}
    recipe["out_dir"] = str(tmp_path / "new")
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {run / 'stage-1-train.ckpt'}: checkpoint does not fit this model") and "\n" not in err


def _teacher_spec(folder: Path, recipe: Path, checkpoint: str) -> Path:
    folder.mkdir(exist_ok=True)
    spec = folder / "tiny.yaml"
    spec.write_text(f"# a tiny teacher\nname: tiny\nmodel: {{name: mlp, hidden: [32]}}\ndata: digits\n"
                    f"recipe: {recipe}\ncheckpoint: {checkpoint}\nsha256: null  # set by run.py teacher\n"
                    "accuracy: null\n")
    return spec


def test_teacher_record_only_writes_the_checkpoints_sha256_and_accuracy(small_run, tmp_path, capsys):
    import hashlib
    import shutil

    from compress.checkpoint import read_checkpoint

    run, recipe_path = small_run
    teachers = tmp_path / "teachers"
    spec = _teacher_spec(teachers, recipe_path, "runs/tiny/stage-1-train.ckpt")
    (teachers / "runs" / "tiny").mkdir(parents=True)
    ckpt = shutil.copy(run / "stage-1-train.ckpt", teachers / "runs" / "tiny" / "stage-1-train.ckpt")
    assert main(["teacher", "tiny", "--record-only", "--teachers-dir", str(teachers)]) == 0
    digest = hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
    accuracy = round(float(read_checkpoint(ckpt)["metrics"]["accuracy"]), 6)
    assert capsys.readouterr().out.strip() == f"teacher tiny: accuracy {accuracy}, sha256 {digest}"
    text = spec.read_text()
    assert f"sha256: {digest}\n" in text and f"accuracy: {accuracy}\n" in text
    assert text.startswith("# a tiny teacher\nname: tiny\n")  # the rest of the spec kept
    assert accuracy > 0.8  # two epochs on digits


def test_teacher_trains_by_its_recipe_then_records(small_run, tmp_path, capsys):
    from compress.checkpoint import read_checkpoint

    _, recipe_path = small_run
    teachers = tmp_path / "teachers"
    spec = _teacher_spec(teachers, recipe_path, "runs/tiny/stage-1-train.ckpt")
    assert main(["teacher", "tiny", "stages.1.sparsity=0.5", "--teachers-dir", str(teachers)]) == 0
    ckpt = teachers / "runs" / "tiny" / "stage-1-train.ckpt"
    out = capsys.readouterr().out.strip().splitlines()[-1]
    accuracy = round(float(read_checkpoint(ckpt)["metrics"]["accuracy"]), 6)
    assert out.startswith(f"teacher tiny: accuracy {accuracy}, sha256 ") and f"accuracy: {accuracy}\n" in spec.read_text()
    assert read_checkpoint(teachers / "runs" / "tiny" / "stage-2-prune.unstructured.ckpt")["metrics"]["sparsity"] == \
        pytest.approx(0.5, abs=0.01)  # the override reached the recipe


def test_teacher_unknown_or_untrained_is_one_line(small_run, tmp_path, capsys):
    _, recipe_path = small_run
    teachers = tmp_path / "teachers"
    _teacher_spec(teachers, recipe_path, "runs/tiny/stage-1-train.ckpt")
    assert main(["teacher", "tiyn", "--teachers-dir", str(teachers)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: teacher: unknown teacher 'tiyn' (no {teachers / 'tiyn.yaml'}); use 'self', a checkpoint path, or a "
        "name; valid: self, tiny (did you mean 'tiny'?)")
    # --record-only before the teacher was trained: one line, not a FileNotFoundError traceback
    assert main(["teacher", "tiny", "--record-only", "--teachers-dir", str(teachers)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: teacher 'tiny' is not trained yet (no {teachers / 'runs' / 'tiny' / 'stage-1-train.ckpt'}), so there "
        "is nothing to record; train it with `python run.py teacher tiny`")
    assert "sha256: null" in (teachers / "tiny.yaml").read_text()
