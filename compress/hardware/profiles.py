"""Hardware profiles: what a roofline needs to know about a device, as small YAML files.

A profile gives peak compute per dtype, memory bandwidth, the on-chip buffer, per-op overheads
and what the hardware can exploit (unstructured sparsity in CSR, N:M sparsity, weight sharing,
operator fusion). Shipped profiles live in ``compress/hardware/profiles/*.yaml`` and are
registered by file name in :data:`PROFILES`; a user's profile is a path to a YAML file with the
same schema. Files are validated against :class:`HardwareProfile` (an OmegaConf structured
config), so a typo or a wrong type is one error line naming the file and the field.

``cpu-local`` is special: its figures are measured on the machine that runs it
(:mod:`compress.hardware.calibrate`), then cached.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from compress.errors import UserError, nearest, suggest
from compress.registry import Registry
from compress.schema import merge_structured, read_yaml

__all__ = ["HardwareProfile", "PeakConfig", "OverheadConfig", "EfficiencyConfig", "UnstructuredConfig",
           "SparsityConfig", "FusionConfig", "PROFILES", "PROFILE_DIR", "DTYPE_BYTES", "load_profile",
           "resolve_profile", "check_profiles", "profile_from_dict", "CALIBRATORS", "aligned_channels"]

PROFILE_DIR = Path(__file__).with_name("profiles")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


@dataclass
class PeakConfig:
    """Peak dense compute in GFLOP/s (GOP/s for int8); null where the dtype is not supported."""

    fp32: float | None = None
    fp16: float | None = None
    int8: float | None = None


@dataclass
class OverheadConfig:
    """Fixed cost per operation in microseconds, added to its roofline time.

    ``op`` is a kernel launch or dispatch; ``view`` a metadata-only op (reshape, transpose);
    ``module`` one ``nn.Module`` call in eager PyTorch (0 for a compiled runtime); ``conv``,
    ``grouped_conv`` and ``matmul`` replace ``op`` for those kernels when set.
    """

    op: float = 0.0
    view: float = 0.0
    module: float = 0.0
    conv: float | None = None
    grouped_conv: float | None = None
    matmul: float | None = None


@dataclass
class EfficiencyConfig:
    """Fraction of peak compute each kind of kernel reaches (1.0: the peak)."""

    conv: float = 1.0  # dense convolutions (peak is usually a large GEMM)
    matmul: float = 1.0
    grouped_conv: float = 1.0  # depthwise and grouped: little reuse, lanes poorly filled
    elementwise: float = 1.0
    pool: float = 1.0  # FLOPs of a pooling window (one per element read)
    unaligned: float = 1.0  # extra factor when a layer's channels are not multiples of ``lanes``


@dataclass
class UnstructuredConfig:
    """Unstructured sparsity: ``none``, or ``csr`` (values + relative indices of ``index_bits``)."""

    format: str = "none"
    efficiency: float = 1.0  # fraction of the dense kernel's throughput the sparse kernel reaches
    index_bits: int = 16


@dataclass
class SparsityConfig:
    unstructured: UnstructuredConfig = field(default_factory=UnstructuredConfig)
    nm: str | None = None  # e.g. "2:4": at most N non-zeros in every M consecutive weights


@dataclass
class FusionConfig:
    conv_bn_act: bool = False  # BN and activation after a conv/linear run inside it
    elementwise: bool = False  # an element-wise op runs inside the op that produced its input


@dataclass
class HardwareProfile:
    """One device for the roofline simulator (see profiles/*.yaml for documented examples)."""

    name: str = "?"
    description: str = ""
    dtype: str = "fp32"  # what models run at here: weights and activations
    peak_gflops: PeakConfig = field(default_factory=PeakConfig)
    memory_gbps: float | None = None  # off-chip (DRAM) bandwidth, GB/s
    on_chip_bytes: int = 0  # buffer/cache holding activations (and weights, if weights_on_chip)
    on_chip_gbps: float | None = None  # bandwidth of that buffer; null: free next to DRAM
    weights_on_chip: bool = False  # weights may stay on chip across inferences when they fit
    lanes: int = 1  # channels computed side by side; others pad to a multiple of this
    overhead_us: OverheadConfig = field(default_factory=OverheadConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    weight_sharing: bool = False  # weights read at their codebook bits (plus the codebook)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    calibrate: str | None = None  # "cpu": figures measured on this machine (cpu-local)
    source: str = ""  # where the profile came from (file path), filled in on load

    # -- derived ---------------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def peak_flops(self) -> float:
        """Peak dense FLOP/s (OP/s) at the profile's dtype."""
        return float(getattr(self.peak_gflops, self.dtype)) * 1e9

    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        if not self.sparsity.nm:
            return None
        n, m = self.sparsity.nm.split(":")
        return int(n), int(m)

    def as_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.structured(self))  # type: ignore[return-value]


def aligned_channels(profile: HardwareProfile) -> int:
    """The channel multiple this hardware rewards: its ``lanes``.

    One definition for the simulator's lane notes and ``prune.structured``'s ``round_to: auto``,
    so the two never disagree.
    """
    return max(1, int(profile.lanes))


# Shipped profiles: name -> YAML path. One registry per extension point (the house's Registry).
PROFILES: Registry[Path] = Registry("hardware profile")
for _path in sorted(PROFILE_DIR.glob("*.yaml")):
    PROFILES.register(_path.stem, _path)

# ``calibrate: KIND`` in a profile -> fn(profile) -> the profile with measured figures filled in.
# :mod:`compress.hardware.calibrate` registers ``cpu``; this module never imports it.
CALIBRATORS: Registry[Callable[[HardwareProfile], HardwareProfile]] = Registry("calibration")


def _looks_like_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or "/" in name or "\\" in name


def _read_file(path: Path, key: str) -> dict[str, Any]:
    where = f"{key}: " if key else ""
    if not path.is_file():
        raise UserError(f"{where}profile file '{path}' not found; give a shipped name ({', '.join(PROFILES.names())}) "
                        "or the path of a YAML file")
    try:
        data = read_yaml(path, f"{where}{path}")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}{path}{at}: YAML syntax error: {problem}") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}{path}: a hardware profile is a mapping of fields (name, dtype, peak_gflops, "
                        f"memory_gbps, ...), got {type(data).__name__}")
    return data


def profile_from_dict(data: dict[str, Any], where: str) -> HardwareProfile:
    """Validate ``data`` against the schema; ``where`` (file or key) starts every error line."""
    try:
        cfg = merge_structured(HardwareProfile, data, "")
        profile: HardwareProfile = OmegaConf.to_object(cfg)  # type: ignore[assignment]
        _check_values(profile, calibrated_later=profile.calibrate is not None)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return profile


def _check_values(p: HardwareProfile, calibrated_later: bool = False) -> None:
    def bad(field_: str, why: str) -> UserError:
        return UserError(f"{field_}: {why}")

    if p.dtype not in DTYPE_BYTES:
        raise bad("dtype", f"'{p.dtype}' is not valid; {suggest(p.dtype, DTYPE_BYTES)}")
    if p.calibrate not in (None, "cpu"):
        raise bad("calibrate", f"'{p.calibrate}' is not valid; valid: cpu (or leave it out)")
    if not calibrated_later:
        peak = getattr(p.peak_gflops, p.dtype)
        if peak is None:
            raise bad(f"peak_gflops.{p.dtype}", f"required: the profile runs models at {p.dtype}; give its peak in "
                                                "GFLOP/s or change dtype")
        if p.memory_gbps is None:
            raise bad("memory_gbps", "required: off-chip bandwidth in GB/s")
    for name in DTYPE_BYTES:
        v = getattr(p.peak_gflops, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise bad(f"peak_gflops.{name}", f"{v} must be > 0 (or null: not supported)")
    for name, v in (("memory_gbps", p.memory_gbps), ("on_chip_gbps", p.on_chip_gbps)):
        if v is not None and not v > 0:
            raise bad(name, f"{v} must be > 0")
    if p.on_chip_bytes < 0:
        raise bad("on_chip_bytes", f"{p.on_chip_bytes} must be >= 0")
    if p.lanes < 1:
        raise bad("lanes", f"{p.lanes} must be >= 1")
    for name, v in vars(p.overhead_us).items():
        if v is not None and not v >= 0:
            raise bad(f"overhead_us.{name}", f"{v} must be >= 0")
    for name, v in vars(p.efficiency).items():
        if not 0 < v <= 1:
            raise bad(f"efficiency.{name}", f"{v} must be in (0, 1]")
    u = p.sparsity.unstructured
    if u.format not in ("none", "csr"):
        raise bad("sparsity.unstructured.format", f"'{u.format}' is not valid; valid: none, csr")
    if not 0 < u.efficiency <= 1:
        raise bad("sparsity.unstructured.efficiency", f"{u.efficiency} must be in (0, 1]")
    if not 1 <= u.index_bits <= 32:
        raise bad("sparsity.unstructured.index_bits", f"{u.index_bits} must be in [1, 32]")
    if p.sparsity.nm is not None:
        parts = str(p.sparsity.nm).split(":")
        ok = len(parts) == 2 and all(s.isdigit() for s in parts) and 0 < int(parts[0]) < int(parts[1])
        if not ok:
            raise bad("sparsity.nm", f"'{p.sparsity.nm}' is not an N:M pattern; write it like \"2:4\" (N < M)")


@lru_cache(maxsize=64)
def _load_file(path: str, key: str, mtime_ns: int) -> HardwareProfile:
    data = _read_file(Path(path), key)
    profile = profile_from_dict(data, f"{key}: {path}" if key else path)
    profile.source = path
    if profile.name == "?":
        profile.name = Path(path).stem
    return profile


def load_profile(name_or_path: str, key: str = "", calibrate: bool = True) -> HardwareProfile:
    """A shipped profile by name, or a YAML file by path; ``cpu-local`` is calibrated (cached).

    Args:
        name_or_path: ``jetson-tx2``, or ``path/to/device.yaml``.
        key: recipe path named in errors (``hardware[1]``).
        calibrate: measure this machine for ``calibrate: cpu`` profiles (False: leave figures unset).
    """
    name_or_path = str(name_or_path)
    if name_or_path in PROFILES:
        path = PROFILES.get(name_or_path)
    elif _looks_like_path(name_or_path):
        path = Path(name_or_path)
    else:
        near = nearest(name_or_path, PROFILES.names())
        hint = f" (did you mean '{near}'?)" if near else ""
        raise UserError(f"{key + ': ' if key else ''}unknown profile '{name_or_path}'{hint}; shipped: "
                        f"{', '.join(PROFILES.names())}; or give the path of a YAML file")
    mtime = path.stat().st_mtime_ns if path.is_file() else 0
    profile = copy.deepcopy(_load_file(str(path), key, mtime))
    if profile.calibrate is not None and calibrate:
        profile = CALIBRATORS.get(profile.calibrate, f"{key or name_or_path}.calibrate")(profile)
    return profile


def resolve_profile(profile: str | HardwareProfile, key: str = "") -> HardwareProfile:
    """Accept a name, a path or a ready :class:`HardwareProfile` (timm's get_act_layer idiom)."""
    return profile if isinstance(profile, HardwareProfile) else load_profile(profile, key)


def check_profiles(names: list[str], key: str = "hardware") -> None:
    """Validate a recipe's ``hardware`` list without measuring anything (recipe validation)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        k = f"{key}[{i}]"
        if not isinstance(name, str) or not name:
            raise UserError(f"{k}: expected a profile name or a YAML path, got {name!r}; shipped: "
                            f"{', '.join(PROFILES.names())}")
        profile = load_profile(name, k, calibrate=False)
        if profile.name in seen:
            raise UserError(f"{k}: profile '{profile.name}' is listed twice (metric keys are per profile name)")
        seen.add(profile.name)
