"""VSkipError: the one base of every error a user can fix (bad plan, model dir, argument, request).

The CLI prints a VSkipError as one line and exits 2; anything else is a bug of ours and
prints its traceback (exit 1). Each subclass keeps its older base (ValueError, RuntimeError),
so `except ValueError` callers still catch it. Plain Python: no torch.
"""

from __future__ import annotations


class VSkipError(Exception):
    """A mistake in what the user gave us; the message names the file, field or argument."""


class ModelDirError(VSkipError, ValueError):
    """A model directory that cannot be loaded: missing or corrupt config, weights or processor files."""
