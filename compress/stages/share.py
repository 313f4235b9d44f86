"""Stage ``share``: Deep Compression's weight sharing (Han et al. 2016, section 3).

Per layer, k-means over the non-zero weights into 2^bits centroids (linear init by default, the
paper's best); pruned zeros stay zero and are not clustered. Fine-tuning then trains only the
centroids, each with the sum of its cluster's gradients (eq. 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from compress.config import FinetuneConfig
from compress.errors import UserError
from compress.plumbing.masks import prunable_layers
from compress.schema import check_choice, match_layers
from compress.sharing import share_layer
from compress.stages.base import STAGES, Context, Stage, StageResult

__all__ = ["ShareStage"]

LAYER_TYPES = {"conv": ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d"), "linear": ("Linear",)}


@dataclass
class ShareConfig:
    bits: int = 5  # codebook bits for every layer not set otherwise
    types: dict[str, int] = field(default_factory=dict)  # conv | linear -> bits (the paper: conv 8, fc 5)
    layers: dict[str, int] = field(default_factory=dict)  # name/glob -> bits (wins over types)
    init: str = "linear"  # linear | density | random
    ignore: list[str] = field(default_factory=list)  # layers left unshared (names/globs)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@STAGES.register("share")
class ShareStage(Stage):
    """``ShareStage(bits=5, types={"conv": 8}).apply(model)``."""

    Config = ShareConfig
    type_name = "share"

    def validate(self) -> None:
        c, key = self.config, self.key
        check_choice(c.init, f"{key}.init", ("linear", "density", "random"))
        for k, bits in [("bits", c.bits), *((f"types.{t}", b) for t, b in c.types.items()),
                        *((f"layers.{n}", b) for n, b in c.layers.items())]:
            if not 1 <= bits <= 16:
                raise UserError(f"{key}.{k}: {bits} bits is outside [1, 16]")
        for t in c.types:
            check_choice(t, f"{key}.types", tuple(LAYER_TYPES))

    def bits_per_layer(self, model: nn.Module) -> dict[str, int]:
        c = self.config
        layers = prunable_layers(model)
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

    def plan(self, model: nn.Module) -> list[str]:
        return [f"{n} -> {b} bits" for n, b in self.bits_per_layer(model).items()]

    def apply(self, model: nn.Module, ctx: Context | None = None) -> StageResult:
        ctx = ctx or Context()
        bits = self.bits_per_layer(model)
        layers = prunable_layers(model)
        clusters = {}
        for name, b in bits.items():  # installed before fine-tuning starts (DDP registers parameters then)
            clusters[name] = int(share_layer(layers[name], b, self.config.init).centroids.numel())
        logged = ctx.finetune(model, self.config.finetune, tag=self.name)
        return StageResult(model, {"bits": bits, "clusters": clusters, "finetune": logged})
