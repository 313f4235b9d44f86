"""Weight sharing: k-means codebooks whose centroids train with per-cluster gradient sums."""

from pathlib import Path

import pytest
import torch
from torch import nn

from compress.checkpoint import load_into, read_checkpoint, save_checkpoint
from compress.pruning.masks import set_mask
from compress.sharing import kmeans_1d, share_layer
from compress.sharing.kmeans import init_centroids
from compress.sharing.shared import get_shared
from compress.stages import STAGES
from compress.stages.base import Context
from compress.stages.share import ShareStage


def _sgd_steps(model: nn.Module, steps: int = 20, lr: float = 0.01) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, *model.input_shape, generator=g)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()


class Net(nn.Module):
    input_shape = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_kmeans_1d_matches_lloyd_on_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([-3.0, 0.5, 4.0])
    w = (centers[torch.randint(0, 3, (3000,), generator=g)] + 0.1 * torch.randn(3000, generator=g)).view(30, 100)
    c, labels = kmeans_1d(w, 3)
    assert labels.shape == w.shape
    assert torch.allclose(c, centers, atol=0.02)
    # each value sits in the cluster of its nearest centroid, and every centroid is its cluster's mean
    assert torch.equal(labels, (w.unsqueeze(-1) - c).abs().argmin(-1))
    for j in range(3):
        assert c[j] == pytest.approx(float(w[labels == j].mean()), abs=1e-5)


def test_linear_init_spans_min_to_max_evenly():
    w = torch.tensor([-2.0, -1.0, 0.1, 0.2, 6.0]).sort().values
    assert torch.allclose(init_centroids(w, 5, "linear"), torch.tensor([-2.0, 0.0, 2.0, 4.0, 6.0]))
    d = init_centroids(torch.arange(101.0), 3, "density")
    assert torch.allclose(d, torch.tensor([0.0, 50.0, 100.0]))


def _proc_bytes(key: str) -> int:
    import re

    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def test_kmeans_runs_on_25m_weights_without_an_n_by_k_matrix():
    # the time it takes is bench/kmeans.py's business; its memory is this test's
    clear_refs = Path("/proc/self/clear_refs")
    if not clear_refs.exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident size")
    n, k = 25_000_000, 256
    w = torch.randn(n)
    clear_refs.write_text("5")  # VmHWM (peak resident set) := VmRSS now
    before = _proc_bytes("VmRSS")
    c, labels = kmeans_1d(w, k)
    peak = _proc_bytes("VmHWM") - before
    # a float32 (n x k) distance matrix is 25.6 GB, a bool one 6.4 GB; the sort-based Lloyd keeps a few
    # n-long float64/int64 vectors (200 MB each): about 1.6 GB measured
    assert peak < 3e9, f"peak {peak / 1e9:.1f} GB"
    assert c.numel() == k and labels.max() == k - 1
    assert torch.all(c[1:] > c[:-1])
    # each label names the nearest centroid (brute force on a sample)
    idx = torch.randint(0, n, (20_000,), generator=torch.Generator().manual_seed(0))
    nearest = (w[idx, None] - c[None, :]).abs().min(1).values
    assert torch.allclose((w[idx] - c[labels[idx]]).abs(), nearest, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
def test_at_most_2_pow_bits_values_and_pruned_zeros_stay_zero_through_finetuning(bits):
    torch.manual_seed(0)
    model = Net()
    mask = (torch.rand_like(model.fc.weight) > 0.7).float()
    set_mask(model.fc, mask)
    before = model.fc.weight.detach().clone()
    share_layer(model.fc, bits)
    share_layer(model.conv, bits)
    w0 = model.fc.weight.detach().clone()
    assert torch.equal(w0 == 0, before == 0)
    _sgd_steps(model)
    for m in (model.conv, model.fc):
        values = m.weight.detach().unique()
        assert values[values != 0].numel() <= 2 ** bits
    assert torch.isfinite(model.fc.weight).all() and torch.all(model.fc.weight[mask == 0] == 0)
    assert not torch.equal(model.fc.weight.detach(), w0)  # the centroids did train
    # only the codebook, never the per-weight values, is a parameter
    names = {n for n, p in model.named_parameters()}
    assert "fc.parametrizations.weight.0.centroids" in names and "fc.weight" not in names


def test_centroid_gradient_is_the_per_cluster_sum_of_weight_gradients():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.1, -1.0], [0.0, -0.9, 0.95]]))
    shared = share_layer(layer, 1)  # two clusters: about -1 and about +1; the zero is pruned
    idx = shared.indices.long()
    assert torch.equal(idx, torch.tensor([[1, 1, 0], [0, 0, 1]]))
    x = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
    upstream = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    (layer(x) * upstream).sum().backward()
    dw = upstream.t() @ x  # dL/dW of a linear layer, by hand
    dw[1, 0] = 0  # the pruned weight sends nothing to any centroid
    expected = torch.stack([dw[idx == 0].sum(), dw[idx == 1].sum()])
    assert torch.allclose(shared.centroids.grad, expected)


