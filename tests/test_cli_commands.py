"""The CLI's subcommands."""

from pathlib import Path

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
