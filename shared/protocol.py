"""The SplitFT wire protocol: message envelopes, message bodies, chunking. Pure; no network here.

Every MQTT payload is one zstd-compressed msgpack map, the envelope::

    {"v": 1, "type": "act", "job": "demo", "sender": "jetson-3", "sid": "9f2c41d0e8a7b6c5",
     "seq": 42, "round": 3, "step": 1, "corr": "r3", "ts": 1764340000.25, "auth": None,
     "body": {...}}

``sid`` is a random id per process start, so that ``(sender, sid, seq)`` names a message uniquely
even across restarts; receivers drop a ``(sender, sid, seq)`` they have seen (QoS 1 redelivers).
``auth`` is reserved for message authentication. Bodies are validated by the ``parse_*`` function
of their type; tensors inside them by :mod:`splitft.shared.codec`.

Payloads larger than the link's limit (brokers cap packets: EMQX at 1 MB by default) travel as
``chunk`` envelopes, reassembled by :class:`Reassembler` with bounded memory and a timeout.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .codec import DEFAULT_LIMITS, Limits, decode_state, decode_tensor, encode_state, encode_tensor, pack, unpack
from .errors import WireError

PROTOCOL_VERSION = 1

JOIN, ASSIGN, ACT, GRAD, ADAPTER, ROUND, METRICS, STATUS, CHUNK = (
    "join",
    "assign",
    "act",
    "grad",
    "adapter",
    "round",
    "metrics",
    "status",
    "chunk",
)
MESSAGE_TYPES = frozenset({JOIN, ASSIGN, ACT, GRAD, ADAPTER, ROUND, METRICS, STATUS, CHUNK})
_ENVELOPE_KEYS = frozenset({"v", "type", "job", "sender", "sid", "seq", "round", "step", "corr", "ts", "auth", "body"})


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
    auth: bytes | None = None

    @property
    def key(self) -> tuple[str, str, int]:
        """Names the message uniquely (for duplicate detection)."""
        return (self.sender, self.sid, self.seq)


def encode_envelope(env: Envelope, level: int = 1) -> bytes:
    return pack(
        {
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
            "auth": env.auth,
            "body": env.body,
        },
        level=level,
    )


def decode_envelope(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Unpack and check the envelope fields; the body is checked later by its ``parse_*`` function."""
    obj = unpack(payload, limits)
    if not isinstance(obj, dict):
        raise WireError("bad_schema", f"envelope must be a map, got {type(obj).__name__}")
    if set(obj) != _ENVELOPE_KEYS:
        raise WireError("bad_schema", f"envelope keys {sorted(map(str, obj))} != {sorted(_ENVELOPE_KEYS)}")
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {obj['v']!r}, this build speaks {PROTOCOL_VERSION}")
    if not isinstance(obj["type"], str) or obj["type"] not in MESSAGE_TYPES:
        raise WireError("bad_schema", f"unknown message type {obj['type']!r}")
    for name in ("job", "sender", "sid"):
        if not isinstance(obj[name], str) or not obj[name]:
            raise WireError("bad_schema", f"envelope field {name} must be a non-empty string")
    for name in ("seq", "round", "step"):
        if type(obj[name]) is not int:
            raise WireError("bad_schema", f"envelope field {name} must be an integer")
    if obj["corr"] is not None and not isinstance(obj["corr"], str):
        raise WireError("bad_schema", "envelope field corr must be a string or nil")
    if not isinstance(obj["ts"], (int, float)) or not math.isfinite(obj["ts"]):
        raise WireError("bad_schema", "envelope field ts must be a finite number")
    if obj["auth"] is not None and not isinstance(obj["auth"], bytes):
        raise WireError("bad_schema", "envelope field auth must be bytes or nil")
    if not isinstance(obj["body"], dict):
        raise WireError("bad_schema", "envelope body must be a map")
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
        auth=obj["auth"],
    )


# --------------------------------------------------------------------------- body helpers


