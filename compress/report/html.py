"""Charts of a run and of runs side by side (plotly), and the self-contained pages that hold them.

One place builds every figure: the report sink writes them into ``report.html``, the compare
command into ``compare.html``, and the wandb sink logs the same figures (``wandb.Plotly``).
Series are found by key, not listed: every ``*_speedup*``, ``*accuracy*`` and ``*latency_ms*``
metric a record holds (``sim_speedup/<profile>``, ``runtime_speedup/<runtime>``, ...) gets its
trace; a ``<key>_iqr`` next to a key becomes its error bar. Nothing here computes a metric: the
only arithmetic is units (fractions to percent, bytes to KB) and a layer's share of a total the
record states.

plotly is imported inside the functions that draw, so importing this module stays cheap.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from typing import Any

from compress.report.notes import group_notes, stages_label
from compress.report.table import table_columns, table_rows

__all__ = ["series_keys", "series_label", "stage_figures", "layer_figures", "compare_figures", "run_figures",
           "report_page", "compare_page", "final_table"]

# Suffixes of a metric's spread, drawn as its error bar rather than as a series of its own.
SPREAD_SUFFIXES = ("_iqr", "_std", "_ci", "_lo", "_hi")
_COLORS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
           "#eeca3b"]
_LAYOUT = {"template": "plotly_white", "height": 380, "autosize": True, "margin": {"l": 60, "r": 20, "t": 50, "b": 40},
           "legend": {"orientation": "h", "y": -0.42, "yanchor": "top"}, "font": {"size": 12}}


def _number(v: Any) -> bool:
    """A finite number (NaN and inf are gaps in a chart and n/a in a table)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series_keys(records: list[dict[str, Any]], is_series: Callable[[str], bool]) -> list[str]:
    """Numeric metric keys whose base (the part before ``/``) passes ``is_series``, first-seen order.

    A spread (``measured_speedup_iqr``) is left out, and so is a bare key that also comes per
    variant (``sim_speedup`` repeats ``sim_speedup/<first profile>``).
    """
    keys: list[str] = []
    for r in records:
        for k, v in r["metrics"].items():
            base = k.partition("/")[0]
            if k not in keys and _number(v) and is_series(base) and not base.endswith(SPREAD_SUFFIXES):
                keys.append(k)
    return [k for k in keys if not any(other.startswith(k + "/") for other in keys)]


def _is_speedup(base: str) -> bool:
    return "_speedup" in base


def _is_accuracy(base: str) -> bool:
    return base == "accuracy" or base.endswith("_accuracy")


def _is_metric(base: str) -> bool:
    """The task's primary metric: ``metric`` (PyTorch) and ``runtime_metric/<runtime>``."""
    return base in ("metric", "runtime_metric")


def _is_latency(base: str) -> bool:
    return "latency_ms" in base


def series_label(key: str) -> str:
    """A legend label: ``mac_speedup`` -> ``MACs``, ``sim_speedup/jetson-tx2`` -> ``sim jetson-tx2``."""
    base, _, variant = key.partition("/")
    words = base
    for kind in ("_speedup", "_latency_ms", "_accuracy", "_metric"):
        words = words.replace(kind, "")
    words = {"mac": "MACs", "accuracy": "PyTorch", "metric": "PyTorch"}.get(
        words, words).replace("_", " ").strip()
    return f"{words} {variant}".strip() or key


def _spread(records: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
    """Error bars from ``<base>_iqr[/<variant>]`` (half the width each side), if the records hold one."""
    base, sep, variant = key.partition("/")
    for suffix in SPREAD_SUFFIXES[:3]:
        name = f"{base}{suffix}{sep}{variant}"
        values = [r["metrics"].get(name) for r in records]
        if any(_number(v) for v in values):
            return {"type": "data", "array": [v / 2 if suffix == "_iqr" and _number(v) else v for v in values],
                    "visible": True}
    return None


def _stage_labels(records: list[dict[str, Any]]) -> list[str]:
    return [f"{r['index']} {r['name']}" for r in records]


def _figure(title: str, xtitle: str, ytitle: str, **layout: Any) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title={"text": title}, xaxis_title=xtitle, yaxis_title=ytitle, colorway=_COLORS,
                      **{**_LAYOUT, **layout})
    return fig