def test_shared_model_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ShareStage(bits=3).apply(model)
    _sgd_steps(model, steps=3)
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, model_spec=None, stage_index=1, stage_name="share")
    back = Net()
    load_into(back, read_checkpoint(path))
    assert get_shared(back.fc) is not None and get_shared(back.fc).bits == 3
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(back(x), model(x))


def test_share_stage_from_python_bits_by_type_and_name(synthetic_dm):
    from compress.models import build_model

    model = build_model("lenet5", input_shape=[1, 8, 8], num_classes=10)
    stage = STAGES.get("share")(bits=4, types={"conv": 6}, layers={"fc_out": 3}, ignore=["features.0"])
    bits = stage.bits_per_layer(model)
    assert bits == {"features.3": 6, "fc1": 4, "fc_out": 3}
    result = stage.apply(model, Context(synthetic_dm, trainer={"progress_bar": False}))
    assert result.info["bits"] == bits
    assert get_shared(model.features[0]) is None
    for name, b in bits.items():
        w = model.get_submodule(name).weight.detach()
        assert w.unique().numel() <= 2 ** b + 1  # codebook values and the pruned zero
    x = torch.randn(2, 1, 8, 8)
    assert model(x).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [({"bits": 0}, "bits"), ({"types": {"lstm": 4}}, "types"),
                                          ({"init": "kmeans++"}, "init")])
def test_bad_share_configs_are_user_errors(kwargs, match):
    from compress.errors import UserError

    with pytest.raises(UserError, match=match):
        ShareStage(**kwargs)


def test_kmeans_small_and_degenerate_inputs():
    empty = torch.empty(0, 3, dtype=torch.float64)
    c, labels = kmeans_1d(empty, 4)
    assert c.shape == (0,) and c.dtype == torch.float64 and labels.shape == (0, 3) and labels.dtype == torch.long
    c, labels = kmeans_1d(torch.tensor([0.5]), 4)  # one value: one cluster
    assert c.tolist() == [0.5] and labels.tolist() == [0]
    c, labels = kmeans_1d(torch.tensor([1.0, 2.0, 4.0, 9.0]), 1)  # k = 1: the mean
    assert c.tolist() == [4.0] and labels.tolist() == [0, 0, 0, 0]
    c, labels = kmeans_1d(torch.tensor([2.0, 1.0, 2.0, 1.0]), 4)  # two distinct values for four clusters
    assert c.tolist() == [1.0, 2.0] and labels.tolist() == [1, 0, 1, 0]


def _lloyd_fixed_point(w: torch.Tensor, c: torch.Tensor, labels: torch.Tensor) -> None:
    """Each value is labelled with its nearest centroid, and each centroid is the mean of its values."""
    assert torch.equal(labels, (w.unsqueeze(-1) - c).abs().argmin(-1))
    for j in range(len(c)):
        assert c[j] == pytest.approx(float(w[labels == j].mean()), abs=1e-6)


def test_kmeans_fixed_points_worked_by_hand():
    # away from zero: the boundary is the midpoint 15.5 between 10.5 and 20.5
    w = torch.tensor([10.0, 11.0, 20.0, 21.0])
    c, labels = kmeans_1d(w, 2)
    assert c.tolist() == [10.5, 20.5] and labels.tolist() == [0, 0, 1, 1]
    # linear init [0, 5, 10]: {0, 1, 2} {6} {10}; the singleton's centroid moves from 5 to its value 6
    w = torch.tensor([0.0, 1.0, 2.0, 6.0, 10.0])
    c, labels = kmeans_1d(w, 3)
    assert c.tolist() == [1.0, 6.0, 10.0]
    _lloyd_fixed_point(w, c, labels)
    # linear init [-1, 0, 1] leaves the middle cluster empty (the gap pruning leaves around zero): it moves to the
    # value farthest from its centroid (0.5, 0.3 from 0.8), then {-1, -0.8} {0.5} {0.9, 1}
    w = torch.tensor([-1.0, -0.8, 0.5, 0.9, 1.0], dtype=torch.float64)
    c, labels = kmeans_1d(w, 3)
    assert c.tolist() == pytest.approx([-0.9, 0.5, 0.95])
    assert labels.tolist() == [0, 0, 1, 2, 2]
    _lloyd_fixed_point(w, c, labels)


