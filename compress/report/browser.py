"""Open a report page in headless Chromium (playwright): console errors, rendered charts, a screenshot.

Used by the browser test and ``bench/screenshot.py``. playwright (the ``dev`` extra) drives the
system Chromium (Debian's ``chromium``) through ``executable_path``: its own browser download is
not needed. Every request that is not a file is refused, so a page that needs the network fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM_ARGS", "chromium_path", "inspect_page"]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# Each plotly chart of the page: its title and how many traces hold points (non-empty x and y).
_CHARTS_JS = """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd => ({
  id: gd.id,
  title: (gd.layout && gd.layout.title && gd.layout.title.text) || '',
  traces: (gd.data || []).length,
  with_points: (gd.data || []).filter(t => t.x && t.y && t.x.length > 0 && t.y.length > 0
                                        && Array.from(t.y).some(v => v !== null)).length,
  drawn: gd.querySelectorAll('.main-svg .trace').length,
}))"""


def chromium_path() -> str | None:
    """The Chromium to drive: ``$CHROMIUM``, else ``chromium`` or ``chromium-browser`` on the PATH."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return found if found and Path(found).exists() else None


def inspect_page(page_path: str | Path, screenshot: str | Path | None = None, width: int = 1280,
                 height: int = 1500, full_page: bool = False) -> dict[str, Any]:
    """Load a page from disk, wait for its charts and report what rendered.

    Args:
        page_path: the HTML file.
        screenshot: where to save a PNG of the page (the top ``height`` pixels unless ``full_page``).
        width: viewport width in pixels.
        height: viewport height in pixels.
        full_page: screenshot the whole page, not the viewport.

    Returns:
        ``{"errors": [console errors and page exceptions], "blocked": [refused network requests],
        "charts": [{"id", "title", "traces", "with_points", "drawn"}, ...]}``.
    """
    from playwright.sync_api import sync_playwright  # the dev extra: only tests and bench/ use this module

    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("no chromium on the PATH (apt-get install chromium, or set $CHROMIUM)")
    errors: list[str] = []
    blocked: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            def route(r: Any) -> None:
                if r.request.url.startswith(("file:", "data:", "blob:")):
                    r.continue_()
                else:
                    blocked.append(r.request.url)
                    r.abort()

            page.route("**/*", route)
            page.goto(Path(page_path).resolve().as_uri(), wait_until="load")
            page.wait_for_function("() => Array.from(document.querySelectorAll('.js-plotly-plot'))"
                                   ".every(gd => gd._fullLayout)", timeout=30_000)
            charts = page.evaluate(_CHARTS_JS)
            if screenshot is not None:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=full_page)
        finally:
            browser.close()
    return {"errors": errors, "blocked": blocked, "charts": charts}