def _log_if_wide(fig: Any, values: list[float], axis: str = "yaxis") -> None:
    positive = [v for v in values if _number(v) and v > 0]
    if positive and max(positive) / min(positive) > 30:
        fig.update_layout(**{axis: {"type": "log", "dtick": 1}})


def stage_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage charts: accuracy, stored size, compression ratio, speedups side by side, latency."""
    import plotly.graph_objects as go

    x = _stage_labels(records)
    figs: dict[str, Any] = {}

    def metric(key: str, scale: float = 1.0) -> list[float | None]:
        return [r["metrics"][key] * scale if _number(r["metrics"].get(key)) else None for r in records]

    fig = _figure("Accuracy per stage", "", "accuracy %")
    for k in series_keys(records, _is_accuracy):
        fig.add_trace(go.Scatter(x=x, y=metric(k, 100), name=series_label(k), mode="lines+markers+text",
                                 text=[f"{v:.2f}" if v is not None else "" for v in metric(k, 100)],
                                 textposition="top center", cliponaxis=False))
    figs["accuracy"] = fig
    if not fig.data:  # a task judged by another metric: its primary metric instead, in its own units
        fig = _figure("Primary metric per stage", "", "metric")
        for k in series_keys(records, _is_metric):
            fig.add_trace(go.Scatter(x=x, y=metric(k), name=series_label(k), mode="lines+markers+text",
                                     text=[f"{v:.4g}" if v is not None else "" for v in metric(k)],
                                     textposition="top center", cliponaxis=False))
        figs["accuracy"] = fig

    fig = _figure("Stored size per stage", "", "KB")
    fig.add_trace(go.Bar(x=x, y=metric("stored_bytes", 1 / 1024), name="stored (compressed)",
                         text=[f"{v:.1f}" if v is not None else "" for v in metric("stored_bytes", 1 / 1024)]))
    if any(v is not None for v in metric("dense_bytes")):
        fig.add_trace(go.Scatter(x=x, y=metric("dense_bytes", 1 / 1024), name="dense fp32", mode="lines+markers"))
    figs["size"] = fig

    fig = _figure("Compression ratio per stage", "", "dense bytes / stored bytes")
    ratio = metric("compression_ratio")
    fig.add_trace(go.Bar(x=x, y=ratio, name="compression ratio",
                         text=[f"{v:.1f}x" if v is not None else "" for v in ratio]))
    figs["compression"] = fig

    fig = _figure("Speedups per stage (MACs, measured, simulated, runtimes)", "", "speedup over stage 0 (x)",
                  barmode="group")
    values: list[float] = []
    for k in series_keys(records, _is_speedup):
        y = metric(k)
        values += [v for v in y if v is not None]
        fig.add_trace(go.Bar(x=x, y=y, name=series_label(k), error_y=_spread(records, k)))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    _log_if_wide(fig, values)
    figs["speedups"] = fig

    fig = _figure("Latency per stage (measured, simulated, runtimes)", "", "ms per sample")
    values = []
    for k in series_keys(records, _is_latency):
        y = metric(k)
        values += [v for v in y if v is not None]
        fig.add_trace(go.Scatter(x=x, y=y, name=series_label(k), mode="lines+markers", error_y=_spread(records, k)))
    _log_if_wide(fig, values)
    figs["latency"] = fig
    return {k: f for k, f in figs.items() if f.data}


def layer_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer charts of the last stage: sparsity, kept of the original, bits per weight, latency shares."""
    import plotly.graph_objects as go

    last, first = records[-1], records[0]
    layers = last.get("layers", [])
    if not layers:
        return {}
    names = [row["name"] for row in layers]
    where = f"stage {last['index']} {last['name']}"
    figs: dict[str, Any] = {}

    fig = _figure(f"Sparsity per layer ({where})", "layer", "zeros %")
    fig.add_trace(go.Bar(x=names, y=[100 * row.get("sparsity", 0) for row in layers], name="sparsity",
                         text=[f"{100 * row.get('sparsity', 0):.1f}" for row in layers]))
    figs["layer_sparsity"] = fig

    # Channels when the layer rows carry them; else the layer's weight count, which structured
    # pruning shrinks and unstructured pruning does not (its zeros are in "nonzero").
    original = {row["name"]: row for row in first.get("layers", [])}
    fig = _figure(f"Kept of the original per layer ({where})", "layer", "% of stage 0", barmode="group")
    for key, label in (("out_channels", "channels"), ("params", "weights (structure)"), ("nonzero", "nonzero weights")):
        if key == "params" and any("out_channels" in row for row in layers):
            continue
        y = [100 * row[key] / original[row["name"]]["out_channels" if key == "out_channels" else "params"]
             if _number(row.get(key)) and row["name"] in original else None for row in layers]
        if any(v is not None for v in y):
            fig.add_trace(go.Bar(x=names, y=y, name=label))
    figs["layer_kept"] = fig

    fig = _figure(f"Bits per weight per layer ({where})", "layer", "bits", barmode="group")
    for key, label in (("weight_bits", "weight"), ("weight_bits_huffman", "weight, Huffman-coded"),
                       ("index_bits_huffman", "sparse index, Huffman-coded")):
        y = [row.get(key) if key != "index_bits_huffman" or row.get("format") != "dense" else None for row in layers]
        if any(_number(v) for v in y):
            fig.add_trace(go.Bar(x=names, y=y, name=label))
    figs["layer_bits"] = fig

    fig = _figure(f"Share of simulated latency per layer ({where})", "layer", "% of the profile's latency",
                  barmode="group")
    for profile in series_keys([last], lambda b: b == "sim_latency_ms"):
        total_us = last["metrics"][profile] * 1000
        name = profile.partition("/")[2] or "sim"
        times = [row.get("hardware", {}).get(name, {}).get("time_us") for row in layers]
        if total_us <= 0 or not any(_number(t) for t in times):
            continue
        shares = [100 * t / total_us if _number(t) else None for t in times]
        other = max(0.0, 100 - sum(s for s in shares if s is not None))
        fig.add_trace(go.Bar(x=names + ["other ops"], y=shares + [other], name=name))
    figs["layer_latency"] = fig
    return {k: f for k, f in figs.items() if f.data}


