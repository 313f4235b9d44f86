"""Models whose inputs are a mapping of tensors and whose outputs are a structure, in every stage.

A plain-torch model takes keyword arguments and returns a dict (``model.output`` names the logits);
a user's LightningDataModule serves ``({"points", "scale"}, labels)`` batches; a Hugging Face BERT
(built from a config) takes ``{"input_ids", "attention_mask"}`` and returns a ``ModelOutput``.
"""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from compress.batches import batch_size, call, cat, eval_mode, forward, logits_of, repeat_to, set_output, take
from compress.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# -- the rule --------------------------------------------------------------------------------------
class _Output(collections.OrderedDict):
    """What a Hugging Face ModelOutput is: an ordered dict whose fields are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


Pair = collections.namedtuple("Pair", ["features", "scores"])


def test_the_logits_rule_for_each_output_form():
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    assert logits_of(a) is a
    assert logits_of({"hidden": b, "logits": a}) is a  # the `logits` key wins over order
    assert logits_of(_Output(loss=None, logits=a)) is a
    assert logits_of((a, b)) is a and logits_of([a, b]) is a  # return_dict=False: logits first
    assert logits_of({"only": a}) is a  # the one tensor of a mapping
    assert logits_of({"pred": a, "aux": b}, "aux") is b  # model.output names a key
    assert logits_of((b, a), 1) is a and logits_of((b, a), "1") is a  # or a tuple index (a YAML string too)
    assert logits_of(Pair(b, a), "scores") is a  # or a namedtuple field
    with pytest.raises(UserError, match=r"^model.output: cannot tell .* \(a dict with keys pred, aux\); set model.output"):
        logits_of({"pred": a, "aux": b})
    with pytest.raises(UserError, match=r"^model.output: the model's output has no field 'nope' \(a dict with keys pred"):
        logits_of({"pred": a}, "nope")
    with pytest.raises(UserError, match=r"no field 2 \(a tuple of 2\)"):
        logits_of((a, b), 2)


def test_mapping_inputs_are_keyword_arguments_and_batch_helpers_keep_the_form():
    seen = {}

    class Keywords(nn.Module):
        def forward(self, points, scale):
            seen.update(points=points.shape, scale=scale.shape)
            return {"pred": points * scale}

    x = {"points": torch.arange(6.0).reshape(3, 2), "scale": torch.tensor([[1.0], [2.0], [3.0]])}
    model = set_output(Keywords(), "pred")
    assert torch.equal(forward(model, x), torch.tensor([[0.0, 1.0], [4.0, 6.0], [12.0, 15.0]]))
    assert seen == {"points": (3, 2), "scale": (3, 1)}
    assert call(nn.Identity(), x["points"]) is x["points"]
    assert batch_size(x) == 3
    assert torch.equal(take(x, 1)["scale"], torch.tensor([[1.0]]))
    five = repeat_to(x, 5)  # cycled: samples 0, 1, 2, 0, 1
    assert torch.equal(five["scale"].flatten(), torch.tensor([1.0, 2.0, 3.0, 1.0, 2.0]))
    assert torch.equal(cat([take(x, 1), take(x, 2)])["points"], torch.tensor([[0.0, 1.0], [0.0, 1.0], [2.0, 3.0]]))
    assert torch.equal(cat([(x["points"],), (x["points"],)])[0], torch.cat([x["points"]] * 2))
    set_output(model, None)
    assert forward(model, x) is not None  # the one tensor of the dict


# -- a user's keyword model and data module through every stage ----------------------------------
class KeywordNet(nn.Module):
    """``forward(points=..., scale=...) -> {"pred": logits, "embedding": features}``."""

    def __init__(self, num_classes: int = 3, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, num_classes)

    def forward(self, points: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(torch.cat([points, scale], 1))
        return {"embedding": h, "pred": self.head(h)}


class KeywordData(pl.LightningDataModule):
    """Clusters in 2-D served as ``({"points": (B, 2), "scale": (B, 1)}, labels)``."""

    def __init__(self, n: int = 600, classes: int = 3, batch_size: int = 32):
        super().__init__()
        self.n, self.num_classes, self.batch_size = n, classes, batch_size

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(self.num_classes, 2, generator=g) * 4
        y = torch.randint(0, self.num_classes, (self.n,), generator=g)
        s = torch.rand(self.n, 1, generator=g) + 0.5
        p = (centers[y] + torch.randn(self.n, 2, generator=g) * 0.5) * s
        rows = [({"points": p[i], "scale": s[i]}, y[i]) for i in range(self.n)]
        self.train_rows, self.test_rows = rows[: self.n // 2], rows[self.n // 2:]

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.test_rows, batch_size=64)


def _keyword_recipe(tmp_path, stages, **over):
    from tests.conftest import quick_recipe

    return quick_recipe(tmp_path, model={"name": "import:tests.test_batches:KeywordNet", "output": "pred"},
                        data={"name": "import:tests.test_batches:KeywordData"}, hardware=["cpu-local"],
                        eval={"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]},
                        stages=stages, **over)


def test_keyword_inputs_and_dict_outputs_run_train_prune_share_distill_and_onnxruntime(tmp_path):
    from compress.checkpoint import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = _keyword_recipe(tmp_path, [
        {"type": "train", "epochs": 4, "optimizer": {"lr": 0.1}},
        {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 1, "optimizer": {"lr": 0.01}}},
        {"type": "share", "bits": 4, "finetune": {"epochs": 1, "optimizer": {"lr": 0.001},
                                                  "distill": {"teacher": "self", "T": 2.0, "alpha": 0.5}}},
    ])
    pipeline = Pipeline(load_recipe(recipe), quiet=True)
    records = pipeline.run()
    trained, pruned, shared = (r["metrics"] for r in records[1:])
    assert pipeline.spec["output"] == "pred" and pipeline.spec["kwargs"] == {"num_classes": 3}
    assert trained["accuracy"] > 0.9  # separable clusters: learnt through keyword inputs and dict outputs
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert shared["accuracy"] > 0.85
    for m in (trained, pruned, shared):  # ONNX Runtime ran the graph on named inputs, same predictions
        assert m["runtime_accuracy/onnxruntime"] == pytest.approx(m["accuracy"], abs=0.01)
        assert m["macs"] == 3 * 32 + 32 * 32 + 32 * 3  # per sample: the three Linear layers
    # the checkpoint rebuilds the model with its output field; same logits in a fresh load
    data = KeywordData()
    data.setup()
    x = torch.utils.data.default_collate([r[0] for r in data.test_rows[:16]])
    loaded = load_model(tmp_path / "run" / "stage-3-share.ckpt")
    assert loaded.compress_output == "pred"
    from compress.metrics import evaluate_accuracy

    assert evaluate_accuracy(loaded, data.test_dataloader())["accuracy"] == shared["accuracy"]
    out = subprocess.run([sys.executable, "run.py", "export", str(tmp_path / "run"), "--format", "onnx"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from compress.runtime import OrtModel

    session = OrtModel(tmp_path / "run" / "model.onnx")
    assert session.input_names == ["points", "scale"]
    assert torch.allclose(session(x), forward(loaded, x), atol=1e-4)


def test_keyword_model_quantised_int8_in_onnxruntime(tmp_path):
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = _keyword_recipe(tmp_path, [{"type": "train", "epochs": 3, "optimizer": {"lr": 0.1}},
                                        {"type": "quantize", "mode": "ptq", "calibration_batches": 4}])
    records = Pipeline(load_recipe(recipe), quiet=True).run()
    q = records[-1]["metrics"]
    assert q["precision"] == "int8"
    assert q["runtime_accuracy/onnxruntime"] >= records[1]["metrics"]["accuracy"] - 0.05


@pytest.mark.parametrize("output, message", [
    ("embeddings", r"^model.output: the model's output has no field 'embeddings' \(a dict with keys embedding, pred\)"),
    ("embedding", r"^model: it predicts 32 classes \(model.output 'embedding'\), the data has 3; .*, or model.output"),
])
def test_a_wrong_output_field_is_one_line_before_any_training(tmp_path, output, message):
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = _keyword_recipe(tmp_path, [{"type": "train", "epochs": 1}])
    recipe["model"]["output"] = output
    pipeline = Pipeline(load_recipe(recipe), quiet=True)
    with pytest.raises(UserError, match=message):
        pipeline.run()
    assert not list((tmp_path / "run").glob("*.ckpt"))


def test_model_output_errors_exit_2_from_the_cli(tmp_path):
    import yaml

    recipe = _keyword_recipe(tmp_path, [{"type": "train", "epochs": 1}])
    recipe["model"]["output"] = [1, 2]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "run.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: model.output: [1, 2] must be a field name (logits) or a tuple index (0)"]
    recipe["model"] = {"name": "import:tests.test_batches:KeywordNet", "output": "pred", "num_classes": 5}
    path.write_text(yaml.safe_dump(recipe))
    out = subprocess.run([sys.executable, "run.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: model: it predicts 5 classes (model.output 'pred'), the data has 3; set model.num_classes: 3 (or the "
        "model's own argument for it), or model.output to the field that holds the logits"]


def test_tuple_outputs_train_and_distil_from_the_first_element():
    from compress.distill import DistillationObjective
    from compress.metrics import evaluate_accuracy

    class TupleNet(nn.Module):  # return_dict=False style: (logits, hidden)
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            return self.fc(x), x

    torch.manual_seed(0)
    student, teacher = TupleNet(), TupleNet()
    x, y = torch.randn(8, 2), torch.randint(0, 3, (8,))
    loader = [(x, y)]
    expected = (student.fc(x).argmax(1) == y).float().mean().item()
    assert evaluate_accuracy(student, loader)["accuracy"] == pytest.approx(expected)
    objective = DistillationObjective(student, teacher, T=2.0, alpha=1.0, example_inputs=x)
    loss, logits, _ = objective(student, x, y)
    assert torch.equal(logits, student.fc(x))
    p_t = torch.softmax(teacher.fc(x) / 2.0, 1)
    by_hand = (p_t * (p_t.log() - torch.log_softmax(student.fc(x) / 2.0, 1))).sum(1).mean() * 4.0
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


# -- synthetic tokens -------------------------------------------------------------------------------
def test_tokens_follow_their_rule_and_padding_is_masked():
    from compress.data import build_datamodule, describe

    dm = build_datamodule({"name": "tokens", "vocab_size": 13, "seq_len": 10, "min_len": 3, "classes": 3}, seed=2)
    dm.setup()
    (x, y) = next(iter(dm.test_dataloader()))
    assert describe(dm) == ({"input_ids": (10,), "attention_mask": (10,)}, 3, 32)
    for ids, mask, label in zip(x["input_ids"].tolist(), x["attention_mask"].tolist(), y.tolist(), strict=True):
        n = sum(mask)
        assert 3 <= n <= 10 and mask == [1] * n + [0] * (10 - n) and ids[n:] == [0] * (10 - n)
        assert all(1 <= t <= 12 for t in ids[:n])
        counts = [sum(1 for t in ids[:n] if band * 4 < t <= (band + 1) * 4) for band in range(3)]  # ids 1-4, 5-8, 9-12
        assert label == counts.index(max(counts))
    again = build_datamodule({"name": "tokens", "vocab_size": 13, "seq_len": 10, "min_len": 3, "classes": 3}, seed=2)
    again.setup()
    assert torch.equal(next(iter(again.test_dataloader()))[0]["input_ids"], x["input_ids"])
    with pytest.raises(UserError, match=r"^data.seq_len: 3 must be >= data.min_len \(4\)"):
        build_datamodule({"name": "tokens", "seq_len": 3})


# -- Hugging Face ---------------------------------------------------------------------------------
BERT = {"model_type": "bert", "vocab_size": 32, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 16}


def test_hugging_face_bert_from_a_config_runs_a_recipe_on_token_tensors(tmp_path):
    pytest.importorskip("transformers")
    from compress.checkpoint import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    recipe = quick_recipe(
        tmp_path, model={"name": "transformers", "config": BERT},
        data={"name": "tokens", "vocab_size": 32, "seq_len": 12, "train_size": 768, "batch_size": 32},
        eval={"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]}, hardware=["cpu-local"],
        stages=[{"type": "train", "epochs": 5, "optimizer": {"name": "adamw", "lr": 0.003}},
                {"type": "prune.structured", "ratio": 0.5, "heads": "prune",
                 "finetune": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.001}}},
                {"type": "prune.unstructured", "sparsity": 0.5,
                 "finetune": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.0005},
                              "distill": {"teacher": "self", "T": 2.0, "alpha": 0.5}}},
                {"type": "share", "bits": 6}])
    records = Pipeline(load_recipe(recipe), quiet=True).run()
    trained, heads, pruned, shared = (r["metrics"] for r in records[1:])
    assert records[2]["info"]["heads"] == {"bert.encoder.layer.0.attention.self": 1}  # 2 heads -> 1
    assert heads["params"] < trained["params"] and heads["mac_speedup"] > 1.5
    assert trained["accuracy"] > 0.8  # chance is ~0.6 (two bands, the larger class)
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01) and pruned["accuracy"] > 0.7
    assert shared["compression_ratio"] > pruned["compression_ratio"] > 1.0
    for m in (trained, heads, pruned, shared):
        assert m["runtime_accuracy/onnxruntime"] == pytest.approx(m["accuracy"], abs=0.01)
    from compress.data import build_datamodule

    dm = build_datamodule(recipe["data"])
    dm.setup()
    loaded = load_model(tmp_path / "run" / "stage-4-share.ckpt")
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert loaded.bert.encoder.layer[0].attention.self.attention_head_size == 16  # a whole head of 16 went
    from compress.metrics import evaluate_accuracy

    assert evaluate_accuracy(loaded, dm.test_dataloader())["accuracy"] == shared["accuracy"]


def test_transformers_factory_loads_a_local_folder_and_says_what_is_wrong(tmp_path):
    transformers = pytest.importorskip("transformers")
    from compress.models import build_model

    source = build_model("transformers", config=BERT, num_classes=3)
    source.save_pretrained(tmp_path / "bert")
    loaded = build_model("transformers", pretrained=str(tmp_path / "bert"), num_classes=3)
    assert isinstance(loaded, transformers.BertForSequenceClassification) and loaded.config.num_labels == 3
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(UserError, match=r"^model: give either model.pretrained .* not neither"):
        build_model("transformers")
    with pytest.raises(UserError, match=r"^model: give either .* not both"):
        build_model("transformers", pretrained="x", config=BERT)
    with pytest.raises(UserError, match=r"^model.task: unknown task 'summarize'"):
        build_model("transformers", task="summarize", config=BERT)
    with pytest.raises(UserError, match=r"^model.config.model_type: required"):
        build_model("transformers", config={"hidden_size": 8})
    with pytest.raises(UserError, match=r"^model.pretrained: cannot load '.*nowhere'"):
        build_model("transformers", pretrained=str(tmp_path / "nowhere"))


def test_hugging_face_bert_quantised_int8_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("transformers")
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    recipe = quick_recipe(
        tmp_path, model={"name": "transformers", "config": BERT},
        data={"name": "tokens", "vocab_size": 32, "seq_len": 12, "train_size": 768, "batch_size": 32},
        eval={"latency_repeats": 3, "latency_warmup": 1, "runtimes": ["onnxruntime"]},
        stages=[{"type": "train", "epochs": 4, "optimizer": {"name": "adamw", "lr": 0.003}},
                {"type": "quantize", "mode": "ptq", "calibration_batches": 4}])
    records = Pipeline(load_recipe(recipe), quiet=True).run()
    trained, q = records[1]["metrics"], records[2]["metrics"]
    assert q["precision"] == "int8" and q["stored_bytes"] < trained["stored_bytes"] / 2
    assert q["runtime_accuracy/onnxruntime"] >= trained["runtime_accuracy/onnxruntime"] - 0.05
    assert q["runtime_bytes/onnxruntime"] < trained["runtime_bytes/onnxruntime"] / 2  # int8 weights in the file


def test_eval_mode_puts_back_the_mode_the_model_was_in_also_after_an_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    for start in (True, False):
        model.train(start)
        with eval_mode(model) as inside:
            assert inside is model and not model.training and not model[1].training
        assert model.training is start and model[1].training is start
    model.train()
    with pytest.raises(ValueError, match="inside"), eval_mode(model):
        raise ValueError("inside")
    assert model.training and model[1].training
