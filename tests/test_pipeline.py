"""End to end: a shrunken quick start on the bundled digits, checked through its outputs."""

import json

import pytest
import torch

from compress.pipeline import Pipeline
from compress.recipe import load_recipe
from tests.conftest import quick_recipe

METRIC_KEYS = {"accuracy", "loss", "params", "nonzero_params", "sparsity", "macs", "effective_macs", "dense_bytes",
               "stored_bytes", "compression_ratio", "mac_speedup", "measured_latency_ms", "measured_speedup", "wall_s"}
LAYER_KEYS = {"name", "type", "params", "nonzero", "sparsity", "macs"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quick")
    recipe = quick_recipe(tmp, logger={"wandb": {"mode": "offline"}})
    pipeline = Pipeline(load_recipe(recipe), quiet=True)
    records = pipeline.run()
    return tmp / "run", records, pipeline.model


def test_report_has_every_key_for_every_stage(quick_run):
    out, records, _ = quick_run
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["name"] == "t" and report["recipe"]["stages"][1]["type"] == "prune.unstructured"
    assert [s["index"] for s in report["stages"]] == [0, 1, 2, 3]
    assert report["stages"][0]["type"] == "input"
    for s in report["stages"]:
        assert {"index", "name", "type", "metrics", "layers"} <= set(s)
        assert METRIC_KEYS <= set(s["metrics"]), METRIC_KEYS - set(s["metrics"])
        assert all(LAYER_KEYS <= set(layer) for layer in s["layers"])
    sparsity = [s["metrics"]["sparsity"] for s in report["stages"]]
    assert sparsity[1] == 0 and sparsity[1] < sparsity[2] < sparsity[3]
    assert sparsity[3] == pytest.approx(0.8, abs=1e-3)
    last = report["stages"][-1]["metrics"]
    assert last["mac_speedup"] == pytest.approx(last["macs"] / last["effective_macs"])
    assert report["stages"][1]["metrics"]["accuracy"] > 0.85  # trained for 3 epochs on digits
    assert (out / "report.md").read_text().count("\n| ") >= 4


def test_checkpoints_load_weights_only_and_reproduce_the_model(quick_run):
    out, records, final = quick_run
    from compress.checkpoint import load_model, read_checkpoint
    from compress.data import build_datamodule, example_batch
    from compress.metrics import evaluate_accuracy

    for i, name in enumerate(["input", "train", "prune.unstructured", "prune.unstructured-2"]):
        path = out / f"stage-{i}-{name}.ckpt"
        raw = torch.load(path, weights_only=True)
        assert raw["stage_index"] == i
    model = load_model(out / "stage-3-prune.unstructured-2.ckpt")
    dm = build_datamodule({"name": "digits"})
    x, _ = example_batch(dm, 16)
    data = read_checkpoint(out / "stage-3-prune.unstructured-2.ckpt")
    assert data["metrics"]["sparsity"] == pytest.approx(records[-1]["metrics"]["sparsity"])
    zeros = sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert zeros == pytest.approx(0.8 * 50200, abs=3)
    with torch.no_grad():  # the loaded model computes what the pipeline's own model computed
        assert torch.equal(model(x), final.eval()(x))
        trained = load_model(out / "stage-1-train.ckpt")(x)
    assert not torch.allclose(trained, model(x))  # and each checkpoint holds its own stage's weights
    assert evaluate_accuracy(model, dm.test_dataloader())["accuracy"] == records[-1]["metrics"]["accuracy"]


def test_mac_speedup_after_structured_pruning_is_against_the_input_models_macs():
    from compress.data import build_datamodule
    from compress.measurement import MeasureConfig, measure
    from compress.pruning.structured import prune_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 8 * 8, 10))
    dm = build_datamodule({"name": "digits"})  # 1 x 8 x 8 images
    # by hand, a MAC per weight per output position: 8*1*9*64 + 8*8*9*64 + 512*10
    dense_macs = 8 * 9 * 64 + 8 * 8 * 9 * 64 + 512 * 10
    quick = MeasureConfig(repeats=3, warmup=1)
    base, _, _ = measure(net, dm, quick)
    assert base["macs"] == dense_macs == 46592 and base["mac_speedup"] == 1.0
    prune_model(net, torch.randn(1, 1, 8, 8), importance="l1", ratio=0.5)
    assert (net[0].out_channels, net[2].out_channels, net[5].in_features) == (4, 4, 256)
    pruned_macs = 4 * 9 * 64 + 4 * 4 * 9 * 64 + 256 * 10
    after, _, _ = measure(net, dm, quick, baseline=base)
    assert after["macs"] == after["effective_macs"] == pruned_macs == 14080
    assert after["mac_speedup"] == pytest.approx(dense_macs / pruned_macs)  # 3.31x: against stage 0


