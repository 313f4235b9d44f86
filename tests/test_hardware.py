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


# -- the simulator on hand-built traces: every figure by hand --------------------------------------------------
# 1 GFLOP/s and 1 GB/s: one FLOP or one byte costs 1 ns = 0.001 us, so every time below is a count / 1000.

def _hw(**over):
    from compress.hardware.profiles import HardwareProfile, OverheadConfig, PeakConfig

    kw = {"name": "h", "peak_gflops": PeakConfig(fp32=1.0), "memory_gbps": 1.0, "overhead_us": OverheadConfig()}
    kw.update(over)
    return HardwareProfile(**kw)


def _op(index, kind, flops=0, reads=(), writes=(), module=None, name=None, weight=None, params=(), **shape):
    from compress.hardware.trace import Op

    module = module if module is not None else f"m{index}"
    return Op(index=index, module=module, module_type="M", leaf=True, name=name or kind, kind=kind, flops=flops,
              reads=list(reads), writes=list(writes), weight=weight, params=list(params), **shape)


def _sim(ops, profile, weights=None, inputs=(0,), outputs=None, module_calls=0):
    from compress.hardware.roofline import simulate
    from compress.hardware.trace import Trace

    outputs = {ops[-1].writes[0][0]} if outputs is None else set(outputs)
    trace = Trace(ops=ops, module_calls=module_calls, input_ids=set(inputs), output_ids=outputs, weights={})
    return simulate(trace, weights or {}, profile)


def _fc(out_ch=20, in_ch=10, flops=2000, **shape):
    """A linear layer: reads 10 floats (40 B), writes 20 (80 B), 200 weights (800 B), 20 biases (80 B)."""
    shape = {"out_channels": out_ch, "in_channels": in_ch, "groups": 1, **shape}
    return _op(0, shape.pop("kind", "matmul"), flops, [(0, 10, 0)], [(1, 20, 0)], module="fc", name="addmm",
               weight="fc.weight", params=[("fc.bias", 20)], **shape)


def _info(elements=200, nonzero=200, rows=20, bits=None, tensor=None):
    from compress.hardware.roofline import WeightInfo

    return {"fc.weight": WeightInfo("fc.weight", elements, nonzero, rows, bits, tensor)}


def test_one_layer_priced_by_hand_compute_memory_and_overhead_bounds():
    from compress.hardware.profiles import OverheadConfig

    # 2000 FLOPs: 2 us; 40 + 80 + 800 + 80 = 1000 B: 1 us; 1 us launch; 0.5 us per module call
    sim = _sim([_fc()], _hw(overhead_us=OverheadConfig(op=1.0, module=0.5)), _info(), module_calls=2)
    (o,) = sim.ops
    assert (o.name, o.module, o.op, o.kind, o.weight_format) == ("fc", "fc", "addmm", "matmul", "dense")
    assert (o.flops, o.dram_bytes, o.chip_bytes, o.weight_bytes) == (2000, 1000, 0, 800)
    assert (o.compute_us, o.memory_us, o.overhead_us, o.time_us) == pytest.approx((2.0, 1.0, 1.0, 3.0), rel=1e-12)
    assert o.bound == "compute"
    assert (o.out_channels, o.in_channels, o.groups) == (20, 10, 1)
    assert sim.latency_us == pytest.approx(4.0) and sim.framework_us == pytest.approx(1.0)
    assert sim.share("compute") == pytest.approx(3 / 4) and sim.share("memory") == 0.0
    assert sim.overhead_share == pytest.approx(2 / 4)
    # ties: compute = memory is compute-bound; an overhead equal to the roofline time is overhead-bound
    (o,) = _sim([_fc(flops=1000)], _hw(), _info()).ops
    assert o.bound == "compute" and o.compute_us == o.memory_us == pytest.approx(1.0)
    (o,) = _sim([_fc()], _hw(overhead_us=OverheadConfig(op=9.0, matmul=2.0)), _info()).ops
    assert o.overhead_us == pytest.approx(2.0) and o.bound == "overhead" and o.time_us == pytest.approx(4.0)


@pytest.mark.parametrize("kind, expected", [
    ("matmul", 3.0), ("conv", 4.0), ("grouped_conv", 5.0), ("view", 0.25), ("pool", 0.5), ("activation", 0.5)])
