"""Tasks end to end (issue 24): each built-in task and a user's task through train, prune.structured
with distillation from ``teacher: self``, quantize (ptq, ``max_accuracy_drop``) and export, every
reported figure recomputed here with torchmetrics from the stage's checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from compress.checkpoint import load_model
from compress.cli import main
from compress.errors import UserError
from compress.pipeline import Pipeline
from compress.recipe import load_recipe
from compress.runtime import OrtModel
from compress.tasks import Task, label_targets
from compress.tasks.base import MetricSpec

BINS = 12


def _features(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Inputs (n, 16) and a pitch-like target: a fractional bin in [0, BINS - 1] read off the inputs."""
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(16, generator=torch.Generator().manual_seed(0))  # one rule for both splits
    y = torch.sigmoid(x @ w / 2) * (BINS - 1)
    return x, y


class PitchData(pl.LightningDataModule):
    """Fractional-bin targets, no ``num_classes``: the model's 12 outputs say how many labels there are."""

    def __init__(self, train: int = 768, test: int = 256, batch_size: int = 32):
        super().__init__()
        self.train_xy, self.test_xy = _features(train, 1), _features(test, 2)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train_xy), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def test_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.test_xy), batch_size=128)


class RegressionData(PitchData):
    """The same inputs with real-valued targets (N,)."""


class SigmoidTagger(nn.Module):
    """Ends in a sigmoid, as CREPE does: outputs are probabilities, one per bin."""

    def __init__(self, hidden: int = 64, bins: int = BINS):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, bins)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.head(self.body(x)))


