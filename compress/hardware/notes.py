"""Hardware-friendliness notes: what in a model wastes a profile, read off the simulation's numbers."""

from __future__ import annotations

from compress.hardware.profiles import HardwareProfile, aligned_channels
from compress.hardware.roofline import FUSIBLE, Simulation, WeightInfo, _lane_fill

__all__ = ["hardware_notes"]

MIN_SHARE = 0.01  # layers taking less of the time than this are not worth a note
LANE_WASTE = 0.10  # idle lanes worth a note
WIDTH_RATIO = 8.0  # a 1x1 conv this much wider on one side than the other
GROUPED_SHARE = 0.10


def _examples(items: list[str], k: int = 3) -> str:
    more = f", +{len(items) - k} more" if len(items) > k else ""
    return ", ".join(items[:k]) + more


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def hardware_notes(sim: Simulation, profile: HardwareProfile, weights: dict[str, WeightInfo]) -> list[str]:
    """One line per finding, prefixed with the profile's name."""
    p = profile.name
    total = sim.latency_us or 1.0
    matrix = [o for o in sim.ops if o.kind in ("conv", "grouped_conv", "matmul")]
    last = matrix[-1].name if matrix else None  # the classifier: its width is the number of classes
    notes: list[str] = []

    if profile.lanes > 1:
        narrow = [o for o in matrix if o.name != last and o.out_channels < profile.lanes]
        if len(narrow) > len(matrix) / 2:
            notes.append(f"{p}: {len(narrow)} of {len(matrix)} layers have fewer output channels than its "
                         f"{profile.lanes} lanes (e.g. {_examples([f'{o.name} {o.out_channels}' for o in narrow])}): "
                         "the model is too narrow to fill this hardware, whatever the rounding")
        else:
            wasted = [o for o in matrix if o.name != last and o.time_us / total >= MIN_SHARE
                      and 1 - _lane_fill(o.out_channels, profile.lanes) >= LANE_WASTE]
            if wasted:
                items = [f"{o.name} {o.out_channels}->{-(-o.out_channels // profile.lanes) * profile.lanes}" for o in wasted]
                share = sum(o.time_us for o in wasted) / total
                notes.append(f"{p}: {_plural(len(wasted), 'layer')} ({share:.0%} of the time) {'has' if len(wasted) == 1 else 'have'} channel counts that leave "
                             f">={LANE_WASTE:.0%} of its {profile.lanes} lanes idle ({_examples(items)}); "
                             f"prune.structured round_to: {aligned_channels(profile)} (what round_to: auto "
                             f"picks with latency_on: {p}) keeps them aligned")

    lopsided = []
    for o in matrix:
        if o.kind == "conv" and o.groups == 1 and all(k == 1 for k in o.kernel) and o.in_channels and o.out_channels:
            ratio = max(o.in_channels, o.out_channels) / min(o.in_channels, o.out_channels)
            if ratio >= WIDTH_RATIO and o.bound == "memory" and o.time_us / total >= MIN_SHARE:
                lopsided.append(f"{o.name} {o.in_channels}->{o.out_channels} ({o.bound}-bound, {o.time_us / total:.0%})")
    if lopsided:
        notes.append(f"{p}: memory-bound 1x1 convolutions with very unequal widths (little reuse per byte): "
                     f"{_examples(lopsided)}")

    grouped = [o for o in matrix if o.kind == "grouped_conv"]
    if grouped:
        t_share = sum(o.time_us for o in grouped) / total
        flops = sum(o.flops for o in sim.ops) or 1.0
        f_share = sum(o.flops for o in grouped) / flops
        if t_share >= GROUPED_SHARE and t_share > 1.5 * f_share:
            notes.append(f"{p}: depthwise/grouped convolutions do {f_share:.0%} of the FLOPs but take {t_share:.0%} of "
                         f"the time ({sum(o.bound == 'memory' for o in grouped)} of {len(grouped)} memory-bound); "
                         "pruning them gains less than their MACs suggest")

    loose = [o for o in sim.ops if o.kind in FUSIBLE]
    if loose:
        share = sum(o.time_us for o in loose) / total
        if share >= 0.05:
            kinds = sorted({o.op.split("+")[0] for o in loose})
            fix = "fold BN into the conv weights and fuse activations (torch.compile, or an inference runtime)" \
                if not profile.fusion.conv_bn_act else "this hardware fuses conv+BN+activation only"
            notes.append(f"{p}: {len(loose)} element-wise ops run unfused ({', '.join(kinds)}): {share:.0%} of the "
                         f"time; {fix}")

    sparse = [w for w in weights.values() if w.density < 0.9]
    if sparse:
        dens = sum(w.nonzero for w in sparse) / sum(w.elements for w in sparse)
        used = [o for o in matrix if "csr" in o.weight_format or ":" in o.weight_format]
        if profile.sparsity.unstructured.format == "none" and not profile.nm_pattern:
            notes.append(f"{p}: {_plural(len(sparse), 'layer')} {'holds' if len(sparse) == 1 else 'hold'} {1 - dens:.0%} zeros, which this hardware computes anyway "
                         "(no sparse support): structured pruning is what speeds it up")
        elif not used:
            what = f"{profile.sparsity.nm} sparsity" if profile.nm_pattern else "sparse kernels"
            notes.append(f"{p}: {_plural(len(sparse), 'layer')} {'holds' if len(sparse) == 1 else 'hold'} {1 - dens:.0%} zeros but none runs faster with "
                         f"{what}" + (f" (no layer's zeros follow the {profile.sparsity.nm} pattern)"
                                      if profile.nm_pattern else " (not sparse enough to pay for the indices)"))
    return notes
