"""The SplitFT wire protocol: message envelopes, message bodies, chunking. Pure; no network here.

Every MQTT payload is one zstd-compressed msgpack map, the envelope::

    {"v": 1, "type": "act", "job": "demo", "sender": "jetson-3", "sid": "9f2c41d0e8a7b6c5",
     "seq": 42, "round": 3, "step": 1, "corr": "r3", "ts": 1764340000.25, "auth": None,
     "body": {...}}

``sid`` is a random id per process start, so that ``(sender, sid, seq)`` names a message uniquely
even across restarts; receivers drop a ``(sender, sid, seq)`` they have seen (QoS 1 redelivers).
``auth`` carries the message's authentication tag when the job has a key (:func:`envelope_mac`):
HMAC-SHA256 over the topic and the envelope packed with ``auth`` nil, so a tag binds the message to
the topic it was published on; ``ts`` then bounds how old a message may be (:func:`check_auth`).
Bodies are validated by the ``parse_*`` function of their type; tensors inside them by
:mod:`splitft.shared.codec`.

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
from pathlib import Path
from typing import Any

import msgpack
import torch

from .codec import (
    DEFAULT_LIMITS,
    FLOAT_WIRE_DTYPES,
    Limits,
    _brief,
    compress,
    decode_state,
    decode_tensor,
    encode_state,
    encode_tensor,
    unpack,
)
from .config import SPLITS, OptimizerSettings
from .data import check_chat_template
from .defense import DefenseSettings
from .errors import ConfigError, Refusal, WireError
from .lora import LoraSettings
from .memory import PROFILE_FIELDS

PROTOCOL_VERSION = 1

JOIN, ASSIGN, ACT, GRAD, TAIL_ACT, TAIL_GRAD, ADAPTER, ROUND, METRICS, STATUS, CHUNK, NOTICE = (
    "join",
    "assign",
    "act",
    "grad",
    "tail_act",
    "tail_grad",
    "adapter",
    "round",
    "metrics",
    "status",
    "chunk",
    "notice",
)
MESSAGE_TYPES = frozenset(
    {JOIN, ASSIGN, ACT, GRAD, TAIL_ACT, TAIL_GRAD, ADAPTER, ROUND, METRICS, STATUS, CHUNK, NOTICE}
)
AUTH_TAG_BYTES = 32  # HMAC-SHA256
MIN_KEY_BYTES = 32
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


def _fields(env: Envelope, auth: bytes | None) -> dict[str, Any]:
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
        "auth": auth,
        "body": env.body,
    }


def envelope_mac(key: bytes, topic: str, env: Envelope) -> bytes:
    """HMAC-SHA256 over the topic and the envelope packed with ``auth`` nil.

    The receiver packs the decoded envelope again; msgpack packs the same values to the same bytes,
    so a tag verifies exactly when topic, header and body are those that were signed.
    """
    mac = hmac.new(key, topic.encode() + b"\0", hashlib.sha256)
    mac.update(msgpack.packb(_fields(env, None), use_bin_type=True))  # no concatenated copy of a big message
    return mac.digest()


def encode_envelope(env: Envelope, level: int = 1, *, key: bytes | None = None, topic: str | None = None) -> bytes:
    """Pack and compress ``env``; with ``key`` (and the ``topic`` it is published on) it is signed."""
    auth = env.auth
    if key is not None:
        if topic is None:
            raise ValueError("signing a message needs the topic it is published on")
        auth = envelope_mac(key, topic, env)
    return compress(msgpack.packb(_fields(env, auth), use_bin_type=True), level)


def check_auth(env: Envelope, topic: str, key: bytes, window_s: float | None, now: float | None = None) -> None:
    """Refuse a message that is unsigned, signed with another key or for another topic, or too old or new.

    ``window_s`` bounds the clock difference between members and how long a captured message can be
    replayed; within it, replays are caught by the receivers' memory of ``(sender, sid, seq)``.
    ``None`` skips the time check: status messages are retained and Last Wills are signed when a
    connection opens, so both may be old when they arrive (their ``sid`` tells stale ones apart).
    """
    if env.auth is None:
        raise WireError(Refusal.UNAUTHENTICATED, "message carries no authentication tag")
    if len(env.auth) != AUTH_TAG_BYTES or not hmac.compare_digest(env.auth, envelope_mac(key, topic, env)):
        raise WireError(Refusal.BAD_AUTH, "authentication tag does not match (wrong key, topic or content)")
    now = time.time() if now is None else now
    if window_s is not None and abs(now - env.ts) > window_s:
        raise WireError(Refusal.STALE, f"timestamp {now - env.ts:+.0f} s from now, outside the {window_s:g} s window")


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


def decode_envelope(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Unpack and check the envelope fields; the body is checked later by its ``parse_*`` function."""
    obj = unpack(payload, limits)
    if not isinstance(obj, dict):
        raise WireError(Refusal.BAD_SCHEMA, f"envelope must be a map, got {type(obj).__name__}")
    if set(obj) != _ENVELOPE_KEYS:
        missing, extra = sorted(_ENVELOPE_KEYS - set(obj)), len(set(obj) - _ENVELOPE_KEYS)
        raise WireError(Refusal.BAD_SCHEMA, f"envelope keys differ (missing {missing}, {extra} unknown)")
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        raise WireError(
            Refusal.BAD_VERSION, f"protocol version {_brief(obj['v'])}, this build speaks {PROTOCOL_VERSION}"
        )
    if not isinstance(obj["type"], str) or obj["type"] not in MESSAGE_TYPES:
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
    if obj["auth"] is not None and not isinstance(obj["auth"], bytes):
        raise WireError(Refusal.BAD_SCHEMA, "envelope field auth must be bytes or nil")
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
        auth=obj["auth"],
    )