def _get(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in body:
        raise WireError("bad_schema", f"message lacks field {name!r}")
    value = body[name]
    # bool is an int in Python; never accept one for the other.
    if isinstance(value, bool) and kind is not bool and (kind is int or kind is float):
        raise WireError("bad_schema", f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise WireError("bad_schema", f"field {name!r} must be {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError("nonfinite", f"field {name!r} is not finite")
    return value


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = _get(body, name, int)
    if not lo <= value <= hi:
        raise WireError("bad_schema", f"field {name!r} = {value} outside [{lo}, {hi}]")
    return int(value)


def _number(body: Mapping[str, Any], name: str) -> float:
    return float(_get(body, name, (int, float)))


def _timings(body: Mapping[str, Any]) -> dict[str, float]:
    raw = _get(body, "timings", dict)
    if len(raw) > 64 or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in raw.items()
    ):
        raise WireError("bad_schema", "timings must map at most 64 names to finite numbers")
    return {k: float(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- activations and gradients


@dataclass(frozen=True)
class Activations:
    """One step's cut-layer activations from an agent, with what the server needs for the loss."""

    hidden: torch.Tensor  # (B, T, C) float32
    labels: torch.Tensor  # (B, T) int64, -100 where no loss is taken
    lengths: torch.Tensor  # (B,) int64: real tokens per row (rows are right-padded)
    timings: dict[str, float]  # the agent's timings of its previous step

    @property
    def attention_mask(self) -> torch.Tensor:
        width = self.hidden.shape[1]
        return (torch.arange(width).unsqueeze(0) < self.lengths.unsqueeze(1)).long()  # (B, T)


def act_body(
    hidden: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor, wire_dtype: str, timings: Mapping[str, float]
) -> dict[str, Any]:
    # Masks travel as lengths, labels as int32: a few bytes per token next to the activations.
    return {
        "act": encode_tensor(hidden, wire_dtype),
        "labels": encode_tensor(labels, "int32"),
        "lengths": encode_tensor(lengths, "int32"),
        "timings": dict(timings),
    }


def parse_act(
    body: Mapping[str, Any], hidden_size: int, max_batch: int, max_length: int, vocab_size: int
) -> Activations:
    hidden = decode_tensor(_get(body, "act", dict), expect_shape=[None, None, hidden_size])
    batch, width = hidden.shape[:2]
    if not (1 <= batch <= max_batch and 1 <= width <= max_length):
        raise WireError("bad_shape", f"activation batch {batch} x {width} outside 1..{max_batch} x 1..{max_length}")
    labels = decode_tensor(_get(body, "labels", dict), expect_shape=[batch, width], expect_dtypes=["int32"])
    lengths = decode_tensor(_get(body, "lengths", dict), expect_shape=[batch], expect_dtypes=["int32"])
    if bool((lengths < 1).any()) or bool((lengths > width).any()):
        raise WireError("bad_shape", f"lengths must lie in [1, {width}]")
    if bool(((labels != -100) & ((labels < 0) | (labels >= vocab_size))).any()):
        raise WireError("bad_schema", f"labels must be -100 or token ids in [0, {vocab_size})")
    return Activations(hidden, labels, lengths, _timings(body))


def grad_body(grad: torch.Tensor, wire_dtype: str, loss: float, tokens: int) -> dict[str, Any]:
    return {"grad": encode_tensor(grad, wire_dtype), "loss": float(loss), "tokens": int(tokens)}


def parse_grad(body: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[torch.Tensor, float, int]:
    grad = decode_tensor(_get(body, "grad", dict), expect_shape=list(shape))
    return grad, _number(body, "loss"), _int(body, "tokens", 0, 1 << 40)


# --------------------------------------------------------------------------- adapters


def adapter_body(
    state: Mapping[str, torch.Tensor],
    tokens: int,
    samples: int,
    loss: float,
    timings: Mapping[str, float],
    wire_dtype: str = "fp32",
) -> dict[str, Any]:
    return {
        "adapter": encode_state(state, wire_dtype),
        "tokens": int(tokens),
        "samples": int(samples),
        "loss": float(loss),
        "timings": dict(timings),
    }


@dataclass(frozen=True)
class AdapterUpload:
    state: dict[str, torch.Tensor]
    tokens: int
    samples: int
    loss: float
    timings: dict[str, float]


def parse_adapter(body: Mapping[str, Any], expect: Mapping[str, tuple[int, ...]]) -> AdapterUpload:
    state = decode_state(_get(body, "adapter", dict), expect={k: list(v) for k, v in expect.items()})
    return AdapterUpload(
        state=state,
        tokens=_int(body, "tokens", 1, 1 << 40),
        samples=_int(body, "samples", 1, 1 << 40),
        loss=_number(body, "loss"),
        timings=_timings(body),
    )


# --------------------------------------------------------------------------- small messages


def parse_join(body: Mapping[str, Any]) -> dict[str, Any]:
    """A join: the agent's device profile and the size of its data."""
    profile = _get(body, "profile", dict)
    _int(body, "data_samples", 1, 1 << 40)
    _int(body, "data_tokens", 1, 1 << 48)
    _get(body, "model", str)
    if len(profile) > 64:
        raise WireError("bad_schema", "profile has too many fields")
    return dict(body)


def parse_status(body: Mapping[str, Any]) -> str:
    state = _get(body, "state", str)
    if state not in ("online", "offline"):
        raise WireError("bad_schema", f"unknown status {state!r}")
    return str(state)


# --------------------------------------------------------------------------- chunking


def chunk_payload(payload: bytes, max_bytes: int, header: Envelope, level: int = 1) -> list[bytes]:
    """Split an encoded message into ``chunk`` envelopes of at most about ``max_bytes`` each.

    ``header`` supplies the envelope fields of the chunks (its ``seq`` is the first chunk's; the
    caller numbers the rest consecutively); the chunks share the id ``sid:seq`` of the first.
    """
    room = max_bytes - 512  # envelope overhead of a chunk
    if room <= 0:
        raise ValueError(f"max payload {max_bytes} is too small for a chunk envelope")
    count = math.ceil(len(payload) / room)
    chunk_id = f"{header.sid}:{header.seq}"
    return [
        encode_envelope(
            Envelope(
                type=CHUNK,
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

    A sender may have at most ``per_sender`` messages in flight and all senders together
    ``max_pending`` (the oldest is dropped beyond either), a message may total at most
    ``max_message_bytes``, and a message that receives no chunk for ``timeout_s`` is dropped (an
    inactivity timeout: a large message on a slow link keeps going as long as chunks keep coming).
    ``dropped`` counts the messages given up.
    """

    def __init__(
        self, max_message_bytes: int, max_pending: int = 256, timeout_s: float = 60.0, per_sender: int = 2
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.per_sender = per_sender
        self.timeout_s = timeout_s
        self.dropped = 0
        self._pending: OrderedDict[tuple[str, str], _Partial] = OrderedDict()

    def add(self, sender: str, body: Mapping[str, Any], now: float | None = None) -> bytes | None:
        """Take one chunk; return the whole payload when this chunk completes it."""
        now = time.monotonic() if now is None else now
        self.expire(now)
        chunk_id = _get(body, "id", str)
        count = _int(body, "count", 1, 1 << 20)
        index = _int(body, "index", 0, count - 1)
        data = _get(body, "data", bytes)
        key = (sender, chunk_id)
        partial = self._pending.get(key)
        if partial is None:
            mine = [k for k in self._pending if k[0] == sender]
            if len(mine) >= self.per_sender:
                del self._pending[mine[0]]
                self.dropped += 1
            elif len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                self.dropped += 1
            partial = self._pending[key] = _Partial(count, {}, 0, now)
        partial.started = now  # the inactivity clock restarts with every chunk
        if partial.count != count:
            raise WireError("bad_chunk", f"chunk {chunk_id} announces {count} parts, earlier {partial.count}")
        if index in partial.parts:
            return None  # a redelivered chunk
        partial.size += len(data)
        if partial.size > self.max_message_bytes:
            del self._pending[key]
            self.dropped += 1
            raise WireError("too_large", f"chunked message {chunk_id} exceeds {self.max_message_bytes} bytes")
        partial.parts[index] = data
        if len(partial.parts) < count:
            return None
        del self._pending[key]
        return b"".join(partial.parts[i] for i in range(count))

    def expire(self, now: float) -> None:
        stale = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for key in stale:
            del self._pending[key]
            self.dropped += 1

    @property
    def pending(self) -> int:
        return len(self._pending)
