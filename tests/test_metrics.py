import pytest
import torch
from torch import nn

from compress.metrics import count_layers, evaluate_accuracy, measure_latency_ms, summarize
from compress.pruning.masks import set_mask


def test_counts_against_hand_computation(tiny_model):
    # conv 1->4, 3x3 on 8x8: 36 weights, output 6x6 -> 36*36 MACs; fc 144->10: 1440 weights, 1440 MACs
    mask = torch.ones(4, 1, 3, 3, dtype=torch.bool)
    mask[0] = False  # prune one whole filter: 9 zeros
    set_mask(tiny_model.conv, mask)
    fc_mask = torch.ones(10, 144, dtype=torch.bool)
    fc_mask[:, :72] = False  # 720 zeros
    set_mask(tiny_model.fc, fc_mask)
    layers = {s.name: s for s in count_layers(tiny_model, torch.randn(1, 1, 8, 8))}
    assert layers["conv"].params == 36 and layers["conv"].nonzero == 27
    assert layers["conv"].macs == 36 * 36 and layers["conv"].effective_macs == 27 * 36
    assert layers["fc"].macs == 1440 and layers["fc"].effective_macs == 720
    assert layers["fc"].sparsity == pytest.approx(0.5)
    s = summarize(tiny_model, list(layers.values()))
    assert s["params"] == 36 + 4 + 1440 + 10
    assert s["nonzero_params"] == 27 + 4 + 720 + 10
    assert s["sparsity"] == pytest.approx((9 + 720) / (36 + 1440))
    assert s["macs"] == 36 * 36 + 1440 and s["effective_macs"] == 27 * 36 + 720
    assert s["dense_bytes"] == 4 * (36 + 4 + 1440 + 10)


def test_grouped_conv_macs():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False))
    (layer,) = count_layers(model, torch.randn(1, 8, 5, 5))
    assert layer.params == 72 and layer.macs == 72 * 25  # depthwise: 9 MACs per output element


def test_accuracy_and_loss_on_known_predictions():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x  # inputs are the logits

    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1, 1])
    loader = [(logits[:2], labels[:2]), (logits[2:], labels[2:])]
    out = evaluate_accuracy(Fixed(), loader)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, labels)))


class _Clock:
    """A fake ``time`` module whose clock moves only when the model says it ran."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now


def test_latency_is_the_median_time_per_call_after_warmup_in_eval_mode(tiny_model, monkeypatch):
    import compress.metrics.latency as latency

    clock = _Clock()
    monkeypatch.setattr(latency, "time", clock)
    calls: list[tuple[bool, bool]] = []

    class Timed(nn.Module):  # the first call costs 5 ms (a warm-up), every later one 0.25 ms
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append((self.training, torch.is_grad_enabled()))
            clock.now += 0.005 if len(calls) == 1 else 0.00025
            return self.inner(x)

    model = Timed(tiny_model).train()
    ms = measure_latency_ms(model, torch.randn(1, 1, 8, 8), repeats=3, warmup=1)
    assert ms == pytest.approx(0.25, rel=1e-6)  # the 5 ms warm-up call is not in the median
    # the warm-up sized each sample at MIN_SAMPLE_S / 5 ms -> 1 call: 1 + 3 calls in all, in eval mode, no autograd
    assert len(calls) == 4 and not any(training or grad for training, grad in calls)
    assert model.training and tiny_model.training  # the caller's mode is restored


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_counts_are_per_sample_integers_whatever_the_batch_and_skip_unused_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(3, 3)  # registered first, never called
            self.conv = nn.Conv2d(1, 2, 3)
            self.empty = nn.Linear(0, 2)  # no weights at all
            self.fc = nn.Linear(2 * 6 * 6, 4)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1)) + self.empty(x.new_zeros(len(x), 0)).sum(1, keepdim=True)

    layers = count_layers(Net(), torch.randn(3, 1, 8, 8))  # a batch of 3: still per sample
    assert [(s.name, s.type) for s in layers] == [("conv", "Conv2d"), ("empty", "Linear"), ("fc", "Linear")]
    conv, empty, fc = layers
    assert conv.macs == 18 * 36 and fc.macs == 72 * 4 and type(conv.macs) is int and type(fc.effective_macs) is int
    assert (empty.params, empty.macs, empty.sparsity) == (0, 0, 0.0)
    assert conv.as_dict() == {"name": "conv", "type": "Conv2d", "params": 18, "nonzero": 18, "sparsity": 0.0,
                              "macs": 18 * 36, "effective_macs": 18 * 36}
    bn_only = nn.Sequential(nn.BatchNorm2d(2))
    s = summarize(bn_only, count_layers(bn_only, torch.randn(1, 2, 4, 4)))
    assert (s["params"], s["sparsity"], s["macs"]) == (4, 0.0, 0)  # nothing prunable: no sparsity to speak of


def test_int8_rounding_to_zero_is_no_sparsity_but_a_mask_under_quantisation_is():
    from compress.quant import quantize_ptq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[0].weight[:, :4] *= 1e-4  # a quarter of the weights round to zero in int8
    x = torch.randn(16, 8)
    dense = summarize(model, count_layers(model, x))
    assert dense["sparsity"] == 0.0
    quantize_ptq(model, [x])
    assert int((model[0].weight == 0).sum()) >= 8 * 64 // 4 - 8  # int8 did round them to zero ...
    after = summarize(model, count_layers(model, x))
    assert after["sparsity"] == 0.0 and after["effective_macs"] == after["macs"]  # ... which is no pruning
    masked = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    set_mask(masked[2], torch.rand(4, 64) > 0.5)
    zeros = int((masked[2].weight == 0).sum())
    quantize_ptq(masked, [x])
    stats = {s.name: s for s in count_layers(masked, x)}
    assert stats["2"].params - stats["2"].nonzero == zeros  # the mask's zeros still count
