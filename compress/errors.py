"""User-facing errors: one line, naming the key or file and how to fix it; the CLI exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UserError", "TrainingDiverged", "nearest", "suggest"]


class UserError(Exception):
    """A mistake in the user's input (recipe, override, file, argument).

    The CLI prints ``error: <message>`` on one line and exits with status 2, no traceback.
    """


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the stage stops and the last good checkpoint stays (exit 1)."""


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to ``name``, or None when nothing is close."""
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def suggest(name: str, choices: Iterable[str]) -> str:
    """A ``"valid: a, b, c (did you mean 'x'?)"`` tail for error messages."""
    choices = sorted(str(c) for c in choices)
    text = "valid: " + ", ".join(choices)
    near = nearest(name, choices)
    if near is not None:
        text += f" (did you mean '{near}'?)"
    return text