def test_each_kind_of_op_pays_its_own_launch(kind, expected):
    from compress.hardware.profiles import OverheadConfig

    over = OverheadConfig(op=0.5, view=0.25, matmul=3.0, conv=4.0, grouped_conv=5.0)
    (o,) = _sim([_op(0, kind, 0, [(0, 1, 0)], [(1, 1, 0)], out_channels=1, in_channels=1)], _hw(overhead_us=over)).ops
    assert o.overhead_us == pytest.approx(expected)
    # unset kernel-specific costs fall back: grouped_conv -> conv -> op, conv and matmul -> op
    fallback = {"grouped_conv": 4.0 if kind == "grouped_conv" else None}
    (o,) = _sim([_op(0, kind, 0, [(0, 1, 0)], [(1, 1, 0)], out_channels=1, in_channels=1)],
                _hw(overhead_us=OverheadConfig(op=0.5, view=0.25, conv=fallback["grouped_conv"]))).ops
    assert o.overhead_us == pytest.approx({"view": 0.25, "grouped_conv": 4.0}.get(kind, 0.5))


@pytest.mark.parametrize("kind, out_ch, in_ch, groups, lanes, expected_us", [
    # efficiency conv 0.5, matmul 0.25, grouped 0.125, pool 0.2, elementwise 0.4; unaligned 0.5 more
    ("conv", 16, 8, 1, 8, 2 / 0.5),
    ("matmul", 16, 8, 1, 8, 2 / 0.25),
    ("conv", 20, 8, 1, 8, 2 / (0.5 * 20 / 24 * 0.5)),  # 20 of 24 lanes filled, and unaligned
    ("conv", 16, 10, 1, 8, 2 / (0.5 * 0.5)),  # the input channels are unaligned
    ("grouped_conv", 16, 10, 2, 8, 2 / 0.125),  # grouped: only the output channels count
    ("conv", 1, 8, 1, 8, 2 / (0.5 * 1 / 8 * 0.5)),  # a single output channel fills 1 of 8 lanes
    ("conv", 3, 8, 1, 2, 2 / (0.5 * 3 / 4 * 0.5)),  # 2 lanes: 3 channels fill 3 of 4
    ("conv", 3, 7, 1, 1, 2 / 0.5),  # one lane: always full and aligned
    ("pool", 0, 0, 1, 8, 2 / 0.2),
    ("activation", 0, 0, 1, 8, 2 / 0.4),
])
def test_compute_time_by_kind_lanes_and_alignment(kind, out_ch, in_ch, groups, lanes, expected_us):
    from compress.hardware.profiles import EfficiencyConfig

    eff = EfficiencyConfig(conv=0.5, matmul=0.25, grouped_conv=0.125, pool=0.2, elementwise=0.4, unaligned=0.5)
    op = _op(0, kind, 2000, [(0, 1, 0)], [(1, 1, 0)], out_channels=out_ch, in_channels=in_ch, groups=groups)
    (o,) = _sim([op], _hw(efficiency=eff, lanes=lanes)).ops
    assert o.compute_us == pytest.approx(expected_us)


def test_weights_stay_on_chip_only_when_all_of_them_fit():
    # weights 800 B + bias 80 B = 880 B; the buffer reads at 4 GB/s; activations 40 + 80 B stay in DRAM
    fits = _hw(on_chip_bytes=880, on_chip_gbps=4.0, weights_on_chip=True)
    (o,) = _sim([_fc()], fits, _info()).ops
    assert (o.dram_bytes, o.chip_bytes) == (120, 880)
    assert o.memory_us == pytest.approx(120 / 1000 + 880 / 4000, rel=1e-12)
    for profile in (_hw(on_chip_bytes=879, on_chip_gbps=4.0, weights_on_chip=True),  # one byte short
                    _hw(on_chip_bytes=880, on_chip_gbps=4.0)):  # or not allowed to keep them
        (o,) = _sim([_fc()], profile, _info()).ops
        assert (o.dram_bytes, o.chip_bytes) == (1000, 0) and o.memory_us == pytest.approx(1.0)
    # an on-chip buffer with no bandwidth of its own is free next to DRAM
    (o,) = _sim([_fc()], _hw(on_chip_bytes=880, weights_on_chip=True), _info()).ops
    assert o.memory_us == pytest.approx(120 / 1000)