def test_kmeans_inits_by_hand():
    # linear keeps the data's precision: 5 centroids 1e-9 apart (float32 would merge them all into 1.0)
    w = torch.tensor([1.0, 1.0 + 4e-9], dtype=torch.float64)
    assert init_centroids(w, 5, "linear").tolist() == pytest.approx([1.0 + i * 1e-9 for i in range(5)], abs=1e-12,
                                                                     rel=0)
    # density: the 0, 1/2 and 1 quantiles, interpolated between ranks (0, 1.5, 3 of 0..3)
    assert init_centroids(torch.arange(4.0), 3, "density").tolist() == [0.0, 1.5, 3.0]
    # above torch.quantile's input limit (2^24 values) the quantiles are read off the sorted values by rank
    big = torch.arange(2 ** 24 + 1, dtype=torch.float64)
    assert init_centroids(big, 3, "density").tolist() == [0.0, 2.0 ** 23, 2.0 ** 24]
    del big
    # random: k of the values, sorted, reproducible from the generator alone
    w = torch.arange(100.0)
    a = init_centroids(w, 5, "random", torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    b = init_centroids(w, 5, "random", torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.all(a[1:] > a[:-1]) and set(a.tolist()) <= set(w.tolist())
    # kmeans_1d passes its generator on: with no Lloyd step the centroids are that init, whatever the global seed
    w = torch.randn(200, generator=torch.Generator().manual_seed(5))
    c1, _ = kmeans_1d(w, 8, "random", iters=0, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1)
    c2, _ = kmeans_1d(w, 8, "random", iters=0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c1, c2)
    assert torch.equal(c1, init_centroids(w.double().sort().values, 8, "random", torch.Generator().manual_seed(3)).float())


def test_codebook_sizes_index_dtypes_and_what_is_clustered():
    torch.manual_seed(0)
    for bits, dtype in ((3, torch.uint8), (8, torch.uint8), (9, torch.int16)):
        layer = nn.Linear(40, 30)  # 1200 distinct weights: a full codebook of 2^bits centroids
        shared = share_layer(layer, bits)
        assert shared.centroids.numel() == 2 ** bits and shared.indices.dtype == dtype, bits
        assert torch.equal(layer.weight, shared.centroids[shared.indices.long()])
    assert int(shared.indices.max()) > 255  # 9-bit indices do not fit a uint8
    with pytest.raises(ValueError, match="already shared"):
        share_layer(layer, 4)
    with pytest.raises(ValueError, match="unknown init 'bogus'"):
        share_layer(nn.Linear(4, 4), 2, init="bogus")
    # pruned zeros are not clustered: the codebook is the means of the non-zero weights only
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 1.1, -1.0], [0.0, -0.9, 0.95]]))
    shared = share_layer(layer, 1)
    assert shared.centroids.tolist() == pytest.approx([(-1.0 - 0.9) / 2, (1.0 + 1.1 + 0.95) / 3])
    assert layer.weight[1, 0] == 0


@pytest.mark.parametrize("bits, weights, reloaded", [
    (1, 50, 1),  # 2 centroids: 1 bit
    (2, 50, 2),
    (9, 200, 9),  # 200 centroids would fit 8 bits, but the stored indices are int16: 9
])
def test_reloaded_codebook_keeps_its_index_width(tmp_path, bits, weights, reloaded):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(weights // 10, 10))
    share_layer(model[0], bits)
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, model_spec=None, stage_index=1, stage_name="share")
    back = nn.Sequential(nn.Linear(weights // 10, 10))
    load_into(back, read_checkpoint(path))
    assert get_shared(back[0]).bits == reloaded
    assert get_shared(back[0]).indices.dtype == get_shared(model[0]).indices.dtype
    assert torch.equal(back[0].weight, model[0].weight)


@pytest.mark.parametrize("offset, scale", [(0.0, 1.0), (1e6, 1.0), (0.0, 1e-9)])
def test_kmeans_runs_lloyd_to_its_fixed_point_at_any_scale(offset, scale):
    # linear init [1, 15.5, 30] -> {1..8} {9} {30} -> {1..6} {7..9} -> {1..5} {6..9} {30}: means 3, 7.5, 30.
    # Every step moves a centroid by at least 0.5, but that is little next to 1e6, and little in absolute terms
    # at 1e-9: a tolerance in either sense would stop before the fixed point.
    w = offset + scale * torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9, 30], dtype=torch.float64)
    c, labels = kmeans_1d(w, 3)
    assert c.tolist() == pytest.approx([offset + scale * v for v in (3.0, 7.5, 30.0)], rel=1e-12)
    assert labels.tolist() == [0] * 5 + [1] * 4 + [2]
