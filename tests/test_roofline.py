"""hardware/roofline.py: per-op times, residency and fusion priced by hand (mutation testing: docs/mutants/roofline.md).

The profiles run at 1 GFLOP/s and 1 GB/s, so one FLOP or one byte costs 1 ns = 0.001 us: every time
below is a count worked out from the layer shapes, divided by 1000 and by the efficiencies given.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.hardware import simulate_model, weight_infos
from compress.hardware.profiles import (
    EfficiencyConfig,
    FusionConfig,
    HardwareProfile,
    OverheadConfig,
    PeakConfig,
    SparsityConfig,
    UnstructuredConfig,
)
from compress.hardware.roofline import OpCost, nm_compliant, simulate
from compress.hardware.trace import Op, Trace


def hw(**over) -> HardwareProfile:
    kw = {"name": "h", "peak_gflops": PeakConfig(fp32=1.0), "memory_gbps": 1.0, "overhead_us": OverheadConfig()}
    kw.update(over)
    return HardwareProfile(**kw)


def conv_bn_relu_fc() -> nn.Module:
    """conv 2->4 (3x3, no bias) on 4x4 -> BN -> ReLU -> flatten -> linear 16->3: six module calls."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16, 3)).eval()


X = torch.randn(1, 2, 4, 4)


# -- a traced model, every op by hand ---------------------------------------------------------------------
def test_tiny_model_unfused_every_op_by_hand():
    # conv: 16 outputs x 18 MACs = 576 FLOPs; reads 32 floats, writes 16, 72 weights: (32 + 16 + 72) x 4 = 480 B
    # BN: 2 FLOPs per element = 32; 16 in, 16 out, 4 x 4 parameters: 192 B
    # ReLU: 16 FLOPs; 16 in, 16 out: 128 B.  flatten: a view.
    # linear: 2 x 3 x 16 + 3 (bias) = 99 FLOPs; 16 in, 3 out, 48 weights, 3 biases: 280 B
    # 0.25 us per op: the conv is compute-bound, BN and ReLU overhead-bound, the linear memory-bound
    profile = hw(overhead_us=OverheadConfig(op=0.25, module=0.5))
    sim = simulate_model(conv_bn_relu_fc(), X, [profile])["h"]
    rows = [(o.name, o.kind, o.flops, o.dram_bytes, o.chip_bytes, o.weight_bytes, o.bound) for o in sim.ops]
    assert rows == [("0", "conv", 576, 480, 0, 288, "compute"), ("1", "norm", 32, 192, 0, 0, "overhead"),
                    ("2", "activation", 16, 128, 0, 0, "overhead"), ("3", "view", 0, 0, 0, 0, "overhead"),
                    ("4", "matmul", 99, 280, 0, 192, "memory")]
    assert [o.compute_us for o in sim.ops] == pytest.approx([0.576, 0.032, 0.016, 0.0, 0.099])
    assert [o.memory_us for o in sim.ops] == pytest.approx([0.480, 0.192, 0.128, 0.0, 0.280])
    assert [o.overhead_us for o in sim.ops] == pytest.approx([0.25, 0.25, 0.25, 0.0, 0.25])
    assert [o.time_us for o in sim.ops] == pytest.approx([0.826, 0.442, 0.378, 0.0, 0.530])
    assert [o.weight_format for o in sim.ops] == ["dense", "", "", "", "dense"]
    assert (sim.ops[0].out_channels, sim.ops[0].in_channels, sim.ops[0].kernel) == (4, 2, (3, 3))
    assert sim.profile == "h" and sim.framework_us == pytest.approx(6 * 0.5)
    assert sim.latency_us == pytest.approx(0.826 + 0.442 + 0.378 + 0.530 + 3.0)