def run_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every chart of a run's report: per stage, then per layer of the last stage."""
    return {**stage_figures(records), **layer_figures(records)}


def _trained_from(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records from the trained baseline on: an untrained input (stage 0 followed by training)
    would stretch every accuracy axis down to chance."""
    start = 0
    while start + 1 < len(records) and records[start + 1]["type"] == "train":
        start += 1
    return records[start:]


def compare_figures(runs: dict[str, list[dict[str, Any]]], metric: tuple[str, bool] | None = None) -> dict[str, Any]:
    """Runs side by side: accuracy against stored size and against each latency (Pareto charts),
    and the final stage's speedups.

    ``metric`` is the task's ``(primary metric, higher_is_better)`` for runs whose records hold no
    ``accuracy``: the charts plot ``metric`` (``runtime_metric/R``) and the front follows its direction.
    """
    import plotly.graph_objects as go

    all_records = [r for records in runs.values() for r in records]
    figs: dict[str, Any] = {}
    by_accuracy = metric is None or any("accuracy" in r["metrics"] for r in all_records)
    name, higher = ("accuracy", True) if by_accuracy else metric
    scale_y = 100 if by_accuracy else 1
    xkeys = [("stored_bytes", "compressed size", "stored KB", 1 / 1024)]
    xkeys += [(k, f"{series_label(k)} latency", "ms per sample", 1.0) for k in series_keys(all_records, _is_latency)]
    for xkey, what, xtitle, scale in xkeys:
        base, sep, variant = xkey.partition("/")
        top = "accuracy" if by_accuracy else "metric"
        ykey = f"runtime_{top}/{variant}" if base.startswith("runtime_") else top
        fig = _figure(f"{name.capitalize()} vs {what}", xtitle, "accuracy %" if by_accuracy else name)
        points: list[tuple[float, float, str]] = []
        for i, (run, records) in enumerate(runs.items()):
            shown = [r for r in _trained_from(records) if _number(r["metrics"].get(xkey))
                     and _number(r["metrics"].get(ykey, r["metrics"].get(top)))]
            if not shown:
                continue
            xs = [r["metrics"][xkey] * scale for r in shown]
            ys = [scale_y * r["metrics"].get(ykey, r["metrics"][top]) for r in shown]
            labels = [f"{run}: {r['index']} {r['name']}" for r in shown]
            points += list(zip(xs, ys, labels, strict=True))
            fig.add_trace(go.Scatter(x=xs, y=ys, name=run, mode="lines+markers", text=labels, hoverinfo="text+x+y",
                                     marker={"size": [7] * (len(xs) - 1) + [13], "color": _COLORS[i % len(_COLORS)]},
                                     line={"color": _COLORS[i % len(_COLORS)], "width": 1}))
        if not points:
            continue
        front: list[tuple[float, float, str]] = []
        sign = 1 if higher else -1  # the front keeps what is better in the metric's own direction
        for p in sorted(points, key=lambda p: (p[0], -sign * p[1])):  # smaller and better than all before
            if not front or sign * p[1] > sign * front[-1][1]:
                front.append(p)
        fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], name="Pareto front",
                                 mode="lines", line={"shape": "hv", "dash": "dash", "color": "#888"},
                                 text=[p[2] for p in front], hoverinfo="text"))
        _log_if_wide(fig, [p[0] for p in points], "xaxis")
        figs[f"pareto_{xkey.replace('/', '_')}"] = fig

    fig = _figure("Speedups of the final stage", "", "speedup over stage 0 (x)", barmode="group")
    finals = [records[-1] for records in runs.values()]
    keys = series_keys(finals, _is_speedup)
    for run, records in runs.items():
        m = records[-1]["metrics"]
        fig.add_trace(go.Bar(x=[series_label(k) for k in keys], y=[m.get(k) for k in keys], name=run))
    fig.add_hline(y=1.0, line_dash="dot", line_color="#888")
    _log_if_wide(fig, [f["metrics"].get(k) for f in finals for k in keys])
    if keys:
        figs["final_speedups"] = fig
    return figs


# -- pages --------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{margin-bottom:4px} .sub{color:#666;margin-top:0}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.chart{border:1px solid #e3e3e3;border-radius:6px;padding:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
.wide{overflow-x:auto}
th,td{border-bottom:1px solid #e3e3e3;padding:3px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child,.stages th:nth-child(2),.stages td:nth-child(2){text-align:left}
.chart{min-width:0}
pre{background:#f6f8fa;padding:12px;border-radius:6px;font-size:12px;overflow:auto}
li{margin:3px 0} .when{color:#555;font-weight:600}
"""


def _div(fig: Any, div_id: str) -> str:
    return '<div class="chart">' + fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id,
                                                default_width="100%", default_height=f"{fig.layout.height}px",
                                                config={"displaylogo": False, "responsive": True}) + "</div>"


