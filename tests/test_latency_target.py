"""prune.structured to a latency target: allocation by latency per importance, the target reached on a
simulated profile (deterministic), ``round_to: auto``, sim metrics at the latency batch, bad input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compress.pruning.latency as latency_mod
from compress.cli import main
from compress.errors import UserError
from compress.hardware import hardware_metrics, load_profile, simulate_model
from compress.models import build_model
from compress.pruning.latency import (
    LatencyBackend,
    LatencyTable,
    LayerSpec,
    auto_alignments,
    latency_backend,
    prune_to_latency,
    resolve_round_to,
)
from compress.pruning.structured import prune_model
from compress.stages import STAGES, Context
from tests.conftest import quick_recipe

PROFILE = "jetson-tx2"


class TwoBranch(nn.Module):
    """A stem feeding two branches of equal width: a 1x1 one (memory-bound) and a 3x3 one (compute-bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.mem = nn.Conv2d(32, 32, 1)
        self.mem_out = nn.Conv2d(32, 8, 1)
        self.cmp = nn.Conv2d(32, 32, 3, padding=1)
        self.cmp_out = nn.Conv2d(32, 8, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        torch.manual_seed(0)
        w = torch.randn(32)  # the same channel norms in both branches: only latency tells them apart
        for conv in (self.mem, self.cmp):
            nn.init.ones_(conv.weight)
            with torch.no_grad():
                conv.weight.mul_(w.view(-1, 1, 1, 1) / conv.weight[0].norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        a = self.mem_out(torch.relu(self.mem(s)))
        b = self.cmp_out(torch.relu(self.cmp(s)))
        return self.fc(torch.cat([a, b], 1).mean((2, 3)))


# A device whose ridge point (20 FLOP/byte) puts a 1x1 conv (~8 FLOP/byte) under the memory roof and a
# 3x3 one (~70) under the compute roof; no cache, so every activation crosses DRAM.
SMALL_DEVICE = """name: small-device
dtype: fp32
peak_gflops: {fp32: 200}
memory_gbps: 10
on_chip_bytes: 0
lanes: 8
overhead_us: {op: 1.0}
"""


def test_allocation_prunes_where_latency_per_importance_is_cheaper(tmp_path: Path):
    device = tmp_path / "small-device.yaml"
    device.write_text(SMALL_DEVICE)
    model, x = TwoBranch().eval(), torch.randn(2, 3, 32, 32)
    sim = simulate_model(model, x[:1], [str(device)])["small-device"].by_layer()
    assert sim["mem"].bound == "memory" and sim["cmp"].bound == "compute"  # the premise of the test
    # pruning a channel of the 3x3 branch saves ~9x the FLOPs of one of the 1x1 branch, and the 1x1 branch's
    # time is mostly its input read, which pruning its outputs does not shrink
    r = prune_to_latency(model, x, torch.randn(4, 3, 32, 32), target=1.3, backend=latency_backend(str(device)),
                         round_to=8, ignore=["stem", "mem_out", "cmp_out"])
    assert r.achieved >= 1.3 * 0.95
    assert r.channels_after["cmp"] < r.channels_after["mem"]  # the compute-bound branch pays more per channel
    assert r.channels_after["stem"] == 32 and r.channels_after["mem_out"] == r.channels_after["cmp_out"] == 8


def test_target_reached_on_a_simulated_profile_deterministically():
    def run() -> dict:
        torch.manual_seed(0)
        model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
        stage = STAGES.get("prune.structured")({"latency_speedup": 1.5, "latency_on": PROFILE, "latency_batch": 8})
        stage.example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        return stage.apply(model, Context()).info

    a, b = run(), run()
    assert a == b  # simulated: the same widths and figures every time
    assert 1.5 * 0.95 <= a["latency_speedup"] <= 1.5 * 1.15
    assert a["latency_speedup_target"] == 1.5 and a["latency_on"] == PROFILE and a["latency_batch"] == 8
    assert "simulated on jetson-tx2" in a["latency_measured"]
    # read back: the simulated speedup at the latency batch agrees with what the stage reported
    torch.manual_seed(0)
    base = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    pruned = copy.deepcopy(base)
    stage = STAGES.get("prune.structured")({"latency_speedup": 1.5, "latency_on": PROFILE, "latency_batch": 8})
    stage.example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stage.apply(pruned, Context())
    x1, xb = torch.randn(1, 3, 32, 32), torch.randn(8, 3, 32, 32)
    m0, _, _ = hardware_metrics(base, x1, [PROFILE], None, xb=xb)
    m1, _, _ = hardware_metrics(pruned, x1, [PROFILE], m0, xb=xb)
    assert m0[f"sim_speedup_batch/{PROFILE}"] == 1.0 and f"sim_latency_ms/{PROFILE}" in m1  # old keys stay
    assert m1[f"sim_speedup_batch/{PROFILE}"] == pytest.approx(a["latency_speedup"], rel=1e-6)


def test_round_to_auto_picks_the_profile_lanes_and_agrees_with_the_lane_note():
    lanes = load_profile(PROFILE).lanes
    assert resolve_round_to("auto", latency_backend(PROFILE)) == lanes == 8
    assert resolve_round_to("auto", None) is None and resolve_round_to(4, latency_backend(PROFILE)) == 4
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    stage = STAGES.get("prune.structured")({"latency_speedup": 1.5, "latency_on": PROFILE, "latency_batch": 4})
    stage.example = torch.randn(2, 3, 32, 32)
    info = stage.apply(model, Context()).info
    assert info["round_to"] == lanes
    changed = {n: c for n, c in info["channels"].items() if c != info["channels_before"][n]}
    assert changed and all(c % lanes == 0 for c in changed.values())
    # the simulator's lane note names the same width round_to: auto picks
    odd = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    prune_model(odd, torch.randn(2, 3, 32, 32), ratio=0.3)
    _, _, notes = hardware_metrics(odd, torch.randn(1, 3, 32, 32), [PROFILE], None)
    lane_notes = [n for n in notes if "lanes idle" in n]
    assert lane_notes and f"round_to: {lanes} (what round_to: auto picks with latency_on: {PROFILE})" in lane_notes[0]


def test_round_to_auto_without_a_target_is_no_rounding():
    torch.manual_seed(0)
    a = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    b = copy.deepcopy(a)
    x = torch.randn(2, 3, 32, 32)
    stage = STAGES.get("prune.structured")({"ratio": 0.3})
    stage.example = x
    assert stage.config.round_to == "auto"
    info = stage.apply(a, Context()).info
    assert info["channels"] == prune_model(b, x, ratio=0.3, round_to=None).channels_after


@pytest.mark.parametrize("values, match", [
    ({"latency_speedup": 0.9, "latency_on": PROFILE}, r"latency_speedup: 0\.9 must be > 1"),
    ({"latency_speedup": 1.0, "latency_on": PROFILE}, r"latency_speedup: 1\.0 must be > 1"),
    ({"latency_speedup": 2.0, "latency_on": "jetsn-tx2"},
     r"latency_on: unknown profile 'jetsn-tx2' \(did you mean 'jetson-tx2'\?\).*runtime: torch, onnxruntime"),
    ({"latency_speedup": 2.0, "mac_speedup": 2.0}, r"not both"),
    ({"latency_speedup": 2.0, "latency_on": PROFILE, "global": True}, r"\.global: a latency_speedup target"),
    ({"latency_speedup": 2.0, "round_to": "lanes"}, r"round_to: 'lanes' is not valid"),
])
def test_bad_latency_input_names_the_key(values, match):
    with pytest.raises(UserError, match=match):
        STAGES.get("prune.structured")(values, key="stages[1]")


def test_unreachable_target_is_refused_before_pruning():
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match=r"stages\[1\]\.latency_speedup: 20.0x on jetson-tx2 cannot be reached.*"
                                        r"nothing was pruned"):
        prune_to_latency(model, torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32), target=20.0,
                         backend=latency_backend(PROFILE), round_to=8, key="stages[1]")
    after = model.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())