class Regressor(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class WithinOneBin(torchmetrics.Metric):
    """A user's metric: the peak bin within one bin of the true (fractional) bin (RPA-style)."""

    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        self.hits += int(((preds.argmax(1).float() - target).abs() <= 1.0).sum())
        self.total += len(target)

    def compute(self) -> Tensor:
        return self.hits.float() / self.total


def bin_bce(outputs: Tensor, targets: Tensor) -> Tensor:
    """A user's loss: BCE of probabilities against Gaussian-blurred bin targets."""
    return nn.functional.binary_cross_entropy(outputs.clamp(1e-6, 1 - 1e-6), label_targets(targets, BINS, 1.0))


class PitchTask(Task):
    """A user's task: its own loss and metric, softened-sigmoid distillation."""

    default_loss = "import:tests.test_task_pipeline:bin_bce"
    default_primary = "within1"
    default_distill = "bce"

    def default_metrics(self) -> dict[str, MetricSpec]:
        return {"within1": MetricSpec(WithinOneBin)}

    def width(self, outputs: Tensor) -> int:
        return int(outputs.shape[1])

    def distill_rows(self, outputs: Tensor) -> Tensor:
        return torch.logit(outputs.clamp(1e-6, 1 - 1e-6))


def recipe_for(tmp_path: Path, task: dict, model: dict, data: dict, stages: list[dict], **over) -> dict:
    recipe = {"name": "task", "seed": 0, "out_dir": str(tmp_path / "run"), "model": model, "data": data, "task": task,
              "trainer": {"progress_bar": False}, "logger": {"wandb": {"mode": "disabled"}},
              "eval": {"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]}, "hardware": [],
              "stages": stages}
    recipe.update(over)
    return recipe


def compress_stages(lr: float, epochs: int = 6, optimizer: str = "adam", drop: float = 0.05) -> list[dict]:
    opt = {"name": optimizer, "lr": lr}
    return [{"type": "train", "epochs": epochs, "optimizer": opt, "lr_schedule": "none"},
            {"type": "prune.structured", "ratio": 0.5,
             "finetune": {"epochs": 2, "optimizer": {**opt, "lr": lr / 2}, "lr_schedule": "none",
                          "distill": {"teacher": "self", "T": 2.0, "alpha": 0.5}}},
            {"type": "quantize", "mode": "ptq", "calibration_batches": 4, "max_accuracy_drop": drop}]


def run(recipe: dict) -> tuple[list[dict], Path]:
    records = Pipeline(load_recipe(recipe), quiet=True).run()
    return records, Path(recipe["out_dir"])


def stage_outputs(out: Path, index: int, name: str, loader: DataLoader) -> tuple[Tensor, Tensor]:
    model = load_model(out / f"stage-{index}-{name}.ckpt", trust_model_code=True).eval()
    with torch.no_grad():
        pairs = [(model(x), y) for x, y in loader]
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


STAGE_NAMES = ["input", "train", "prune.structured", "quantize"]


# -- multilabel: sigmoid outputs, fractional-bin targets, a data module without num_classes ---------------

@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multilabel")
    recipe = recipe_for(tmp, {"name": "multilabel", "outputs": "probabilities", "label_smoothing_sigma": 1.0},
                        {"name": "import:tests.test_task_pipeline:SigmoidTagger"},
                        {"name": "import:tests.test_task_pipeline:PitchData"}, compress_stages(lr=0.01))
    return run(recipe)


def test_multilabel_figures_are_torchmetrics_on_the_stage_models(multilabel_run):
    records, out = multilabel_run
    loader = PitchData().test_dataloader()
    for i, name in enumerate(STAGE_NAMES[:3]):
        probs, y = stage_outputs(out, i, name, loader)
        hot = label_targets(y, BINS).long()
        m = records[i]["metrics"]
        want_map = MultilabelAveragePrecision(num_labels=BINS, average="micro")(probs, hot).item()
        assert m["metric"] == m["metrics/map"] == pytest.approx(want_map, abs=1e-6), name
        assert m["metrics/f1"] == pytest.approx(MultilabelF1Score(num_labels=BINS, average="micro")(probs, hot).item(),
                                                abs=1e-6)
        want_loss = nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), label_targets(y, BINS, 1.0))
        assert m["loss"] == pytest.approx(want_loss.item(), rel=1e-4)
        assert "accuracy" not in m and m["runtime_metric/onnxruntime"] == pytest.approx(m["metric"], abs=1e-4)
    assert records[1]["metrics"]["metric"] > 0.5  # learnt: chance is ~1/12
    control = records[3]["info"]["accuracy_control"]
    assert control["metric"] == "map" and control["met"]
    assert records[3]["metrics"]["precision"] == "int8"
    assert records[0]["metrics"]["metric"] - records[3]["metrics"]["runtime_metric/onnxruntime"] < 0.5
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["task"]["name"] == "multilabel"


def test_multilabel_run_exports_an_int8_graph_scored_by_the_task(multilabel_run, capsys):
    records, out = multilabel_run
    main(["export", str(out), "--format", "onnx", "--out", str(out / "int8.onnx"), "--trust-model-code"])
    assert "int8 (QDQ)" in capsys.readouterr().out
    x, y = PitchData().test_xy
    probs = OrtModel(out / "int8.onnx")(x)
    hot = label_targets(y, BINS).long()
    got = MultilabelAveragePrecision(num_labels=BINS, average="micro")(probs, hot).item()
    assert got == pytest.approx(records[3]["metrics"]["runtime_metric/onnxruntime"], abs=0.02)


# -- regression ---------------------------------------------------------------------------------------

