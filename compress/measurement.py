"""Measurement: every per-stage metric of a model, from accuracy and size to latency where it ships.

The pipeline measures stage 0 (the input model) and every stage after it with :func:`measure`,
configured by one :class:`MeasureConfig` built from the recipe (:meth:`MeasureConfig.from_recipe`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.calls import call
from compress.data import describe, example_batch, training_inputs
from compress.encoding import model_storage
from compress.errors import UserError
from compress.hardware import hardware_metrics
from compress.metrics import compare_latency, count_layers, summarize, thread_env, untouched_note
from compress.plumbing.masks import deployed_copy, weight_layers
from compress.quant import float_copy, int8_storage_bytes, is_quantized
from compress.runtime import RUNTIMES, feeds, ort_evaluate
from compress.tasks import Task, build_task, evaluate_model

__all__ = ["MeasureConfig", "measure", "runtime_metrics"]


@dataclass(frozen=True)
class MeasureConfig:
    """How a stage is measured: the recipe's ``eval`` block and the keys measurement reads elsewhere.

    Attributes:
        repeats: about this many latency samples per model at batch 1 (``eval.latency_repeats``).
        warmup: untimed calls before timing (``eval.latency_warmup``).
        latency_batch: the second timing's batch (``eval.latency_batch_size``; None: the data's).
        threads: torch intra-op threads of every timing (``eval.latency_threads``).
        max_batches: cap on test batches for accuracy (``eval.max_batches``; None: the whole split).
        runtimes: where to also measure speed and accuracy (``eval.runtimes``).
        hardware: simulated hardware profiles (``hardware``).
        index_bits: relative-index width of the stored size (``encoding.index_bits``).
        calibration_batches: the int8 calibration size of a runtime's graph (the ``quantize`` stage's).
        task: what judges the outputs (the recipe's ``task``; None: classification).
        int8_max_drop: the quantize stage's ``max_accuracy_drop``: how far below float an int8 graph may be.
    """

    repeats: int = 30
    warmup: int = 10
    latency_batch: int | None = None
    threads: int = 1
    max_batches: int | None = None
    runtimes: tuple[str, ...] = ()
    hardware: tuple[str, ...] = ()
    index_bits: int | str = 5
    calibration_batches: int = 8
    task: Task | None = None
    int8_max_drop: float | None = None

    @classmethod
    def from_recipe(cls, recipe: Any) -> MeasureConfig:
        """The settings a validated :class:`compress.recipe.Recipe` gives."""
        cfg, e = recipe.cfg, recipe.cfg.eval
        # the quantize stage's calibration size, so a runtime's int8 graph sees the same batches
        quantize = next((s for s in recipe.stages if s.type_name == "quantize"), None)
        calibration = int(quantize.config.calibration_batches) if quantize is not None else 8
        return cls(repeats=e.latency_repeats, warmup=e.latency_warmup, latency_batch=e.latency_batch_size,
                   threads=e.latency_threads, max_batches=e.max_batches, runtimes=tuple(e.runtimes),
                   hardware=tuple(cfg.hardware), index_bits=cfg.encoding.index_bits,
                   calibration_batches=calibration, task=recipe.task,
                   int8_max_drop=quantize.max_drop if quantize is not None else None)


def measure(model: nn.Module, datamodule: Any, config: MeasureConfig = MeasureConfig(), *,
            baseline: dict[str, Any] | None = None, baseline_model: nn.Module | None = None,
            runtime_baselines: dict[str, Any] | None = None,
            ) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Every per-stage metric, from the model in hand: ``(metrics, layer rows, extras)``.

    ``measured_speedup`` (and ``_batch``) time this model's deployed copy and ``baseline_model``
    (the input model's deployed copy; None: this model against itself, the noise floor) in
    alternating rounds at ``threads`` intra-op threads (:func:`compress.metrics.compare_latency`),
    with the spread of the per-round speedups in ``measured_speedup_iqr`` ([q1, q3]) and a note in
    ``extras["notes"]`` when the machine was busy or the spread wide.

    A quantised model (``quantize``) is stored as int8 (``stored_bytes``: int8 weights, scales, zero
    points); eager PyTorch runs its float copy (it has no int8 kernels here), while each runtime in
    ``runtimes`` runs the int8 graph: :func:`runtime_metrics`. ``config`` says how (the recipe's
    ``eval`` block, :class:`MeasureConfig`); ``baseline`` (stage 0's metrics), ``baseline_model`` and
    ``runtime_baselines`` are what every stage is compared against.

    A model whose test outputs are not finite (``nonfinite_outputs`` > 0) gets one note saying it
    outputs NaN (or inf), and no runtime measurement: its export check could only fail, blaming
    the exporter for the model's arithmetic.
    """
    c = config
    model = model.cpu()
    x1 = example_batch(datamodule, 1)[0]
    layers = count_layers(model, x1)
    task = c.task if c.task is not None else build_task(None)
    # metric (the primary), metrics/<name>, loss; accuracy too for classification
    metrics: dict[str, Any] = evaluate_model(task, model, datamodule.test_dataloader(), c.max_batches)
    nonfinite = metrics.pop("nonfinite", None)
    metrics.update(summarize(model, layers))
    extras: dict[str, Any] = {}
    # stage 0 names what every stage's figures leave out (a bare parameter given to F.linear)
    left_out = untouched_note(model, x1, weight_layers(model), "no stage can touch") if baseline is None else None
    notes: list[str] = [left_out] if left_out else []
    if nonfinite:  # said once, as what it is: the model's arithmetic, not the exporter or a runtime
        notes.append(f"the model outputs {nonfinite} on {metrics['nonfinite_outputs']} test inputs: accuracy and "
                     "loss measure broken arithmetic" + (", runtimes not measured" if c.runtimes else ""))
    # The model as it would be deployed: parametrizations (masks, codebooks) baked in.
    quantized = is_quantized(model)
    deployed = (float_copy(model) if quantized else deployed_copy(model)).eval()
    storage = model_storage(model, c.index_bits, deployed)
    metrics["stored_bytes"] = int8_storage_bytes(model) if quantized else storage["total"]["compressed_bytes"]
    # Deep Compression's ratio: against the network the user brought (stage 0) as stored, not this stage's
    # dense size, so stage 0 (and any stage that changes nothing) is exactly 1.0 whatever the format's overhead
    metrics["compression_ratio"] = (baseline or metrics)["stored_bytes"] / max(1, metrics["stored_bytes"])
    metrics["compressed_bytes"] = metrics["stored_bytes"]
    metrics["precision"] = "int8" if quantized else "fp32"
    batch = c.latency_batch or describe(datamodule)[2]
    xb = example_batch(datamodule, batch)[0]
    if c.threads < 1:
        raise UserError(f"eval.latency_threads: {c.threads} must be >= 1")
    reference = (baseline_model if baseline_model is not None else deployed).cpu().eval()
    rounds = max(3, -(-c.repeats // 3))  # about `repeats` samples per model at batch 1, half that at batch
    with torch.inference_mode():
        t1 = compare_latency(lambda: call(deployed, x1), lambda: call(reference, x1), rounds=rounds, repeats=3,
                             warmup=c.warmup, threads=c.threads)
        tb = compare_latency(lambda: call(deployed, xb), lambda: call(reference, xb), rounds=max(3, rounds // 2),
                             repeats=3, warmup=c.warmup, threads=c.threads)
    metrics["measured_latency_ms"] = t1.candidate_ms
    metrics["measured_latency_ms_batch"] = tb.candidate_ms
    metrics["latency_batch_size"] = batch
    metrics["latency_threads"] = t1.threads
    base = baseline or metrics
    metrics["mac_speedup"] = base["macs"] / max(1, metrics["effective_macs"])
    metrics["measured_speedup"] = t1.speedup
    metrics["measured_speedup_iqr"] = list(t1.speedup_iqr)
    metrics["measured_speedup_batch"] = tb.speedup
    metrics["measured_speedup_batch_iqr"] = list(tb.speedup_iqr)
    why = [f"machine busy: {t1.busy or tb.busy}"] if t1.busy or tb.busy else []
    why += [f"wide spread at batch {n}: {t.wide_spread}" for n, t in ((1, t1), (batch, tb)) if t.wide_spread]
    if why:
        notes.append(f"timing unreliable ({'; '.join(why)}): measured speedups {t1.speedup:.2f}x at batch 1 and "
                     f"{tb.speedup:.2f}x at batch {batch} may be off; rerun on an idle machine to trust them")
    rows = [s.as_dict() for s in layers]
    for row in rows:  # Deep Compression's per-layer terms (Tables 2-3): bits per weight and index
        row.update(storage["layers"].get(row["name"], {}))
    if c.hardware:
        with thread_env(c.threads):  # cpu-local is calibrated at the thread count the timing uses
            hw, hw_layers, hw_notes = hardware_metrics(model, x1, list(c.hardware), baseline, deployed,
                                                       precision=metrics["precision"], xb=xb)
        notes += hw_notes
        metrics.update(hw)
        by_name = {r["name"]: r for r in rows}
        for name, per_profile in hw_layers.items():
            if name in by_name:
                by_name[name]["hardware"] = per_profile
    if c.runtimes and not nonfinite:  # exporting NaN logits would fail the export check and blame the exporter
        rt, rt_notes = runtime_metrics(model, reference, datamodule, c, x1=x1, xb=xb, rounds=rounds,
                                       baselines=runtime_baselines)
        metrics.update(rt)
        notes += rt_notes
    if notes:
        extras["notes"] = notes
    return metrics, rows, extras


def runtime_metrics(model: nn.Module, baseline_model: nn.Module, datamodule: Any, config: MeasureConfig, *,
                    x1: Any, xb: Any, rounds: int, baselines: dict[str, Any] | None = None,
                    ) -> tuple[dict[str, Any], list[str]]:
    """Speed and accuracy where the model ships: per runtime R, the model deployed there (int8 when
    quantised) and the input model deployed the same way, timed in alternating rounds at ``config.threads``.

    Keys: ``runtime_latency_ms/R``, ``runtime_latency_ms_batch/R``, ``runtime_speedup/R``,
    ``runtime_speedup_batch/R`` (against stage 0 in the same runtime), their ``_iqr``,
    ``runtime_metric/R`` (the task's primary metric computed by the runtime on its outputs),
    ``runtime_metrics/R/<name>`` (each of the task's metrics), ``runtime_accuracy/R`` (classification:
    test accuracy) and ``runtime_bytes/R`` (the file).
    ``baselines`` (runtime -> session of ``baseline_model``) is filled on first use and reused after, so
    the input model is deployed once per run, not once per stage.
    """
    c = config
    baselines = {} if baselines is None else baselines
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    calibration = training_inputs(datamodule, c.calibration_batches) if is_quantized(model) else None
    a1, ab = feeds(x1), feeds(xb)
    # the int8 graph is judged by the task on labelled test inputs (a deploy function takes these keywords)
    check_x, check_y = example_batch(datamodule, 256)
    check = {"check_inputs": check_x, "check_targets": check_y, "task": c.task or build_task(None),
             "max_drop": c.int8_max_drop} if calibration is not None else {}
    if check and c.int8_max_drop is not None:
        # The quantize stage set a drop: its accuracy control judged this very graph by the one gate
        # (int8_accuracy_gate) on the whole test split and recorded whether it was met; a second rule on
        # 256 inputs here would refuse what that gate passed. ORT's own metric is reported below.
        check = {"check": False}
    with tempfile.TemporaryDirectory(prefix="compress-runtime-") as tmp:
        for r in c.runtimes:
            deploy = RUNTIMES.get(r, "eval.runtimes")
            path = Path(tmp) / f"{r}.onnx"
            session = deploy(model, path, x1, calibration=calibration, threads=c.threads, **check)
            if r not in baselines:  # a session holds its graph in memory: the file may go with tmp
                baselines[r] = deploy(baseline_model, Path(tmp) / f"{r}-baseline.onnx", x1, threads=c.threads)
            base = baselines[r]
            t1 = compare_latency(lambda s=session: s.run(a1), lambda b=base: b.run(a1), rounds=rounds, repeats=3,
                                 warmup=c.warmup, threads=c.threads)
            tb = compare_latency(lambda s=session: s.run(ab), lambda b=base: b.run(ab), rounds=max(3, rounds // 2),
                                 repeats=3, warmup=c.warmup, threads=c.threads)
            metrics[f"runtime_latency_ms/{r}"] = t1.candidate_ms
            metrics[f"runtime_latency_ms_batch/{r}"] = tb.candidate_ms
            metrics[f"runtime_speedup/{r}"] = t1.speedup
            metrics[f"runtime_speedup_iqr/{r}"] = list(t1.speedup_iqr)
            metrics[f"runtime_speedup_batch/{r}"] = tb.speedup
            metrics[f"runtime_speedup_batch_iqr/{r}"] = list(tb.speedup_iqr)
            scores = ort_evaluate(session, datamodule.test_dataloader(), c.task or build_task(None), c.max_batches)
            metrics[f"runtime_metric/{r}"] = scores["metric"]
            metrics.update({f"runtime_metrics/{r}/{k[len('metrics/'):]}": v for k, v in scores.items()
                            if k.startswith("metrics/")})
            if "accuracy" in scores:
                metrics[f"runtime_accuracy/{r}"] = scores["accuracy"]
            metrics[f"runtime_bytes/{r}"] = path.stat().st_size
            if calibration is not None:
                notes += _int8_against_float(model, deploy, r, Path(tmp), x1, ab, c, rounds, metrics, session)
            if t1.busy or t1.wide_spread or tb.wide_spread:
                notes.append(f"{r}: timing unreliable ({t1.busy or t1.wide_spread or tb.wide_spread}): runtime "
                             f"speedups {t1.speedup:.2f}x / {tb.speedup:.2f}x may be off")
    return metrics, notes


def _int8_against_float(model: nn.Module, deploy: Any, runtime: str, tmp: Path, x1: Any, ab: Any,
                        c: MeasureConfig, rounds: int, metrics: dict[str, Any], session: Any) -> list[str]:
    """``runtime_int8_speedup_batch/R``: the int8 graph against this very model deployed in float, at the
    latency batch; a note when int8 is the slower graph (in a runtime it can be: LeNet-5's first
    convolution, one input channel, runs ~4x slower as QLinearConv than as float in ONNX Runtime)."""
    fp32 = deploy(float_copy(model), tmp / f"{runtime}-float.onnx", x1, threads=c.threads)
    t = compare_latency(lambda s=session: s.run(ab), lambda f=fp32: f.run(ab), rounds=max(3, rounds // 2),
                        repeats=3, warmup=c.warmup, threads=c.threads)
    metrics[f"runtime_int8_speedup_batch/{runtime}"] = t.speedup
    if t.speedup_iqr[1] >= 1.0:  # int8 not slower in the middle half of the rounds
        return []
    return [f"{runtime}: the int8 graph is slower than this model in float ({t.candidate_ms:.3f} vs "
            f"{t.baseline_ms:.3f} ms at batch {len(next(iter(ab.values())))}): int8 buys size here, not speed; profile "
            "the graph, or keep its slow layers float (quantize.ignore)"]