def _skip_chain():
    """input v0 (50 int64) -> v1 (100 floats) -> v2 (25 int64) -> v3 (25 floats); op3 reads v1, v3, v0 -> v4.

    Bytes 400, 400, 200, 100, 400. Live (from the op after the producer to the last reader): v0 at positions
    0-3, v1 1-3, v2 2, v3 3, so [400, 800, 1000, 900]. v1 and v2 fit in 1000 B, v3 in 900 B.
    """
    return [_op(0, "elementwise", 0, [(0, 50, 8)], [(1, 100, 0)]),
            _op(1, "elementwise", 0, [(1, 100, 0)], [(2, 25, 8)]),
            _op(2, "elementwise", 0, [(2, 25, 8)], [(3, 25, 0)]),
            _op(3, "elementwise", 0, [(1, 100, 0), (3, 25, 0), (0, 50, 8)], [(4, 100, 0)])]


@pytest.mark.parametrize("capacity, on_chip", [(0, set()), (899, set()), (900, {3}), (1000, {1, 2, 3}),
                                               (10 ** 6, {1, 2, 3})])
def test_activations_are_held_on_chip_when_their_whole_life_fits(capacity, on_chip):
    sizes = {0: 400, 1: 400, 2: 200, 3: 100, 4: 400}
    sim = _sim(_skip_chain(), _hw(on_chip_bytes=capacity, on_chip_gbps=4.0))
    for o, op in zip(sim.ops, _skip_chain(), strict=True):
        moved = [vid for vid, _, _ in op.reads + op.writes]
        assert o.chip_bytes == sum(sizes[v] for v in moved if v in on_chip), o.name
        assert o.dram_bytes == sum(sizes[v] for v in moved if v not in on_chip), o.name  # inputs, outputs: DRAM


def test_element_wise_fusion_keeps_the_fused_values_internal():
    from compress.hardware.profiles import FusionConfig

    # op2 reads v2 (op1's only reader) and op3 reads v3: both run inside op1; v1 has two readers, so it is
    # written out; op0 reads the model's input and leads its own kernel
    sim = _sim(_skip_chain(), _hw(fusion=FusionConfig(elementwise=True), on_chip_bytes=800, on_chip_gbps=4.0))
    assert [(o.name, o.fused) for o in sim.ops] == [("m0", []), ("m1", ["m2", "m3"])]
    assert sim.ops[1].op == "elementwise+elementwise+elementwise"
    # v2 and v3 never leave the kernel; v1 (alone live now: 800 B) is on chip; v0 in, v4 out are DRAM
    assert (sim.ops[0].dram_bytes, sim.ops[0].chip_bytes) == (400, 400)
    assert (sim.ops[1].dram_bytes, sim.ops[1].chip_bytes) == (400 + 400, 400 + 400)