def test_tiny_model_fused_with_resident_weights_lanes_and_an_on_chip_activation():
    # Weights 288 + 192 B, parameters (BN 16, bias 3) 76 B: 556 B stay on chip, leaving 64 B: the ReLU's
    # output (16 floats), live from the view to the linear, fits; the model's input and output do not count.
    # 4 lanes: the conv fills 4 of 4 but its 2 input channels are unaligned (x 0.5); the linear's 3 outputs fill
    # 3 of 4, unaligned too.
    profile = hw(weights_on_chip=True, on_chip_bytes=556 + 64, on_chip_gbps=2.0, lanes=4,
                 fusion=FusionConfig(conv_bn_act=True),
                 efficiency=EfficiencyConfig(conv=0.5, matmul=0.8, elementwise=0.25, unaligned=0.5),
                 overhead_us=OverheadConfig(op=1.0, conv=0.5, matmul=0.125, view=0.25, module=0.5))
    sim = simulate_model(conv_bn_relu_fc(), X, [profile])["h"]
    conv, view, fc = sim.ops
    assert (conv.op, conv.fused, view.kind, fc.op) == ("conv2d+batch_norm+relu", ["1", "2"], "view", "linear")
    # conv + ReLU (BN folded: no FLOPs, no bytes): 576 / (0.5 x 0.5) + 16 / 0.25 ns
    assert conv.flops == 592 and conv.compute_us == pytest.approx(2.304 + 0.064)
    # DRAM: the input (128 B); chip: the ReLU's output (64 B) and the weights (288 B) at 2 GB/s
    assert (conv.dram_bytes, conv.chip_bytes, conv.weight_bytes) == (128, 64 + 288, 288)
    assert conv.memory_us == pytest.approx(0.128 + 352 / 2000)
    assert (conv.overhead_us, conv.time_us, conv.bound) == pytest.approx((0.5, 2.868, "compute"))
    assert (view.overhead_us, view.time_us, view.bound) == pytest.approx((0.25, 0.25, "overhead"))
    # linear: 99 FLOPs at 0.8 x 3/4 x 0.5; DRAM: its 3 outputs; chip: its input, 3 biases and 48 weights
    assert fc.compute_us == pytest.approx(99 / 0.3 / 1000)
    assert (fc.dram_bytes, fc.chip_bytes) == (12, 64 + 12 + 192)
    assert fc.memory_us == pytest.approx(0.012 + 268 / 2000)
    assert (fc.time_us, fc.bound) == pytest.approx((0.33 + 0.125, "compute"))
    assert sim.latency_us == pytest.approx(2.868 + 0.25 + 0.455 + 3.0)
    # one byte short: the weights and parameters stream from DRAM, and the whole buffer holds the activation
    (conv, _, fc) = simulate_model(conv_bn_relu_fc(), X, [dataclasses.replace(profile, on_chip_bytes=555)])["h"].ops
    assert (conv.dram_bytes, conv.chip_bytes, fc.dram_bytes, fc.chip_bytes) == (128 + 288, 64, 12 + 12 + 192, 64)
    assert conv.memory_us == pytest.approx(0.416 + 0.032) and fc.memory_us == pytest.approx(0.216 + 0.032)