# --------------------------------------------------------------------------- body helpers


def _get(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in body:
        raise WireError(Refusal.BAD_SCHEMA, f"message lacks field {name!r}")
    value = body[name]
    # bool is an int in Python; never accept one for a number (nor an int for a bool).
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} must be {kind}, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise WireError(Refusal.NONFINITE, f"field {name!r} is not finite")
    return value


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int:
    value = _get(body, name, int)
    if not lo <= value <= hi:
        raise WireError(Refusal.BAD_SCHEMA, f"field {name!r} = {value} outside [{lo}, {hi}]")
    return int(value)


def _number(body: Mapping[str, Any], name: str) -> float:
    return float(_get(body, name, (int, float)))


def _timings(body: Mapping[str, Any]) -> dict[str, float]:
    raw = _get(body, "timings", dict)
    if len(raw) > 64 or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in raw.items()
    ):
        raise WireError(Refusal.BAD_SCHEMA, "timings must map at most 64 names to finite numbers")
    return {k: float(v) for k, v in raw.items()}


# --------------------------------------------------------------------------- activations and gradients


@dataclass(frozen=True)
class Activations:
    """One step's cut-layer activations from an agent, with what the server needs for the loss."""

    hidden: torch.Tensor  # (B, T, C) float32
    labels: torch.Tensor | None  # (B, T) int64, -100 where no loss is taken; None in the U split (they stay home)
    lengths: torch.Tensor  # (B,) int64: real tokens per row (rows are right-padded)
    timings: dict[str, float]  # the agent's timings of its previous step

    @property
    def attention_mask(self) -> torch.Tensor:
        width = self.hidden.shape[1]
        return (torch.arange(width).unsqueeze(0) < self.lengths.unsqueeze(1)).long()  # (B, T)


