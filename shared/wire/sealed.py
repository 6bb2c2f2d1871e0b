"""Private adapters: the client blocks' adapters sealed with a fleet key the coordinator does not hold.

With ``private_adapters = true`` in a job file, the adapters of the blocks below ``c_min`` (blocks every device
holds and the server never runs) leave a device only sealed: AES-256-GCM under the fleet key, a 32-byte secret
the devices share and the coordinator never sees (``splitft-agent make-fleet-key``). The coordinator relays the
sealed uploads of the last round to every device in its next assignment; each device opens all of them and
averages them itself with the coordinator's own aggregation (``shared/model/aggregation.py``: the same
function, the same contributions in the same order, the same weights), so every device starts the round from
the same private adapters, equal bit for bit to what a coordinator that saw them would have sent.

A sealed upload is ``nonce (12 bytes) || AES-GCM(key, nonce, msgpack(adapters), aad)``; the associated data
binds it to its job, round and device (``job\\0round\\0agent``), so that a blob cannot be replayed as another
device's or another round's. What the coordinator still sees: each blob's size, who sent it and when, and the
tokens each device trained on (it counts them itself).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from splitft.shared.errors import ConfigError, Refusal, WireError
from splitft.shared.model.aggregation import Contribution, aggregate, module_key
from splitft.shared.wire.codec import DEFAULT_LIMITS, decode_state, encode_state, pack, unpack
from splitft.shared.wire.keys import load_key, write_key

log = logging.getLogger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12
#: the most sealed uploads one assignment relays: every device downloads every device's private adapters, so a
#: job with private adapters runs rounds of at most this many devices
MAX_SEALED = 256


def make_fleet_key(path: Path) -> Path:
    """Write a new fleet key (32 random bytes as hex, mode 0600) to ``path``; an existing file is never replaced
    (the devices holding it would be cut off)."""
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{path} exists: a fleet key is never overwritten (the devices holding it would be cut off)")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: the folder {path.parent} does not exist")
    return write_key(path)


def load_fleet_key(path: Path) -> bytes:
    """The fleet key in ``path``: exactly 32 bytes as hex; a ConfigError names the file otherwise."""
    key = load_key(path)
    if len(key) != KEY_BYTES:
        raise ConfigError(f"fleet key {path}: expected {KEY_BYTES} bytes as hex (splitft-agent make-fleet-key)")
    return key


def associated(job: str, round_: int, agent: str) -> bytes:
    return f"{job}\0{round_}\0{agent}".encode()


def seal(key: bytes, state: Mapping[str, torch.Tensor], aad: bytes, wire_dtype: str = "fp32") -> bytes:
    """``state`` encoded (as an upload encodes adapters) and sealed: nonce || ciphertext and tag."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, pack(encode_state(state, wire_dtype)), aad)


def open_sealed(
    key: bytes, blob: bytes, aad: bytes, expect: Mapping[str, Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """The adapters in ``blob``; a WireError (``unauthenticated``) if it was not sealed with ``key`` for ``aad``."""
    if len(blob) < NONCE_BYTES + 16:
        raise WireError(Refusal.BAD_SCHEMA, f"a sealed adapter of {len(blob)} bytes is too short")
    try:
        raw = AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise WireError(Refusal.UNAUTHENTICATED, "a sealed adapter does not open with this fleet key") from None
    shapes = None if expect is None else {k: list(v) for k, v in expect.items()}
    return decode_state(unpack(raw, DEFAULT_LIMITS), expect=shapes)


@dataclass(frozen=True)
class SealedUpload:
    """One device's sealed private adapters from one round, and its weight in the average (its tokens)."""

    agent: str
    round: int
    weight: float
    blob: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"agent": self.agent, "round": self.round, "weight": self.weight, "blob": self.blob}

    @classmethod
    def from_wire(cls, item: object) -> SealedUpload:
        if not isinstance(item, dict):
            raise WireError(Refusal.BAD_SCHEMA, "a sealed upload must be a map")
        agent, round_, weight, blob = (item.get(k) for k in ("agent", "round", "weight", "blob"))
        if not (isinstance(agent, str) and 0 < len(agent) <= 256 and type(round_) is int and round_ >= 1):
            raise WireError(Refusal.BAD_SCHEMA, "a sealed upload names its agent and round")
        if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 < weight < 1e15):
            raise WireError(Refusal.BAD_SCHEMA, "a sealed upload's weight must be a positive number")
        if not isinstance(blob, bytes):
            raise WireError(Refusal.BAD_SCHEMA, "a sealed upload's blob must be bytes")
        return cls(agent, round_, float(weight), blob)


def average_sealed(
    key: bytes,
    job: str,
    uploads: Sequence[SealedUpload],
    ranks: Mapping[str, int],
    seed: int,
) -> dict[str, torch.Tensor]:
    """Open every upload and average them as the coordinator averages adapters (token-weighted, each module
    over its holders, at ``ranks``: module key -> the job's rank of that module). A blob that does not open with
    the key, or holds other modules or NaN/Inf, is left out and logged: every device gets the same blobs, so
    every device leaves out the same ones. None left is a WireError."""
    contributions = []
    for upload in uploads:
        try:
            state = open_sealed(key, upload.blob, associated(job, upload.round, upload.agent))
            unknown = {module_key(n) for n in state} - set(ranks)
            if unknown:
                raise WireError(Refusal.BAD_SCHEMA, f"it holds modules {sorted(unknown)[:2]} of no private block")
            if not all(bool(torch.isfinite(t).all()) for t in state.values()):
                raise WireError(Refusal.NONFINITE, "it holds NaN or Inf")
        except WireError as exc:
            log.warning("left out the sealed adapters of %s (round %d): %s", upload.agent, upload.round, exc.detail)
            continue
        contributions.append(Contribution(upload.weight, state))
    if not contributions:
        raise WireError(Refusal.UNAUTHENTICATED, "no sealed adapter of the last round opens with this fleet key")
    return aggregate(contributions, ranks, seed=seed)