# -- weights the layers of ``prunable_layers`` do not hold ----------------------------------------------------
class BareWeight(nn.Module):
    """F.linear on a bare parameter, as transformers' Conv1D and MultiheadAttention's in_proj_weight do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_weight = nn.Parameter(torch.randn(8, 16))
        self.scale = nn.Parameter(torch.ones(8))  # a 1-D weight-like parameter: read as a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.proj_weight) * self.scale


def test_a_bare_weight_read_by_a_matmul_is_priced_like_a_linear_layer():
    # 16 inputs (64 B), 8 outputs (32 B), 128 weights (512 B): found by its own name, dense
    profile = hw()
    fc, _ = simulate_model(BareWeight(), torch.randn(1, 16), [profile])["h"].ops
    assert (fc.op, fc.weight_format, fc.weight_bytes, fc.dram_bytes) == ("linear", "dense", 512, 64 + 32 + 512)
    assert fc.memory_us == pytest.approx(0.608)
    info = weight_infos(BareWeight())["proj_weight"]
    assert info.name == "proj_weight" and (info.elements, info.nonzero, info.rows, info.shared_bits) == (128, 128, 8, None)
    assert "scale" not in weight_infos(BareWeight())


class Tied(nn.Module):
    """An embedding's table reused by the output layer (GPT-2's lm_head): the trace names it after the first holder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def test_a_tied_weight_is_priced_under_the_name_the_trace_gives_it():
    tied = Tied()
    with torch.no_grad():
        tied.embed.weight[:5] = 0  # half the table zero
    infos = weight_infos(tied)
    assert (infos["embed.weight"].elements, infos["embed.weight"].nonzero) == (40, 20)
    sim = simulate_model(tied, torch.tensor([[1, 2]]), [hw()])["h"]
    head = next(o for o in sim.ops if o.kind == "matmul")
    # 2 tokens: 8 floats in, 20 out, the 40-entry table as the weight (160 B)
    assert (head.weight_format, head.weight_bytes, head.dram_bytes) == ("dense", 160, (8 + 20 + 40) * 4)


class RootWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 4))
        with torch.no_grad():
            self.weight[0, 0] = 1.0
        self.register_buffer("table_weight", torch.ones(2, 2))  # buffers are read like parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def test_a_weight_of_the_model_itself_has_no_prefix_and_buffers_count():
    infos = weight_infos(RootWeight())
    assert set(infos) == {"weight", "table_weight"}
    assert (infos["weight"].elements, infos["weight"].nonzero, infos["weight"].rows) == (12, 1, 3)
    assert torch.equal(infos["weight"].tensor, RootWeight().weight)
    assert (infos["table_weight"].elements, infos["table_weight"].rows) == (4, 2)