def _page(title: str, body: str) -> str:
    from plotly.offline import get_plotlyjs

    # plotly.js once per page, inlined: the file opens from disk with no network.
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script type=\"text/javascript\">{get_plotlyjs()}</script></head>"
            f"<body>\n{body}\n</body></html>\n")


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class=\"wide\"><table class=\"{css}\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _charts(figs: dict[str, Any], prefix: str) -> str:
    return '<div class="grid">' + "".join(_div(f, f"{prefix}-{k}") for k, f in figs.items()) + "</div>"


def report_page(records: list[dict[str, Any]], recipe: dict[str, Any], recipe_yaml: str | None = None) -> str:
    """``report.html``: the stage table, per-stage and per-layer charts, the notes once each, the recipe."""
    import yaml

    name = recipe.get("name", "run")
    model = (recipe.get("model") or {}).get("name", "?")
    data = (recipe.get("data") or {}).get("name", "?")
    columns = table_columns(records)
    body = [f"<h1>{html.escape(str(name))}</h1>",
            f"<p class=\"sub\">model {html.escape(str(model))} on {html.escape(str(data))}; "
            f"{len(records)} of {len(recipe.get('stages', [])) + 1} stages done (stage 0 is the input model)</p>",
            "<h2>Stages</h2>", _table([h for h, _, _ in columns], table_rows(records, columns), "stages"),
            "<h2>Per stage</h2>", _charts(stage_figures(records), "stage")]
    layer_figs = layer_figures(records)
    if layer_figs:
        body += [f"<h2>Per layer, stage {records[-1]['index']} ({html.escape(records[-1]['name'])})</h2>",
                 _charts(layer_figs, "layer")]
    notes = group_notes(records)
    if notes:
        body += ["<h2>Notes</h2>", "<ul>" + "".join(
            f"<li><span class=\"when\">{stages_label(s)}:</span> {html.escape(n)}</li>" for s, n in notes) + "</ul>"]
    text = recipe_yaml if recipe_yaml is not None else yaml.safe_dump(recipe, sort_keys=False)
    body += [f"<details><summary><b>Recipe (resolved)</b>: {html.escape(str(name))}, "
             f"{len(recipe.get('stages', []))} stages</summary><pre>{html.escape(text)}</pre></details>"]
    return _page(f"{name}: compression report", "\n".join(body))