def test_regression_through_every_stage(tmp_path, capsys):
    recipe = recipe_for(tmp_path, {"name": "regression"}, {"name": "import:tests.test_task_pipeline:Regressor"},
                        {"name": "import:tests.test_task_pipeline:RegressionData"},
                        compress_stages(lr=0.003, drop=0.2))
    records, out = run(recipe)
    loader = RegressionData().test_dataloader()
    for i, name in enumerate(STAGE_NAMES[:3]):
        pred, y = stage_outputs(out, i, name, loader)
        m = records[i]["metrics"]
        assert m["metric"] == m["metrics/mae"] == pytest.approx((pred[:, 0] - y).abs().mean().item(), rel=1e-5)
        assert m["metrics/r2"] == pytest.approx(torchmetrics.R2Score()(pred[:, 0], y).item(), abs=1e-5)
    assert records[1]["metrics"]["metric"] < 0.5 * records[0]["metrics"]["metric"]  # lower is better: it learnt
    control = records[3]["info"]["accuracy_control"]
    assert control["metric"] == "mae" and control["higher_is_better"] is False and control["met"]
    int8 = records[3]["metrics"]["runtime_metric/onnxruntime"]
    assert int8 - control["float_runtime_metric"] <= 0.2
    assert records[3]["metrics"]["runtime_metrics/onnxruntime/r2"] > 0.5
    main(["export", str(out), "--format", "onnx", "--out", str(out / "int8.onnx"), "--trust-model-code"])
    x, y = RegressionData().test_xy
    mae = (OrtModel(out / "int8.onnx")(x)[:, 0] - y).abs().mean().item()
    assert mae == pytest.approx(int8, rel=0.05)


# -- a user's task by import ----------------------------------------------------------------------------

def test_a_user_task_by_import_with_its_own_loss_and_metric(tmp_path):
    recipe = recipe_for(tmp_path, {"name": "import:tests.test_task_pipeline:PitchTask"},
                        {"name": "import:tests.test_task_pipeline:SigmoidTagger"},
                        {"name": "import:tests.test_task_pipeline:PitchData"},
                        compress_stages(lr=0.01)[:2], eval={"latency_repeats": 3, "latency_warmup": 1})
    records, out = run(recipe)
    loader = PitchData().test_dataloader()
    for i, name in enumerate(STAGE_NAMES[:3]):
        probs, y = stage_outputs(out, i, name, loader)
        m = records[i]["metrics"]
        assert m["metric"] == m["metrics/within1"] == pytest.approx(WithinOneBin()(probs, y).item())
        assert m["loss"] == pytest.approx(bin_bce(probs, y).item(), rel=1e-4)
    assert records[1]["metrics"]["metric"] > 0.8 > records[0]["metrics"]["metric"]


# -- distillation from sigmoid outputs --------------------------------------------------------------------

def test_sigmoid_distillation_recovers_a_pruning_drop(tmp_path):
    """Prune 3/4 of the channels of a trained sigmoid model (no fine-tuning): its mAP drops; a distill
    stage with alpha 1 (the teacher's softened sigmoids alone, no label) recovers most of the drop."""
    stages = [{"type": "train", "epochs": 8, "optimizer": {"name": "adam", "lr": 0.003}, "lr_schedule": "none"},
              {"type": "prune.structured", "ratio": 0.75, "importance": "random"},
              {"type": "distill", "distill": {"teacher": "self", "T": 1.0, "alpha": 1.0},
               "finetune": {"epochs": 6, "optimizer": {"name": "adam", "lr": 0.003}, "lr_schedule": "none"}}]
    recipe = recipe_for(tmp_path, {"name": "multilabel", "outputs": "probabilities", "label_smoothing_sigma": 1.0},
                        {"name": "import:tests.test_task_pipeline:SigmoidTagger"},
                        {"name": "import:tests.test_task_pipeline:PitchData"}, stages,
                        eval={"latency_repeats": 3, "latency_warmup": 1})
    records, _ = run(recipe)
    teacher, pruned, distilled = (records[i]["metrics"]["metric"] for i in (1, 2, 3))
    assert teacher - pruned > 0.1, (teacher, pruned)
    assert distilled - pruned > 0.5 * (teacher - pruned), (teacher, pruned, distilled)  # measured: 65%


# -- errors -------------------------------------------------------------------------------------------

