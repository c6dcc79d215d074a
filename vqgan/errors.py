"""DataError: a mistake in the data a run was pointed at (an empty folder, a missing column, tokens that do
not fit the prior), as opposed to a bug. The console commands print it as one line (vqgan.cli.errors).
This module imports nothing, so that the commands' --help stays cheap."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or mismatched input data; the message names the problem and, where there is one, the fix."""
