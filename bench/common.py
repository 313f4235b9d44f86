"""What every benchmark shares: a printed table and a JSON file (never a timing assert in a test)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compress.files import json_text

__all__ = ["print_table", "write_json"]


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """One line per row; ``columns`` are ``(header, key, format spec)``, e.g. ``("read s", "read_s", ".2f")``."""
    cells = [[format(r.get(key, ""), fmt) if r.get(key) is not None else "-" for _, key, fmt in columns]
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(columns)]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(columns, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def write_json(out: str | Path | None, payload: Any) -> None:
    """Write ``payload`` to ``out`` (folders made as needed); nothing when ``out`` is None."""
    if out is None:
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json_text(payload, indent=2))
    print(f"wrote {out}")
