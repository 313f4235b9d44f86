"""Sinks: where each stage's record goes (terminal, report.json/md/html, CSV, wandb). Sinks never compute."""

from compress.tracking.sinks import CSVSink, HtmlSink, ReportSink, Sink, TerminalSink, WandbSink, flatten

__all__ = ["Sink", "TerminalSink", "ReportSink", "HtmlSink", "CSVSink", "WandbSink", "flatten"]