class _ConvBias(nn.Module):
    """conv -> (+1) and conv -> BN -> (+1): an add is not an activation, so conv_bn_act leaves it out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + 1) * (self.bn(self.conv2(x)) + 1)


def test_conv_bn_act_fusion_takes_bn_then_an_activation_and_nothing_else(tmp_path):
    path = write_profile(tmp_path, "fused", fusion={"conv_bn_act": True, "elementwise": False})
    sim = simulate_model(_ConvBias().eval(), torch.randn(1, 2, 4, 4), [path])["fused"]
    assert {o.name: o.fused for o in sim.ops if o.kind == "conv"} == {"conv": [], "conv2": ["bn"]}
    assert sum(o.op == "add" for o in sim.ops) == 2


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.relu(y) + y  # y has two readers: written out, so the ReLU cannot fuse


class _InputFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(torch.relu(x))  # the add's first operand is the input: it fuses by the second


def test_fusion_needs_a_single_reader_and_looks_past_unfusable_operands(tmp_path):
    x = torch.randn(1, 2, 4, 4)
    fused = write_profile(tmp_path, "f", fusion={"conv_bn_act": True, "elementwise": True})
    sim = simulate_model(_Residual().eval(), x, [fused])["f"]
    assert [o.fused for o in sim.ops if o.kind == "conv"] == [[]]
    sim = simulate_model(_InputFirst().eval(), x, [fused])["f"]
    conv = next(o for o in sim.ops if o.kind == "conv")
    assert conv.op == "conv2d+add" and next(o for o in sim.ops if o.op == "relu").fused == []
    # the kernel reads the ReLU's output (32 floats) and 4 weights, the add reads x (32) and writes the model's
    # output (32); the conv's own output never leaves the kernel
    assert conv.dram_bytes == (32 + 4 + 32 + 32) * 4


def _conv_bn_relu(with_bn: bool = True):
    """conv (1000 FLOPs, 4 weights, 2 biases) -> BN (100 FLOPs, 4 vectors of 2) -> ReLU_ (50 FLOPs); 8 floats each."""
    ops = [_op(0, "conv", 1000, [(0, 8, 0)], [(1, 8, 0)], module="c", name="convolution", weight="c.weight",
               params=[("c.bias", 2)], out_channels=2, in_channels=2, groups=1, kernel=(1, 1))]
    if with_bn:
        ops.append(_op(1, "norm", 100, [(1, 8, 0)], [(2, 8, 0)], module="bn", name="batch_norm",
                       params=[("bn.weight", 2), ("bn.bias", 2), ("bn.running_mean", 2), ("bn.running_var", 2)]))
    last = ops[-1].writes[0][0]
    ops.append(_op(len(ops), "activation", 50, [(last, 8, 0)], [(last + 1, 8, 0)], module="relu", name="relu_"))
    return ops


def test_bn_folds_into_the_conv_and_the_activation_runs_in_its_kernel():
    from compress.hardware.profiles import EfficiencyConfig, FusionConfig
    from compress.hardware.roofline import WeightInfo

    weights = {"c.weight": WeightInfo("c.weight", 4, 4, 2)}
    eff = EfficiencyConfig(conv=0.5, elementwise=0.25)
    fused = _hw(fusion=FusionConfig(conv_bn_act=True), efficiency=eff)
    (o,) = _sim(_conv_bn_relu(), fused, weights).ops
    # the conv's input and output (32 B each), weights 16 B, bias 8 B; BN folded away: no FLOPs, no bytes
    assert (o.op, o.fused, o.flops, o.dram_bytes) == ("convolution+batch_norm+relu", ["bn", "relu"], 1050, 88)
    assert o.compute_us == pytest.approx(1000 / 0.5 / 1000 + 50 / 0.25 / 1000)
    (o,) = _sim(_conv_bn_relu(with_bn=False), fused, weights).ops  # conv + ReLU: the ReLU's FLOPs still count
    assert (o.op, o.flops, o.dram_bytes) == ("convolution+relu", 1050, 88)
    assert o.compute_us == pytest.approx(2.2)
    # unfused, each op moves its own values and parameters (BN: 4 x 2 floats)
    ops = _sim(_conv_bn_relu(), _hw(efficiency=eff), weights).ops
    assert [(o.op, o.flops, o.dram_bytes) for o in ops] == [("convolution", 1000, 88), ("batch_norm", 100, 96),
                                                             ("relu", 50, 64)]
    assert [o.weight_format for o in ops] == ["dense", "", ""] and ops[0].kernel == (1, 1)
    assert ops[1].compute_us == pytest.approx(100 / 0.25 / 1000)


def test_activations_share_the_buffer_with_resident_weights():
    # fc: 880 B of weights and bias; its output v1 (80 B) is read by a ReLU that writes the output
    ops = [_fc(), _op(1, "activation", 0, [(1, 20, 0)], [(2, 20, 0)])]
    for on_chip, weights_on_chip, v1_on_chip in [(960, True, True), (959, True, False), (80, False, True),
                                                 (79, False, False)]:
        sim = _sim(ops, _hw(on_chip_bytes=on_chip, on_chip_gbps=4.0, weights_on_chip=weights_on_chip), _info())
        fc, relu = sim.ops
        resident = 880 if weights_on_chip else 0
        assert fc.chip_bytes == resident + (80 if v1_on_chip else 0), (on_chip, weights_on_chip)
        assert relu.chip_bytes == (80 if v1_on_chip else 0) and relu.dram_bytes == 80 + (0 if v1_on_chip else 80)


def test_sparse_and_shared_formats_by_hand_and_ties_keep_the_plain_format():
    from compress.hardware.profiles import SparsityConfig, UnstructuredConfig

    # 200 weights, 50 non-zero, 20 rows; CSR: value + 4-bit index per non-zero, a 4-byte pointer per row + 1
    csr = SparsityConfig(unstructured=UnstructuredConfig(format="csr", efficiency=0.5, index_bits=4))
    (o,) = _sim([_fc(flops=2000)], _hw(sparsity=csr), _info(nonzero=50)).ops
    assert o.weight_format == "csr" and o.weight_bytes == pytest.approx(50 * (32 + 4) / 8 + 21 * 4)
    assert o.flops == pytest.approx(2000 * 0.25 / 0.5)  # the non-zero MACs at half the dense kernel's rate
    # shared 3-bit codes + CSR: 3 + 4 bits per non-zero, the pointers, and the 8-entry fp32 codebook
    (o,) = _sim([_fc()], _hw(sparsity=csr, weight_sharing=True), _info(nonzero=50, bits=3)).ops
    assert o.weight_format == "shared3+csr" and o.weight_bytes == pytest.approx(50 * 7 / 8 + 21 * 4 + 8 * 4)
    # a dense layer is never offered CSR
    (o,) = _sim([_fc()], _hw(sparsity=csr), _info()).ops
    assert o.weight_format == "dense" and o.weight_bytes == 800
    # half the weights zero at half the kernel's efficiency: the same FLOP time, and compute-bound either way
    (o,) = _sim([_fc(flops=10 ** 6)], _hw(sparsity=csr), _info(nonzero=100)).ops
    assert o.weight_format == "dense" and o.flops == 10 ** 6


def test_two_four_conv_weights_and_shared_two_four_by_hand():
    from compress.hardware.profiles import SparsityConfig
    from compress.hardware.roofline import WeightInfo

    w = torch.tensor([1.0, 0.0, 1.0, 0.0]).repeat(4, 2).view(4, 8, 1, 1)  # 2 of every 4 input channels
    conv = _op(0, "conv", 1000, [(0, 8, 0)], [(1, 4, 0)], module="c", weight="c.weight", out_channels=4,
               in_channels=8)
    gpu = _hw(sparsity=SparsityConfig(nm="2:4"))
    (o,) = _sim([conv], gpu, {"c.weight": WeightInfo("c.weight", 32, 16, 4, None, w)}).ops
    assert o.weight_format == "2:4" and o.weight_bytes == pytest.approx(32 / 2 * (32 + 2) / 8) and o.flops == 500
    # 2-bit codes: half the weights at 2 + 2 bits, and the 4-entry codebook
    shared = _hw(sparsity=SparsityConfig(nm="2:4"), weight_sharing=True)
    (o,) = _sim([conv], shared, {"c.weight": WeightInfo("c.weight", 32, 16, 4, 2, w)}).ops
    assert o.weight_format == "shared2+2:4" and o.weight_bytes == pytest.approx(16 * 4 / 8 + 4 * 4)


def test_report_helpers_sum_repeated_calls_and_rank_the_slowest():
    from compress.hardware.roofline import OpCost, Simulation

    def cost(name, time_us, bound="memory", **kw):
        return OpCost(name=name, module=name, op="addmm", kind="matmul", flops=10, dram_bytes=20, chip_bytes=30,
                      weight_bytes=40, compute_us=1, memory_us=2, overhead_us=3, time_us=time_us, bound=bound, **kw)

    ops = [cost("fc", 5, fused=["relu"], kernel=(3, 3)), cost("a", 1), cost("fc", 7, bound="compute"), cost("b", 2),
           cost("c", 3), cost("d", 4), cost("e", 6)]
    sim = Simulation("h", ops, framework_us=2.0)
    layers = sim.by_layer()
    assert list(layers) == ["fc", "a", "b", "c", "d", "e"]
    fc = layers["fc"]  # the two calls of fc, summed
    assert (fc.flops, fc.dram_bytes, fc.chip_bytes, fc.weight_bytes) == (20, 40, 60, 80)
    assert (fc.compute_us, fc.memory_us, fc.overhead_us, fc.time_us) == (2, 4, 6, 12)
    assert ops[0].time_us == 5 and ops[0].flops == 10  # the simulation's own rows are left as they were
    row = fc.as_row()
    assert row["fused"] == ["relu"] and row["kernel"] == [3, 3] and row["bound"] == "memory"
    assert [o.time_us for o in sim.bottlenecks()] == [7, 6, 5, 4, 3]  # five by default
    assert sim.latency_us == 30 and sim.share("compute") == pytest.approx(7 / 30)
    assert Simulation("h", [], 0.0).share("memory") == 0.0 and Simulation("h", [], 0.0).overhead_share == 0.0


def test_weight_infos_count_the_deployed_values_given():
    from compress.hardware import weight_infos

    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 2, 1))
    deployed = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        deployed[0].weight[:2] = 0  # the deployed copy holds zeros the model's own tensors do not show
    infos = weight_infos(model, deployed)
    assert set(infos) == {"0.weight", "1.weight"} and infos["0.weight"].name == "0.weight"
    assert (infos["0.weight"].elements, infos["0.weight"].nonzero, infos["0.weight"].rows) == (12, 4, 3)
    assert infos["0.weight"].shared_bits is None and torch.equal(infos["0.weight"].tensor, deployed[0].weight)
    assert weight_infos(nn.Linear(4, 3))["weight"].rows == 3  # a bare layer: no name prefix


@pytest.mark.parametrize("capacity, on_chip", [(439, set()), (440, {1}), (1039, {1}), (1040, {1, 9})])
def test_a_value_read_but_never_written_is_live_from_the_start(capacity, on_chip):
    # v9 is no input of the model (a constant tensor), read by both ops; v0 (1000 B) is read only by op0.
    # Live: position 0 holds v0 and v9 (1040 B), position 1 holds v9 and v1 (440 B).
    ops = [_op(0, "elementwise", 0, [(0, 250, 0), (9, 10, 0)], [(1, 100, 0)]),
           _op(1, "elementwise", 0, [(1, 100, 0), (9, 10, 0)], [(2, 10, 0)])]
    sim = _sim(ops, _hw(on_chip_bytes=capacity, on_chip_gbps=4.0))
    sizes = {0: 1000, 1: 400, 2: 40, 9: 40}
    for o, op in zip(sim.ops, ops, strict=True):
        moved = [vid for vid, _, _ in op.reads + op.writes]
        assert o.chip_bytes == sum(sizes[v] for v in moved if v in on_chip), (capacity, o.name)


def test_a_value_leaves_the_buffer_after_its_last_reader():
    # v1 (40 B) lives at position 1 only; v2 (400 B, at position 2) never fits 100 B, v1 does; and so does a
    # single int8 element in a 1-byte buffer
    ops = [_op(0, "elementwise", 0, [(0, 10, 0)], [(1, 10, 0)]), _op(1, "elementwise", 0, [(1, 10, 0)], [(2, 100, 0)]),
           _op(2, "elementwise", 0, [(2, 100, 0)], [(3, 10, 0)])]
    assert [o.chip_bytes for o in _sim(ops, _hw(on_chip_bytes=100, on_chip_gbps=4.0)).ops] == [40, 40, 0]
    ops = [_op(0, "elementwise", 0, [(0, 1, 0)], [(1, 1, 1)]), _op(1, "elementwise", 0, [(1, 1, 1)], [(2, 1, 0)])]
    assert [o.chip_bytes for o in _sim(ops, _hw(on_chip_bytes=1, on_chip_gbps=4.0)).ops] == [1, 1]


@pytest.mark.parametrize("capacity, on_chip", [(399, set()), (400, {4}), (800, {1, 4})])
def test_fused_values_take_no_buffer_space(capacity, on_chip):
    from compress.hardware.profiles import FusionConfig

    # the skip chain, with op1-op3 fused (v2, v3 internal), then a matmul reading v4: live [400, 800, 800, 800, 400]
    ops = _skip_chain() + [_op(4, "matmul", 0, [(4, 100, 0)], [(5, 10, 0)], out_channels=10, in_channels=100)]
    sim = _sim(ops, _hw(fusion=FusionConfig(elementwise=True), on_chip_bytes=capacity, on_chip_gbps=4.0))
    assert [o.fused for o in sim.ops] == [[], ["m2", "m3"], []]
    assert sim.ops[2].chip_bytes == (400 if 4 in on_chip else 0)
    assert sim.ops[0].chip_bytes == (400 if 1 in on_chip else 0)


def test_element_wise_fusion_alone_runs_bn_in_the_conv_kernel_but_does_not_fold_it():
    from compress.hardware.profiles import FusionConfig
    from compress.hardware.roofline import WeightInfo

    weights = {"c.weight": WeightInfo("c.weight", 4, 4, 2)}
    (o,) = _sim(_conv_bn_relu(), _hw(fusion=FusionConfig(elementwise=True)), weights).ops
    # BN's FLOPs and its 4 x 2 floats of parameters are still paid
    assert (o.op, o.flops, o.dram_bytes) == ("convolution+batch_norm+relu", 1150, 88 + 32)