def act_body(
    hidden: torch.Tensor,
    labels: torch.Tensor | None,
    lengths: torch.Tensor,
    wire_dtype: str,
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The activations at the cut; ``labels`` None in the U split, where the device keeps them.

    Masks travel as lengths (the padding of each row), labels as int32: a few bytes per token next to
    the activations.
    """
    body = {
        "act": encode_tensor(hidden, wire_dtype),
        "lengths": encode_tensor(lengths, "int32"),
        "timings": dict(timings),
    }
    if labels is not None:
        body["labels"] = encode_tensor(labels, "int32")
    return body


def parse_act(
    body: Mapping[str, Any],
    hidden_size: int,
    max_batch: int,
    max_length: int,
    vocab_size: int,
    *,
    with_labels: bool = True,
) -> Activations:
    """Activations at the cut; ``with_labels`` False (the U split) refuses a body that carries labels."""
    hidden = decode_tensor(
        _get(body, "act", dict), expect_shape=[None, None, hidden_size], expect_dtypes=FLOAT_WIRE_DTYPES
    )
    batch, width = hidden.shape[:2]
    if not (1 <= batch <= max_batch and 1 <= width <= max_length):
        raise WireError(
            Refusal.BAD_SHAPE, f"activation batch {batch} x {width} outside 1..{max_batch} x 1..{max_length}"
        )
    lengths = decode_tensor(_get(body, "lengths", dict), expect_shape=[batch], expect_dtypes=["int32"])
    if bool((lengths < 1).any()) or bool((lengths > width).any()):
        raise WireError(Refusal.BAD_SHAPE, f"lengths must lie in [1, {width}]")
    if not with_labels:
        if "labels" in body:
            raise WireError(Refusal.BAD_SCHEMA, "labels in a U-split job: they must stay on the device")
        return Activations(hidden, None, lengths, _timings(body))
    labels = decode_tensor(_get(body, "labels", dict), expect_shape=[batch, width], expect_dtypes=["int32"])
    if bool(((labels != -100) & ((labels < 0) | (labels >= vocab_size))).any()):
        raise WireError(Refusal.BAD_SCHEMA, f"labels must be -100 or token ids in [0, {vocab_size})")
    return Activations(hidden, labels, lengths, _timings(body))


def grad_body(
    grad: torch.Tensor, wire_dtype: str, loss: float | None = None, tokens: int | None = None
) -> dict[str, Any]:
    """The gradient at the cut; in the two-part split with the batch's loss and target tokens (the server's)."""
    body: dict[str, Any] = {"grad": encode_tensor(grad, wire_dtype)}
    if loss is not None and tokens is not None:
        body.update(loss=float(loss), tokens=int(tokens))
    return body


def parse_grad(
    body: Mapping[str, Any], shape: tuple[int, ...], *, with_loss: bool = False
) -> tuple[torch.Tensor, float | None, int | None]:
    """(gradient, loss, tokens); loss and tokens are None when the server has none (the U split).

    ``with_loss`` (the two-part split) refuses a gradient without them."""
    grad = decode_tensor(_get(body, "grad", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)
    if not with_loss and "loss" not in body and "tokens" not in body:
        return grad, None, None
    return grad, _number(body, "loss"), _int(body, "tokens", 0, 1 << 40)


def tail_act_body(hidden: torch.Tensor, wire_dtype: str) -> dict[str, Any]:
    """U split, server -> device: the hidden states entering the device's tail blocks."""
    return {"act": encode_tensor(hidden, wire_dtype)}


