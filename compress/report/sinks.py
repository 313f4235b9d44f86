"""Sinks for stage records.

A record is ``{"index", "name", "type", "metrics": {...}, "layers": [{...}], ...}``; every sink
receives the same records, in stage order.
"""

from __future__ import annotations

import csv
import sys
import textwrap
from pathlib import Path
from typing import Any, TextIO

from compress.files import atomic_write, write_json
from compress.report.html import report_page, run_figures
from compress.report.notes import notes_lines
from compress.report.table import TABLE_COLUMNS, TextTable, table_columns, table_rows, terminal_columns

__all__ = ["Sink", "TerminalSink", "ReportSink", "HtmlSink", "CSVSink", "WandbSink", "flatten", "TABLE_COLUMNS",
           "table_columns"]


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


class Sink:
    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None: ...

    def close(self, records: list[dict[str, Any]], final_checkpoint: Path | None = None) -> None: ...


class TerminalSink(Sink):
    """A table that grows by one line per stage, at most ``width`` columns; the notes once, at the end.

    The header is printed with the first record (stage 0 holds every profile's and runtime's
    keys); a resumed run prints the finished stages' rows first. Columns that do not fit are
    named once; every column is in report.md and report.html.
    """

    def __init__(self, width: int = 120, name_width: int = 20, max_notes: int = 12, file: TextIO | None = None):
        self.width = width
        self.name_width = name_width
        self.max_notes = max_notes
        self.file = file
        self.table: TextTable | None = None
        self.left_out: list[str] = []
        self.printed = 0

    def _print(self, text: str) -> None:
        print(text, file=self.file or sys.stdout, flush=True)

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        if self.table is None:
            columns, left_out = terminal_columns(records[0], self.width, name_width=self.name_width)
            self.table = TextTable(columns)
            self._print(self.table.header())
            self.left_out = left_out
        for r in records[self.printed:]:
            self._print(self.table.row(r))
        self.printed = len(records)

    def close(self, records: list[dict[str, Any]], final_checkpoint: Path | None = None) -> None:
        lines = notes_lines(records)
        if lines:
            self._print("notes:")
        for line in lines[:self.max_notes]:
            self._print(textwrap.fill(line, self.width, initial_indent="  ", subsequent_indent="    "))
        if len(lines) > self.max_notes:
            self._print(f"  ({len(lines) - self.max_notes} more notes in report.md)")
        if self.left_out:
            self._print(textwrap.fill(f"not shown: {', '.join(self.left_out)}; every column is in report.md and "
                                      "report.html", self.width, subsequent_indent="  "))


class ReportSink(Sink):
    """``report.json`` (rewritten after each stage) and ``report.md``."""

    def __init__(self, out_dir: Path, recipe: dict[str, Any]):
        self.out_dir = out_dir
        self.recipe = recipe

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        report = {"recipe": self.recipe, "stages": records}
        write_json(self.out_dir / "report.json", report)
        columns = table_columns(records)
        header = [h for h, _, _ in columns]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(records, columns)]
        md = f"# {self.recipe.get('name', 'run')}\n\n" + "\n".join(lines) + "\n"
        notes = [f"- {line}" for line in notes_lines(records)]
        if notes:
            md += "\n## Notes\n\n" + "\n".join(notes) + "\n"
        atomic_write(self.out_dir / "report.md", lambda tmp: Path(tmp).write_text(md))


class HtmlSink(Sink):
    """``report.html``, rewritten after each stage: charts, notes and recipe in one file that opens offline."""

    def __init__(self, out_dir: Path, recipe: dict[str, Any]):
        self.path = out_dir / "report.html"
        self.recipe = recipe
        recipe_file = out_dir / "recipe.yaml"
        self.recipe_yaml = recipe_file.read_text() if recipe_file.is_file() else None

    def on_stage(self, record: dict[str, Any], records: list[dict[str, Any]]) -> None:
        page = report_page(records, self.recipe, self.recipe_yaml)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


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
    """Per-stage metrics against the stage index, per-layer tables, report.html's charts (``report/<chart>``,
    as wandb plotly panels), the final model as an artifact."""

    def __init__(self, run: Any, log_model: bool = True, charts: bool = True):
        self.run = run
        self.log_model = log_model
        self.charts = charts
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
        if self.charts:  # the figures of report.html, so the dashboard shows what the page shows
            payload.update({f"report/{name}": wandb.Plotly(fig) for name, fig in run_figures(records).items()})
        self.run.log(payload)
        self.run.summary[f"{record['name']}/accuracy"] = record["metrics"].get("accuracy")
        self.run.summary[f"{record['name']}/metric"] = record["metrics"].get("metric")  # the task's primary

    def close(self, records: list[dict[str, Any]], final_checkpoint: Path | None = None) -> None:
        import wandb

        if self.log_model and final_checkpoint is not None and final_checkpoint.is_file():
            artifact = wandb.Artifact(f"{self.run.name or 'model'}-final".replace("/", "-"), type="model",
                                      metadata=records[-1]["metrics"] if records else {})
            artifact.add_file(str(final_checkpoint))
            self.run.log_artifact(artifact)
        self.run.finish()
