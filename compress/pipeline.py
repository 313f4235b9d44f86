"""The pipeline: one visible loop over the recipe's stages.

baseline (stage 0: the input model as it comes) -> for each stage: apply (incl. fine-tuning),
measure, checkpoint, log to every sink.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from compress.checkpoint import load_into, read_checkpoint, save_checkpoint
from compress.data import build_datamodule, describe, example_batch
from compress.errors import UserError
from compress.files import atomic_write, hold_folder, json_text, plain_data, write_json
from compress.measurement import MeasureConfig, measure
from compress.model_setup import check_outputs, load_weights, model_spec
from compress.models import build_model
from compress.plumbing.masks import deployed_copy
from compress.recipe import Recipe
from compress.report.sinks import CSVSink, HtmlSink, ReportSink, Sink, TerminalSink, WandbSink
from compress.runfolder import clear_run, first_difference, holds_run, keep_curves
from compress.stages.base import Context, Stage

__all__ = ["Pipeline"]

NOT_COMPRESSION = ("train", "evaluate")


class Pipeline:
    """Runs a validated :class:`Recipe`. ``Pipeline(load_recipe(path)).run()``."""

    def __init__(self, recipe: Recipe, *, overwrite: bool = False, resume: bool = False, quiet: bool = False,
                 trust_model_code: bool = False, timing_lock: Any = None,
                 after_stage: Callable[[int, dict[str, Any]], None] | None = None):
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
        self.timing_lock = timing_lock or contextlib.nullcontext()  # held while a stage is measured (search trials)
        self.after_stage = after_stage  # called with (index, metrics) after each stage (search: cache, pruner)

    # -- set-up ------------------------------------------------------------------------------
    def prepare(self) -> tuple[nn.Module, Context]:
        """Data, model and context; validates every stage's plan against the model (no training)."""
        cfg = self.cfg
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg.data, seed=cfg.seed)
        dm.setup("fit")
        dm.setup("test")  # a user's LightningDataModule may build its test split only here
        # num_classes None (a data module that does not say, or a task without classes): the model's own width stands
        input_shape, num_classes, batch_size = describe(dm)
        self.spec = model_spec(cfg.model, input_shape, num_classes)
        model = build_model(self.spec["name"], key="model", output=self.spec.get("output"), **self.spec["kwargs"])
        if cfg.model.get("checkpoint"):
            load_weights(model, Path(cfg.model.checkpoint))
        x = example_batch(dm, 2)[0]
        check_outputs(model, x, num_classes, self.recipe.task)
        self.plans = {stage.name: stage.plan(model, x) for stage in self.recipe.stages}
        ctx = Context(dm, out_dir=self.out_dir, trainer=OmegaConf.to_container(cfg.trainer), seed=cfg.seed,
                      teachers_dir=cfg.teachers_dir, latency_batch=cfg.eval.latency_batch_size or batch_size,
                      latency_threads=cfg.eval.latency_threads, model_spec=self.spec,
                      trust_model_code=self.trust_model_code, task=self.recipe.task)
        return model, ctx

    def _check_out_dir(self) -> None:
        """Never overwrite a run silently: a folder that holds one needs --resume or --overwrite."""
        if not rank_zero_only.rank == 0:
            return
        out = self.out_dir
        if not holds_run(out):
            return
        if self.overwrite:
            clear_run(out)
            return
        if not self.resume:
            raise UserError(f"out_dir: '{out}' already holds a run; pass --resume to continue it, --overwrite to "
                            "replace it, or choose another: out_dir=runs/NEW")
        saved = OmegaConf.to_container(OmegaConf.load(out / "recipe.yaml"), resolve=True) \
            if (out / "recipe.yaml").exists() else None
        if saved is not None:
            diff = first_difference(saved, self.recipe.to_container())
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
        diff = first_difference(data.get("model_spec"), self.spec, "model_spec")
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

        curves = CSVLogger(str(self.out_dir), name="curves", version="")
        if self.resume:
            keep_curves(curves)
        ctx.loggers.append(curves)
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
            write_json(run_file, {"wandb_id": run_id})
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

    def _ckpt_name(self, index: int, name: str) -> str:
        return f"stage-{index}-{name.replace('/', '_')}.ckpt"

    def _finish_stage(self, index: int, name: str, type_: str, model: nn.Module, ctx: Context,
                      baseline: dict[str, Any] | None, t0: float, info: dict[str, Any]) -> dict[str, Any]:
        wall = time.perf_counter() - t0
        if index == 0:
            self.baseline_model = deployed_copy(model.cpu()).eval()
        with self.timing_lock:  # parallel search trials would slow each other's clocks
            metrics, layers, extras = measure(model, ctx.datamodule, MeasureConfig.from_recipe(self.recipe),
                                              baseline=baseline, baseline_model=self.baseline_model,
                                              runtime_baselines=self.runtime_baselines)
        metrics["wall_s"] = wall
        notes = info.pop("notes", None)  # what the stage itself says (layers left out, and why)
        if notes:
            extras["notes"] = list(notes) + extras.get("notes", [])
        record = {"index": index, "name": name, "type": type_, "metrics": metrics, "layers": layers,
                  "info": plain_data(info), **extras}
        self.records.append(record)
        if rank_zero_only.rank == 0:
            save_checkpoint(self.out_dir / self._ckpt_name(index, name), model, model_spec=self.spec,
                            recipe=self.recipe.to_container(), stage_index=index, stage_name=name,
                            metrics=metrics, extra={"records": json_text(self.records)},
                            check_inputs=example_batch(ctx.datamodule, 2)[0])
            for sink in self.sinks:
                sink.on_stage(record, self.records)
            lightning_dir = ctx.stage_checkpoint_dir(index)
            if lightning_dir is not None and lightning_dir.exists():  # the stage checkpoint supersedes them
                import shutil

                shutil.rmtree(lightning_dir, ignore_errors=True)
        if self.after_stage is not None:
            self.after_stage(index, metrics)
        return metrics
