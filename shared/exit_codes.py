"""Named exit codes of the SplitFT commands (scripts and service managers can act on them)."""

from __future__ import annotations

from enum import IntEnum

from .errors import ConfigError, DataError, JobError, LinkError, ModelError


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # an unexpected error; the traceback is printed
    USAGE = 2  # bad command-line arguments (typer/click's own code)
    CONFIG = 3  # a configuration value is invalid
    MODEL = 4  # the model cannot be loaded or split
    CHECK_FAILED = 5  # a check ran and found a mismatch (e.g. `verify-split`)
    DATA = 6  # a data file is missing or unusable
    BROKER = 7  # the MQTT broker cannot be reached
    JOB_FAILED = 8  # the job could not go on (too few agents, every agent lost)
    INTERRUPTED = 130  # Ctrl-C


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of an error the commands report without a traceback."""
    for kind, code in (
        (ModelError, ExitCode.MODEL),
        (DataError, ExitCode.DATA),
        (LinkError, ExitCode.BROKER),
        (ConfigError, ExitCode.CONFIG),
        (JobError, ExitCode.JOB_FAILED),
    ):
        if isinstance(exc, kind):
            return code
    return ExitCode.JOB_FAILED
