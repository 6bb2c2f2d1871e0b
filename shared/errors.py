"""The one exception tree of SplitFT, each error beside the exit code a command ends with on it.

    SplitFTError                 every error SplitFT raises on purpose                              exit
    ├── ConfigError              a bad setting: unknown preset, cut out of range, bad rank, ...       3
    │   ├── ScenarioError        a fault scenario file that cannot be run (names file and line)     3
    │   └── SecretsError         the fleet's secrets cannot be made: a tool missing or failing       3
    ├── ModelError               a model folder that cannot be used: missing, unsupported family      4
    ├── DataError                a training-data file that cannot be used: missing, malformed         6
    ├── LinkError                the MQTT broker cannot be reached, or a publish could not complete  7
    ├── JobError                 the job cannot go on: too few agents joined, every agent lost       8
    │   └── WorkerLost           a coordinator worker is gone (a collective failed or timed out)    8
    ├── RoundAborted             an agent's part in a round ended early: caught by the agent itself
    └── WireError                bytes from the network that are refused; ``reason`` is a :class:`Refusal`
                                 (a stable code, for counters and logs), the message says what was wrong

Code that handles untrusted input catches ``WireError``, counts ``exc.reason`` and carries on.
:func:`exit_code_for` maps an error to its :class:`ExitCode`.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class SplitFTError(Exception):
    """Base class of every error SplitFT raises on purpose."""


class ConfigError(SplitFTError, ValueError):
    """A configuration value is invalid; the message names the field."""


class ModelError(SplitFTError):
    """A model cannot be loaded or split."""


class LinkError(SplitFTError):
    """The broker cannot be reached, or a message could not be sent in time."""


class DataError(SplitFTError):
    """A data file is missing, malformed, or holds no usable sample."""


class ScenarioError(ConfigError):
    """A fault scenario file that cannot be run: the message names the file and the line."""


class SecretsError(ConfigError):
    """Something needed to make the fleet's secrets is missing or failed; the message says what."""


class JobError(SplitFTError):
    """The job cannot go on: too few agents joined in time, or too few finished a round."""


class WorkerLost(JobError):
    """A member of the coordinator's worker group is gone (a collective failed or timed out)."""


class RoundAborted(SplitFTError):
    """This agent's part in the current round ended early (deadline, new assignment, job done); the agent
    catches it and waits for its next assignment."""


class Refusal(StrEnum):
    """Why a message from the network was refused: the stable codes every member counts (``rejected`` in
    the coordinator's metrics.jsonl, per reason) and logs. OPERATIONS.md's table explains each one."""

    # the bytes
    EMPTY = "empty"  # an empty payload (how MQTT clears a retained message)
    TOO_LARGE = "too_large"  # over the size limits, compressed or declared decompressed
    BAD_COMPRESSION = "bad_compression"  # not a zstd frame, truncated, or not the size it declares
    BAD_MSGPACK = "bad_msgpack"  # the decompressed bytes are not msgpack
    # the envelope
    BAD_TOPIC = "bad_topic"  # a topic this job does not use
    BAD_VERSION = "bad_version"  # another protocol version
    BAD_SCHEMA = "bad_schema"  # a missing field, a field of the wrong type or out of range, an unknown type
    WRONG_TYPE = "wrong_type"  # a message type the topic does not carry
    WRONG_JOB = "wrong_job"  # the envelope names another job
    WRONG_SENDER = "wrong_sender"  # the sender is not the agent the topic belongs to
    DUPLICATE = "duplicate"  # seen before (a QoS 1 redelivery, or a replay)
    BAD_CHUNK = "bad_chunk"  # the parts of a chunked message do not agree
    # authentication (with a job key)
    UNAUTHENTICATED = "unauthenticated"  # not signed
    BAD_AUTH = "bad_auth"  # signed with another key, changed, or moved to another topic
    STALE = "stale"  # signed, but its time stamp is outside the window
    # the tensors in the body
    BAD_DTYPE = "bad_dtype"  # a wire dtype that is unknown or not accepted for this tensor
    BAD_SHAPE = "bad_shape"  # a shape other than the one expected, or out of bounds
    NONFINITE = "nonfinite"  # NaN or Inf
    OUTLIER = "outlier"  # an adapter update far larger than the round's median (a forgery, or a diverged device)
    # the job's state
    UNEXPECTED = "unexpected"  # well-formed, but for no current assignment, or a step already served or not begun
    # the receiver's bounds
    OVERLOADED = "overloaded"  # the receiver holds as many bytes from this sender, or from all, as it may
    INCOMPLETE = "incomplete"  # a chunked message given up: its parts stopped coming, or a newer one took its place
    # bugs on the receiving side, counted rather than fatal
    DECODE_ERROR = "decode_error"  # the decoder raised something other than a refusal
    HANDLER_ERROR = "handler_error"  # handling an accepted message raised


#: refusals that happen in a healthy job, counted and logged at INFO rather than as warnings: duplicates (QoS 1
#: redeliveries, a retained status delivered again on a resubscribe) and late messages (after a retry or a restart)
ROUTINE_REFUSALS = frozenset({Refusal.DUPLICATE, Refusal.UNEXPECTED})


class WireError(SplitFTError):
    """Data received from the network was refused: ``reason`` says why (a :class:`Refusal`, suitable as a
    counter key), ``detail`` what exactly was wrong."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        reason = Refusal(reason)  # an unknown code is a bug here, not on the wire
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
