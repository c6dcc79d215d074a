"""A user's mistake as opposed to a bug: DataError, and how a command reports any user error in one line.

DataError is a mistake in the data a run was pointed at (an empty folder, a missing column, tokens that do
not fit the prior). A traceback helps whoever debugs vqgan, not whoever mistyped a path: the console commands
(vqgan/cli) and the library's own `python -m` entries (vqgan.train, vqgan.train_prior, vqgan.data.make_shards)
print a user error as one line `error: ...` and exit 2; `--debug` (any position on the command line) or
VQGAN_DEBUG=1 shows the traceback. Bugs (anything not listed in the errors a command catches) keep their
traceback always. This module sits below the library (it imports only yaml and vqgan.config), so that the
library never imports vqgan.cli and the commands' --help stays cheap.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

import yaml

from vqgan.config import ConfigError


class DataError(ValueError):
    """Bad or mismatched input data; the message names the problem and, where there is one, the fix."""


DEBUG_FLAG = "--debug"
# The exceptions the library raises for bad input: ConfigError, ExportError and HubError are ValueErrors.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError, yaml.YAMLError)


def debug_enabled(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("VQGAN_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (continuation lines joined with '; ')."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the message is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    if isinstance(err, (FileNotFoundError, PermissionError)) and err.filename and str(err.filename) not in text:
        text = f"{err.filename}: {text}"
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


# What a trainer reports as a user's mistake: config, file and data problems (DataError, raised where data
# and token datasets are opened and checked). Any other ValueError deep inside a training loop is more
# likely a bug than a typo, so it keeps its traceback there.
TRAINING_USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, NotADirectoryError,
                                                          yaml.YAMLError, DataError)


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
                user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    """Run `body(argv without --debug)`; a user error -> 'error: ...' on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        status = body(argv)
    except user_errors as err:
        if debug:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0 if status is None else int(status)


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too: `PROG: error: MESSAGE (see PROG --help)`, exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_debug_flag(parser) -> None:
    """Document --debug in a command's --help (run_command removes it before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="show the full traceback of an error (or VQGAN_DEBUG=1)")


def run_training(train: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """A trainer's `main(argv)` as a command (vqgan-train, python -m vqgan.train): TRAINING_USER_ERRORS one line."""

    def body(args: list[str]) -> int:
        train(args)  # returns the run's summary, not an exit status
        return 0

    return run_command(body, argv, TRAINING_USER_ERRORS)
