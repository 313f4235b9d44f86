"""Benchmark: the model families users bring, through every kind of stage, as a new user runs them.

torchvision (ResNet-18, MobileNetV3, EfficientNet-B0, ShuffleNetV2, DenseNet-121, RegNet, ViT), timm
(ViT, ConvNeXt, MobileViT) and Hugging Face (BERT, DistilBERT, GPT-2, ViT; small configs, no download)
x (structured pruning to 2x MACs, unstructured 50% + 5-bit sharing, int8 PTQ measured in ONNX Runtime,
``run.py export --format onnx`` of the int8 run), random weights on synthetic data. Each cell runs
``run.py`` in a subprocess, first ``--dry-run`` (a refusal there is the wanted kind), then the run:

* outcome: ``ok``, ``refused at --dry-run``, ``refused`` (exit 2: one line, after work started) or
  ``TRACEBACK`` (anything else: a bug); the one line is kept;
* MAC ratio, self-check (the largest relative output difference of a structural step against the
  original with the removed channels zeroed), ONNX Runtime speedup (int8), notes, seconds.

torchvision 0.29 and timm 1.0 need torch 2.14.1, so this runs in its own venv, never in CI::

    python -m venv /work/famvenv && /work/famvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \\
        -e ".[dev]"
    /work/famvenv/bin/python bench/families.py [--families hf torchvision timm] [--out bench/results/families.json]

A family whose package is missing is skipped with a line saying so. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import write_json

ROOT = Path(__file__).resolve().parents[1]
IMAGES = {"name": "synthetic", "shape": [3, 64, 64], "classes": 10, "train_size": 64, "test_size": 64,
          "batch_size": 16}
TOKENS = {"name": "tokens", "vocab_size": 64, "seq_len": 16, "classes": 2, "train_size": 64, "test_size": 64,
          "batch_size": 16}


def _hf(model_type: str, task: str = "sequence-classification", **config: Any) -> dict[str, Any]:
    return {"name": "transformers", "task": task, "config": {"model_type": model_type, **config}}


TEXT = dict(vocab_size=64, max_position_embeddings=32)
MODELS: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "torchvision": {
        name: ({"name": f"import:torchvision.models:{fn}", "num_classes": IMAGES["classes"]}, IMAGES)
        for name, fn in [("ResNet-18", "resnet18"), ("MobileNetV3", "mobilenet_v3_small"),
                         ("EfficientNet-B0", "efficientnet_b0"), ("ShuffleNetV2", "shufflenet_v2_x0_5"),
                         ("DenseNet-121", "densenet121"), ("RegNet", "regnet_y_400mf")]
    } | {"ViT": ({"name": "import:torchvision.models:VisionTransformer", "image_size": 64, "patch_size": 16,
                  "num_layers": 2, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128,
                  "num_classes": IMAGES["classes"]}, IMAGES)},
    "timm": {
        name: ({"name": "import:timm:create_model", "model_name": arch, "num_classes": IMAGES["classes"], **extra},
               IMAGES)
        for name, arch, extra in [("ViT", "vit_tiny_patch16_224", {"img_size": 64}),
                                  ("ConvNeXt", "convnext_atto", {}),
                                  ("MobileViT", "mobilevit_xxs", {})]
    },
    "hf": {
        "BERT": (_hf("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     **TEXT), TOKENS),
        "DistilBERT": (_hf("distilbert", dim=64, n_layers=2, n_heads=4, hidden_dim=128, **TEXT), TOKENS),
        "GPT-2": (_hf("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2), TOKENS),
        "ViT": (_hf("vit", "image-classification", image_size=64, patch_size=16, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=128), IMAGES),
    },
}
PACKAGES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}
VARIANTS = {
    "structured 2x MACs": [{"type": "prune.structured", "mac_speedup": 2.0}],
    "unstructured + share": [{"type": "prune.unstructured", "sparsity": 0.5}, {"type": "share", "bits": 5}],
    "int8 PTQ": [{"type": "quantize", "mode": "ptq", "calibration_batches": 2}],
}


def _run(args: list[str], timeout: int) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s", time.perf_counter() - t0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, (lines[-1] if lines else ""), time.perf_counter() - t0


def _outcome(code: int, line: str, when: str) -> str:
    if code == 0:
        return "ok"
    if code == 2 and line.startswith("error: "):
        return f"refused{when}: {line[7:]}"
    return f"TRACEBACK{when}: {line}"


def run_cell(model: dict, data: dict, variant: str, folder: Path, timeout: int) -> dict[str, Any]:
    """One model x variant: dry run, run, (int8) export; what happened and the figures."""
    recipe = {"name": "fam", "seed": 0, "out_dir": str(folder / "run"), "model": model, "data": data,
              "trainer": {"progress_bar": False}, "logger": {"wandb": {"mode": "disabled"}},
              "eval": {"latency_repeats": 5, "latency_warmup": 1, "max_batches": 2,
                       "runtimes": ["onnxruntime"] if variant == "int8 PTQ" else []},
              "hardware": [], "stages": VARIANTS[variant]}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    row: dict[str, Any] = {"variant": variant}
    code, line, seconds = _run([str(path), "--dry-run"], timeout)
    if code != 0:
        return row | {"outcome": _outcome(code, line, " at --dry-run"), "seconds": seconds}
    code, line, seconds = _run([str(path), "--quiet"], timeout)
    row |= {"outcome": _outcome(code, line, ""), "seconds": seconds}
    report = folder / "run" / "report.json"
    if code == 0 and report.exists():
        last = json.loads(report.read_text())["stages"][-1]
        m, info = last["metrics"], last["info"]
        row |= {"mac_ratio": m.get("mac_speedup"), "self_check": info.get("self_check"),
                "ort_speedup": m.get("runtime_speedup/onnxruntime"), "notes": len(last.get("notes", []))}
    if code == 0 and variant == "int8 PTQ":
        # an ``import:`` or ``transformers`` model is code the checkpoint names: export builds it only on trust, as a
        # user would pass
        trust = ["--trust-model-code"] if model["name"].startswith("import:") or model["name"] == "transformers" else []
        code, line, s = _run(["export", str(folder / "run"), "--format", "onnx", *trust], timeout)
        row |= {"export": _outcome(code, line, ""), "seconds": seconds + s}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--models", nargs="+", default=None, help="only these model names (e.g. ResNet-18 ViT)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--timeout", type=int, default=600, help="seconds per run.py call")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()
    rows = []
    for family in args.families:
        if importlib.util.find_spec(PACKAGES[family]) is None:
            print(f"{family}: {PACKAGES[family]} is not installed; skipped")
            continue
        for name, (model, data) in MODELS[family].items():
            if args.models is not None and name not in args.models:
                continue
            for variant in args.variants:
                with tempfile.TemporaryDirectory() as tmp:
                    row = {"family": family, "model": name} | run_cell(model, data, variant, Path(tmp), args.timeout)
                rows.append(row)
                print(json.dumps(row, default=float), flush=True)
    print("\n| family | model | variant | outcome | MAC ratio | self-check | ORT speedup | export | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def f(key: str, spec: str, r: dict = r) -> str:
            return format(r[key], spec) if r.get(key) is not None else "-"
        print(f"| {r['family']} | {r['model']} | {r['variant']} | {r['outcome'][:120]} | {f('mac_ratio', '.2f')} | "
              f"{f('self_check', '.1e')} | {f('ort_speedup', '.2f')} | {r.get('export', '-')[:60]} | "
              f"{f('seconds', '.0f')} |")
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
