"""The one exception tree of SplitFT.

    SplitFTError                 every error SplitFT raises on purpose
    ├── ConfigError              a bad setting: unknown preset, cut out of range, bad rank, ...
    ├── ModelError               a model folder that cannot be used: missing, unsupported family, no weights
    ├── LinkError                the MQTT broker cannot be reached, or a publish could not complete
    ├── DataError                a training-data file that cannot be used: missing, malformed, no samples
    └── WireError                bytes from the network that are refused; ``reason`` is a short stable
                                 code (for counters and logs), the message says what was wrong

Code that handles untrusted input catches ``WireError``, counts ``exc.reason`` and carries on.
"""

from __future__ import annotations


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


class WireError(SplitFTError):
    """Data received from the network was refused.

    ``reason`` is one of a small set of stable codes (``too_large``, ``bad_compression``,
    ``bad_msgpack``, ``bad_schema``, ``bad_dtype``, ``bad_shape``, ``nonfinite``), suitable as a
    counter key; the message gives the detail.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