def parse_tail_act(body: Mapping[str, Any], shape: tuple[int, ...]) -> torch.Tensor:
    return decode_tensor(_get(body, "act", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)


def tail_grad_body(grad: torch.Tensor, wire_dtype: str, loss: float | None) -> dict[str, Any]:
    """U split, device -> server: d(the device's mean loss)/d(the tail's input); the loss itself only if reported.

    No token count travels: the server weights by the real tokens of the rows (``lengths`` of ``act``).
    """
    return {"grad": encode_tensor(grad, wire_dtype), "loss": None if loss is None else float(loss)}


def parse_tail_grad(body: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[torch.Tensor, float | None]:
    grad = decode_tensor(_get(body, "grad", dict), expect_shape=list(shape), expect_dtypes=FLOAT_WIRE_DTYPES)
    if body.get("loss") is None:
        if "loss" not in body:
            raise WireError(Refusal.BAD_SCHEMA, "message lacks field 'loss'")
        return grad, None
    return grad, _number(body, "loss")


# --------------------------------------------------------------------------- adapters


def adapter_body(
    state: Mapping[str, torch.Tensor],
    tokens: int,
    samples: int,
    loss: float | None,
    timings: Mapping[str, float],
    wire_dtype: str = "fp32",
) -> dict[str, Any]:
    return {
        "adapter": encode_state(state, wire_dtype),
        "tokens": int(tokens),
        "samples": int(samples),
        "loss": None if loss is None else float(loss),  # None: a U-split agent that does not report its loss
        "timings": dict(timings),
    }


@dataclass(frozen=True)
class AdapterUpload:
    state: dict[str, torch.Tensor]
    tokens: int
    samples: int
    loss: float | None
    timings: dict[str, float]


def parse_adapter(body: Mapping[str, Any], expect: Mapping[str, tuple[int, ...]]) -> AdapterUpload:
    state = decode_state(_get(body, "adapter", dict), expect={k: list(v) for k, v in expect.items()})
    return AdapterUpload(
        state=state,
        tokens=_int(body, "tokens", 1, 1 << 40),
        samples=_int(body, "samples", 1, 1 << 40),
        loss=None if body.get("loss", 0) is None else _number(body, "loss"),
        timings=_timings(body),
    )


# --------------------------------------------------------------------------- small messages


#: profile fields the coordinator computes with (estimates, placement): numbers >= 0 when present
PROFILE_NUMBERS = frozenset(
    {"block_s", "block_tokens", "usable_mb", "memory_available_mb", "memory_total_mb", "uplink_mbps",
     "downlink_mbps", "rtt_ms", "throughput_gflops", "accelerator_memory_mb", "cpu_logical", "cpu_physical",
     "cpu_max_mhz", "load_1m", "torch_threads"} | PROFILE_FIELDS
)  # fmt: skip


@dataclass(frozen=True)
class Join:
    """What an agent says when it joins: its device profile, the size of its data, the model it runs."""

    profile: dict[str, Any]  # a flat map of measured and declared device figures (see parse_join)
    data_samples: int
    data_tokens: int  # a rough count, for planning
    model: str  # as the agent was given it (a preset name or its own path): for the logs
    version: str = ""  # the agent's SplitFT version
    fingerprint: str = ""  # the model's content id (splitft.shared.models.model_fingerprint): what is compared
    # examples of its data that fit the job's max_length (read from the coordinator's status); None: not known
    usable_samples: int | None = None


def join_body(join: Join) -> dict[str, Any]:
    return {
        "profile": dict(join.profile),
        "data_samples": join.data_samples,
        "data_tokens": join.data_tokens,
        "model": join.model,
        "version": join.version,
        "fingerprint": join.fingerprint,
        "usable_samples": join.usable_samples,
    }


def parse_join(body: Mapping[str, Any]) -> Join:
    """A join: the agent's device profile and the size of its data.

    The profile is a flat map of at most 64 names to scalars (strings of at most 256 characters,
    finite numbers, booleans, nil); the fields in :data:`PROFILE_NUMBERS` must be numbers >= 0.
    """
    profile = _get(body, "profile", dict)
    samples = _int(body, "data_samples", 1, 1 << 40)
    tokens = _int(body, "data_tokens", 1, 1 << 48)
    model = _get(body, "model", str)
    version = body.get("version", "")
    if not isinstance(version, str) or len(version) > 64:
        raise WireError(Refusal.BAD_SCHEMA, f"version must be a string of at most 64 characters, got {_brief(version)}")
    fingerprint = _get(body, "fingerprint", str)
    if not 0 < len(fingerprint) <= 64:
        raise WireError(Refusal.BAD_SCHEMA, "fingerprint must be a string of 1 to 64 characters")
    usable = body.get("usable_samples")
    if usable is not None and (type(usable) is not int or not 0 <= usable <= samples):
        raise WireError(Refusal.BAD_SCHEMA, f"usable_samples must be nil or an integer in [0, {samples}]")
    if len(profile) > 64:
        raise WireError(Refusal.BAD_SCHEMA, "profile has too many fields")
    for name, value in profile.items():
        if not isinstance(name, str) or len(name) > 64:
            raise WireError(
                Refusal.BAD_SCHEMA, f"profile field name {_brief(name)} is not a string of at most 64 characters"
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if name in PROFILE_NUMBERS and not (number and value >= 0):
            raise WireError(
                Refusal.BAD_SCHEMA, f"profile field {name!r} must be a finite number >= 0, got {_brief(value)}"
            )
        if not (number or value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 256)):
            raise WireError(Refusal.BAD_SCHEMA, f"profile field {name!r} must be a scalar, got {_brief(value)}")
    return Join(dict(profile), samples, tokens, model, version, fingerprint, usable)


@dataclass(frozen=True)
class Assignment:
    """A device's part in one round: its layout (cut, tail, LoRA ranks), the adapters it starts from and
    how to train. ``round`` and ``corr`` travel in the envelope, the rest in the body."""

    round: int
    model: str  # the coordinator's name for it (for the logs)
    fingerprint: str  # its content id: the agent checks it against its own model's
    cut: int
    ranks: dict[int, int]  # LoRA rank of every block the device holds
    lora: LoraSettings
    adapter: Any  # the encoded state, decoded once the segment's shapes are known
    local_steps: int
    batch_size: int
    max_length: int
    optimizer: OptimizerSettings
    wire_dtype: str
    adapter_wire_dtype: str
    step_timeout_s: float
    seed: int
    attempt: int = 1  # the coordinator's run of this round (a round that fell short of min_agents runs again)
    corr: str = ""  # the assignment's id, repeated in the activations and the upload
    split: str = "two-part"  # "u": the device also holds the last `tail` blocks and the head, and takes the loss
    tail: int = 0  # U split: blocks at the top of the model this device holds
    report_loss: bool = True  # U split: send the mean loss (a scalar) with each tail gradient
    # clip / noise on the activations sent, NoPeek in the loss
    defense: DefenseSettings = field(default_factory=DefenseSettings)
    chat_template: str | bool = "auto"  # how the device renders its pairs and conversations (shared/data.py)

    @property
    def u_split(self) -> bool:
        return self.split == "u"


def assign_body(a: Assignment) -> dict[str, Any]:
    """The body of an ``assign`` message (the adapter state already encoded)."""
    lora: dict[str, Any] = {
        "r": a.lora.r,
        "r_cut": a.lora.r_cut,
        "alpha_per_rank": a.lora.alpha_per_rank,
        "dropout": a.lora.dropout,
    }
    if a.lora.targets is not None:
        lora["targets"] = list(a.lora.targets)
    return {
        "model": a.model,
        "fingerprint": a.fingerprint,
        "cut": a.cut,
        "split": a.split,
        "tail": a.tail,
        "report_loss": a.report_loss,
        "ranks": [a.ranks[j] for j in sorted(a.ranks)],
        "lora": lora,
        "adapter": a.adapter,
        "local_steps": a.local_steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "optimizer": {
            "name": a.optimizer.name,
            "lr": a.optimizer.lr,
            "weight_decay": a.optimizer.weight_decay,
            "momentum": a.optimizer.momentum,
        },
        "defense": {"noise": a.defense.noise, "clip": a.defense.clip, "nopeek": a.defense.nopeek},
        "wire_dtype": a.wire_dtype,
        "adapter_wire_dtype": a.adapter_wire_dtype,
        "step_timeout_s": a.step_timeout_s,
        "seed": a.seed,
        "attempt": a.attempt,
        "chat_template": a.chat_template,
    }


def parse_assign(
    round_: int,
    body: Mapping[str, Any],
    fingerprint: str,
    total_layers: int,
    max_positions: int | None = None,
    corr: str | None = None,
) -> Assignment:
    """Check an assignment against this agent's model; a WireError says what is wrong."""

    def get(name: str, kind: type | tuple[type, ...]) -> Any:
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise WireError(Refusal.BAD_SCHEMA, f"assignment field {name!r} missing or of the wrong type")
        return value

    model = get("model", str)
    if get("fingerprint", str) != fingerprint:
        raise WireError(
            Refusal.BAD_SCHEMA,
            f"assignment for model {_brief(model)} (fingerprint {_brief(body['fingerprint'])}), this agent's model "
            f"has fingerprint {fingerprint}",
        )
    cut = get("cut", int)
    if not 1 <= cut <= total_layers - 1:
        raise WireError(Refusal.BAD_SCHEMA, f"cut {cut} outside 1..{total_layers - 1}")
    split = body.get("split", "two-part")
    if split not in SPLITS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown split {split!r}")
    tail = body.get("tail", 0)
    if type(tail) is not int or not 0 <= tail <= total_layers - 1 - cut or (split == "two-part" and tail != 0):
        raise WireError(
            Refusal.BAD_SCHEMA, f"tail {tail!r} does not fit a {split} split at cut {cut} of {total_layers}"
        )
    report_loss = body.get("report_loss", True)
    if type(report_loss) is not bool:
        raise WireError(Refusal.BAD_SCHEMA, "report_loss must be a boolean")
    chat_template = body.get("chat_template", "auto")
    try:
        check_chat_template(chat_template)
    except ConfigError as exc:
        raise WireError(Refusal.BAD_SCHEMA, str(exc)) from exc
    blocks = [*range(cut), *range(total_layers - tail, total_layers)]
    ranks = get("ranks", list)
    if len(ranks) != len(blocks) or not all(type(r) is int and 0 < r <= 4096 for r in ranks):
        raise WireError(Refusal.BAD_SCHEMA, "ranks must list one positive rank per client block")
    wire, adapter_wire = get("wire_dtype", str), get("adapter_wire_dtype", str)
    if wire not in FLOAT_WIRE_DTYPES or adapter_wire not in FLOAT_WIRE_DTYPES:
        raise WireError(Refusal.BAD_DTYPE, f"unknown wire dtype {wire!r} / {adapter_wire!r}")
    try:
        lora_fields = dict(get("lora", dict))
        if "targets" in lora_fields and isinstance(lora_fields["targets"], list):
            lora_fields["targets"] = tuple(lora_fields["targets"])
        lora = LoraSettings(**lora_fields)
        optimizer = OptimizerSettings(**get("optimizer", dict))
        raw_defense = body.get("defense", {})
        if not isinstance(raw_defense, dict):
            raise ConfigError("defense must be a map")
        defense = DefenseSettings(**raw_defense)
    except (TypeError, ConfigError) as exc:
        raise WireError(Refusal.BAD_SCHEMA, f"assignment settings: {exc}") from exc
    steps, batch, length = get("local_steps", int), get("batch_size", int), get("max_length", int)
    if not (1 <= steps <= 100_000 and 1 <= batch <= 4096 and 8 <= length <= 1 << 20):
        raise WireError(Refusal.BAD_SCHEMA, "local_steps, batch_size or max_length out of range")
    if max_positions is not None and length > max_positions:
        raise WireError(Refusal.BAD_SCHEMA, f"max_length {length} exceeds the model's {max_positions} positions")
    timeout = float(get("step_timeout_s", (int, float)))
    if not 0 < timeout < 1e7:
        raise WireError(Refusal.BAD_SCHEMA, "step_timeout_s out of range")
    attempt = body.get("attempt", 1)
    if type(attempt) is not int or not 1 <= attempt <= 1_000_000:
        raise WireError(Refusal.BAD_SCHEMA, "attempt out of range")
    return Assignment(
        round=round_,
        model=model,
        fingerprint=fingerprint,
        cut=cut,
        ranks=dict(zip(blocks, ranks, strict=True)),
        lora=lora,
        adapter=get("adapter", dict),
        local_steps=steps,
        batch_size=batch,
        max_length=length,
        optimizer=optimizer,
        wire_dtype=wire,
        adapter_wire_dtype=adapter_wire,
        step_timeout_s=timeout,
        seed=get("seed", int),
        attempt=attempt,
        split=split,
        tail=tail,
        report_loss=report_loss,
        defense=defense,
        corr=corr or "",
        chat_template=chat_template,
    )


def parse_status(body: Mapping[str, Any]) -> str:
    state = _get(body, "state", str)
    if state not in ("online", "offline"):
        raise WireError(Refusal.BAD_SCHEMA, f"unknown status {_brief(state)}")
    return str(state)


#: what the coordinator tells one agent: it was dropped from a round, or its upload was refused
#: dropped: out of the current round; refused: its upload was refused; not_admitted: its join was refused
NOTICE_EVENTS = frozenset({"dropped", "refused", "not_admitted"})
#: why a join was refused: the agent's model is another one, or its data has no usable example
NOTICE_CAUSES = frozenset({"model", "data", "memory"})


@dataclass(frozen=True)
class Notice:
    event: str
    reason: str
    cause: str | None = None  # not_admitted only


def notice_body(event: str, reason: str, cause: str | None = None) -> dict[str, Any]:
    if event not in NOTICE_EVENTS or (cause is not None and cause not in NOTICE_CAUSES):
        raise ValueError(f"unknown notice {event!r} ({cause!r})")
    body: dict[str, Any] = {"event": event, "reason": reason[:500]}
    if cause is not None:
        body["cause"] = cause
    return body


def parse_notice(body: Mapping[str, Any]) -> Notice:
    event = _get(body, "event", str)
    if event not in NOTICE_EVENTS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown notice {_brief(event)}")
    cause = body.get("cause")
    if cause is not None and cause not in NOTICE_CAUSES:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown notice cause {_brief(cause)}")
    return Notice(str(event), str(_get(body, "reason", str))[:500], cause)


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
        chunk_id = _get(body, "id", str)
        count = _int(body, "count", 1, 1 << 20)
        index = _int(body, "index", 0, count - 1)
        data = _get(body, "data", bytes)
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
