"""The command line: ``python run.py RECIPE [key=value ...]`` and its subcommands.

User mistakes print one line, ``error: ...``, on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from compress.errors import UserError

__all__ = ["main"]

USAGE = """python run.py RECIPE.yaml [key=value ...] [--dry-run] [--overwrite | --resume]
       python run.py resume RUN_DIR
       python run.py export RUN_DIR --format deep [--out FILE]
       python run.py sensitivity RECIPE.yaml [key=value ...]"""


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
    args = p.parse_intermixed_args(list(argv))
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    pipeline = Pipeline(recipe, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
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
    print(f"report: {pipeline.out_dir / 'report.json'}")
    return 0


def _resume(argv: Sequence[str]) -> int:
    """``resume RUN_DIR``: the recipe saved in the run folder, resumed there."""
    p = argparse.ArgumentParser(prog="run.py resume", description="Resume an interrupted run.")
    p.add_argument("run_dir")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(list(argv))
    from pathlib import Path

    recipe_path = Path(args.run_dir) / "recipe.yaml"
    if not recipe_path.is_file():
        raise UserError(f"{args.run_dir}: no recipe.yaml there; is it a run folder (out_dir of a recipe)?")
    return _run([str(recipe_path), f"out_dir={args.run_dir}", "--resume"] + (["--quiet"] if args.quiet else []))


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"resume": _resume}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}")
        return 0 if argv else 2
    import warnings

    warnings.filterwarnings("ignore", message=r".*(LeafSpec|treespec|does not have many workers|num_workers).*")
    from compress.lit.system import TrainingDiverged

    command = COMMANDS.get(argv[0])
    try:
        return command(argv[1:]) if command else _run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e} (finished stages kept their checkpoints)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted (finished stages kept their checkpoints)", file=sys.stderr)
        return 130