def test_class_count_is_checked_only_where_the_task_has_classes(tmp_path):
    base = recipe_for(tmp_path, {"name": "regression"}, {"name": "lenet300"}, {"name": "digits"},
                      [{"type": "train", "epochs": 0}], eval={"latency_repeats": 3, "latency_warmup": 1})
    Pipeline(load_recipe(base), quiet=True).prepare()  # 10 outputs against scalar targets: the task's business
    wrong = {**base, "task": {"name": "multilabel"}, "model": {"name": "lenet300", "num_classes": 7}}
    with pytest.raises(UserError, match="model: it predicts 7 classes, the data has 10"):
        Pipeline(load_recipe(wrong), quiet=True).prepare()


# -- language model: byte-level text, a GPT-2-style transformers model ------------------------------------

GPT_NEO = {"name": "transformers", "task": "causal-lm",
           "config": {"model_type": "gpt_neo", "vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                      "attention_types": [[["global"], 2]], "max_position_embeddings": 32, "intermediate_size": 64,
                      "bos_token_id": 0, "eos_token_id": 0}}


def write_corpus(path: Path, words: int = 1200) -> Path:
    vocab = "the quick brown fox jumps over the lazy dog while a small cat sleeps on the warm mat".split()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (words,), generator=g)))
    return path


def test_language_model_through_every_stage_with_perplexity_per_stage(tmp_path, capsys):
    """Heads, MLP width and a whole block pruned (drop_layers), distilled from self; int8; exported."""
    pytest.importorskip("transformers")
    corpus = write_corpus(tmp_path / "corpus.txt")
    stages = [{"type": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 0.01}, "lr_schedule": "none"},
              {"type": "prune.structured", "ratio": 0.5, "heads": "prune", "drop_layers": ["transformer.h.1"],
               "finetune": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.005}, "lr_schedule": "none",
                            "distill": {"teacher": "self", "T": 1.0, "alpha": 0.5}}},
              {"type": "quantize", "mode": "ptq", "calibration_batches": 2, "max_metric_drop": 1.0}]
    data = {"name": "text", "files": [str(corpus)], "seq_len": 16, "batch_size": 32}
    recipe = recipe_for(tmp_path, {"name": "language-model"}, GPT_NEO, data, stages,
                        eval={"latency_repeats": 3, "latency_warmup": 1})
    records, out = run(recipe)
    from compress.data import build_datamodule
    from compress.tasks.metrics import SequencePerplexity

    loader = build_datamodule(data).test_dataloader()
    for i, name in enumerate(STAGE_NAMES[:3]):
        model = load_model(out / f"stage-{i}-{name}.ckpt", trust_model_code=True).eval()
        ppl = torchmetrics.text.Perplexity()
        with torch.no_grad():
            for x, y in loader:
                ppl.update(model(x).logits[:, :-1], y[:, 1:])
        m = records[i]["metrics"]
        assert m["metric"] == m["metrics/perplexity"] == pytest.approx(ppl.compute().item(), rel=1e-4), name
    perplexity = [r["metrics"]["metrics/perplexity"] for r in records]
    assert perplexity[1] < 0.2 * perplexity[0]  # it learnt the corpus: ~256 (uniform bytes) -> ~20
    assert records[2]["info"]["heads"] and records[2]["metrics"]["mac_speedup"] > 1.5
    assert records[2]["info"]["dropped_layers"] == ["transformer.h.1"]
    reloaded = load_model(out / "stage-3-quantize.ckpt", trust_model_code=True)
    assert len(reloaded.transformer.h) == 1 and reloaded.config.num_layers == 1
    control = records[3]["info"]["accuracy_control"]
    assert control["metric"] == "perplexity" and control["met"] and "float_runtime_accuracy" not in control
    assert control["steps"][-1]["runtime_metric"] - control["float_runtime_metric"] <= 1.0
    main(["export", str(out), "--format", "onnx", "--out", str(out / "lm.onnx"), "--trust-model-code"])
    assert "int8 (QDQ)" in capsys.readouterr().out
    x, y = next(iter(loader))
    ppl = SequencePerplexity()
    ppl.update(OrtModel(out / "lm.onnx")(x)[:, :-1].movedim(-1, 1), y[:, 1:])
    assert ppl.compute().item() == pytest.approx(perplexity[3], rel=0.1)


