"""Named exit codes of the SplitFT commands (scripts and service managers can act on them)."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # an unexpected error; the traceback is printed
    USAGE = 2  # bad command-line arguments (typer/click's own code)
    CONFIG = 3  # a configuration value is invalid
    MODEL = 4  # the model cannot be loaded or split
    CHECK_FAILED = 5  # a check ran and found a mismatch (e.g. `verify-split`)
