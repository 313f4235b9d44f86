"""The old name of :mod:`compress.calls` (it holds calls of a model, not batches), kept for imports
written before the rename."""

from compress.calls import *  # noqa: F403
from compress.calls import __all__  # noqa: F401