# -- reports: the primary metric and its direction ----------------------------------------------------

def _records(values: list[tuple[float, float]]) -> list[dict]:
    return [{"index": i, "name": f"s{i}", "type": "prune.structured" if i else "input",
             "metrics": {"metric": m, "runtime_metric/onnxruntime": m, "stored_bytes": b}}
            for i, (m, b) in enumerate(values)]


def test_compare_front_follows_the_metric_direction():
    from compress.report.html import compare_figures, stage_figures
    from compress.report.table import table_columns, terminal_columns

    runs = {"a": _records([(10.0, 4096), (12.0, 2048), (30.0, 1024)]), "b": _records([(10.0, 4096), (11.0, 1024)])}
    lower = compare_figures(runs, ("perplexity", False))["pareto_stored_bytes"]
    front = lower.data[-1]
    assert lower.layout.title.text == "Perplexity vs compressed size" and list(front.y) == [11.0, 10.0]
    higher = compare_figures(runs, ("map", True))["pareto_stored_bytes"].data[-1]
    assert list(higher.y) == [30.0]  # the smallest run is also the "best" when higher is better
    chart = stage_figures(runs["a"])["accuracy"]
    assert chart.layout.title.text == "Primary metric per stage" and [t.name for t in chart.data] == \
        ["PyTorch", "runtime onnxruntime"]
    assert table_columns(runs["a"])[2] == ("metric", "metric", "{:.4g}")
    assert terminal_columns(runs["a"][1])[0][2].key == "metric"


def test_compare_refuses_runs_of_different_tasks(tmp_path):
    from compress.report.compare import Run, check_comparable

    recipe = {"model": {"name": "m"}, "data": {"name": "d"}}
    runs = {"a": Run(tmp_path, {**recipe, "task": {"name": "regression"}}, []),
            "b": Run(tmp_path, recipe, [])}
    with pytest.raises(UserError, match=r"the runs differ in task \(a: regression \(default metric\), "
                                        r"b: classification \(default metric\)\)"):
        check_comparable(runs)


# -- whole layers dropped ---------------------------------------------------------------------------------

