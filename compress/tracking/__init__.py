"""Sinks: where each stage's record goes (terminal, report.json/md, CSV, wandb). Sinks never compute."""

from compress.tracking.sinks import CSVSink, ReportSink, Sink, TerminalSink, WandbSink, flatten

__all__ = ["Sink", "TerminalSink", "ReportSink", "CSVSink", "WandbSink", "flatten"]