def test_measure_config_gathers_eval_hardware_index_bits_and_the_quantize_calibration(tmp_path):
    from compress.measurement import MeasureConfig

    recipe = quick_recipe(tmp_path, hardware=["jetson-tx2"], encoding={"index_bits": 4},
                          eval={"latency_repeats": 7, "latency_warmup": 2, "latency_batch_size": 16,
                                "latency_threads": 2, "max_batches": 3, "runtimes": ["onnxruntime"]})
    loaded = load_recipe(recipe)
    assert MeasureConfig.from_recipe(loaded) == MeasureConfig(
        repeats=7, warmup=2, latency_batch=16, threads=2, max_batches=3, runtimes=("onnxruntime",),
        hardware=("jetson-tx2",), index_bits=4, calibration_batches=8,  # no quantize stage: the default
        task=loaded.task)
    recipe["stages"].append({"type": "quantize", "calibration_batches": 5, "max_accuracy_drop": 0.02})
    assert MeasureConfig.from_recipe(load_recipe(recipe)).calibration_batches == 5
    assert MeasureConfig.from_recipe(load_recipe(recipe)).int8_max_drop == 0.02


def test_csv_and_wandb_offline_run_hold_per_stage_metrics(quick_run):
    out, _, _ = quick_run
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 5 and "accuracy" in rows[0]
    assert (out / "curves" / "metrics.csv").read_text().count("prune.unstructured-2/loss_step") == 1  # per-step training curves
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = sorted(p.name.split("_")[0] for p in (runs[0] / "files" / "media" / "table" / "layers").iterdir())
    assert tables == ["0-input", "1-train", "2-prune.unstructured", "3-prune.unstructured-2"]
    assert (runs[0] / f"run-{runs[0].name.split('-')[-1]}.wandb").stat().st_size > 10_000


def test_wandb_sink_logs_stage_metrics_against_stage_index(quick_run):
    from compress.tracking import WandbSink

    class FakeRun:
        name = "fake"

        def __init__(self):
            self.logged, self.metrics, self.summary = [], [], {}

        def define_metric(self, name, step_metric=None):
            self.metrics.append((name, step_metric))

        def log(self, payload):
            self.logged.append(payload)

    _, records, _ = quick_run
    run = FakeRun()
    sink = WandbSink(run)
    for r in records:
        sink.on_stage(r, records)
    assert ("stage/*", "stage/index") in run.metrics
    assert [p["stage/index"] for p in run.logged] == [0, 1, 2, 3]
    assert run.logged[3]["stage/sparsity"] == records[3]["metrics"]["sparsity"]
    assert "layers/3-prune.unstructured-2" in run.logged[3]


def test_cli_quickstart_writes_report(tmp_path, capsys, monkeypatch):
    import yaml

    from compress.cli import main

    recipe = quick_recipe(tmp_path, stages=[{"type": "train", "epochs": 1},
                                            {"type": "prune.unstructured", "sparsity": 0.5}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    assert main([str(path), "seed=1", "name=cli"]) == 0
    out = capsys.readouterr().out
    assert "prune.unstructured" in out and "acc %" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["recipe"]["seed"] == 1 and report["recipe"]["name"] == "cli"


def test_same_seed_same_metrics(tmp_path):
    def run(sub):
        recipe = quick_recipe(tmp_path / sub, stages=[{"type": "train", "epochs": 1},
                                                      {"type": "prune.unstructured", "sparsity": 0.6}])
        return Pipeline(load_recipe(recipe), quiet=True).run()

    a, b = run("a"), run("b")
    for ra, rb in zip(a, b, strict=True):
        assert ra["metrics"]["accuracy"] == rb["metrics"]["accuracy"]
        assert ra["metrics"]["loss"] == rb["metrics"]["loss"]
