"""Per-layer pruning sensitivity: prune each layer alone at several ratios, evaluate, plot.

The analysis of Li et al. 2017 ("Pruning Filters for Efficient ConvNets", section 4.1, Fig. 2b)
and Han et al. 2015 (Fig. 6): each layer's filters are removed alone (with the layers coupled to
it by residual adds or concatenation, which Torch-Pruning's dependency graph removes together),
without fine-tuning, and the accuracy curve per layer shows which layers tolerate pruning. The
largest ratio whose accuracy drop stays within ``max_drop`` gives a suggested per-layer ratio map
for ``prune.structured.layer_ratios``. The drops were measured one layer at a time; pruned
together they add up, so fine-tune (or lower ``max_drop``).
"""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch_pruning as tp
from torch import Tensor, nn

from compress.errors import UserError
from compress.plumbing.masks import deployed_copy, prunable_layers
from compress.pruning.attention import plan_heads
from compress.pruning.structured import count_macs, output_layers, resolve_importance, trace_logits
from compress.schema import match_layers

__all__ = ["run_sensitivity", "suggest_ratios", "DEFAULT_RATIOS"]

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _coupled_groups(model: nn.Module, example_inputs: Tensor, names: list[str], ignored: list[str]) -> dict[str, list[str]]:
    """Each layer that roots its own group -> every prunable layer whose outputs go with it."""
    layers = prunable_layers(model)
    module2name = {m: n for n, m in layers.items()}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=trace_logits)
    groups: dict[str, list[str]] = {}
    covered: set[str] = set()
    for name in names:
        if name in covered:
            continue
        layer = layers[name]
        fn = dg.get_pruner_of_module(layer).prune_out_channels
        group = dg.get_pruning_group(layer, fn, idxs=list(range(dg.get_out_channels(layer))))
        members = sorted({module2name[dep.target.module] for dep, _ in group
                          if dep.target.module in module2name and dg.is_out_channel_pruning_fn(dep.handler)})
        if any(m in ignored for m in members):
            continue  # pruning it would change an ignored or output layer's outputs
        covered.update(members)
        groups[name] = members
    return groups


def suggest_ratios(curves: dict[str, dict[float, float]], baseline: float, max_drop: float) -> dict[str, float]:
    """Per layer, the largest ratio such that it and every smaller ratio lose at most ``max_drop``."""
    out: dict[str, float] = {}
    for layer, curve in curves.items():
        best = 0.0
        for ratio in sorted(curve):
            if baseline - curve[ratio] > max_drop:
                break
            best = ratio
        if best > 0:
            out[layer] = best
    return out


def run_sensitivity(model: nn.Module, evaluate_fn: Callable[[nn.Module], float], example_inputs: Tensor,
                    out_dir: str | Path, ratios: Sequence[float] = DEFAULT_RATIOS, importance: Any = "l1",
                    max_drop: float = 0.01, layers: Sequence[str] = (), ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Prune each layer (group) alone at each ratio, evaluate without fine-tuning, write CSV + PNG.

    Args:
        model: the trained model; left untouched (copies are pruned, masks baked in).
        evaluate_fn: ``evaluate_fn(model) -> accuracy`` (higher is better, any scale).
        example_inputs: a batch for tracing.
        out_dir: where ``sensitivity.csv``, ``sensitivity.png`` and ``suggested_ratios.json`` go.
        ratios: fractions of channels removed, each in (0, 1).
        importance: which channels go (a name in ``IMPORTANCES`` or an object).
        max_drop: accuracy loss allowed per layer for the suggested ratio map (evaluate_fn's scale).
        layers: only these layers (names/globs); default all but the output layer.
        ignore: layers (names/globs) left alone.

    Returns:
        ``baseline``, ``rows`` (one per layer and ratio), ``curves`` {layer: {ratio: acc}},
        ``groups`` {layer: coupled layers}, ``suggested`` {layer: ratio}, and the file paths.
    """
    for r in ratios:
        if not 0 < r < 1:
            raise UserError(f"sensitivity.ratios: {r} is outside (0, 1)")
    if max_drop < 0:
        raise UserError(f"sensitivity.max_drop: {max_drop} must be >= 0")
    resolve_importance(importance, "sensitivity.importance")  # fail early on a bad name
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = deployed_copy(model).eval()
    all_layers = prunable_layers(base)
    outputs = output_layers(base, example_inputs)
    ignored = set(outputs) | (set(match_layers(list(all_layers), list(ignore), "sensitivity.ignore")) if ignore else set())
    # channels, not heads: a projection narrowed alone would split its module's heads (prune.structured heads:)
    name_of = {m: n for n, m in all_layers.items()}
    ignored |= {name_of[p] for p in plan_heads(base, "keep").ignored_layers() if p in name_of}
    names = list(match_layers(list(all_layers), list(layers), "sensitivity.layers")) if layers else list(all_layers)
    names = [n for n in all_layers if n in names and n not in ignored]
    groups = _coupled_groups(copy.deepcopy(base), example_inputs, names, sorted(ignored))

    base_macs = count_macs(base, example_inputs)[0]
    baseline = float(evaluate_fn(copy.deepcopy(base)))
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[float, float]] = {}
    for name in groups:
        curves[name] = {}
        for ratio in sorted(ratios):
            m = copy.deepcopy(base)
            layer = m.get_submodule(name)
            pruner = tp.pruner.BasePruner(
                m, example_inputs, importance=resolve_importance(importance), pruning_ratio=0.0, forward_fn=trace_logits,
                pruning_ratio_dict={layer: float(ratio)},
                ignored_layers=[m.get_submodule(n) for n in sorted(ignored)])
            pruner.step()
            m.eval()
            acc = float(evaluate_fn(m))
            macs = count_macs(m, example_inputs)[0]
            curves[name][ratio] = acc
            rows.append({"layer": name, "coupled": ";".join(groups[name]), "ratio": ratio,
                         "channels": int(getattr(layer, "out_channels", getattr(layer, "out_features", 0))),
                         "mac_speedup": base_macs / max(1, macs), "accuracy": acc, "drop": baseline - acc})

    csv_path = out_dir / "sensitivity.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "coupled", "ratio", "channels", "mac_speedup", "accuracy", "drop"])
        writer.writeheader()
        writer.writerows(rows)
    png_path = out_dir / "sensitivity.png"
    _plot(curves, baseline, png_path)
    suggested = suggest_ratios(curves, baseline, max_drop)
    json_path = out_dir / "suggested_ratios.json"
    json_path.write_text(json.dumps({"baseline": baseline, "max_drop": max_drop, "layer_ratios": suggested}, indent=2))
    return {"baseline": baseline, "rows": rows, "curves": curves, "groups": groups, "suggested": suggested,
            "max_drop": max_drop, "csv": str(csv_path), "png": str(png_path), "json": str(json_path)}


def _plot(curves: dict[str, dict[float, float]], baseline: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        xs = [0.0] + sorted(curve)
        ax.plot(xs, [baseline] + [curve[r] for r in sorted(curve)], marker="o", markersize=3, label=name)
    ax.axhline(baseline, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("fraction of channels pruned (layer alone, no fine-tuning)")
    ax.set_ylabel("accuracy")
    ax.set_title("Pruning sensitivity per layer")
    if curves:
        ax.legend(fontsize=6 if len(curves) > 12 else 8, ncol=1 + len(curves) // 20, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