class Blocks(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


def test_drop_layers_removes_blocks_and_a_fresh_model_is_cut_the_same_way():
    from compress.pruning.layers import drop_layers, layer_counts, restore_layer_counts

    torch.manual_seed(0)
    model = Blocks()
    kept = [model.blocks[0], model.blocks[2]]
    assert drop_layers(model, ["blocks.1"], "k") == ["blocks.1"] and list(model.blocks) == kept
    fresh = Blocks()
    restore_layer_counts(fresh, layer_counts(model), model.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(UserError, match=r"k\[0\]: 'blocks.5' is not an item of an nn.ModuleList \(items of blocks\)"):
        drop_layers(model, ["blocks.5"], "k")
    with pytest.raises(UserError, match=r"k\[0\]: 'fc.0' is not an item of an nn.ModuleList \(the model has no"):
        drop_layers(nn.Sequential(nn.Linear(2, 2)), ["fc.0"], "k")
    with pytest.raises(UserError, match="k: every item of 'blocks' would go; keep at least one"):
        drop_layers(model, ["blocks.0", "blocks.1"], "k")
    with pytest.raises(UserError, match="ckpt: checkpoint is of another architecture \\(no layer list 'layers'\\)"):
        restore_layer_counts(fresh, {"layers": 1}, {}, "ckpt")


def test_drop_layers_is_refused_at_plan_time_in_a_recipe(tmp_path):
    recipe = recipe_for(tmp_path, {"name": "classification"}, {"name": "lenet300"}, {"name": "digits"},
                        [{"type": "prune.structured", "ratio": 0.5, "drop_layers": ["fc.0"]}])
    with pytest.raises(UserError, match=r"stages\[0\]\.drop_layers\[0\]: 'fc.0' is not an item"):
        Pipeline(load_recipe(recipe), quiet=True).prepare()


# -- the int8 gate and the runtime judged by the task -----------------------------------------------------

def test_the_int8_check_by_the_task_refuses_a_graph_worse_than_the_recipe_allows(tmp_path):
    from compress.runtime import export_onnx, ort_evaluate
    from compress.runtime.export import _check_int8_metric
    from compress.tasks import build_task

    torch.manual_seed(0)
    good, other = Regressor(), Regressor()
    x = torch.randn(64, 16)
    path = export_onnx(other.eval(), tmp_path / "other.onnx", x[:1])  # the graph computes another function
    with torch.no_grad():
        targets = good.eval()(x)[:, 0]
    task = build_task({"name": "regression"})
    with pytest.raises(UserError, match=r"export: int8 ONNX Runtime mae is .* on 64 check inputs, the PyTorch quantised "
                                        r"model's 0 \(float: 0\): more than 0.01 worse and more than max_accuracy_drop "
                                        r"0.001 below float; file not written"):
        _check_int8_metric(good, good, path, x, targets, task, max_drop=0.001)
    assert _check_int8_metric(good, good, path, x, targets, task, max_drop=100.0) > 0  # within what the recipe allows
    with pytest.raises(ValueError, match="check_targets needs the check_inputs"):
        from compress.quant import quantize_ptq

        quantized = Regressor()
        quantize_ptq(quantized, [x])
        export_onnx(quantized, tmp_path / "q.onnx", x[:1], check_targets=targets, task=task)
    with pytest.raises(UserError, match="runtime metrics: data: the test data loader yielded no batches"):
        ort_evaluate(path, [], task)


def test_a_task_with_classes_needs_a_class_dimension():
    from compress.model_setup import check_outputs
    from compress.tasks import build_task

    flat = nn.Sequential(nn.Linear(16, 1), nn.Flatten(0))  # (N,) outputs
    with pytest.raises(UserError, match=r"model.output: the logits have shape \(2,\); expected \(batch, classes, "
                                        r"...\) for task multilabel"):
        check_outputs(flat, torch.randn(2, 16), None, build_task({"name": "multilabel"}))
    check_outputs(flat, torch.randn(2, 16), None, build_task({"name": "regression"}))  # no classes: any shape


def test_the_int8_check_allows_one_flipped_prediction_of_a_small_check_set_never_more(tmp_path, monkeypatch):
    from compress.runtime import export, export_onnx
    from compress.runtime.export import _check_int8_metric
    from compress.tasks import build_task

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(16, 8).repeat(4, 1)  # 64 check inputs, 16 distinct: one of them is 6.25 points
    path = export_onnx(model, tmp_path / "m.onnx", x[:1])
    with torch.no_grad():
        targets = model(x).argmax(1)
    task = build_task(None)

    def flipped(k):  # the graph's logits with the predictions of the first k distinct inputs moved
        class Graph:
            def __init__(self, _path):
                pass

            def __call__(self, inputs):
                with torch.no_grad():
                    out = model(inputs).clone()
                wrong = (out.argmax(1) + 1) % 4
                for i in range(len(inputs)):
                    if i % 16 < k:
                        out[i, wrong[i]] = out[i].max() + 1
                return out
        return Graph

    monkeypatch.setattr(export, "OrtModel", flipped(1))
    assert _check_int8_metric(model, model, path, x, targets, task) == pytest.approx(15 / 16)
    monkeypatch.setattr(export, "OrtModel", flipped(2))
    with pytest.raises(UserError, match=r"accuracy is 0.875 on 64 check inputs.*more than 0.0625 worse"):
        _check_int8_metric(model, model, path, x, targets, task)
