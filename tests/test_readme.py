"""The README's Python example runs as written."""

import os
import re

import pytest

from tests.conftest import ROOT


def test_from_python_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    ns: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), ns)
    finally:
        os.chdir(cwd)
    import torch

    from compress import build_datamodule, model_storage, read_compressed
    from compress.metrics import evaluate_accuracy
    from compress.pruning.masks import prunable_layers

    model = ns["model"].eval()
    layers = prunable_layers(model)
    weights = [m.weight.detach() for m in layers.values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.9, abs=0.01)  # pruned to 90% ...
    assert all(w[w != 0].unique().numel() <= 2 ** 5 for w in weights)  # ... then 5-bit codebooks
    decoded = read_compressed(tmp_path / "model.dc")
    x = torch.randn(8, 1, 8, 8)
    for name, m in prunable_layers(decoded).items():
        assert torch.equal(m.weight, layers[name].weight)
    with torch.no_grad():
        assert torch.allclose(decoded(x), model(x), atol=1e-6)
    total = model_storage(model)["total"]
    size = (tmp_path / "model.dc").stat().st_size
    assert total["compressed_bytes"] <= size < total["compressed_bytes"] + 512  # the file, plus its model spec
    assert total["dense_bytes"] / size > 20
    dm = build_datamodule({"name": "digits"})
    # pruned from random init, fine-tuned 3 + 2 epochs: 0.39-0.53 over seeds, far above chance (0.1)
    assert evaluate_accuracy(model, dm.test_dataloader())["accuracy"] > 0.25
