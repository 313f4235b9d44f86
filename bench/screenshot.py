"""Screenshot a report page in headless Chromium, checked as the browser test checks it.

    python bench/screenshot.py RUN_DIR docs/report.png            # RUN_DIR/report.html
    python bench/screenshot.py compare.html docs/compare.png --height 1100

Fails (exit 1) on a console error, a network request, or a chart without data points; prints
each chart's title and trace count. Needs the dev extra (playwright) and Debian's chromium.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress.report.browser import inspect_page


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("page", help="a run folder (its report.html) or an HTML file")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=1500, help="viewport height: the screenshot's, unless --full-page")
    p.add_argument("--full-page", action="store_true")
    args = p.parse_args()
    page = Path(args.page)
    page = page / "report.html" if page.is_dir() else page
    seen = inspect_page(page, args.out, width=args.width, height=args.height, full_page=args.full_page)
    for chart in seen["charts"]:
        print(f"{chart['traces']:3d} traces, {chart['with_points']:3d} with points: {chart['title']}")
    bad = seen["errors"] + [f"network request: {u}" for u in seen["blocked"]] + \
        [f"no data: {c['title']}" for c in seen["charts"] if not c["traces"] or c["with_points"] < c["traces"]]
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    print(f"{args.out}: {Path(args.out).stat().st_size:,} bytes")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
