"""Reports: where each stage's record goes (sinks: terminal, report.json/md/html, CSV, wandb; sinks never compute), and
what they show: stage tables as text, grouped notes, charts (plotly) in report.html and compare.html."""

from compress.report.notes import group_notes, notes_lines
from compress.report.table import (
           TABLE_COLUMNS,
           Column,
           TextTable,
           cell,
           table_columns,
           table_rows,
           terminal_columns,
)

__all__ = ["TABLE_COLUMNS", "Column", "TextTable", "cell", "table_columns", "table_rows", "terminal_columns",
           "group_notes", "notes_lines"]
