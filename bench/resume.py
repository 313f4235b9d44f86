"""How much time a resume saves: a run killed in its last stage, resumed vs started again.

    python bench/resume.py [--recipe recipes/quickstart.yaml] [--kill STAGE:EPOCH:BATCH] [--out FILE]

Prints a table and writes JSON. The kill is a real SIGKILL (fault injection via COMPRESS_KILL_AT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress.files import json_text

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), *args, "--quiet"], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - t0, proc.returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "quickstart.yaml"))
    p.add_argument("--kill", default="3:3:0", help="STAGE:EPOCH:BATCH at which the first run is killed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = [args.recipe, "logger.wandb.mode=disabled"]
        full, rc = timed(common + [f"out_dir={tmp}/full"])
        assert rc == 0, "the uninterrupted run failed"
        killed, rc = timed(common + [f"out_dir={tmp}/crash"], {"COMPRESS_KILL_AT": args.kill})
        assert rc != 0, "the kill point was never reached; choose an earlier --kill"
        resumed, rc = timed(["resume", f"{tmp}/crash"])
        assert rc == 0, "the resume failed"
        same = [s["metrics"]["accuracy"] for s in json.loads(Path(f"{tmp}/full/report.json").read_text())["stages"]] == \
               [s["metrics"]["accuracy"] for s in json.loads(Path(f"{tmp}/crash/report.json").read_text())["stages"]]
    rows = {"recipe": args.recipe, "kill_at": args.kill, "full_run_s": full, "until_kill_s": killed,
            "resume_s": resumed, "rerun_s": full, "saved_s": full - resumed, "saved_fraction": 1 - resumed / full,
            "same_accuracies": same}
    print(f"{'recipe':<28}{'kill at':>10}{'full s':>9}{'killed after s':>16}{'resume s':>10}{'saved':>8}{'same acc':>10}")
    print(f"{Path(args.recipe).name:<28}{args.kill:>10}{full:>9.1f}{killed:>16.1f}{resumed:>10.1f}"
          f"{rows['saved_fraction']:>8.0%}{str(same):>10}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json_text(rows, indent=1))


if __name__ == "__main__":
    main()
