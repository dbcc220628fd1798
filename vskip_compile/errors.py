"""VSkipError: the one base of every error a user can fix (bad plan, model dir, argument, request).

The CLI prints a VSkipError as one line and exits 2; anything else, and a VSkipError marked
`internal`, is a bug of ours and prints its traceback (exit 1). Each subclass keeps its older base (ValueError, RuntimeError),
so `except ValueError` callers still catch it. Plain Python: no torch.
"""

from __future__ import annotations


class VSkipError(Exception):
    """A mistake in what the user gave us; the message names the file, field or argument."""

    # True for a subclass raised by our own checks of our own work (a pass that cannot prove
    # its rewrite, the eval harness disagreeing with itself): not the user's to fix, so the
    # CLI prints its traceback and exits 1.
    internal = False


class ModelDirError(VSkipError, ValueError):
    """A model directory that cannot be loaded: missing or corrupt config, weights or processor files."""
