"""Stage ``share``: Deep Compression's weight sharing (Han et al. 2016, section 3).

Per layer, k-means over the non-zero weights into 2^bits centroids (linear init by default, the
paper's best); pruned zeros stay zero and are not clustered. Fine-tuning then trains only the
centroids, each with the sum of its cluster's gradients (eq. 3).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from compress.plumbing.masks import weight_layers
from compress.schema import match_layers
from compress.sharing import share_layer
from compress.stage_configs import LAYER_TYPES, ShareConfig
from compress.stages.base import STAGES, Context, Stage, StageResult, untouched_notes

__all__ = ["ShareStage"]

@STAGES.register("share")
class ShareStage(Stage):
    """``ShareStage(bits=5, types={"conv": 8}).apply(model)``."""

    Config = ShareConfig
    type_name = "share"

    def bits_per_layer(self, model: nn.Module) -> dict[str, int]:
        c = self.config
        layers = weight_layers(model)
        ignored = match_layers(list(layers), list(c.ignore), f"{self.key}.ignore") if c.ignore else {}
        named = match_layers(list(layers), list(c.layers), f"{self.key}.layers") if c.layers else {}
        out = {}
        for name, m in layers.items():
            if name in ignored:
                continue
            kind = next((t for t, classes in LAYER_TYPES.items() if type(m).__name__ in classes
                         or any(b.__name__ in classes for b in type(m).__mro__)), None)
            out[name] = int(c.layers[named[name]]) if name in named else int(c.types.get(kind, c.bits))
        return out

    def plan(self, model: nn.Module, example_inputs: Any = None) -> list[str]:
        return [f"{n} -> {b} bits" for n, b in self.bits_per_layer(model).items()]

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        bits = self.bits_per_layer(model)
        layers = weight_layers(model)
        clusters = {}
        for name, b in bits.items():  # installed before fine-tuning starts (DDP registers parameters then)
            clusters[name] = int(share_layer(layers[name], b, self.config.init).centroids.numel())
        logged = ctx.finetune(model, self.config.finetune, tag=self.name)
        info: dict[str, Any] = {"bits": bits, "clusters": clusters, "finetune": logged}
        notes = untouched_notes(model, ctx, weight_layers(model))
        if notes:
            info["notes"] = notes
        return StageResult(model, info)
