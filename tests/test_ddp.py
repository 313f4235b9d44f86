"""The same recipe under Lightning DDP (2 CPU processes, gloo): masks hold on every rank, only rank
zero writes, and the figures agree with a single-process run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.conftest import quick_recipe

DRIVER = textwrap.dedent('''
    """Runs the CLI with a probe stage that records, on every rank, what the model looks like."""
    import json, os, sys
    from dataclasses import dataclass
    import torch
    from compress.cli import main
    from compress.pruning.masks import get_mask, masked_modules, prunable_layers
    from compress.stages import STAGES, Stage, StageResult

    @dataclass
    class ProbeConfig:
        path: str = "probe"

    @STAGES.register("test.probe")
    class ProbeStage(Stage):
        Config = ProbeConfig
        type_name = "test.probe"

        def apply(self, model, ctx=None):
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            layers = {}
            for name, m in prunable_layers(model).items():
                w = m.weight.detach()
                layers[name] = {"nonzero": int(torch.count_nonzero(w)), "distinct": int(torch.unique(w).numel()),
                                "sum": float(w.double().sum())}
                if name in masked_modules(model):
                    layers[name].update(mask_kept=int(get_mask(m).sum()),
                                        zeros_where_masked=bool((w[~get_mask(m)] == 0).all()))
            with open(f"{self.config.path}-{rank}.json", "w") as f:
                json.dump(layers, f)
            return StageResult(model)

    sys.exit(main(sys.argv[1:]))
''')


def recipe_of(tmp_path, name, trainer, probes: bool = True) -> dict:
    recipe = quick_recipe(tmp_path, name=name, out_dir=str(tmp_path / name), trainer=trainer,
                          logger={"wandb": {"mode": "offline"}})
    recipe["data"]["batch_size"] = 32
    recipe["stages"] = [
        {"type": "train", "epochs": 2, "optimizer": {"lr": 0.05}},
        {"type": "prune.unstructured", "sparsity": 0.6, "schedule": "agp",
         "finetune": {"epochs": 2, "optimizer": {"lr": 0.01}}},
        {"type": "test.probe", "path": str(tmp_path / f"{name}-probe")},
        {"type": "share", "bits": 3, "finetune": {"epochs": 1, "optimizer": {"lr": 0.001},
                                                  "distill": {"teacher": "self", "T": 4.0}}},
        {"type": "test.probe", "path": str(tmp_path / f"{name}-shared")},
    ]
    if not probes:
        recipe["stages"] = [s for s in recipe["stages"] if s["type"] != "test.probe"]
    return recipe


def run(tmp_path, name, trainer):
    """The recipe under the driver (a probe stage on every rank) in processes of its own, as DDP needs."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe_of(tmp_path, name, trainer)))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, str(driver), str(path), "--quiet"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / name / "report.json").read_text())


def run_here(tmp_path, name, trainer):
    """The same recipe without the probes, in this process (one process needs no process of its own)."""
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = recipe_of(tmp_path, name, trainer, probes=False)
    recipe["logger"] = {"wandb": {"mode": "disabled"}}
    Pipeline(load_recipe(recipe), quiet=True).run()
    return json.loads((tmp_path / name / "report.json").read_text())


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    single = run_here(tmp_path, "single", {"progress_bar": False})
    ddp = run(tmp_path, "ddp", {"strategy": "ddp", "devices": 2, "accelerator": "cpu", "progress_bar": False})
    assert ddp["recipe"]["trainer"]["strategy"] == "ddp"
    probes = [json.loads((tmp_path / f"ddp-probe-{r}.json").read_text()) for r in (0, 1)]
    assert probes[0] == probes[1], "the ranks hold different models"
    for layer in probes[0].values():
        assert layer["zeros_where_masked"] and layer["nonzero"] == layer["mask_kept"]
    # weight sharing fine-tuned by distillation under DDP: same codebooks on both ranks, <= 2^3 values
    shared = [json.loads((tmp_path / f"ddp-shared-{r}.json").read_text()) for r in (0, 1)]
    assert shared[0] == shared[1], "the ranks hold different codebooks"
    for name, layer in shared[0].items():
        assert layer["distinct"] <= 2 ** 3 + 1 and layer["nonzero"] == probes[0][name]["nonzero"]
    # only rank zero writes: one report, one wandb run, one set of stage checkpoints
    assert len(list((tmp_path / "ddp" / "wandb").glob("offline-run-*"))) == 1
    assert not list(tmp_path.glob("ddp/stage-*.ckpt.*"))
    s, d = single["stages"][-1]["metrics"], ddp["stages"][-1]["metrics"]
    assert d["sparsity"] == pytest.approx(s["sparsity"], abs=1e-6)
    assert d["accuracy"] == pytest.approx(s["accuracy"], abs=0.05)  # half the steps per epoch, same epochs