def test_target_missed_as_measured_says_how_far_it_got():
    sim = latency_backend(PROFILE)
    stubborn = LatencyBackend(name="stubborn", how="a runtime that never speeds up", lanes=8, deterministic=True,
                              layer_ms=sim.layer_ms, model_ms=sim.model_ms, speedup=lambda m, b, x: 1.05)
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    with pytest.raises(UserError, match=r"k\.latency_speedup: reached only 1\.05x of 1\.50x on stubborn .*MACs"):
        prune_to_latency(model, torch.randn(2, 3, 32, 32), torch.randn(4, 3, 32, 32), target=1.5, backend=stubborn,
                         round_to=8, key="k")


def test_cli_exit_2_on_an_unknown_latency_target(tmp_path: Path, capsys):
    import yaml

    recipe = quick_recipe(tmp_path)
    recipe["stages"][1] = {"type": "prune.structured", "latency_speedup": 2.0, "latency_on": "tensorrt"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main([str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "stages[1].latency_on: unknown profile 'tensorrt'" in err and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# The torch backend, the on-disk table cache, backtracking and round_to: auto's fallbacks
# ---------------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(torch.relu(self.c3(x)).mean((2, 3)))


def _flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_torch_backend_with_a_flop_timer_reaches_the_target(monkeypatch):
    """The torch backend's plumbing (tables, deployed copies, A/B speedup) with the timer replaced by a FLOP count."""
    monkeypatch.setattr(latency_mod, "latency_ms", lambda fn, **kw: _flops(fn) / 1e6)
    monkeypatch.setattr(latency_mod, "compare_latency",
                        lambda cand, base, **kw: SimpleNamespace(speedup=_flops(base) / _flops(cand)))
    backend = latency_backend("torch")
    assert backend.name == "torch" and not backend.deterministic and "eager torch" in backend.how
    torch.manual_seed(0)
    model, x = SmallNet().eval(), torch.randn(2, 3, 16, 16)
    table = LatencyTable(backend, 4, cache=False)
    r = prune_to_latency(model, x, torch.randn(4, 3, 16, 16), target=2.0, backend=backend, round_to=8, table=table)
    assert 2.0 * 0.95 <= r.achieved <= 2.0 * 1.15 and r.on == "torch" and r.round_to == 8
    assert all(c % 8 == 0 for n, c in r.channels_after.items() if n != "fc")
    assert table.measured == len(table.entries) > 0


def test_torch_backend_tables_grow_with_width_as_measured():
    """Real timing, tolerant of a shared machine: 64 channels in and out cost more than 8 (64x the MACs)."""
    table = LatencyTable(latency_backend("torch"), 4, cache=False)
    spec = LayerSpec("conv", (3, 3), (1, 1), (1, 1), (1, 1), (16, 16))
    assert table.ms(spec, 64, 64) > table.ms(spec, 8, 8)
    assert table.path is None and table.measured == 2


def _counting_backend(calls: list[str], **key) -> LatencyBackend:
    def ms(m: nn.Module, x: torch.Tensor) -> float:
        calls.append(tuple(x.shape))
        return float(sum(p.numel() for p in m.parameters()))

    return LatencyBackend(name="fake", how="counted", lanes=8, deterministic=False, layer_ms=ms, model_ms=ms,
                          speedup=lambda m, b, x: ms(b, x) / ms(m, x), cache_key={"fake": 1, **key})


def test_measured_tables_are_cached_on_disk_reused_and_keyed(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    spec = LayerSpec("conv", (3, 3), (1, 1), (1, 1), (1, 1), (8, 8))
    calls: list = []
    first = LatencyTable(_counting_backend(calls), 4)
    value = first.ms(spec, 8, 16)
    assert first.measured == 1 and len(calls) == latency_mod.MEASURED_SAMPLES  # the fastest of a few
    first.save()
    assert first.path is not None and first.path.parent == tmp_path / "latency" and first.path.exists()
    data = json.loads(first.path.read_text())
    assert data["key"]["batch"] == 4 and data["key"]["format"] == latency_mod.TABLE_FORMAT
    assert data["entries"] == {spec.as_key(8, 16, 4): value}

    calls.clear()
    again = LatencyTable(_counting_backend(calls), 4)  # same target and batch: read back, nothing measured
    assert again.ms(spec, 8, 16) == value and again.measured == 0 and calls == []
    again.save()  # nothing new: not rewritten
    assert json.loads(first.path.read_text()) == data

    other_batch = LatencyTable(_counting_backend(calls), 2)
    other_threads = LatencyTable(_counting_backend(calls, threads=2), 4)
    assert len({first.path, other_batch.path, other_threads.path}) == 3
    assert other_batch.entries == {} and other_threads.entries == {}

    first.path.write_text("{not json")  # a damaged cache is ignored, not fatal
    assert LatencyTable(_counting_backend(calls), 4).entries == {}
    assert LatencyTable(latency_backend(PROFILE), 4).path is None  # simulated tables are never stored


def test_overshoot_is_backed_off_along_the_path(monkeypatch):
    """MobileNetV2 on jetson-tx2 jumped past 2x (2.34x) when activations began to fit on chip: the whole model
    is now checked before channels go, and the allocation's path is cut where it reaches the target."""
    torch.manual_seed(0)
    base = build_model("mobilenetv2", input_shape=(3, 32, 32), num_classes=10).eval()
    model = copy.deepcopy(base)
    r = prune_to_latency(model, torch.randn(2, 3, 32, 32), torch.randn(8, 3, 32, 32), target=2.0,
                         backend=latency_backend(PROFILE), round_to="auto")
    assert 2.0 * 0.95 <= r.achieved <= 2.0 * 1.10


def test_round_to_auto_halves_the_lanes_for_narrow_groups_when_unreachable():
    """ResNet-20's first stage is 16 wide: in steps of 16 it cannot narrow; auto tries 8 for it."""
    backend = LatencyBackend(name="flops", how="counted", lanes=16, deterministic=True,
                             layer_ms=lambda m, x: _flops(lambda: m(x)), model_ms=lambda m, x: _flops(lambda: m(x)),
                             speedup=lambda m, b, x: _flops(lambda: b(x)) / _flops(lambda: m(x)))
    assert auto_alignments(backend) == [(16, None), (16, 8), (8, None)]
    torch.manual_seed(0)
    model = build_model("resnet20", input_shape=(3, 32, 32), num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(UserError, match="round_to 16"):  # the premise: not in steps of 16 everywhere
        prune_to_latency(copy.deepcopy(model), x, x, target=4.0, backend=backend, round_to=16)
    r = prune_to_latency(model, x, x, target=4.0, backend=backend, round_to="auto")
    assert (r.round_to, r.small_round_to) == (16, 8) and r.achieved >= 4.0 * 0.95
    assert r.channels_after["conv1"] == 8 and r.as_dict()["small_round_to"] == 8
