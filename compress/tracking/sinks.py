"""Sinks for stage records.

A record is ``{"index", "name", "type", "metrics": {...}, "layers": [{...}], ...}``; every sink
receives the same records, in stage order.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from compress.files import atomic_write

__all__ = ["Sink", "TerminalSink", "ReportSink", "CSVSink", "WandbSink", "flatten", "TABLE_COLUMNS", "table_columns"]

# (header, metric key, format) of the terminal and Markdown tables.
TABLE_COLUMNS = [
    ("#", "index", "{}"), ("stage", "name", "{}"), ("acc %", "accuracy", "{:.2f}"), ("loss", "loss", "{:.4f}"),
    ("sparsity %", "sparsity", "{:.1f}"), ("nonzero", "nonzero_params", "{:,}"), ("MACs", "effective_macs", "{:,}"),
    ("stored KB", "stored_bytes", "{:.1f}"), ("ratio", "compression_ratio", "{:.1f}x"),
    ("MAC speedup", "mac_speedup", "{:.2f}x"), ("measured", "measured_speedup", "{:.2f}x"),
    ("sim", "sim_speedup", "{:.2f}x"), ("latency ms", "measured_latency_ms", "{:.3f}"), ("wall s", "wall_s", "{:.1f}"),
]


def flatten(d: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``; lists are left out (tables carry them)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key, sep))
        elif not isinstance(v, list | tuple):
            out[key] = v
    return out


def _cell(record: dict[str, Any], key: str, fmt: str) -> str:
    if key in ("index", "name"):
        return str(record[key])
    value = record["metrics"].get(key)
    if value is None:
        return "-"
    if key == "accuracy":
        value *= 100
    elif key == "sparsity":
        value *= 100
    elif key == "stored_bytes":
        value /= 1024
    return fmt.format(value)


def table_columns(records: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """TABLE_COLUMNS plus a ``sim <profile>`` column for each simulated profile after the first
    (``sim`` is the first profile's)."""
    extra: list[str] = []
    for r in records:
        extra += [k.split("/", 1)[1] for k in r["metrics"] if k.startswith("sim_speedup/")
                  and k.split("/", 1)[1] not in extra]
    cols = list(TABLE_COLUMNS)
    at = next(i for i, (_, key, _) in enumerate(cols) if key == "sim_speedup") + 1
    cols[at:at] = [(f"sim {p}", f"sim_speedup/{p}", "{:.2f}x") for p in extra[1:]]
    return cols


def table_rows(records: list[dict[str, Any]], columns: list[tuple[str, str, str]] | None = None) -> list[list[str]]:
    columns = columns or TABLE_COLUMNS
    return [[_cell(r, key, fmt) for _, key, fmt in columns] for r in records]


class Sink:
    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None: ...

    def close(self, records: list[dict[str, Any]], final_checkpoint: Path | None = None) -> None: ...


class TerminalSink(Sink):
    """A rich table of every stage so far, printed after each stage."""

    def __init__(self, max_notes: int = 12) -> None:
        from rich.console import Console

        self.max_notes = max_notes
        console = Console()
        # Not a terminal (CI, a log file): wide enough that the table is not squeezed.
        self.console = console if console.is_terminal else Console(width=200)

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        from rich.table import Table

        table = Table(title=f"after stage {record['index']}: {record['name']}", title_justify="left")
        columns = table_columns(records)
        for header, _, _ in columns:
            table.add_column(header, justify="left" if header == "stage" else "right")
        for row in table_rows(records, columns):
            table.add_row(*row)
        self.console.print(table)
        notes = record.get("notes", [])
        for note in notes[:self.max_notes]:
            self.console.print(f"  note: {note}", highlight=False, soft_wrap=True)
        if len(notes) > self.max_notes:
            self.console.print(f"  ({len(notes) - self.max_notes} more notes in report.json)")


class ReportSink(Sink):
    """``report.json`` (rewritten after each stage) and ``report.md``."""

    def __init__(self, out_dir: Path, recipe: dict[str, Any]):
        self.out_dir = out_dir
        self.recipe = recipe

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        report = {"recipe": self.recipe, "stages": records}
        text = json.dumps(report, indent=1, default=float)
        atomic_write(self.out_dir / "report.json", lambda tmp: Path(tmp).write_text(text))
        columns = table_columns(records)
        header = [h for h, _, _ in columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(records, columns)]
        md = f"# {self.recipe.get('name', 'run')}\n\n" + "\n".join(lines) + "\n"
        notes = [f"- stage {r['index']} ({r['name']}): {n}" for r in records for n in r.get("notes", [])]
        if notes:
            md += "\n## Notes\n\n" + "\n".join(notes) + "\n"
        atomic_write(self.out_dir / "report.md", lambda tmp: Path(tmp).write_text(md))


class CSVSink(Sink):
    """``metrics.csv``: one row per stage, flattened metric keys as columns."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / "metrics.csv"

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        rows = [{"index": r["index"], "name": r["name"], "type": r["type"], **flatten(r["metrics"])} for r in records]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)

        atomic_write(self.path, write)


class WandbSink(Sink):
    """Per-stage metrics against the stage index, per-layer tables, the final model as an artifact."""

    def __init__(self, run: Any, log_model: bool = True):
        self.run = run
        self.log_model = log_model
        run.define_metric("stage/index")
        run.define_metric("stage/*", step_metric="stage/index")

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        import wandb

        payload = {f"stage/{k}": v for k, v in flatten(record["metrics"]).items() if isinstance(v, int | float)}
        payload["stage/index"] = record["index"]
        layers = [flatten(row) for row in record.get("layers", [])]  # hardware/<profile>/time_us, ...
        if layers:
            columns: list[str] = []
            for row in layers:
                columns += [c for c in row if c not in columns]
            payload[f"layers/{record['index']}-{record['name']}"] = wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in layers])
        self.run.log(payload)
        self.run.summary[f"{record['name']}/accuracy"] = record["metrics"].get("accuracy")

    def close(self, records: list[dict[str, Any]], final_checkpoint: Path | None = None) -> None:
        import wandb

        if self.log_model and final_checkpoint is not None and final_checkpoint.is_file():
            artifact = wandb.Artifact(f"{self.run.name or 'model'}-final".replace("/", "-"), type="model",
                                      metadata=records[-1]["metrics"] if records else {})
            artifact.add_file(str(final_checkpoint))
            self.run.log_artifact(artifact)
        self.run.finish()
