"""User-facing errors: one line, naming the key or file and how to fix it; the CLI exits 2."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

__all__ = ["UserError", "TrainingDiverged", "nearest", "suggest", "shorten"]

# A value echoed into a message is cut beyond this many characters, and a whole message beyond
# MAX_MESSAGE: a 10 MB string in a recipe must not become a 10 MB line on the terminal.
MAX_VALUE = 300
MAX_MESSAGE = 2000


class UserError(Exception):
    """A mistake in the user's input (recipe, override, file, argument).

    The CLI prints ``error: <message>`` on one line and exits with status 2, no traceback. Long
    values in the message are cut (:func:`shorten`), so every place that echoes a value is bounded.
    """

    def __init__(self, message: object = "") -> None:
        text = re.sub(rf"\S{{{MAX_VALUE + 1},}}", lambda m: shorten(m.group(0)), str(message))
        super().__init__(shorten(text, MAX_MESSAGE))


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the stage stops and the last good checkpoint stays (exit 1)."""


def shorten(value: object, limit: int = MAX_VALUE) -> str:
    """``str(value)``, or its head and tail around ``...[N characters]...`` when longer than ``limit``."""
    text = str(value)
    if len(text) <= limit:
        return text
    tail = max(limit // 5, 1)
    return f"{text[:limit - tail]}...[{len(text):,} characters]...{text[-tail:]}"


def nearest(name: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to ``name``, or None when nothing is close."""
    if len(str(name)) > MAX_VALUE:  # no valid name is that long; difflib would take seconds on megabytes
        return None
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
