"""Job key files: a job's members sign every message with the same key (:func:`~splitft.shared.wire.envelope.seal`);
the key lives in a file only its owner can read."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from splitft.shared.errors import ConfigError
from splitft.shared.job.data import write_text_atomic

#: the fewest bytes a key may have; new keys have this many
MIN_KEY_BYTES = 32


def load_key(path: str | Path) -> bytes:
    """A job key file: at least 32 random bytes written as hex (``splitft-coordinator make-key``)."""
    try:
        text = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc}") from exc
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigError(f"key file {path} must hold hex digits only") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"key file {path} holds {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
    return key


def write_key(path: Path, *, replace: bool = False) -> Path:
    """A new job key file: :data:`MIN_KEY_BYTES` random bytes as hex, readable only by its owner (what
    :func:`load_key` reads). Without ``replace`` the file must not exist."""
    write_private(path, secrets.token_hex(MIN_KEY_BYTES) + "\n", replace=replace)
    return path


def write_private(path: Path, text: str, *, replace: bool) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte on.

    Without ``replace`` the file must not exist (O_EXCL: never clobbered, even in a race); with it, a
    complete new file replaces the old one atomically."""
    if not replace:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return
    write_text_atomic(path, text)  # through a temp file made with mode 0600
