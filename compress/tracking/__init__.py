"""The old import path of the sinks, which live with the rest of the reporting in :mod:`compress.report.sinks`."""

from compress.report.sinks import CSVSink, HtmlSink, ReportSink, Sink, TerminalSink, WandbSink, flatten

__all__ = ["Sink", "TerminalSink", "ReportSink", "HtmlSink", "CSVSink", "WandbSink", "flatten"]
