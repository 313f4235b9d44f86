"""Notes said once: a note that holds for several stages is listed once, with those stages.

report.json keeps each stage's own ``notes`` list; grouping is presentation, for the terminal,
report.md and report.html.
"""

from __future__ import annotations

from typing import Any

__all__ = ["group_notes", "stages_label", "notes_lines"]


def stages_label(indices: list[int]) -> str:
    """``[3]`` -> ``stage 3``; ``[2, 3, 4]`` -> ``stages 2-4``; ``[1, 3, 4]`` -> ``stages 1, 3-4``."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = [str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs]
    return ("stage " if len(indices) == 1 else "stages ") + ", ".join(parts)


def group_notes(records: list[dict[str, Any]]) -> list[tuple[list[int], str]]:
    """Each distinct note once, with the indices of the stages it was made at, in first-seen order."""
    seen: dict[str, list[int]] = {}
    for r in records:
        for note in r.get("notes", []):
            stages = seen.setdefault(note, [])
            if r["index"] not in stages:
                stages.append(r["index"])
    return [(stages, note) for note, stages in seen.items()]


def notes_lines(records: list[dict[str, Any]]) -> list[str]:
    """``stages 2-4: <note>`` lines, one per distinct note."""
    return [f"{stages_label(stages)}: {note}" for stages, note in group_notes(records)]
