"""The command line: ``python run.py RECIPE [key=value ...]`` and its subcommands.

User mistakes print one line, ``error: ...``, on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable, Sequence

from compress.errors import TrainingDiverged, UserError, shorten

__all__ = ["main"]

# OS errors that are the machine's state, not a bug: one line, exit 2, like any other user mistake.
# A run that meets one has kept every finished stage (checkpoints and reports are written atomically).
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space or raise the quota",
                      errno.EROFS: "write somewhere writable", errno.EACCES: "fix the permissions or write elsewhere",
                      errno.EPERM: "fix the permissions or write elsewhere", errno.ENAMETOOLONG: "use shorter names",
                      errno.ENOTDIR: "a folder in the path is a file", errno.EISDIR: "give a file, not a folder"}

USAGE = """python run.py RECIPE.yaml [key=value ...] [--dry-run] [--overwrite | --resume] [--trust-model-code]
       python run.py resume RUN_DIR [--trust-model-code]
       python run.py teacher NAME [key=value ...]
       python run.py export RUN_DIR --format deep|onnx [--out FILE] [--stage K] [--trust-model-code]
       python run.py sensitivity RECIPE.yaml [key=value ...] [--from CKPT] [--max-drop 0.01]
       python run.py compare RUN_DIR... [--out compare.html] [--force]
       python run.py search RECIPE.yaml [key=value ...] [--trials N] [--jobs K] [--storage URL] [--study NAME]
                            [--timeout S]"""

TRUST_HELP = ("build the model code (import:..., transformers) that a checkpoint or .dc file names; a file is data "
              "otherwise. Only for files you trust, as Hugging Face's trust_remote_code")


def _run(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="run.py", usage=USAGE, description="Run a compression recipe.")
    p.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.devices=2 stages.1.sparsity=0.9")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved recipe and the plan, train nothing")
    p.add_argument("--overwrite", action="store_true", help="replace the run in out_dir")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in out_dir: finished stages are kept, the interrupted one restarts "
                        "from its last epoch")
    p.add_argument("--quiet", action="store_true", help="no tables on the terminal")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    args = p.parse_intermixed_args(list(argv))
    from pathlib import Path

    import yaml

    from compress.schema import read_yaml

    if Path(args.recipe).is_file():  # a file too big or an alias bomb answers before torch loads
        try:
            read_yaml(args.recipe)
        except yaml.YAMLError:
            pass  # load_recipe names the line and column
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # a recipe error answers before Lightning loads
    from compress.pipeline import Pipeline

    pipeline = Pipeline(recipe, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet,
                        trust_model_code=args.trust_model_code)
    if args.dry_run:
        model, _ = pipeline.prepare()
        print(recipe.to_yaml())
        print("plan:")
        print(f"  0. input: {recipe.cfg.model.name}, {sum(p.numel() for p in model.parameters()):,} parameters")
        for i, stage in enumerate(recipe.stages, 1):
            ft = stage.finetune_config
            tail = f", then fine-tune {ft.epochs} epochs" if ft.epochs and stage.type_name != "train" else \
                (f" {ft.epochs} epochs" if stage.type_name == "train" else "")
            print(f"  {i}. {stage.name} ({stage.type_name}){tail}")
            for line in pipeline.plans.get(stage.name, []):
                print(f"       {line}")
        return 0
    pipeline.run()
    print(f"report: {pipeline.out_dir / 'report.html'} (and report.json, report.md)")
    return 0


def _resume(argv: Sequence[str]) -> int:
    """``resume RUN_DIR``: the recipe saved in the run folder, resumed there."""
    p = argparse.ArgumentParser(prog="run.py resume", description="Resume an interrupted run.")
    p.add_argument("run_dir")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    args = p.parse_args(list(argv))
    from pathlib import Path

    recipe_path = Path(args.run_dir) / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{args.run_dir}: no recipe.yaml there; is it a run folder (out_dir of a recipe)?")
    flags = [f for f, on in (("--quiet", args.quiet), ("--trust-model-code", args.trust_model_code)) if on]
    return _run([str(recipe_path), f"out_dir={args.run_dir}", "--resume", *flags])


def _sensitivity(argv: Sequence[str]) -> int:
    """``sensitivity RECIPE``: prune each layer alone at several ratios, no fine-tuning; CSV, plot,
    suggested per-layer ratios (for a ``prune.structured`` stage's ``layer_ratios``)."""
    p = argparse.ArgumentParser(prog="run.py sensitivity", description=_sensitivity.__doc__)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--from", dest="checkpoint", help="a checkpoint of the trained model (default: run the "
                   "recipe's leading train stages)")
    p.add_argument("--ratios", type=float, nargs="+", default=None)
    p.add_argument("--importance", default="l1")
    p.add_argument("--max-drop", type=float, default=0.01, help="drop of the task's primary metric allowed per layer (accuracy: a fraction)")
    args = p.parse_intermixed_args(list(argv))
    from pathlib import Path

    from compress.checkpoint import load_into, read_checkpoint
    from compress.files import finite
    from compress.pipeline import NOT_COMPRESSION, Pipeline
    from compress.recipe import load_recipe
    from compress.sensitivity import DEFAULT_RATIOS, run_sensitivity
    from compress.tasks import evaluate_model

    recipe = load_recipe(args.recipe, args.overrides)
    pipeline = Pipeline(recipe)
    model, ctx = pipeline.prepare()
    if args.checkpoint:
        load_into(model, read_checkpoint(args.checkpoint), args.checkpoint)
    else:
        for stage in recipe.stages:
            if stage.type_name not in NOT_COMPRESSION:
                break
            model = stage.apply(model, ctx).model
    out_dir = Path(recipe.cfg.out_dir) / "sensitivity"
    loader = ctx.datamodule.test_dataloader()
    task = recipe.task  # its primary metric, signed so that higher is better (a perplexity is negated)
    sign = 1.0 if task.higher_is_better else -1.0
    result = run_sensitivity(model, lambda m: sign * evaluate_model(task, m, loader)["metric"], ctx.example_inputs(),
                             out_dir, ratios=args.ratios or DEFAULT_RATIOS, importance=args.importance,
                             max_drop=args.max_drop)
    print(f"baseline {task.primary} {sign * result['baseline']:.4f}; per layer, the largest ratio losing at most "
          f"{args.max_drop}:")
    print("layer_ratios:")
    for name, ratio in result["suggested"].items():
        print(f"  {name}: {ratio}")
    print(f"written: {out_dir}/ (sensitivity.csv, sensitivity.png, suggested_ratios.json)")
    w = recipe.cfg.logger.wandb
    if w.mode != "disabled":
        import wandb

        run = wandb.init(project=w.project, entity=w.entity, mode=w.mode, dir=str(out_dir),
                         name=f"{recipe.cfg.name}-sensitivity", config=recipe.to_container(),
                         settings=wandb.Settings(quiet=True))
        rows = result["rows"]
        run.log({"sensitivity/plot": wandb.Image(str(out_dir / "sensitivity.png")),
                 "sensitivity/table": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        artifact = wandb.Artifact(f"{recipe.cfg.name}-sensitivity", type="sensitivity",
                                  metadata={"suggested": finite(result["suggested"])})
        for f in ("sensitivity.csv", "sensitivity.png", "suggested_ratios.json"):
            artifact.add_file(str(out_dir / f))
        run.log_artifact(artifact)
        run.finish()
    return 0


def _export(argv: Sequence[str]) -> int:
    """``export RUN_DIR --format deep|onnx``: a stage's model as a Deep Compression file or an ONNX graph."""
    p = argparse.ArgumentParser(prog="run.py export", description=_export.__doc__)
    p.add_argument("run_dir")
    p.add_argument("--format", default="deep", choices=["deep", "onnx"],
                   help="deep: the Deep Compression file; onnx: an ONNX graph (int8 QDQ after quantize)")
    p.add_argument("--stage", type=int, default=None, help="stage index (default: the last finished)")
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/model.dc or RUN_DIR/model.onnx)")
    p.add_argument("--index-bits", default=None,
                   help="deep: relative-index width, 1-16 or 'auto' (default: the run's encoding.index_bits)")
    p.add_argument("--max-accuracy-drop", type=float, default=None,
                   help="onnx int8: how far below float the int8 graph's test metric may be (default: the "
                        "run's quantize max_accuracy_drop; without one, the graph is checked against the PyTorch "
                        "quantised model, as the stage's runtime measurement does)")
    p.add_argument("--trust-model-code", action="store_true", help=TRUST_HELP)
    args = p.parse_args(list(argv))
    import re
    from pathlib import Path

    from compress.checkpoint import model_from_checkpoint, read_checkpoint
    from compress.runfolder import check_output

    run_dir = Path(args.run_dir)
    out = check_output(args.out or run_dir / f"model.{'onnx' if args.format == 'onnx' else 'dc'}")
    # stage-<k>-<name>.ckpt only: any other file there (stage-final.ckpt) is not one of the run's stages
    found = {int(m[1]): f for f in run_dir.glob("stage-*.ckpt") if (m := re.fullmatch(r"stage-(\d+)-.+\.ckpt", f.name))}
    ckpts = [found[k] for k in sorted(found) if args.stage is None or k == args.stage]
    if not ckpts:
        raise UserError(f"{run_dir}: no stage checkpoint{' for --stage ' + str(args.stage) if args.stage is not None else ''}"
                        " there; is it a run folder (out_dir of a recipe)?")
    data = read_checkpoint(ckpts[-1])
    model = model_from_checkpoint(data, ckpts[-1], trust_model_code=args.trust_model_code)
    if args.format == "onnx":
        return _export_onnx(model, data, ckpts[-1].name, out, args.max_accuracy_drop)
    from compress.encoding import model_storage, write_compressed
    from compress.quant import is_quantized
    from compress.schema import check_index_bits

    index_bits: int | str = ((data.get("recipe") or {}).get("encoding") or {}).get("index_bits", 5)
    if args.index_bits is not None:
        index_bits = int(args.index_bits) if args.index_bits.isdigit() else args.index_bits
    check_index_bits(index_bits, "--index-bits")
    if is_quantized(model):  # the format holds float and codebook weights: an int8 model would not read back
        raise UserError(f"{ckpts[-1]}: the model is quantised (int8) and a Deep Compression file stores float or "
                        "shared weights; export it with --format onnx (int8 QDQ), or a stage before quantize with --stage")
    written = write_compressed(model, out, data["model_spec"], index_bits)
    reported = model_storage(model, index_bits)["total"]["compressed_bytes"]
    print(f"{out}: {written:,} bytes on disk from {ckpts[-1].name}; reported compressed_bytes {reported:,} "
          f"({100 * (written - reported) / reported:+.2f}%)")
    return 0


def _export_onnx(model, data: dict, source: str, out, max_drop: float | None = None) -> int:
    """The ONNX half of ``export``: inputs, calibration batches and the int8 gate's test split come from
    the run's own data; the gate's tolerance is the run's ``max_accuracy_drop`` unless given."""
    from compress.calls import batch_size, take
    from compress.data import build_datamodule, example_batch, training_inputs
    from compress.quant import is_quantized
    from compress.runtime import DEFAULT_MAX_ACCURACY_DROP, OrtModel, export_onnx
    from compress.tasks import build_task

    recipe = data.get("recipe") or {}
    if "data" not in recipe:
        raise UserError(f"{source}: the checkpoint holds no recipe, so no data to trace and calibrate with")
    dm = build_datamodule(recipe["data"], seed=int(recipe.get("seed", 0)))
    dm.setup("fit")
    quantized = is_quantized(model)
    quantize = next((s for s in recipe.get("stages", []) if s.get("type") == "quantize"), {})
    calibration = quantize.get("calibration_batches", 8)
    task = build_task(recipe.get("task"))
    if max_drop is None:  # the rule the run's quantize stage applied: its max_accuracy_drop, or none
        max_drop = next((quantize[k] for k in ("max_accuracy_drop", "max_metric_drop") if quantize.get(k) is not None),
                        None)
    elif task.name == "classification" and not 0 <= max_drop < 1:
        raise UserError(f"--max-accuracy-drop: {max_drop} must be in [0, 1) (a fraction: 0.005 is half a point)")
    elif max_drop < 0:
        raise UserError(f"--max-accuracy-drop: {max_drop} must be >= 0 (a drop of the task's {task.primary})")
    dm.setup("test")
    test, targets = example_batch(dm, 256)
    # With a drop (the run's or --max-accuracy-drop): the quantize stage's gate on the test split. Without:
    # as the stage's runtime measurement, the graph judged by the task against the PyTorch quantised model.
    gate = quantized and max_drop is not None
    export_onnx(model, out, take(test, 1), calibration=training_inputs(dm, calibration) if quantized else None,
                check_inputs=test, check_targets=targets, task=task, max_drop=max_drop,
                test=dm.test_dataloader() if gate else None,
                max_accuracy_drop=max_drop if gate else DEFAULT_MAX_ACCURACY_DROP)
    print(f"{out}: {out.stat().st_size:,} bytes, {'int8 (QDQ)' if quantized else 'fp32'} ONNX from {source}, "
          f"checked against PyTorch on {batch_size(test)} test inputs; runs in ONNX Runtime "
          f"({OrtModel(out).session.get_providers()[0]})")
    return 0


def _compare(argv: Sequence[str]) -> int:
    """``compare RUN_DIR...``: runs side by side in compare.html (Pareto charts, final metrics)."""
    p = argparse.ArgumentParser(prog="run.py compare", description=_compare.__doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="compare.html", help="the HTML file to write (default: compare.html)")
    p.add_argument("--force", action="store_true", help="compare runs of different models or data sets")
    args = p.parse_args(list(argv))
    from compress.report.compare import compare_runs
    from compress.runfolder import check_output

    check_output(args.out)  # before any run is read: never onto a run's report, a folder, or nowhere writable

    print(compare_runs(args.run_dirs, args.out, force=args.force))
    print(f"compare: {args.out}")
    return 0


def _teacher(argv: Sequence[str]) -> int:
    """``teacher NAME``: train a named teacher (teachers/NAME.yaml) by its recipe and record it."""
    p = argparse.ArgumentParser(prog="run.py teacher", description=_teacher.__doc__)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the teacher's recipe")
    p.add_argument("--teachers-dir", default="teachers")
    p.add_argument("--record-only", action="store_true", help="only write sha256/accuracy of an existing checkpoint")
    args = p.parse_args(list(argv))
    from compress.distill.teacher import load_teacher_spec, record_teacher, teacher_spec_path

    if args.record_only:
        ts = record_teacher(args.name, args.teachers_dir)
    else:
        from compress.teachers import train_teacher

        train_teacher(args.name, args.teachers_dir, overrides=tuple(args.overrides))
        ts = load_teacher_spec(teacher_spec_path(args.name, args.teachers_dir))
    print(f"teacher {ts.name}: accuracy {ts.accuracy}, sha256 {ts.sha256}")
    return 0


def _search(argv: Sequence[str]) -> int:
    """``search RECIPE``: Optuna searches the recipe's ``search.space`` for its objectives under its
    constraints; trials are runs in OUT/trials/<k>/, results in OUT/search.html and OUT/pareto/."""
    p = argparse.ArgumentParser(prog="run.py search", description=_search.__doc__)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--trials", type=int, default=None, help="trials in the study (default: search.trials)")
    p.add_argument("--jobs", type=int, default=1, help="trials at once on this machine (worker processes)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///OUT/study.db); "
                   "postgresql://... or journal:PATH lets other machines join")
    p.add_argument("--study", default=None, help="study name (default: the recipe's name)")
    p.add_argument("--timeout", type=float, default=None, help="start no trial after S seconds")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_intermixed_args(list(argv))
    from compress.search import run_search

    run_search(args.recipe, args.overrides, trials=args.trials, jobs=args.jobs, storage=args.storage,
               study=args.study, timeout=args.timeout, quiet=args.quiet)
    return 0


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "resume": _resume, "teacher": _teacher, "sensitivity": _sensitivity, "export": _export, "compare": _compare,
    "search": _search}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}")
        return 0 if argv else 2
    import warnings

    warnings.filterwarnings("ignore", message=r".*(LeafSpec|treespec|does not have many workers|num_workers).*")
    command = COMMANDS.get(argv[0])
    try:
        return command(argv[1:]) if command else _run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f"{shorten(e.filename)}: " if e.filename else ""
        resume = " (finished stages kept their checkpoints: `python run.py resume OUT_DIR` continues)" \
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        print(f"error: {where}{e.strerror}; {ENVIRONMENT_ERRNOS[e.errno]}{resume}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e} (finished stages kept their checkpoints)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (finished stages kept their checkpoints)", file=sys.stderr)
        return 130
