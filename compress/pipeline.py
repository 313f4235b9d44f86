"""The pipeline: one visible loop over the recipe's stages.

baseline (stage 0: the input model as it comes) -> for each stage: apply (incl. fine-tuning),
measure, checkpoint, log to every sink.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from compress.batches import call, describe_inputs, forward, output_field
from compress.checkpoint import load_into, read_checkpoint, save_checkpoint
from compress.data import build_datamodule, describe, example_batch, training_inputs
from compress.encoding import model_storage
from compress.errors import UserError
from compress.files import atomic_write, hold_folder
from compress.hardware import hardware_metrics
from compress.metrics import compare_latency, count_layers, evaluate_accuracy, summarize, thread_env
from compress.models import build_model, model_kwargs
from compress.pruning.masks import deployed_copy
from compress.quant import float_copy, int8_storage_bytes, is_quantized
from compress.recipe import Recipe
from compress.runfolder import OWN_DIRS, OWN_FILES, holds_run
from compress.runtime import RUNTIMES, feeds, ort_accuracy
from compress.stages.base import Context, Stage
from compress.tracking import CSVSink, HtmlSink, ReportSink, Sink, TerminalSink, WandbSink

__all__ = ["Pipeline", "measure", "model_spec"]

NOT_COMPRESSION = ("train", "evaluate")


def model_spec(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> dict[str, Any]:
    """What rebuilds the architecture: the zoo name, every constructor argument and the output field."""
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items()
              if k not in ("name", "checkpoint", "output")}
    kwargs = model_kwargs(str(cfg.name), kwargs, input_shape=input_shape, num_classes=num_classes)
    spec = {"name": str(cfg.name), "kwargs": kwargs}
    if cfg.get("output") is not None:
        spec["output"] = cfg.output
    return spec


def measure(model: nn.Module, datamodule: Any, *, baseline: dict[str, Any] | None = None,
            baseline_model: nn.Module | None = None, hardware: list[str] = (), repeats: int = 30,
            warmup: int = 10, latency_batch: int | None = None, max_batches: int | None = None,
            index_bits: int | str = 5, threads: int = 1, runtimes: list[str] = (), calibration_batches: int = 8,
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
    ``runtimes`` runs the int8 graph: :func:`runtime_metrics`.
    """
    model = model.cpu()
    x1 = example_batch(datamodule, 1)[0]
    layers = count_layers(model, x1)
    metrics: dict[str, Any] = evaluate_accuracy(model, datamodule.test_dataloader(), max_batches)
    metrics.update(summarize(model, layers))
    extras: dict[str, Any] = {}
    # The model as it would be deployed: parametrizations (masks, codebooks) baked in.
    quantized = is_quantized(model)
    deployed = (float_copy(model) if quantized else deployed_copy(model)).eval()
    storage = model_storage(model, index_bits, deployed)
    metrics["stored_bytes"] = int8_storage_bytes(model) if quantized else storage["total"]["compressed_bytes"]
    # Deep Compression's ratio: against the network the user brought (stage 0), not this stage's dense size
    metrics["compression_ratio"] = (baseline or metrics)["dense_bytes"] / max(1, metrics["stored_bytes"])
    metrics["compressed_bytes"] = metrics["stored_bytes"]
    metrics["precision"] = "int8" if quantized else "fp32"
    batch = latency_batch or describe(datamodule)[2]
    xb = example_batch(datamodule, batch)[0]
    if threads < 1:
        raise UserError(f"eval.latency_threads: {threads} must be >= 1")
    reference = (baseline_model if baseline_model is not None else deployed).cpu().eval()
    rounds = max(3, -(-repeats // 3))  # about `repeats` samples per model at batch 1, half that at batch
    with torch.inference_mode():
        t1 = compare_latency(lambda: call(deployed, x1), lambda: call(reference, x1), rounds=rounds, repeats=3,
                             warmup=warmup, threads=threads)
        tb = compare_latency(lambda: call(deployed, xb), lambda: call(reference, xb), rounds=max(3, rounds // 2),
                             repeats=3, warmup=warmup, threads=threads)
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
    notes = [f"timing unreliable ({'; '.join(why)}): measured speedups {t1.speedup:.2f}x at batch 1 and "
             f"{tb.speedup:.2f}x at batch {batch} may be off; rerun on an idle machine to trust them"] if why else []
    rows = [s.as_dict() for s in layers]
    for row in rows:  # Deep Compression's per-layer terms (Tables 2-3): bits per weight and index
        row.update(storage["layers"].get(row["name"], {}))
    if hardware:
        with thread_env(threads):  # cpu-local is calibrated at the thread count the timing uses
            hw, hw_layers, hw_notes = hardware_metrics(model, x1, list(hardware), baseline, deployed,
                                                       precision=metrics["precision"], xb=xb)
        notes += hw_notes
        metrics.update(hw)
        by_name = {r["name"]: r for r in rows}
        for name, per_profile in hw_layers.items():
            if name in by_name:
                by_name[name]["hardware"] = per_profile
    if runtimes:
        rt, rt_notes = runtime_metrics(model, reference, datamodule, list(runtimes), x1=x1, xb=xb, threads=threads,
                                       warmup=warmup, rounds=rounds, max_batches=max_batches,
                                       calibration_batches=calibration_batches, baselines=runtime_baselines)
        metrics.update(rt)
        notes += rt_notes
    if notes:
        extras["notes"] = notes
    return metrics, rows, extras


def runtime_metrics(model: nn.Module, baseline_model: nn.Module, datamodule: Any, runtimes: list[str], *,
                    x1: Any, xb: Any, threads: int, warmup: int, rounds: int,
                    max_batches: int | None, calibration_batches: int, baselines: dict[str, Any] | None = None,
                    ) -> tuple[dict[str, Any], list[str]]:
    """Speed and accuracy where the model ships: per runtime R, the model deployed there (int8 when
    quantised) and the input model deployed the same way, timed in alternating rounds at ``threads``.

    Keys: ``runtime_latency_ms/R``, ``runtime_latency_ms_batch/R``, ``runtime_speedup/R``,
    ``runtime_speedup_batch/R`` (against stage 0 in the same runtime), their ``_iqr``,
    ``runtime_accuracy/R`` (test accuracy computed by the runtime) and ``runtime_bytes/R`` (the file).
    ``baselines`` (runtime -> session of ``baseline_model``) is filled on first use and reused after, so
    the input model is deployed once per run, not once per stage.
    """
    baselines = {} if baselines is None else baselines
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    calibration = training_inputs(datamodule, calibration_batches) if is_quantized(model) else None
    a1, ab = feeds(x1), feeds(xb)
    with tempfile.TemporaryDirectory(prefix="compress-runtime-") as tmp:
        for r in runtimes:
            deploy = RUNTIMES.get(r, "eval.runtimes")
            path = Path(tmp) / f"{r}.onnx"
            session = deploy(model, path, x1, calibration=calibration, threads=threads)
            if r not in baselines:  # a session holds its graph in memory: the file may go with tmp
                baselines[r] = deploy(baseline_model, Path(tmp) / f"{r}-baseline.onnx", x1, threads=threads)
            base = baselines[r]
            t1 = compare_latency(lambda s=session: s.run(a1), lambda b=base: b.run(a1), rounds=rounds, repeats=3,
                                 warmup=warmup, threads=threads)
            tb = compare_latency(lambda s=session: s.run(ab), lambda b=base: b.run(ab), rounds=max(3, rounds // 2),
                                 repeats=3, warmup=warmup, threads=threads)
            metrics[f"runtime_latency_ms/{r}"] = t1.candidate_ms
            metrics[f"runtime_latency_ms_batch/{r}"] = tb.candidate_ms
            metrics[f"runtime_speedup/{r}"] = t1.speedup
            metrics[f"runtime_speedup_iqr/{r}"] = list(t1.speedup_iqr)
            metrics[f"runtime_speedup_batch/{r}"] = tb.speedup
            metrics[f"runtime_speedup_batch_iqr/{r}"] = list(tb.speedup_iqr)
            metrics[f"runtime_accuracy/{r}"] = ort_accuracy(session, datamodule.test_dataloader(), max_batches)
            metrics[f"runtime_bytes/{r}"] = path.stat().st_size
            if t1.busy or t1.wide_spread or tb.wide_spread:
                notes.append(f"{r}: timing unreliable ({t1.busy or t1.wide_spread or tb.wide_spread}): runtime "
                             f"speedups {t1.speedup:.2f}x / {tb.speedup:.2f}x may be off")
    return metrics, notes


def _check_outputs(model: nn.Module, x: Any, num_classes: int | None) -> None:
    """One forward before any work: the inputs fit, the logits are found (``model.output``), the
    classes agree with the data's (a one-line UserError otherwise)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = forward(model, x)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"model: it does not run on the data's inputs {describe_inputs(x)} "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    finally:
        model.train(was_training)
    if logits.dim() != 2:
        raise UserError(f"model.output: the logits have shape {tuple(logits.shape)}; expected (batch, classes) "
                        "(set model.output to the field holding them)")
    field = output_field(model)
    if num_classes is not None and logits.shape[1] != num_classes:
        where = "" if field is None else f" (model.output {field!r})"
        also = "" if field is None else ", or model.output to the field that holds the logits"
        raise UserError(f"model: it predicts {logits.shape[1]} classes{where}, the data has {num_classes}; set "
                        f"model.num_classes: {num_classes} (or the model's own argument for it){also}")


class Pipeline:
    """Runs a validated :class:`Recipe`. ``Pipeline(load_recipe(path)).run()``."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
                 trust_model_code: bool = False):
        if overwrite and resume:
            raise UserError("--overwrite and --resume contradict each other: choose one")
        self.recipe = recipe
        self.cfg = recipe.cfg
        self.out_dir = Path(self.cfg.out_dir)
        self.overwrite = overwrite
        self.resume = resume
        self.quiet = quiet
        self.trust_model_code = trust_model_code  # build code a teacher checkpoint names (--trust-model-code)
        self.records: list[dict[str, Any]] = []
        self.baseline_model: nn.Module | None = None  # stage 0's deployed copy: every stage is timed against it
        self.runtime_baselines: dict[str, Any] = {}  # runtime -> stage 0 deployed there (sessions, built once)
        self.sinks: list[Sink] = []

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self) -> tuple[nn.Module, Context]:
        """Data, model and context; validates every stage's plan against the model (no training)."""
        cfg = self.cfg
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg.data, seed=cfg.seed)
        dm.setup("fit")
        dm.setup("test")  # a user's LightningDataModule may build its test split only here
        input_shape, num_classes, batch_size = describe(dm)
        if num_classes is None and "num_classes" not in cfg.model:
            raise UserError(f"model.num_classes: the data module {cfg.data.name} does not say how many classes it "
                            "has (no num_classes attribute); set model.num_classes")
        self.spec = model_spec(cfg.model, input_shape, num_classes)
        model = build_model(self.spec["name"], key="model", output=self.spec.get("output"), **self.spec["kwargs"])
        if cfg.model.get("checkpoint"):
            load_weights(model, Path(cfg.model.checkpoint))
        _check_outputs(model, example_batch(dm, 2)[0], num_classes)
        self.plans = {stage.name: stage.plan(model) for stage in self.recipe.stages}
        ctx = Context(dm, out_dir=self.out_dir, trainer=OmegaConf.to_container(cfg.trainer), seed=cfg.seed,
                      teachers_dir=cfg.teachers_dir, latency_batch=cfg.eval.latency_batch_size or batch_size,
                      latency_threads=cfg.eval.latency_threads, model_spec=self.spec,
                      trust_model_code=self.trust_model_code)
        return model, ctx

    def _check_out_dir(self) -> None:
        """Never overwrite a run silently: a folder that holds one needs --resume or --overwrite."""
        if not rank_zero_only.rank == 0:
            return
        out = self.out_dir
        if not holds_run(out):
            return
        if self.overwrite:
            import shutil

            for f in [*(out / n for n in OWN_FILES), *out.glob("stage-*.ckpt")]:
                f.unlink(missing_ok=True)
            for d in OWN_DIRS:
                shutil.rmtree(out / d, ignore_errors=True)
            return
        if not self.resume:
            raise UserError(f"out_dir: '{out}' already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another: out_dir=runs/NEW")
        saved = OmegaConf.to_container(OmegaConf.load(out / "recipe.yaml"), resolve=True) \
            if (out / "recipe.yaml").exists() else None
        if saved is not None:
            diff = _first_difference(saved, self.recipe.to_container())
            if diff is not None:
                raise UserError(f"out_dir: '{out}' holds a different run ({diff} differs from its recipe.yaml); "
                                "resume with the same recipe and overrides, or pass --overwrite")

    def _restore(self, model: nn.Module, ctx: Context) -> int:
        """Load the last finished stage; returns the index of the first stage still to run."""
        stages = self.recipe.stages
        names = ["input"] + [s.name for s in stages]
        done = -1
        for k, name in enumerate(names):
            if not (self.out_dir / self._ckpt_name(k, name)).is_file():
                break
            done = k
        if done < 0:
            return 0
        data = self._read_own(done, names[done])
        load_into(model, data, self.out_dir / self._ckpt_name(done, names[done]))
        first = build_model(self.spec["name"], key="model", output=self.spec.get("output"), **self.spec["kwargs"])
        load_into(first, self._read_own(0, "input"))
        self.baseline_model = deployed_copy(first).eval()
        self.records = json.loads(data["extra"]["records"])
        ref = next((i for i, s in enumerate(stages) if s.type_name not in NOT_COMPRESSION), None)
        if ref is not None and ref < done:  # `teacher: self` is the model before the first compression stage
            reference = build_model(self.spec["name"], key="model", output=self.spec.get("output"), **self.spec["kwargs"])
            load_into(reference, self._read_own(ref, names[ref]))
            ctx.reference_model = reference.eval()
        return done + 1

    def _read_own(self, index: int, name: str) -> dict[str, Any]:
        """A checkpoint of this run, to resume from: its model is the recipe's (the file's spec is never
        built; a spec that differs is another model's checkpoint, refused)."""
        path = self.out_dir / self._ckpt_name(index, name)
        data = read_checkpoint(path)
        diff = _first_difference(data.get("model_spec"), self.spec, "model_spec")
        if diff is not None:
            raise UserError(f"{path}: a checkpoint of another model ({diff} differs from the recipe's model block); "
                            "resume with the recipe that wrote it, or pass --overwrite")
        return data

    def _open_sinks(self, ctx: Context) -> None:
        cfg = self.cfg
        if not rank_zero_only.rank == 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        recipe = self.recipe.to_container()
        atomic_write(self.out_dir / "recipe.yaml", lambda tmp: Path(tmp).write_text(self.recipe.to_yaml()))
        from pytorch_lightning.loggers import CSVLogger

        ctx.loggers.append(CSVLogger(str(self.out_dir), name="curves", version=""))
        self.sinks = [ReportSink(self.out_dir, recipe), HtmlSink(self.out_dir, recipe), CSVSink(self.out_dir)]
        if not self.quiet:
            names = ["input"] + [s.name for s in self.recipe.stages]
            self.sinks.insert(0, TerminalSink(name_width=max(len(n) for n in names)))
        if cfg.logger.wandb.mode != "disabled":
            import wandb
            from pytorch_lightning.loggers import WandbLogger

            w = cfg.logger.wandb
            run_file = self.out_dir / "run.json"
            run_id = json.loads(run_file.read_text()).get("wandb_id") if self.resume and run_file.exists() else None
            logger = WandbLogger(project=w.project, entity=w.entity, group=w.group, tags=list(w.tags),
                                 name=cfg.name, save_dir=str(self.out_dir), mode=w.mode, config=recipe,
                                 id=run_id, resume="allow" if run_id else None,
                                 settings=wandb.Settings(quiet=True))
            ctx.loggers.append(logger)
            run_id = logger.experiment.id
            atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps({"wandb_id": run_id})))
            self.sinks.append(WandbSink(logger.experiment, log_model=w.log_model))

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Run every stage into ``out_dir``, holding its lock from before the first write to the end."""
        if rank_zero_only.rank != 0:  # only rank zero writes (and locks) the folder
            return self._run()
        with hold_folder(self.out_dir):
            return self._run()

    def _run(self) -> list[dict[str, Any]]:
        self._check_out_dir()
        model, ctx = self.prepare()
        start = self._restore(model, ctx) if self.resume else 0
        self._open_sinks(ctx)
        stages: list[Stage] = self.recipe.stages
        if start == 0:
            self._finish_stage(0, "input", "input", model, ctx, None, time.perf_counter(), {})
        baseline = self.records[0]["metrics"]
        for index, stage in enumerate(stages, start=1):
            if index < start:
                continue
            ctx.begin_stage(index, stage.name)
            if ctx.reference_model is None and stage.type_name not in NOT_COMPRESSION:
                ctx.reference_model = copy.deepcopy(model).eval()  # `teacher: self`
            t0 = time.perf_counter()
            result = stage.apply(model, ctx)
            model = result.model
            self._finish_stage(index, stage.name, stage.type_name, model, ctx, baseline, t0, result.info)
        last = self.out_dir / self._ckpt_name(len(stages), stages[-1].name if stages else "input")
        for sink in self.sinks:
            sink.close(self.records, last)
        self.model = model
        return self.records

    def _calibration_batches(self) -> int:
        """The quantize stage's calibration size, so a runtime's int8 graph sees the same batches."""
        return next((int(s.config.calibration_batches) for s in self.recipe.stages if s.type_name == "quantize"), 8)

    def _ckpt_name(self, index: int, name: str) -> str:
        return f"stage-{index}-{name.replace('/', '_')}.ckpt"

    def _finish_stage(self, index: int, name: str, type_: str, model: nn.Module, ctx: Context,
                      baseline: dict[str, Any] | None, t0: float, info: dict[str, Any]) -> dict[str, Any]:
        wall = time.perf_counter() - t0
        e = self.cfg.eval
        if index == 0:
            self.baseline_model = deployed_copy(model.cpu()).eval()
        metrics, layers, extras = measure(model, ctx.datamodule, baseline=baseline, hardware=list(self.cfg.hardware),
                                          repeats=e.latency_repeats, warmup=e.latency_warmup,
                                          latency_batch=e.latency_batch_size, max_batches=e.max_batches,
                                          index_bits=self.cfg.encoding.index_bits,
                                          baseline_model=self.baseline_model, threads=e.latency_threads,
                                          runtimes=list(e.runtimes), calibration_batches=self._calibration_batches(),
                                          runtime_baselines=self.runtime_baselines)
        metrics["wall_s"] = wall
        record = {"index": index, "name": name, "type": type_, "metrics": metrics, "layers": layers,
                  "info": _plain(info), **extras}
        self.records.append(record)
        if rank_zero_only.rank == 0:
            save_checkpoint(self.out_dir / self._ckpt_name(index, name), model, model_spec=self.spec,
                            recipe=self.recipe.to_container(), stage_index=index, stage_name=name,
                            metrics=metrics, extra={"records": json.dumps(self.records, default=float)})
            for sink in self.sinks:
                sink.on_stage(record, self.records)
            lightning_dir = ctx.stage_checkpoint_dir(index)
            if lightning_dir is not None and lightning_dir.exists():  # the stage checkpoint supersedes them
                import shutil

                shutil.rmtree(lightning_dir, ignore_errors=True)
        return metrics


def load_weights(model: nn.Module, path: Path) -> None:
    """``model.checkpoint``: a compress checkpoint, or a plain state_dict (both weights_only)."""
    try:
        data = read_checkpoint(path)
    except UserError as e:
        if "not a compress checkpoint" not in str(e):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
        data = {"state_dict": state.get("state_dict", state) if isinstance(state, dict) else state}
    load_into(model, data, path)


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two plain containers differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}".lstrip(".")
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d is not None:
                return d.lstrip(".")
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return path.lstrip(".") or "stages"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d is not None:
                return d
        return None
    return None if a == b else path.lstrip(".")


def _plain(obj: Any) -> Any:
    """JSON-friendly copy of a stage's info (tensors become lists, numbers stay numbers)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    return str(obj)
