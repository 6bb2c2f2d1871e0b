"""The envelope every SplitFT message travels in, its authentication, and chunking. Pure; no network here.

Every MQTT payload is one zstd-compressed msgpack map, the envelope::

    {"v": 2, "type": "act", "job": "demo", "sender": "jetson-3", "sid": "9f2c41d0e8a7b6c5",
     "seq": 42, "round": 3, "step": 1, "corr": "r3", "ts": 1764340000.25, "body": {...}}

``type`` is a :class:`~splitft.shared.wire.topics.Kind`. ``sid`` is a random id per process start, so that
``(sender, sid, seq)`` names a message uniquely even across restarts; receivers drop a ``(sender, sid, seq)``
they have seen (QoS 1 redelivers). Bodies are validated by the ``parse_*`` function of their kind
(:mod:`~splitft.shared.wire.messages`, :mod:`~splitft.shared.wire.control`); tensors inside them by
:mod:`splitft.shared.wire.codec`.

When the job has a key, the compressed frame is sealed (:func:`seal`): a 40-byte zstd *skippable frame*
holding an HMAC-SHA256 tag goes in front of it, computed over the topic and the compressed frame. A receiver
with the key checks the tag before it reads anything else of the message (:func:`check_tag`): a forgery
costs it one hash of the bytes received, never a decompression. ``ts`` then bounds how old a message may be
(:func:`check_time`). A receiver without a key skips the tag. (Protocol version 1 carried the tag inside the
envelope, so it could only be checked after decompressing: a forged zstd bomb was expanded before it was
refused.)

Payloads larger than the link's limit (brokers cap packets: EMQX at 1 MB by default) travel as
``chunk`` envelopes, reassembled by :class:`Reassembler` with bounded memory and a timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire.codec import (
    DEFAULT_LIMITS,
    Limits,
    _brief,
    compress,
    unpack,
)
from splitft.shared.wire.fields import get_field, int_field
from splitft.shared.wire.topics import KINDS, Kind

PROTOCOL_VERSION = 2

AUTH_TAG_BYTES = 32  # HMAC-SHA256
#: a zstd skippable frame (magic 0x184D2A5A, little-endian) of AUTH_TAG_BYTES: the seal in front of a frame
_SEAL_HEADER = (0x184D2A5A).to_bytes(4, "little") + AUTH_TAG_BYTES.to_bytes(4, "little")
SEAL_BYTES = len(_SEAL_HEADER) + AUTH_TAG_BYTES
_ENVELOPE_KEYS = frozenset({"v", "type", "job", "sender", "sid", "seq", "round", "step", "corr", "ts", "body"})


def new_session_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class Envelope:
    type: str
    job: str
    sender: str
    sid: str
    seq: int
    body: dict[str, Any] = field(default_factory=dict)
    round: int = -1
    step: int = -1
    corr: str | None = None
    ts: float = 0.0

    @property
    def key(self) -> tuple[str, str, int]:
        """Names the message uniquely (for duplicate detection)."""
        return (self.sender, self.sid, self.seq)


def _fields(env: Envelope) -> dict[str, Any]:
    return {
        "v": PROTOCOL_VERSION,
        "type": env.type,
        "job": env.job,
        "sender": env.sender,
        "sid": env.sid,
        "seq": env.seq,
        "round": env.round,
        "step": env.step,
        "corr": env.corr,
        "ts": env.ts,
        "body": env.body,
    }


def _tag(key: bytes, topic: str, frame: bytes | memoryview) -> bytes:
    """HMAC-SHA256 over the topic and the compressed frame: a tag binds the message to the topic it was
    published on, and is checked without decompressing anything."""
    mac = hmac.new(key, topic.encode() + b"\0", hashlib.sha256)
    mac.update(frame)
    return mac.digest()


def seal(key: bytes, topic: str, frame: bytes) -> bytes:
    """``frame`` with its tag in front, in a zstd skippable frame (zstd tools read past it)."""
    return _SEAL_HEADER + _tag(key, topic, frame) + frame


def unseal(payload: bytes) -> tuple[bytes | None, bytes]:
    """Split a payload into its tag (None: not sealed) and the compressed frame; reads a fixed header only."""
    if payload[: len(_SEAL_HEADER)] == _SEAL_HEADER and len(payload) >= SEAL_BYTES:
        return payload[len(_SEAL_HEADER) : SEAL_BYTES], payload[SEAL_BYTES:]
    return None, payload


def check_tag(tag: bytes | None, frame: bytes, topic: str, key: bytes) -> None:
    """Refuse a frame that is unsigned, or signed with another key, for another topic, or changed since."""
    if tag is None:
        raise WireError(Refusal.UNAUTHENTICATED, "message carries no authentication tag")
    if not hmac.compare_digest(tag, _tag(key, topic, frame)):
        raise WireError(Refusal.BAD_AUTH, "authentication tag does not match (wrong key, topic or content)")


def encode_envelope(env: Envelope, level: int = 1, *, key: bytes | None = None, topic: str | None = None) -> bytes:
    """Pack and compress ``env``; with ``key`` (and the ``topic`` it is published on) it is sealed."""
    frame = compress(msgpack.packb(_fields(env), use_bin_type=True), level)
    if key is None:
        return frame
    if topic is None:
        raise ValueError("signing a message needs the topic it is published on")
    return seal(key, topic, frame)


def check_time(env: Envelope, window_s: float | None, now: float | None = None) -> None:
    """Refuse an authenticated message stamped too long ago or too far ahead.

    ``window_s`` bounds the clock difference between members and how long a captured message can be
    replayed; within it, replays are caught by the receivers' memory of ``(sender, sid, seq)``.
    ``None`` skips the check: status messages are retained and Last Wills are signed when a
    connection opens, so both may be old when they arrive (their ``sid`` tells stale ones apart).
    """
    now = time.time() if now is None else now
    if window_s is not None and abs(now - env.ts) > window_s:
        raise WireError(Refusal.STALE, f"timestamp {now - env.ts:+.0f} s from now, outside the {window_s:g} s window")


def decode_envelope(payload: bytes, limits: Limits = DEFAULT_LIMITS, *, cap: int | None = None) -> Envelope:
    """Unpack and check the envelope fields; the body is checked later by its ``parse_*`` function.

    A sealed payload's tag is skipped here (the link checks it first, with the key); ``cap``: the most
    bytes the frame may decompress to (:func:`~splitft.shared.wire.codec.unpack`)."""
    obj = unpack(unseal(payload)[1], limits, cap=cap)
    if not isinstance(obj, dict):
        raise WireError(Refusal.BAD_SCHEMA, f"envelope must be a map, got {type(obj).__name__}")
    if "v" in obj and (type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION):  # (before the keys: they differ)
        raise WireError(
            Refusal.BAD_VERSION, f"protocol version {_brief(obj['v'])}, this build speaks {PROTOCOL_VERSION}"
        )
    if set(obj) != _ENVELOPE_KEYS:
        missing, extra = sorted(_ENVELOPE_KEYS - set(obj)), len(set(obj) - _ENVELOPE_KEYS)
        raise WireError(Refusal.BAD_SCHEMA, f"envelope keys differ (missing {missing}, {extra} unknown)")
    if not isinstance(obj["type"], str) or obj["type"] not in KINDS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown message type {_brief(obj['type'])}")
    for name in ("job", "sender", "sid"):
        if not isinstance(obj[name], str) or not obj[name]:
            raise WireError(Refusal.BAD_SCHEMA, f"envelope field {name} must be a non-empty string")
    for name in ("seq", "round", "step"):
        if type(obj[name]) is not int:
            raise WireError(Refusal.BAD_SCHEMA, f"envelope field {name} must be an integer")
    if obj["corr"] is not None and not isinstance(obj["corr"], str):
        raise WireError(Refusal.BAD_SCHEMA, "envelope field corr must be a string or nil")
    if isinstance(obj["ts"], bool) or not isinstance(obj["ts"], (int, float)) or not math.isfinite(obj["ts"]):
        raise WireError(Refusal.BAD_SCHEMA, "envelope field ts must be a finite number")
    if not isinstance(obj["body"], dict):
        raise WireError(Refusal.BAD_SCHEMA, "envelope body must be a map")
    return Envelope(
        type=obj["type"],
        job=obj["job"],
        sender=obj["sender"],
        sid=obj["sid"],
        seq=obj["seq"],
        body=obj["body"],
        round=obj["round"],
        step=obj["step"],
        corr=obj["corr"],
        ts=float(obj["ts"]),
    )


# --------------------------------------------------------------------------- chunking


def chunk_payload(
    payload: bytes,
    max_bytes: int,
    header: Envelope,
    level: int = 1,
    *,
    key: bytes | None = None,
    topic: str | None = None,
) -> list[bytes]:
    """Split an encoded message into ``chunk`` envelopes of at most about ``max_bytes`` each.

    ``header`` supplies the envelope fields of the chunks (its ``seq`` is the first chunk's; the
    caller numbers the rest consecutively); the chunks share the id ``sid:seq`` of the first. With
    ``key``, every chunk is signed for ``topic`` (and so is the message inside them).
    """
    room = max_bytes - 512  # envelope overhead of a chunk
    if room <= 0:
        raise ValueError(f"max payload {max_bytes} is too small for a chunk envelope")
    count = math.ceil(len(payload) / room)
    chunk_id = f"{header.sid}:{header.seq}"
    return [
        encode_envelope(
            Envelope(
                type=Kind.CHUNK,
                job=header.job,
                sender=header.sender,
                sid=header.sid,
                seq=header.seq + i,
                round=header.round,
                step=header.step,
                ts=header.ts,
                body={"id": chunk_id, "index": i, "count": count, "data": payload[i * room : (i + 1) * room]},
            ),
            level=level,
            key=key,
            topic=topic,
        )
        for i in range(count)
    ]


@dataclass
class _Partial:
    count: int
    parts: dict[int, bytes]
    size: int
    started: float


class Reassembler:
    """Collects chunks into whole payloads, within bounds.

    A sender may have at most ``per_sender`` messages in flight (a newer one replaces its oldest), a
    message may total at most ``max_message_bytes`` (or the smaller ``limit`` the caller gives for its
    topic), all partial messages together at most ``max_total_bytes``, and a message that receives no
    chunk for ``timeout_s`` is dropped (an inactivity timeout: a large message on a slow link keeps going
    as long as chunks keep coming). The owner calls :meth:`expire` on a timer, so that partial messages
    nobody completes do not wait for the next chunk to be dropped. ``dropped`` counts the messages given
    up; ``on_drop(sender, detail)``, when given, hears of each.
    """

    def __init__(
        self,
        max_message_bytes: int,
        max_pending: int = 256,
        timeout_s: float = 60.0,
        per_sender: int = 2,
        max_total_bytes: int = 512 << 20,
        on_drop: Callable[[str, str], None] | None = None,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.per_sender = per_sender
        self.timeout_s = timeout_s
        self.max_total_bytes = max_total_bytes
        self.on_drop = on_drop
        self.dropped = 0
        self._bytes = 0
        self._pending: OrderedDict[tuple[str, str], _Partial] = OrderedDict()

    def add(
        self, sender: str, body: Mapping[str, Any], now: float | None = None, limit: int | None = None
    ) -> bytes | None:
        """Take one chunk; return the whole payload when this chunk completes it."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        chunk_id = get_field(body, "id", str)
        count = int_field(body, "count", 1, 1 << 20)
        index = int_field(body, "index", 0, count - 1)
        data = get_field(body, "data", bytes)
        most = self.max_message_bytes if limit is None else min(limit, self.max_message_bytes)
        key = (sender, chunk_id)
        partial = self._pending.get(key)
        if partial is None:
            mine = [k for k in self._pending if k[0] == sender]
            if len(mine) >= self.per_sender:
                self._drop(mine[0], "a newer chunked message from the same sender took its place")
            elif len(self._pending) >= self.max_pending:
                self._drop(next(iter(self._pending)), f"{self.max_pending} chunked messages in progress")
            partial = self._pending[key] = _Partial(count, {}, 0, now)
        partial.started = now  # the inactivity clock restarts with every chunk
        if partial.count != count:
            raise WireError(Refusal.BAD_CHUNK, f"chunk {chunk_id} announces {count} parts, earlier {partial.count}")
        if index in partial.parts:
            return None  # a redelivered chunk
        if partial.size + len(data) > most:
            self._forget(key)
            self.dropped += 1
            raise WireError(Refusal.TOO_LARGE, f"chunked message {chunk_id} exceeds {most} bytes")
        if self._bytes + len(data) > self.max_total_bytes:
            self._forget(key)
            self.dropped += 1
            raise WireError(
                Refusal.OVERLOADED, f"chunked messages in progress hold {self._bytes} of {self.max_total_bytes} bytes"
            )
        partial.size += len(data)
        self._bytes += len(data)
        partial.parts[index] = data
        if len(partial.parts) < count:
            return None
        self._forget(key)
        return b"".join(partial.parts[i] for i in range(count))

    def expire(self, now: float | None = None) -> None:
        """Drop the partial messages that received no chunk for ``timeout_s``."""
        now = time.monotonic() if now is None else now
        stale = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for key in stale:
            self._drop(key, f"no part of it for {self.timeout_s:g} s")

    def _drop(self, key: tuple[str, str], why: str) -> None:
        partial = self._forget(key)
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(key[0], f"chunked message {key[1]} ({len(partial.parts)} of {partial.count} parts): {why}")

    def _forget(self, key: tuple[str, str]) -> _Partial:
        partial = self._pending.pop(key)
        self._bytes -= partial.size
        return partial

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def bytes(self) -> int:
        """The bytes held in partial messages."""
        return self._bytes
