"""Hardware profiles and the roofline simulator: hand-computed layers, formats, fusion, errors, pipeline.

Every profile here is a fixed file written by the test (or a shipped one with fixed figures);
nothing depends on how fast this machine is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from compress.errors import UserError
from compress.hardware import PROFILES, check_profiles, hardware_metrics, load_profile, simulate_model
from compress.hardware.roofline import nm_compliant
from compress.pruning.masks import set_mask

# A plain roofline device: 100 GFLOP/s, 10 GB/s, no buffer, 1 us per op, nothing exploited.
PLAIN = {"name": "plain", "dtype": "fp32", "peak_gflops": {"fp32": 100.0}, "memory_gbps": 10.0,
         "overhead_us": {"op": 1.0}}


def write_profile(tmp_path: Path, name: str = "plain", **over) -> str:
    data = json.loads(json.dumps(PLAIN))
    for k, v in over.items():
        data[k] = v
    data["name"] = name
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def one_layer(sims, profile: str = "plain"):
    (op,) = [o for o in sims[profile].ops if o.kind in ("conv", "matmul")]
    return op


# -- a single layer by hand ------------------------------------------------------------------
def test_compute_bound_layer_matches_hand_computation(tmp_path):
    fc = nn.Linear(256, 256, bias=False)
    x = torch.randn(512, 256)  # (B, K)
    sims = simulate_model(fc, x, [write_profile(tmp_path)])
    flops = 2 * 512 * 256 * 256
    bytes_ = (512 * 256 + 512 * 256 + 256 * 256) * 4  # input, output, weight at fp32
    compute_us, memory_us = flops / 100e9 * 1e6, bytes_ / 10e9 * 1e6
    op = one_layer(sims)
    assert op.flops == flops and op.dram_bytes == bytes_
    assert op.bound == "compute" and compute_us > memory_us
    assert op.time_us == pytest.approx(compute_us + 1.0)
    assert sims["plain"].latency_us == pytest.approx(compute_us + 1.0)  # the only op, no module overhead


def test_memory_bound_layer_matches_hand_computation(tmp_path):
    fc = nn.Linear(256, 256, bias=False)
    sims = simulate_model(fc, torch.randn(1, 256), [write_profile(tmp_path)])
    flops = 2 * 256 * 256
    bytes_ = (256 + 256 + 256 * 256) * 4
    op = one_layer(sims)
    assert op.bound == "memory"
    assert op.compute_us == pytest.approx(flops / 100e9 * 1e6)
    assert op.time_us == pytest.approx(bytes_ / 10e9 * 1e6 + 1.0)


def test_activations_held_on_chip_leave_dram_traffic_to_weights(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False))
    x = torch.randn(1, 64)
    off = simulate_model(model, x, [write_profile(tmp_path)])["plain"]
    on = simulate_model(model, x, [write_profile(tmp_path, "chip", on_chip_bytes=1 << 20)])["chip"]
    # the two intermediate activations (64 floats each: written, then read) stay on chip
    assert sum(o.dram_bytes for o in off.ops) - sum(o.dram_bytes for o in on.ops) == 2 * 2 * 64 * 4
    assert on.latency_us < off.latency_us


# -- what compression changes ------------------------------------------------------------------
def test_structured_pruning_lowers_compute_and_bytes(tmp_path):
    from compress.pruning.structured import prune_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10)).eval()
    x = torch.randn(1, 3, 8, 8)
    path = write_profile(tmp_path)
    before = simulate_model(model, x, [path])["plain"]
    prune_model(model, x, importance="l1", ratio=0.5)
    after = simulate_model(model, x, [path])["plain"]
    for name in ("0", "3"):  # both convs: half the filters, so fewer FLOPs and fewer bytes each
        b = next(o for o in before.ops if o.name == name)
        a = next(o for o in after.ops if o.name == name)
        assert a.flops < b.flops and a.dram_bytes < b.dram_bytes and a.weight_bytes < b.weight_bytes
    assert after.latency_us < before.latency_us


def sparse_linear(density_mask: torch.Tensor) -> nn.Linear:
    torch.manual_seed(0)
    fc = nn.Linear(density_mask.shape[1], density_mask.shape[0], bias=False)
    set_mask(fc, density_mask)
    return fc


def test_unstructured_sparsity_changes_nothing_without_support_and_lowers_bytes_with_csr(tmp_path):
    torch.manual_seed(0)
    mask = torch.rand(128, 256) < 0.25  # ~75% zeros
    sparse = sparse_linear(mask)
    dense = nn.Linear(256, 128, bias=False)
    x = torch.randn(1, 256)
    plain = write_profile(tmp_path)
    csr = write_profile(tmp_path, "csr", sparsity={"unstructured": {"format": "csr", "efficiency": 1.0,
                                                                       "index_bits": 4}})
    d, s = simulate_model(dense, x, [plain])["plain"], simulate_model(sparse, x, [plain])["plain"]
    assert s.latency_us == d.latency_us
    assert one_layer({"p": s}, "p").weight_bytes == one_layer({"p": d}, "p").weight_bytes == 128 * 256 * 4

    op = one_layer(simulate_model(sparse, x, [csr]), "csr")
    nnz = int(mask.sum())
    assert op.weight_format == "csr"
    assert op.weight_bytes == pytest.approx(nnz * (32 + 4) / 8 + (128 + 1) * 4)
    assert op.flops == pytest.approx(2 * 256 * 128 * nnz / mask.numel())
    assert op.weight_bytes < 128 * 256 * 4


def test_csr_is_not_chosen_when_indices_cost_more_than_the_zeros_save(tmp_path):
    sparse = sparse_linear(torch.rand(128, 256) < 0.95)  # 5% zeros
    csr = write_profile(tmp_path, "csr", sparsity={"unstructured": {"format": "csr", "index_bits": 16}})
    assert one_layer(simulate_model(sparse, torch.randn(1, 256), [csr]), "csr").weight_format == "dense"


def test_weight_sharing_lowers_weight_bytes_by_the_bit_ratio_where_supported(tmp_path):
    from compress.sharing.shared import share_layer

    torch.manual_seed(0)
    fc = nn.Linear(256, 128, bias=False)
    share_layer(fc, bits=4)
    x = torch.randn(1, 256)
    shared = write_profile(tmp_path, "shared", weight_sharing=True)
    plain = write_profile(tmp_path)
    sims = simulate_model(fc, x, [shared, plain])
    n = 128 * 256
    op = one_layer(sims, "shared")
    assert op.weight_format == "shared4"
    assert op.weight_bytes == pytest.approx(n * 4 / 8 + 2 ** 4 * 4)  # 4-bit indices + a 16-entry fp32 codebook
    assert one_layer(sims, "plain").weight_bytes == n * 4
    assert one_layer(sims, "plain").weight_bytes / op.weight_bytes == pytest.approx(32 / 4, rel=0.01)


def test_two_four_sparsity_pays_only_for_layers_whose_mask_is_two_four(tmp_path):
    gpu = write_profile(tmp_path, "gpu", sparsity={"nm": "2:4"})
    x = torch.randn(1, 64)
    two_four = torch.tensor([1, 0, 1, 0], dtype=torch.bool).repeat(32, 16)  # (32, 64): 2 of every 4
    other = torch.zeros(32, 64, dtype=torch.bool)
    other[:, :32] = True  # also 50% zeros, but 4 of 4 kept in half the groups
    assert nm_compliant(two_four.float(), 2, 4) and not nm_compliant(other.float(), 2, 4)
    ok = one_layer(simulate_model(sparse_linear(two_four), x, [gpu]), "gpu")
    no = one_layer(simulate_model(sparse_linear(other), x, [gpu]), "gpu")
    assert ok.weight_format == "2:4" and ok.flops == pytest.approx(2 * 64 * 32 / 2)
    assert ok.weight_bytes == pytest.approx(32 * 64 / 2 * (32 + 2) / 8)  # kept values + 2-bit positions
    assert no.weight_format == "dense" and no.weight_bytes == 32 * 64 * 4



def test_n_m_groups_run_along_the_input_dim_of_linear_and_conv_weights():
    # a linear (O, I): groups of 4 along I; fully dense groups break 2:4, half-zero ones keep it
    assert not nm_compliant(torch.ones(3, 8), 2, 4)
    assert nm_compliant(torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(3, 2), 2, 4)  # 3 rows: not a multiple of 4
    assert not nm_compliant(torch.ones(4, 6), 2, 4)  # I = 6 is no whole number of groups
    assert not nm_compliant(torch.ones(8), 2, 4)  # a vector has no input dim to group along
    # a conv (O, I, kh, kw) and a conv1d (O, I, k): the groups run along I at each kernel position, so
    # input channels 0-1 on and 2-3 off comply, although each channel's kernel row is all non-zero
    conv = torch.zeros(1, 4, 1, 4)
    conv[0, :2] = 1.0
    assert nm_compliant(conv, 2, 4) and nm_compliant(conv[:, :, 0], 2, 4)
    # and the transpose of that pattern (every channel half on, along its kernel row) does not
    across = torch.zeros(1, 4, 1, 4)
    across[0, :, 0, :2] = 1.0
    assert not nm_compliant(across, 2, 4) and not nm_compliant(across[:, :, 0], 2, 4)

# -- the traced graph and fusion ------------------------------------------------------------------
class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn(self.conv(x)))
        return torch.cat([x + y, y], dim=1).mean((2, 3))


def test_trace_counts_residual_adds_concatenations_and_activations(tmp_path):
    sim = simulate_model(Branchy().eval(), torch.randn(1, 4, 8, 8), [write_profile(tmp_path)])["plain"]
    ops = {o.op for o in sim.ops}
    assert {"conv2d", "batch_norm", "relu", "add", "cat", "mean"} <= ops
    add = next(o for o in sim.ops if o.op == "add")
    assert add.name == "add" and add.dram_bytes == 3 * 4 * 8 * 8 * 4  # two inputs, one output


def test_fusion_runs_conv_bn_relu_as_one_op_and_saves_its_traffic(tmp_path):
    x = torch.randn(1, 4, 8, 8)
    plain = simulate_model(Branchy().eval(), x, [write_profile(tmp_path)])["plain"]
    fused = simulate_model(Branchy().eval(), x, [write_profile(
        tmp_path, "fused", fusion={"conv_bn_act": True, "elementwise": False})])["fused"]
    conv = next(o for o in fused.ops if o.name == "conv")
    assert conv.op == "conv2d+batch_norm+relu" and conv.fused == ["bn", "relu"]
    assert len(fused.ops) == len(plain.ops) - 2
    assert sum(o.dram_bytes for o in fused.ops) < sum(o.dram_bytes for o in plain.ops)
    assert any(o.op == "add" for o in fused.ops)  # element-wise fusion is off: the add stays


# -- profiles: shipped, user files, errors -----------------------------------------------------
FIXED_CPU = {"peak_gflops.fp32": 50.0, "memory_gbps": 20.0, "on_chip_gbps": 40.0, "on_chip_bytes": 1 << 22,
             "lanes": 8, "overhead_us.op": 1.0, "overhead_us.view": 0.5, "overhead_us.module": 1.0,
             "overhead_us.matmul": 3.0, "overhead_us.conv": 8.0, "overhead_us.grouped_conv": 20.0,
             "efficiency.conv": 0.5, "efficiency.grouped_conv": 0.05, "efficiency.pool": 0.01}


@pytest.fixture
def fixed_cpu(tmp_path, monkeypatch):
    """cpu-local with fixed figures: a calibration that measures nothing, cached under tmp_path."""
    import compress.hardware.calibrate as cal

    calls = []
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cal, "measure_cpu", lambda: calls.append(1) or dict(FIXED_CPU))
    monkeypatch.setattr(cal, "_busy", lambda threads: False)
    return calls


@pytest.mark.parametrize("name", PROFILES.names())
def test_every_shipped_profile_loads_and_simulates(name, fixed_cpu):
    import math

    from compress.hardware import trace_ops

    profile = load_profile(name)
    assert profile.name == name and profile.peak_flops > 0 and profile.memory_gbps > 0
    model, x = Branchy().eval(), torch.randn(1, 4, 8, 8)
    sim = simulate_model(model, x, [profile])[name]
    # the roofline from first principles, op by op, on the profile's own figures
    chip_gbps = profile.on_chip_gbps or math.inf
    for o in sim.ops:
        assert o.memory_us == pytest.approx(o.dram_bytes / (profile.memory_gbps * 1e3) + o.chip_bytes / (chip_gbps * 1e3))
        assert o.time_us == pytest.approx(max(o.compute_us, o.memory_us) + o.overhead_us)
        expected = "overhead" if o.overhead_us >= max(o.compute_us, o.memory_us) else \
            ("compute" if o.compute_us >= o.memory_us else "memory")
        assert o.bound == expected, o
    conv = next(o for o in sim.ops if o.name == "conv")
    # 4 -> 4 channels, 3x3, 8x8 outputs: 2 * 4*4*9*64 FLOPs, at most at the profile's peak
    assert conv.compute_us >= 2 * 4 * 4 * 9 * 64 / profile.peak_flops * 1e6 * (1 - 1e-9)
    framework = trace_ops(model, x).module_calls * profile.overhead_us.module
    assert sim.latency_us == pytest.approx(sum(o.time_us for o in sim.ops) + framework)
    assert sim.latency_us >= conv.time_us + profile.overhead_us.op * (len(sim.ops) - 1) * (1 - 1e-9) > 0


def test_shipped_profiles_cover_the_issue():
    assert {"cpu-local", "jetson-tx2", "tpu-v1", "edge-npu-int8"} <= set(PROFILES.names())
    assert any(load_profile(n, calibrate=False).sparsity.nm == "2:4" for n in PROFILES.names())
    tpu = load_profile("tpu-v1")
    assert tpu.peak_gflops.int8 == 92000 and tpu.on_chip_bytes == 28 * 2 ** 20
    for name in PROFILES.names():  # each cites its public figures in a comment
        assert "#" in PROFILES.get(name).read_text().splitlines()[0]


def test_cpu_local_calibration_is_cached_per_thread_count(fixed_cpu, tmp_path):
    from compress.hardware.calibrate import cache_path

    a = load_profile("cpu-local")
    b = load_profile("cpu-local")
    assert len(fixed_cpu) == 1 and a.peak_gflops.fp32 == b.peak_gflops.fp32 == 50.0
    assert cache_path().is_file() and str(cache_path()).startswith(str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        load_profile("cpu-local")
    finally:
        torch.set_num_threads(threads)
    assert len(fixed_cpu) == 2  # another key: measured again


def test_calibration_taken_on_a_busy_machine_is_redone_once_it_is_idle(fixed_cpu, monkeypatch):
    import compress.hardware.calibrate as cal

    monkeypatch.setattr(cal, "_busy", lambda threads: True)
    assert "busy" in load_profile("cpu-local").description
    load_profile("cpu-local")
    assert len(fixed_cpu) == 1  # still busy: the cached figures are the best there are
    monkeypatch.setattr(cal, "_busy", lambda threads: False)
    assert "busy" not in load_profile("cpu-local").description
    assert len(fixed_cpu) == 2


def test_unknown_profile_names_the_key_and_the_nearest(tmp_path):
    with pytest.raises(UserError, match=r"^hardware\[1\]: unknown profile 'jetson-tx' \(did you mean 'jetson-tx2'\?\); "
                                        r"shipped: .*tpu-v1") as e:
        check_profiles(["cpu-local", "jetson-tx"], "hardware")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, field", [
    ({"peak_gflops": {"fp32": "fast"}}, "peak_gflops.fp32"),
    ({"memory_gbps": -1}, "memory_gbps"),
    ({"dtype": "fp64"}, "dtype"),
    ({"bandwidth": 10}, "bandwidth"),
    ({"sparsity": {"nm": "4:2"}}, "sparsity.nm"),
    ({"sparsity": {"unstructured": {"format": "coo"}}}, "sparsity.unstructured.format"),
])
def test_malformed_profile_file_is_one_line_naming_file_and_field(tmp_path, content, field):
    path = Path(write_profile(tmp_path, "bad"))
    data = yaml.safe_load(path.read_text())
    for k, v in content.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError) as e:
        check_profiles([str(path)], "hardware")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"hardware[0]: {path}: {field}")


def test_missing_and_unparsable_profile_files(tmp_path):
    with pytest.raises(UserError, match=r"hardware\[0\]: profile file '.*nope.yaml' not found"):
        check_profiles([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "broken.yaml"
    bad.write_text("peak_gflops: {fp32: 1\n")
    with pytest.raises(UserError, match=r"broken.yaml:\d+:\d+: YAML syntax error"):
        check_profiles([str(bad)])


def test_cli_malformed_profile_exits_2_with_one_line(tmp_path, capsys):
    from compress.cli import main
    from tests.conftest import quick_recipe

    bad = tmp_path / "dev.yaml"
    bad.write_text("name: dev\ndtype: fp32\npeak_gflops: {fp32: 10}\n")  # no memory_gbps
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(quick_recipe(tmp_path, hardware=["jetson-tx2", str(bad)])))
    assert main([str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"error: hardware[1]: {bad}: memory_gbps: required")


# -- the pipeline's contract -------------------------------------------------------------------
def test_hardware_metrics_contract(tmp_path, fixed_cpu):
    from compress.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10).eval()
    x1 = torch.randn(1, 1, 8, 8)
    profiles = ["cpu-local", "jetson-tx2"]
    base, layers, notes = hardware_metrics(model, x1, profiles, None)
    alone = simulate_model(model, x1, profiles)  # a second path: no baseline, no metrics dict
    assert base["sim_speedup"] == base["sim_speedup/cpu-local"] == 1.0
    assert base["sim_latency_ms"] == base["sim_latency_ms/cpu-local"] == pytest.approx(alone["cpu-local"].latency_ms)
    for p in profiles:
        sim = alone[p]
        assert base[f"sim_latency_ms/{p}"] == pytest.approx(sim.latency_ms)
        memory = sum(o.time_us for o in sim.ops if o.bound == "memory") / sim.latency_us
        overhead = (sum(o.overhead_us for o in sim.ops) + sim.framework_us) / sim.latency_us
        assert base[f"sim_memory_bound_share/{p}"] == pytest.approx(memory)
        assert base[f"sim_overhead_share/{p}"] == pytest.approx(overhead)
        slowest = sorted((o.time_us for o in sim.ops), reverse=True)[:5]
        assert [b["time_us"] for b in base[f"sim_bottlenecks/{p}"]] == pytest.approx(slowest, abs=1e-3)
    assert set(layers["features.0"]) == set(profiles)
    assert layers["features.0"]["jetson-tx2"]["fused"] == ["features.1"]  # linear + ReLU
    assert any(n.startswith("cpu-local: this machine") for n in notes)

    half = torch.zeros(300, 64, dtype=torch.bool)
    half[:150] = True  # structured in effect: half the rows of the first layer are zero
    set_mask(model.features[0], half)
    after, _, notes = hardware_metrics(model, x1, profiles, base)
    # neither profile has sparse kernels (sparsity format none, no N:M): the zeros are computed anyway
    assert after["sim_speedup/jetson-tx2"] == after["sim_speedup/cpu-local"] == after["sim_speedup"] == 1.0
    # rows really removed (not zeroed) do pay: 150 of 300 outputs of features.0, and 150 inputs of the next layer
    small = build_model("lenet300", input_shape=(1, 8, 8), num_classes=10).eval()
    small.features[0] = nn.Linear(64, 150)
    small.features[2] = nn.Linear(150, 100)
    shrunk, _, _ = hardware_metrics(small, x1, profiles, base)
    expected = alone["jetson-tx2"].latency_us / simulate_model(small, x1, ["jetson-tx2"])["jetson-tx2"].latency_us
    assert shrunk["sim_speedup/jetson-tx2"] == pytest.approx(expected) and expected > 1
    assert any("jetson-tx2: 1 layer holds 50% zeros" in n for n in notes)


def test_jetson_depthwise_net_gains_less_than_its_mac_ratio():
    from compress.metrics import count_layers, summarize
    from compress.models import build_model
    from compress.pruning.structured import prune_model

    torch.manual_seed(0)
    model = build_model("mobilenetv2_small").eval()
    x = torch.randn(1, 1, 28, 28)
    base_macs = summarize(model, count_layers(model, x))["macs"]
    before = simulate_model(model, x, ["jetson-tx2"])["jetson-tx2"]
    prune_model(model, x, importance="l1", ratio=0.5)
    after = simulate_model(model, x, ["jetson-tx2"])["jetson-tx2"]
    mac_speedup = base_macs / summarize(model, count_layers(model, x))["macs"]
    assert 1.0 < before.latency_us / after.latency_us < mac_speedup


def test_pipeline_reports_per_profile_keys_everywhere(tmp_path, fixed_cpu):
    import csv

    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    plain = write_profile(tmp_path)
    recipe = quick_recipe(tmp_path, hardware=["cpu-local", "jetson-tx2", plain], stages=[
        {"type": "train", "epochs": 1, "optimizer": {"lr": 0.05}},
        {"type": "prune.unstructured", "sparsity": 0.5, "finetune": {"epochs": 0}}])
    Pipeline(load_recipe(recipe), quiet=True).run()
    out = Path(recipe["out_dir"])
    report = json.loads((out / "report.json").read_text())
    last = report["stages"][-1]
    for p in ("cpu-local", "jetson-tx2", "plain"):
        # unstructured zeros on three profiles without sparse kernels: the same dense work as stage 0
        assert last["metrics"][f"sim_speedup/{p}"] == 1.0
        assert last["metrics"][f"sim_bottlenecks/{p}"]
    assert last["metrics"]["sim_speedup"] == last["metrics"]["sim_speedup/cpu-local"]
    # features.0 (64 -> 300) + ReLU at batch 1 on the TX2: ~38 kFLOP at 1331 GFLOP/s x 0.7 is ~0.04 us and
    # ~39 KB at 51.2 GB/s ~0.8 us, both far below its 5 us kernel launch
    row = last["layers"][0]
    assert row["name"] == "features.0"
    tx2 = row["hardware"]["jetson-tx2"]
    assert tx2["bound"] == "overhead" and tx2["overhead_us"] == 5.0
    assert tx2["compute_us"] < 0.1 and 0.5 < tx2["memory_us"] < 1.5
    assert tx2["time_us"] == pytest.approx(5.0 + tx2["memory_us"])
    # the plain profile (fp32, 100 GFLOP/s, 10 GB/s, 1 us per op) by hand: memory-bound
    plain_row = row["hardware"]["plain"]
    w_bytes = (300 * 64 + 300) * 4
    assert plain_row["weight_bytes"] == 300 * 64 * 4 and plain_row["dram_bytes"] >= w_bytes
    assert plain_row["memory_us"] == pytest.approx(plain_row["dram_bytes"] / 10e3)
    assert plain_row["bound"] == "memory" and plain_row["memory_us"] > 1.0
    assert any("zeros" in n for n in last["notes"])
    with open(out / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"sim_speedup", "sim_speedup/jetson-tx2", "sim_latency_ms/plain"} <= set(header)
    assert not any("bottlenecks" in c for c in header)
    assert "sim jetson-tx2" in (out / "report.md").read_text()


# -- friendliness notes: each finding from a model built to show it ----------------------------------
def _notes(model: nn.Module, x: torch.Tensor, path: str) -> list[str]:
    from compress.hardware import hardware_notes, weight_infos

    profile = load_profile(path)
    sim = simulate_model(model.eval(), x, [profile])[profile.name]
    return hardware_notes(sim, profile, weight_infos(model))


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_note_a_model_narrower_than_the_lanes(tmp_path):
    # 64 -> 8 -> 8 -> 10 on 16 lanes: both hidden layers (not the classifier) have 8 < 16 outputs
    notes = _notes(_mlp(64, 8, 8, 10), torch.randn(1, 64), write_profile(tmp_path, "wide", lanes=16))
    assert notes[0] == ("wide: 2 of 3 layers have fewer output channels than its 16 lanes (e.g. 0 8, 2 8): the model is "
                        "too narrow to fill this hardware, whatever the rounding")


def test_note_channel_counts_that_leave_lanes_idle_and_unfused_activations(tmp_path):
    torch.manual_seed(0)
    model, x = _mlp(64, 20, 20, 10), torch.randn(1, 64)
    path = write_profile(tmp_path, "wide", lanes=16)
    notes = _notes(model, x, path)
    sim = simulate_model(model, x, [path])["wide"]
    # 20 outputs fill 2 x 16 lanes: 12 of 32 (37.5%) idle; the classifier's 10 are the number of classes
    share = sum(o.time_us for o in sim.ops if o.name in ("0", "2")) / sim.latency_us
    assert notes[0] == (f"wide: 2 layers ({share:.0%} of the time) have channel counts that leave >=10% of its 16 "
                        "lanes idle (0 20->32, 2 20->32); prune.structured round_to: 16 (what round_to: auto picks "
                        "with latency_on: wide) keeps them aligned")
    relu = sum(o.time_us for o in sim.ops if o.kind == "activation") / sim.latency_us
    assert notes[1] == (f"wide: 2 element-wise ops run unfused (relu): {relu:.0%} of the time; fold BN into the conv "
                        "weights and fuse activations (torch.compile, or an inference runtime)")
    assert not any("idle" in n for n in _notes(_mlp(64, 32, 32, 10), x, path))  # multiples of 16: none idle
    fused = write_profile(tmp_path, "fused", lanes=16, fusion={"conv_bn_act": True, "elementwise": True})
    assert not any("unfused" in n for n in _notes(model, x, fused))


def test_note_lopsided_memory_bound_pointwise_conv(tmp_path):
    # 1x1, 256 -> 8 on 8x8: 0.26 MFLOP (2.6 us at 100 GFLOP/s) against 75 KB (7.5 us at 10 GB/s)
    notes = _notes(nn.Sequential(nn.Conv2d(256, 8, 1)), torch.randn(1, 256, 8, 8), write_profile(tmp_path))
    assert notes == ["plain: memory-bound 1x1 convolutions with very unequal widths (little reuse per byte): "
                     "0 256->8 (memory-bound, 100%)"]


def test_note_depthwise_convolutions_take_more_time_than_flops(tmp_path):
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.Conv2d(32, 32, 1))
    x = torch.randn(1, 32, 8, 8)
    path = write_profile(tmp_path)
    sim = simulate_model(model.eval(), x, [path])["plain"]
    dw = next(o for o in sim.ops if o.kind == "grouped_conv")
    f_share = dw.flops / sum(o.flops for o in sim.ops)  # 9 MACs per output against 32: about 22%
    t_share = dw.time_us / sim.latency_us
    assert t_share > 1.5 * f_share
    assert _notes(model, x, path) == [f"plain: depthwise/grouped convolutions do {f_share:.0%} of the FLOPs but take "
                                      f"{t_share:.0%} of the time (1 of 1 memory-bound); pruning them gains less than "
                                      "their MACs suggest"]


def test_note_zeros_that_sparse_hardware_cannot_use(tmp_path):
    torch.manual_seed(0)
    mask = torch.rand(128, 256) < 0.85
    fc = sparse_linear(mask)
    zeros = 1 - float(mask.float().mean())  # ~15%: CSR's 16-bit indices cost more than the zeros save
    csr = write_profile(tmp_path, "csr", sparsity={"unstructured": {"format": "csr", "index_bits": 16}})
    assert _notes(fc, torch.randn(1, 256), csr) == [
        f"csr: 1 layer holds {zeros:.0%} zeros but none runs faster with sparse kernels (not sparse enough to pay "
        "for the indices)"]
    gpu = write_profile(tmp_path, "gpu", sparsity={"nm": "2:4"})
    assert _notes(fc, torch.randn(1, 256), gpu) == [
        f"gpu: 1 layer holds {zeros:.0%} zeros but none runs faster with 2:4 sparsity (no layer's zeros follow the "
        "2:4 pattern)"]


def test_cpu_calibration_measures_every_field_a_profile_needs(tmp_path, monkeypatch):
    """The micro-benchmark itself (shortened): every figure present, in range, and one the profile accepts."""
    import compress.hardware.calibrate as cal

    monkeypatch.setattr(cal, "BUDGET_S", 0.002)
    monkeypatch.setattr(cal, "CHUNK_S", 20e-6)
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path))
    figures = cal.measure_cpu()
    assert figures["lanes"] == cal.simd_lanes_fp32() and figures["on_chip_bytes"] == cal._largest_cache_bytes()
    assert figures["peak_gflops.fp32"] > 0 and figures["memory_gbps"] > 0 and figures["on_chip_gbps"] > 0
    assert all(figures[k] >= 0 for k in figures if k.startswith("overhead_us."))
    assert all(0 < figures[k] <= 1 for k in figures if k.startswith("efficiency."))
    assert 0.05 <= figures["efficiency.unaligned"] <= 1
    profile = cal._apply(load_profile("cpu-local", calibrate=False), figures)
    assert profile.lanes == figures["lanes"] and profile.peak_gflops.fp32 == figures["peak_gflops.fp32"]
    # the CLI measures, caches under $COMPRESS_CACHE and prints the cache
    monkeypatch.setattr(cal, "measure_cpu", lambda: dict(figures))
    assert cal.main(["--force"]) == 0
    assert json.loads(cal.cache_path().read_text())["figures"]["lanes"] == figures["lanes"]
