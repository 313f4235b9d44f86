"""report.html, compare.html, wandb charts, the terminal table and grouped notes, on two shrunken quick starts."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil

import pytest

from compress.cli import main
from compress.pipeline import Pipeline
from compress.recipe import load_recipe
from compress.report import group_notes, notes_lines, terminal_columns
from compress.report.html import compare_figures, run_figures, stage_figures
from compress.report.notes import stages_label
from compress.tracking import HtmlSink, ReportSink, TerminalSink
from tests.conftest import quick_recipe

PROFILES = ["jetson-tx2", "edge-npu-int8"]  # simulated only: no calibration of this machine needed
STAGE_CHARTS = ["Accuracy per stage", "Stored size per stage", "Compression ratio per stage", "Speedups per stage",
                "Latency per stage"]
LAYER_CHARTS = ["Sparsity per layer", "Kept of the original per layer", "Bits per weight per layer",
                "Share of simulated latency per layer"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two quick starts that differ in sparsity; the first logs to an offline wandb run and records
    report.html as it stood after each stage."""
    tmp = tmp_path_factory.mktemp("report")
    pages: list[str] = []
    original = HtmlSink.on_stage

    def on_stage(self, record, records):
        original(self, record, records)
        pages.append(self.path.read_text())

    out = {}
    HtmlSink.on_stage = on_stage
    try:
        for name, sparsity, mode in (("sparse50", 0.5, "offline"), ("sparse80", 0.8, "disabled")):
            recipe = quick_recipe(tmp / name, hardware=PROFILES, logger={"wandb": {"mode": mode}},
                                  stages=[{"type": "train", "epochs": 2, "optimizer": {"lr": 0.05}},
                                          {"type": "prune.unstructured", "sparsity": sparsity,
                                           "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}}}])
            recipe["out_dir"] = str(tmp / name)
            out[name] = Pipeline(load_recipe(recipe), quiet=True).run()
    finally:
        HtmlSink.on_stage = original
    return tmp, out, pages


def _charts_in(page: str) -> dict[str, list]:
    """Each plotly chart of a page: its title -> the x values of its first trace."""
    found = {}
    for call in re.findall(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*(\{.*?"title":\{"text":"[^"]*"\})',
                           page, flags=re.S):
        traces = json.loads(call[0])
        title = re.search(r'"title":\{"text":"([^"]*)"\}', call[1]).group(1)
        found[title] = traces[0]["x"]
    return found


def test_report_html_is_rewritten_after_every_stage(runs):
    tmp, records, pages = runs
    assert len(pages) == 2 * 3  # two runs of three records (input, train, prune)
    for k, page in enumerate(pages[:3]):
        charts = _charts_in(page)
        for title in STAGE_CHARTS:
            x = next(v for t, v in charts.items() if t.startswith(title))
            assert x == [f"{r['index']} {r['name']}" for r in records["sparse50"][:k + 1]], title
        for title in LAYER_CHARTS:
            assert any(t.startswith(title) for t in charts), title
    last = (tmp / "sparse50" / "report.html").read_text()
    assert last == pages[2]
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?:', last)  # plotly.js inlined: opens offline
    assert last.count("Plotly.newPlot") == len(STAGE_CHARTS) + len(LAYER_CHARTS)
    assert "Recipe (resolved)" in last and "prune.unstructured" in last


def test_report_charts_hold_the_records_values(runs):
    _, records, _ = runs
    figs = run_figures(records["sparse80"])
    acc = figs["accuracy"].data[0]
    assert list(acc.y) == pytest.approx([100 * r["metrics"]["accuracy"] for r in records["sparse80"]])
    speedups = {t.name: list(t.y) for t in figs["speedups"].data}
    assert {"MACs", "measured", "sim jetson-tx2", "sim edge-npu-int8"} <= set(speedups)
    assert speedups["MACs"][-1] == pytest.approx(5.0, rel=1e-3)
    sparsity = figs["layer_sparsity"].data[0]
    assert list(sparsity.y) == pytest.approx([80.0] * 3, abs=0.1)
    shares = {t.name: t for t in figs["layer_latency"].data}
    assert set(shares) == set(PROFILES)
    assert sum(shares["jetson-tx2"].y) == pytest.approx(100.0)  # the layers and "other ops" add up


def test_charts_pick_up_runtime_and_spread_keys_generically(runs):
    """Keys measure() may add (a runtime, an IQR) get their traces with no change here."""
    _, records, _ = runs
    recs = copy.deepcopy(records["sparse80"])
    for r in recs:
        m = r["metrics"]
        m["runtime_speedup/onnxruntime"] = 2.0 * m["mac_speedup"]
        m["runtime_accuracy/onnxruntime"] = m["accuracy"]
        m["runtime_latency_ms/onnxruntime"] = 0.01
        m["measured_speedup_iqr"] = 0.1
    figs = stage_figures(recs)
    speedups = {t.name: t for t in figs["speedups"].data}
    assert "runtime onnxruntime" in speedups and "measured speedup iqr" not in speedups
    assert list(speedups["measured"].error_y.array) == pytest.approx([0.05] * len(recs))
    assert "runtime onnxruntime" in {t.name for t in figs["accuracy"].data}
    assert "runtime onnxruntime" in {t.name for t in figs["latency"].data}
    compare = compare_figures({"a": recs, "b": records["sparse50"]})
    assert "pareto_runtime_latency_ms_onnxruntime" in compare and "pareto_stored_bytes" in compare


def test_wandb_offline_run_holds_the_report_charts(runs):
    tmp, _, _ = runs
    (run,) = (tmp / "sparse50" / "wandb").glob("offline-run-*")
    files = [p.name for p in (run / "files" / "media" / "plotly" / "report").iterdir()]
    charts = {re.sub(r"_\d+_[0-9a-f]+\.plotly\.json$", "", name) for name in files}  # <chart>_<step>_<hash>
    assert charts == {"accuracy", "size", "compression", "speedups", "latency", "layer_sparsity", "layer_kept",
                      "layer_bits", "layer_latency"}, files
    logged = json.loads(next((run / "files" / "media" / "plotly" / "report").glob("speedups*.json")).read_text())
    assert any(trace.get("name") == "sim jetson-tx2" for trace in logged["data"])


def test_compare_two_runs_writes_pareto_charts_and_one_table(runs, tmp_path, capsys):
    tmp, records, _ = runs
    out = tmp_path / "compare.html"
    assert main(["compare", str(tmp / "sparse50"), str(tmp / "sparse80"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert [line.split()[1] for line in lines if line.split()[:1] == ["2"]] == ["sparse50", "sparse80"]
    page = out.read_text()
    charts = _charts_in(page)
    assert {"Accuracy vs compressed size", "Accuracy vs measured latency", "Accuracy vs sim jetson-tx2 latency",
            "Speedups of the final stage"} <= set(charts)
    assert "sparse50" in page and "sparse80" in page and "compression_ratio" in page


def _copy_run(src, dst, **recipe_changes):
    dst.mkdir()
    report = json.loads((src / "report.json").read_text())
    report["recipe"].update(recipe_changes)
    (dst / "report.json").write_text(json.dumps(report))
    return dst


def test_compare_refuses_runs_of_different_models_unless_forced(runs, tmp_path, capsys):
    tmp, _, _ = runs
    other = _copy_run(tmp / "sparse80", tmp_path / "lenet5run", model={"name": "lenet5"})
    args = ["compare", str(tmp / "sparse50"), str(other), "--out", str(tmp_path / "c.html")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the runs differ in model") and "--force" in err
    assert not (tmp_path / "c.html").exists()
    assert main(args + ["--force"]) == 0
    assert (tmp_path / "c.html").is_file()
    digits = _copy_run(tmp / "sparse80", tmp_path / "mnistrun", data={"name": "mnist"})
    assert main(["compare", str(tmp / "sparse50"), str(digits)]) == 2
    assert "differ in data set" in capsys.readouterr().err


def test_compare_refuses_a_folder_without_report(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no report.json" in err


def test_compare_names_runs_by_folder_with_parents_when_names_repeat(runs, tmp_path):
    from compress.report.compare import run_names

    assert run_names([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    assert run_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]


def _many_profiles(records):
    recs = copy.deepcopy(records)
    for r in recs:
        r["name"] = r["name"] + "-with-a-long-name"
        for p in ("a100", "tpu-v1", "cpu-local", "a-very-long-profile-name"):
            r["metrics"][f"sim_speedup/{p}"] = 1.5
        r["metrics"]["runtime_speedup/onnxruntime"] = 3.0
    return recs


@pytest.mark.parametrize("wide", [False, True])
def test_terminal_table_fits_120_columns_and_adds_one_row_per_stage(runs, wide):
    _, records, _ = runs
    recs = _many_profiles(records["sparse50"]) if wide else records["sparse50"]
    buf = io.StringIO()
    sink = TerminalSink(name_width=max(len(r["name"]) for r in recs), file=buf)
    printed_after = []
    for k, r in enumerate(recs):
        sink.on_stage(r, recs[:k + 1])
        printed_after.append(buf.getvalue())
    sink.close(recs)
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120
    assert printed_after[0].count("acc %") == 1 and buf.getvalue().count("acc %") == 1  # the header, once
    for k in range(1, len(recs)):  # each stage adds exactly its row
        added = printed_after[k][len(printed_after[k - 1]):].splitlines()
        assert len(added) == 1 and added[0].split()[0] == str(k)
        assert recs[k]["name"].startswith(added[0].split()[1].rstrip("~"))
    if wide:
        cols, _ = terminal_columns(recs[0])
        assert "runtime_speedup/onnxruntime" in [c.key for c in cols]  # runtimes are kept


def _noted(records):
    recs = copy.deepcopy(records)
    for r in recs:
        r["notes"] = ["lanes idle on jetson-tx2"] + (["50% zeros computed anyway"] if r["index"] >= 1 else [])
    recs[0]["notes"].append("calibrated today")
    return recs


def test_notes_are_grouped_by_the_stages_they_hold_for(runs, tmp_path):
    _, records, _ = runs
    recs = _noted(records["sparse50"])
    assert stages_label([2, 3, 4]) == "stages 2-4" and stages_label([1, 3, 4]) == "stages 1, 3-4"
    assert stages_label([3]) == "stage 3"
    assert group_notes(recs) == [([0, 1, 2], "lanes idle on jetson-tx2"), ([0], "calibrated today"),
                                 ([1, 2], "50% zeros computed anyway")]
    expected = ["stages 0-2: lanes idle on jetson-tx2", "stage 0: calibrated today",
                "stages 1-2: 50% zeros computed anyway"]
    assert notes_lines(recs) == expected
    sink = ReportSink(tmp_path, {"name": "t"})
    sink.on_stage(recs[-1], recs)
    md = (tmp_path / "report.md").read_text()
    assert md.split("## Notes\n\n")[1].splitlines() == [f"- {line}" for line in expected]
    HtmlSink(tmp_path, {"name": "t"}).on_stage(recs[-1], recs)
    page = (tmp_path / "report.html").read_text()
    assert page.count("lanes idle on jetson-tx2") == 1 and "stages 0-2:</span>" in page
    buf = io.StringIO()
    terminal = TerminalSink(file=buf)
    for k, r in enumerate(recs):
        terminal.on_stage(r, recs[:k + 1])
    terminal.close(recs)
    assert buf.getvalue().count("lanes idle on jetson-tx2") == 1 and "  stages 0-2: lanes idle" in buf.getvalue()
    # report.json keeps each stage's own list (the contract); grouping is presentation.
    assert json.loads((tmp_path / "report.json").read_text())["stages"][2]["notes"] == recs[2]["notes"]


# -- in a real browser ------------------------------------------------------------------------------
def _browser_or_skip():
    pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    from compress.report.browser import chromium_path

    if chromium_path() is None:
        pytest.skip("no chromium on the PATH (apt-get install chromium)")


@pytest.mark.browser
def test_report_and_compare_pages_render_every_chart_in_chromium(runs, tmp_path):
    _browser_or_skip()
    from compress.report.browser import inspect_page

    tmp, _, _ = runs
    compare = tmp_path / "compare.html"
    assert main(["compare", str(tmp / "sparse50"), str(tmp / "sparse80"), "--out", str(compare)]) == 0
    report = tmp / "sparse50" / "report.html"
    copied = tmp_path / "report" / "report.html"  # alone in a folder: nothing beside it is needed
    copied.parent.mkdir()
    shutil.copy(report, copied)
    for page, expected in ((copied, STAGE_CHARTS + LAYER_CHARTS), (compare, ["Accuracy vs compressed size"])):
        png = tmp_path / f"{page.stem}.png"
        seen = inspect_page(page, screenshot=png)
        assert seen["errors"] == [], seen["errors"]
        assert seen["blocked"] == [], f"the page asked the network for {seen['blocked']}"
        titles = [c["title"] for c in seen["charts"]]
        assert all(any(t.startswith(e) for t in titles) for e in expected), titles
        for chart in seen["charts"]:
            assert chart["traces"] > 0 and chart["with_points"] == chart["traces"], chart
            assert chart["drawn"] >= chart["traces"], chart  # each trace drawn in the SVG
        assert png.stat().st_size > 20_000
