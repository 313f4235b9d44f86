"""Stage tables as text: the full table of report.md and a terminal table that fits a width.

Sinks and the compare command format cells here; nothing is computed but units (fractions to
percent, bytes to KB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TABLE_COLUMNS", "table_columns", "table_rows", "cell", "Column", "TextTable", "terminal_columns"]

# (header, metric key, format) of the Markdown table (every column; the terminal shows a subset).
TABLE_COLUMNS = [
    ("#", "index", "{}"), ("stage", "name", "{}"), ("acc %", "accuracy", "{:.2f}"), ("loss", "loss", "{:.4f}"),
    ("sparsity %", "sparsity", "{:.1f}"), ("nonzero", "nonzero_params", "{:,}"), ("MACs", "effective_macs", "{:,}"),
    ("stored KB", "stored_bytes", "{:.1f}"), ("ratio", "compression_ratio", "{:.1f}x"),
    ("MAC speedup", "mac_speedup", "{:.2f}x"), ("measured", "measured_speedup", "{:.2f}x"),
    ("sim", "sim_speedup", "{:.2f}x"), ("latency ms", "measured_latency_ms", "{:.3f}"), ("wall s", "wall_s", "{:.1f}"),
]
_PERCENT = ("accuracy", "sparsity")


def cell(record: dict[str, Any], key: str, fmt: str) -> str:
    """One formatted cell of a stage record: ``-`` when the metric is absent, ``n/a`` when it is not
    a finite number (``null`` in report.json, NaN in memory)."""
    if key in ("index", "name"):
        return str(record[key])
    if key not in record["metrics"]:
        return "-"
    value = record["metrics"][key]
    if isinstance(value, list | dict):
        return "-"
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key in _PERCENT or key.split("/")[0].endswith("accuracy"):
        value *= 100
    elif key == "stored_bytes":
        value /= 1024
    return fmt.format(value)


def table_columns(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """TABLE_COLUMNS plus a ``sim <profile>`` column for each simulated profile after the first
    (``sim`` is the first profile's) and a ``<runtime>`` column for each runtime's speedup."""
    sims: list[str] = []
    runtimes: list[str] = []
    for r in records:
        for k in r["metrics"]:
            base, _, variant = k.partition("/")
            if base == "sim_speedup" and variant and variant not in sims:
                sims.append(variant)
            elif base == "runtime_speedup" and variant and variant not in runtimes:
                runtimes.append(variant)
    cols = list(TABLE_COLUMNS)
    if not any("accuracy" in r["metrics"] for r in records) and any("metric" in r["metrics"] for r in records):
        cols[2] = ("metric", "metric", "{:.4g}")  # a task judged by another metric (perplexity, mAP, MAE)
    at = next(i for i, (_, key, _) in enumerate(cols) if key == "sim_speedup") + 1
    cols[at:at] = [(f"sim {p}", f"sim_speedup/{p}", "{:.2f}x") for p in sims[1:]] + \
                  [(rt, f"runtime_speedup/{rt}", "{:.2f}x") for rt in runtimes]
    return cols


def table_rows(records: list[dict[str, Any]], columns: list[tuple[str, str, str]] | None = None) -> list[list[str]]:
    """The cells of each record, in the order of ``columns``."""
    columns = columns or TABLE_COLUMNS
    return [[cell(r, key, fmt) for _, key, fmt in columns] for r in records]


@dataclass
class Column:
    """A terminal column: a two-line header, metric key, cell format, width, alignment."""

    top: str
    bottom: str
    key: str
    fmt: str
    width: int = 0
    left: bool = False

    def __post_init__(self) -> None:
        self.width = max(self.width, len(self.top), len(self.bottom))

    @property
    def header(self) -> str:
        return f"{self.top} {self.bottom}".strip()


def terminal_columns(record: dict[str, Any], width: int = 120, name_header: str = "stage",
                     name_width: int = 20) -> tuple[list[Column], list[str]]:
    """Columns for a terminal table that fits ``width``, read from the first record's metric keys.

    Speedups are the point of the table (MACs, measured, each simulated profile, each runtime);
    what does not fit is left out, most dispensable first (wall time, latency, then simulated
    profiles but the first), and named in the second value: the reports hold every column. Last,
    the name column shrinks (to 12).

    Args:
        record: the first record (stage 0 already carries every profile's and runtime's keys).
        width: the widest a printed line may be.
        name_header: header of the name column (``stage``, or ``run`` for compare).
        name_width: width of the name column (the longest stage name).

    Returns:
        ``(columns, left_out)``: the columns to print and the headers of those left out.
    """
    metrics = record["metrics"]
    cols = [Column("", "#", "index", "{}", 2), Column("", name_header, "name", "{}", name_width, left=True),
            Column("", "acc %", "accuracy", "{:.2f}", 6) if "accuracy" in metrics else
            Column("", "metric", "metric", "{:.4g}", 7), Column("sparsity", "%", "sparsity", "{:.1f}"),
            Column("stored", "KB", "stored_bytes", "{:.1f}", 6), Column("ratio", "", "compression_ratio", "{:.1f}x", 6),
            Column("MACs", "speedup", "mac_speedup", "{:.2f}x", 6), Column("", "measured", "measured_speedup", "{:.2f}x")]
    for k in metrics:
        base, _, variant = k.partition("/")
        if variant and base in ("sim_speedup", "runtime_speedup"):
            cols.append(Column("sim" if base == "sim_speedup" else "runtime", variant, k, "{:.2f}x", 6))
    cols += [Column("latency", "ms", "measured_latency_ms", "{:.3f}", 7), Column("wall", "s", "wall_s", "{:.1f}", 5)]
    cols = [c for c in cols if c.key in ("index", "name") or c.key in metrics]
    left_out: list[str] = []

    def line_width() -> int:
        return sum(c.width for c in cols) + 2 * (len(cols) - 1)

    def drop(key: str) -> None:
        nonlocal cols
        if line_width() > width:
            left_out.extend(c.header for c in cols if c.key == key)
            cols = [c for c in cols if c.key != key]

    for key in ["wall_s", "measured_latency_ms"] + [c.key for c in reversed(cols)
                                                     if c.key.startswith("sim_speedup/")][:-1]:
        drop(key)
    name = cols[1]
    name.width = min(name.width, max(12, len(name_header), name.width - (line_width() - width)))
    return cols, left_out


class TextTable:
    """A plain-text table printed a row at a time: the header once, then one line per record."""

    def __init__(self, columns: list[Column]):
        self.columns = columns

    def _line(self, cells: list[str]) -> str:
        out = []
        for c, text in zip(self.columns, cells, strict=True):
            if len(text) > c.width and c.left:
                text = text[: c.width - 1] + "~"
            out.append(text.ljust(c.width) if c.left else text.rjust(c.width))
        return "  ".join(out).rstrip()

    def header(self) -> str:
        """The two header lines and a rule under them."""
        lines = [self._line([c.top for c in self.columns]), self._line([c.bottom for c in self.columns])]
        return "\n".join(lines + ["-" * max(len(line) for line in lines)])

    def row(self, record: dict[str, Any]) -> str:
        """One record's line."""
        return self._line([cell(record, c.key, c.fmt) for c in self.columns])