def final_table(runs: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Every scalar final metric of each run: a row per metric, a column per run."""
    keys: list[str] = []
    for records in runs.values():
        keys += [k for k, v in records[-1]["metrics"].items() if (_number(v) or v is None or isinstance(v, float))
                 and k not in keys]
    rows = [["stages"] + [str(len(records) - 1) for records in runs.values()]]
    for k in keys:
        row = [k]
        for records in runs.values():
            v = records[-1]["metrics"].get(k)
            absent = k not in records[-1]["metrics"]
            row.append("-" if absent else "n/a" if not _number(v) else f"{v:,}" if isinstance(v, int) else f"{v:.4g}")
        rows.append(row)
    return ["metric", *runs], rows


def compare_page(runs: dict[str, list[dict[str, Any]]], recipes: dict[str, dict[str, Any]],
                 metric: tuple[str, bool] | None = None) -> str:
    """``compare.html``: Pareto charts across runs and the final metrics of each run in one table."""
    header, rows = final_table(runs)
    described = [f"<li><b>{html.escape(run)}</b>: model {html.escape(str((r.get('model') or {}).get('name', '?')))}"
                 f" on {html.escape(str((r.get('data') or {}).get('name', '?')))}, stages "
                 + html.escape(", ".join(s.get("type", "?") + (f" {s['sparsity']}" if "sparsity" in s else "")
                                         for s in r.get("stages", []))) + "</li>"
                 for run, r in recipes.items()]
    body = ["<h1>Runs compared</h1>", "<ul>" + "".join(described) + "</ul>",
            "<h2>Trade-offs</h2>", _charts(compare_figures(runs, metric), "compare"),
            "<h2>Final metrics</h2>", _table(header, rows)]
    return _page("compare: " + ", ".join(runs), "\n".join(body))