class Aliased(nn.Module):
    """Two tensors, each held twice: a layer's weight also kept as a later module's buffer, and a buffer of an
    earlier module that a later layer holds as its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Module()
        self.b.register_buffer("copy_weight", self.a.weight.detach())
        self.c = nn.Module()
        self.c.register_buffer("table_weight", torch.randn(4, 4))
        self.d = nn.Linear(4, 4, bias=False)
        self.d.weight = nn.Parameter(self.c.table_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(self.a(x))


def test_weight_infos_name_a_tensor_held_twice_as_the_trace_does():
    from compress.hardware import trace_ops

    model = Aliased().eval()
    x = torch.randn(1, 4)
    # the trace names a tensor after its first holder, parameters and buffers module by module
    read = [o.weight for o in trace_ops(model, x).ops if o.kind == "matmul"]
    assert read == ["a.weight", "c.table_weight"]
    infos = weight_infos(model, model)
    assert set(infos) == {"a.weight", "d.weight", "c.table_weight"}  # the layers' own, and the table's first name
    a, d = simulate_model(model, x, [hw()], deployed=model)["h"].ops
    assert a.weight_bytes == d.weight_bytes == 64 and d.dram_bytes == 16 + 16 + 64


def test_a_layer_the_deployed_copy_lacks_is_counted_on_the_model_itself():
    model = nn.Sequential(nn.Linear(4, 3), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0]).view(2, 2, 1, 1))
    infos = weight_infos(model, nn.Sequential(nn.Linear(4, 3)))
    assert (infos["1.weight"].elements, infos["1.weight"].nonzero, infos["1.weight"].rows) == (4, 1, 2)
    assert torch.equal(infos["1.weight"].tensor, model[1].weight)


def test_codebook_bits_of_a_shared_layer_survive_the_deployed_copy():
    from compress.sharing.shared import share_layer

    torch.manual_seed(0)
    fc = nn.Sequential(nn.Linear(8, 4))
    share_layer(fc[0], bits=2)
    assert set(weight_infos(fc)) == {"0.weight"} and weight_infos(fc)["0.weight"].shared_bits == 2


# -- hand-built traces -----------------------------------------------------------------------------------------
def op(index, kind, flops=0, reads=(), writes=(), name=None, **kw) -> Op:
    return Op(index=index, module=f"m{index}", module_type="M", leaf=True, name=name or kind, kind=kind, flops=flops,
              reads=list(reads), writes=list(writes), **kw)


def run(ops, profile, weights=None):
    trace = Trace(ops=ops, module_calls=0, input_ids={0}, output_ids={ops[-1].writes[0][0]}, weights={})
    return simulate(trace, weights or {}, profile)


def test_a_weight_without_facts_is_reported_dense_and_moves_no_bytes():
    # simulate prices the formats weight_infos describes: a weight missing from them adds nothing
    (o,) = run([op(0, "matmul", 1000, [(0, 10, 0)], [(1, 20, 0)], weight="w.weight", out_channels=20,
                   in_channels=10)], hw()).ops
    assert (o.weight_format, o.weight_bytes, o.dram_bytes) == ("dense", 0, 120)


def test_an_empty_layer_fills_its_lanes():
    # no output channels (all removed): nothing idles, so the conv runs at the full kernel rate
    (o,) = run([op(0, "conv", 800, [(0, 8, 0)], [(1, 0, 0)], out_channels=0, in_channels=8)],
               hw(lanes=8, efficiency=EfficiencyConfig(conv=0.5, unaligned=0.25))).ops
    assert o.compute_us == pytest.approx(800 / 0.5 / 1000)


def test_op_row_keeps_groups_and_strips_only_the_in_place_underscore():
    (o,) = run([op(0, "grouped_conv", 100, [(0, 8, 0)], [(1, 8, 0)], name="conv_depthwiseX_", out_channels=8,
                   in_channels=8, groups=8, kernel=(3, 3))], hw()).ops
    assert (o.op, o.groups, o.kernel) == ("conv_depthwiseX", 8, (3, 3))


def test_as_row_holds_every_field_once_as_json_values():
    cost = OpCost(name="fc", module="fc", op="addmm+relu", kind="matmul", flops=1.0, dram_bytes=2.0, chip_bytes=3.0,
                  weight_bytes=4.0, compute_us=5.0, memory_us=6.0, overhead_us=7.0, time_us=8.0, bound="memory",
                  weight_format="dense", fused=["relu"], out_channels=2, in_channels=3, groups=1, kernel=(1, 1))
    row = cost.as_row()
    assert list(row) == [f.name for f in dataclasses.fields(OpCost)]
    assert json.loads(json.dumps(row)) == row and row["kernel"] == [1, 1] and row["fused"] == ["relu"]
    row["fused"].append("x")
    assert cost.fused == ["relu"]  # the row is a copy


def test_a_weight_with_no_elements_is_dense_and_keeps_any_n_m_pattern():
    # every input channel removed: no zero to skip, so CSR is never offered (its density would be 0/0);
    # the bias add is all the op does: 4 FLOPs at 0.001 GFLOP/s = 4 us
    csr = hw(peak_gflops=PeakConfig(fp32=0.001),
             sparsity=SparsityConfig(unstructured=UnstructuredConfig(format="csr", index_bits=4)))
    (o,) = [o for o in simulate_model(nn.Linear(0, 4), torch.randn(1, 0), [csr])["h"].ops if o.kind == "matmul"]
    assert (o.weight_format, o.flops, o.compute_us) == ("dense", 4, pytest.approx(4.0))
    # an empty weight has no group of M that holds more than N non-zeros, whatever its rank
    for shape in [(0, 8), (4, 0), (4, 0, 3, 3), (0, 8, 3, 3)]:
        assert nm_compliant(torch.zeros(shape), 2, 4), shape
    assert not nm_compliant(torch.zeros(8), 2, 4)  # a bias-like vector is no matmul weight
    assert not nm_compliant(torch.ones(2, 6), 2, 4)  # 6 inputs do not split into groups of 4
