"""A seeded fuzzer over every message the coordinator and an agent read (issue 6, item 6).

Valid messages of every type are built (act, adapter, join and status from agents; assign, grad and
notice to one agent; round and the coordinator's status to all), then broken: random bytes, cuts,
bit flips, appended bytes, zstd frames that declare gigabytes or lie about their size, zstd bombs,
msgpack headers declaring huge lengths, ext types, deep nesting, wrong types and missing or extra
fields in the envelope and the body, wrong tensor shapes and dtypes, data of the wrong length,
NaN/Inf, labels outside the vocabulary, lengths outside [1, T], chunks with bad fields, a chunk that
announces a million parts, bad or missing authentication tags, wrong senders, jobs and topics, replays.

Each payload goes (a) through ``Link._accept`` on its topic, for a Link of the member that reads it
(the coordinator or agent ``a1``), once without and once with a job key, and (b) through the body
parser of its type. Checked: nothing raises but ``WireError`` from a parser (the Link never raises,
and never needs its catch-all ``decode_error``); every payload is accepted, refused with exactly one
reason, or held as a partial chunk; nothing a mutation broke is accepted; memory stays bounded.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import random
import struct
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, TypeVar

import msgpack
import pytest
import torch
import zstandard

from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire import control, envelope
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import (
    DEFAULT_LIMITS,
    FLOAT_WIRE_DTYPES,
    INT_WIRE_DTYPES,
    WIRE_DTYPES,
    compress,
    decode_state,
    encode_state,
    encode_tensor,
)
from splitft.shared.wire.control import notice_body, parse_join, parse_notice, parse_status
from splitft.shared.wire.envelope import (
    SEAL_BYTES,
    Envelope,
    chunk_payload,
    decode_envelope,
    encode_envelope,
    seal,
    unseal,
)
from splitft.shared.wire.link import Link
from splitft.shared.wire.messages import (
    act_body,
    adapter_body,
    grad_body,
    parse_act,
    parse_adapter,
    parse_grad,
    parse_tail_act,
    parse_tail_grad,
    tail_act_body,
    tail_grad_body,
)
from splitft.shared.wire.topics import COORDINATOR, Kind, Topics

T = TypeVar("T")
SEED = 6_006
NOW = 1_750_000_000.0  # the clock of the run (frozen for the Link's timestamp check): payloads are reproducible
PAYLOADS_PER_MODE = 1000  # without and with a job key: 2,000 payloads per run

TOPICS = Topics("fuzz")
KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
MODEL, LAYERS = "tiny-gpt2", 4
FINGERPRINT = "0123456789abcdef"  # the model content id both sides compare
HIDDEN, MAX_B, MAX_T, VOCAB = 128, 8, 64, 50257
AGENTS = ("a1", "a2", "a3")
ADAPTER_EXPECT = {
    "h.0.attn.lora_A": (4, HIDDEN),
    "h.0.attn.lora_B": (HIDDEN, 4),
    "h.1.attn.lora_A": (8, HIDDEN),
    "h.1.attn.lora_B": (HIDDEN, 8),
}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
NAN, INF = float("nan"), float("inf")

UPSTREAM = ("act", "tail_grad", "adapter", "join", "status")  # agent -> coordinator: the coordinator's link reads these
DOWNSTREAM = ("assign", "grad", "tail_act", "notice", "round", "coordinator_status")  # read by the agent's link
KINDS = UPSTREAM + DOWNSTREAM
TYPE_OF = {"act": Kind.ACT, "tail_grad": Kind.TAIL_GRAD, "adapter": Kind.ADAPTER, "join": Kind.JOIN, "status": Kind.STATUS, "assign": Kind.ASSIGN,
           "grad": Kind.GRAD, "tail_act": Kind.TAIL_ACT, "notice": Kind.NOTICE, "round": Kind.ROUND, "coordinator_status": Kind.STATUS}  # fmt: skip
#: the body fields each parser requires, and their type
SCHEMA: dict[str, dict[str, str]] = {
    "act": {"act": "tensor", "labels": "tensor", "lengths": "tensor", "timings": "dict"},
    "adapter": {"adapter": "dict", "tokens": "int", "samples": "int", "loss": "number_or_nil", "timings": "dict"},
    "tail_act": {"act": "tensor"},
    "tail_grad": {"grad": "tensor", "loss": "number_or_nil"},
    "join": {"profile": "dict", "data_samples": "int", "data_tokens": "int", "model": "str", "fingerprint": "str"},
    "status": {"state": "str"},
    "assign": {
        "model": "str",
        "fingerprint": "str",
        "cut": "int",
        "ranks": "list",
        "lora": "dict",
        "adapter": "dict",
        "local_steps": "int",
        "batch_size": "int",
        "max_length": "int",
        "optimizer": "dict",
        "wire_dtype": "str",
        "adapter_wire_dtype": "str",
        "step_timeout_s": "number",
        "seed": "int",
    },
    "grad": {"grad": "tensor", "loss": "number", "tokens": "int"},
    "notice": {"event": "str", "reason": "str"},
    "coordinator_status": {"state": "str"},
}
WRONG: dict[str, list[Any]] = {
    "int": [None, True, 1.5, "7", b"7", [7], {"n": 7}],
    "number": [None, True, "1.0", b"1", [1.0], {}, NAN, INF, -INF],
    "number_or_nil": [True, "1.0", b"1", [1.0], {}, NAN, INF, -INF],
    "str": [None, 7, 1.5, b"text", ["text"], {}],
    "dict": [None, 7, "map", b"map", [1, 2]],
    "list": [None, 7, "list", b"l", {"0": 1}],
    "tensor": [None, 7, "tensor", b"\x00" * 16, [1.0, 2.0], {}],
}
ENV_WRONG: dict[str, list[Any]] = {
    "v": ["2", 2.0, None, True, 1, 3, 0, [2]],
    "type": [1, None, ["act"], "nope", b"act", "", {"t": 1}],
    "job": [1, "", None, b"fuzz", ["fuzz"]],
    "sender": [1, "", None, b"a1"],
    "sid": [1, "", None, [1]],
    "seq": ["1", 1.5, None, True, b"1"],
    "round": ["1", 1.5, None, False],
    "step": ["1", 1.5, None, True],
    "corr": [3, [], b"x", {}, 1.5],
    "ts": ["now", None, NAN, INF, -INF, [], True, b"1"],
    "auth": ["tag", 1, [], {}, True, None, b"\x00" * 32],  # version 1's tag field: no longer in an envelope
    "body": [[], None, "x", 1, b"body", True],
}
#: msgpack headers that declare far more than follows, ext types, a byte msgpack never uses, nesting
#: deeper than the unpacker's stack
RAW_MSGPACK = [
    b"\xc6\xff\xff\xff\xff" + b"x" * 8,  # bin32 of 4 GiB
    b"\xc6" + (200 << 20).to_bytes(4, "big") + b"x" * 8,  # bin32 of 200 MiB: under the decoded limit, not there
    b"\xc5\xff\xff" + b"x" * 3,  # bin16
    b"\xdb\xff\xff\xff\xff" + b"a",  # str32 of 4 GiB
    b"\xdb" + (5000).to_bytes(4, "big") + b"a" * 5000,  # a string over max_str_len, all there
    b"\xdd\xff\xff\xff\xff\xc0",  # array32 of 4 G items
    b"\xdd" + (99_999).to_bytes(4, "big") + b"\xc0",  # within max_items, absent
    b"\xdf\xff\xff\xff\xff",  # map32 of 4 G entries
    b"\xde\xff\xff\xa1k\xc0",  # map16 of 65535 entries, one there
    b"\xd4\x01\x00",  # fixext1
    b"\xc7\x05\x01hello",  # ext8
    b"\xc7\x00\x05",  # ext8 of length 0
    b"\xc8\x00\x00\x05",  # ext16 of length 0
    b"\xd6\xff\x00\x00\x00\x01",  # timestamp
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\xc1",  # never used
    b"\x91" * 100_000 + b"\xc0",  # arrays nested 100,000 deep
    b"\x81\xa1k" * 5000 + b"\xc0",  # maps nested 5,000 deep
]
PLACEHOLDER = b"\xa5" * 24

ACCEPT, HELD, REFUSE_WIRE, REFUSE_BODY, REFUSE_LINK, ANY = (
    "accept",
    "held",
    "refuse_wire",
    "refuse_body",
    "refuse_link",
    "any",
)


def assign_expect(ranks: list[int]) -> dict[str, tuple[int, int]]:
    """The client adapter shapes of an assignment (what the agent's segment would have)."""
    out: dict[str, tuple[int, int]] = {}
    for j, r in enumerate(ranks):
        out[f"h.{j}.attn.lora_A"], out[f"h.{j}.attn.lora_B"] = (r, HIDDEN), (HIDDEN, r)
    return out


def take_assignment(env: Envelope) -> Any:
    """What the agent does with an assignment before training: check it, then decode its adapters."""
    a = control.parse_assign(env.round, env.body, FINGERPRINT, LAYERS)
    expect = assign_expect([a.ranks[j] for j in range(a.cut)])
    decode_state(a.adapter, expect={n: list(s) for n, s in expect.items()})
    return a


PARSERS: dict[str, Callable[[Envelope, Any], Any] | None] = {
    "act": lambda env, ctx: parse_act(env.body, HIDDEN, MAX_B, MAX_T, VOCAB),
    "adapter": lambda env, ctx: parse_adapter(env.body, ADAPTER_EXPECT),
    "join": lambda env, ctx: parse_join(env.body),
    "status": lambda env, ctx: parse_status(env.body),
    "assign": lambda env, ctx: take_assignment(env),
    "grad": lambda env, ctx: parse_grad(env.body, ctx),
    "tail_act": lambda env, ctx: parse_tail_act(env.body, ctx),
    "tail_grad": lambda env, ctx: parse_tail_grad(env.body, ctx),
    "notice": lambda env, ctx: parse_notice(env.body),
    "round": None,  # the agent only looks at body.get("event"): there is nothing to refuse
    "coordinator_status": lambda env, ctx: parse_status(env.body),
}


def rle_frame(declared: int, size: int, byte: int = 0) -> bytes:
    """A zstd frame declaring ``declared`` bytes whose RLE blocks expand to ``size`` bytes of ``byte``:
    4 bytes per 128 KiB, so a gigabyte bomb costs 32 kB to build."""
    header = ZSTD_MAGIC + bytes([0xE0]) + declared.to_bytes(8, "little")  # single segment, 8-byte content size
    blocks, left = [], size
    while True:
        n = min(left, 128 << 10)
        left -= n
        blocks.append((int(left == 0) | (1 << 1) | (n << 3)).to_bytes(3, "little") + bytes([byte]))
        if left == 0:
            return header + b"".join(blocks)


def nested(depth: int, as_map: bool) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = {"k": value} if as_map else [value]
    return value


# Nesting just within what msgpack packs and unpacks (about 1,020 levels in all), deeper than ``repr`` can go.
DEEP_IN_ENVELOPE = nested(1015, False)
DEEP_IN_BODY = nested(1010, False)
#: every wrong value of every envelope field; deep nesting and 8 MiB of bytes check that error messages
#: stay small (``repr`` of a hostile value can recurse too deep, or be four times its size)
ENV_CASES: list[tuple[str, Any]] = [(name, value) for name, values in ENV_WRONG.items() for value in values]
ENV_CASES += [(name, DEEP_IN_ENVELOPE) for name in ENV_WRONG]
ENV_CASES += [(name, lambda: bytes(8 << 20)) for name in ENV_WRONG]
BODY_CASES = [
    (kind, name, value) for kind, fields in SCHEMA.items() for name, tag in fields.items() for value in WRONG[tag]
]
TENSOR_MUTATIONS = [
    (kind, slot, sub)
    for kind, slot in [("act", "act"), ("act", "labels"), ("act", "lengths"), ("grad", "grad"), ("tail_act", "act"),
                       ("tail_grad", "grad"), ("adapter", None), ("assign", None)]
    for sub in ("shape", "dtype", "data_len", "nonfinite", "extra_key", "missing_key", "huge_dims", "not_map",
                "retyped", "hostile_field")
]  # fmt: skip
RAW_CASES = [(raw, where) for raw in RAW_MSGPACK for where in ("top", "envelope", "body")]
#: (what a frame holds, what it declares): short and long by a little and by a lot, nothing, the whole limit
SIZE_LIES = [(real, declared) for real in (1 << 10, 1 << 20, 4 << 20) for declared in (0, 1, real // 2, real - 1,
             real + 1, real * 2, DEFAULT_LIMITS.max_decoded_bytes)]  # fmt: skip


def raw_fields(payload: bytes) -> dict[str, Any]:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(unseal(payload)[1]), raw=False)


@dataclass
class Msg:
    kind: str
    topic: str
    env: Envelope
    ctx: Any = None


@dataclass
class Case:
    mutation: str
    kind: str
    topic: str
    payload: bytes
    expect: str
    reason: str | None = None  # the Link's reason, for REFUSE_LINK (None: any reason)
    original: Envelope | None = None  # what a byte-mutated payload held before
    ctx: Any = None


class Fuzzer:
    """Builds cases for one link mode (``keyed``: every member holds KEY and signs with it)."""

    def __init__(self, seed: int, keyed: bool, now: float) -> None:
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.keyed, self.now = keyed, now
        self.sid = f"{self.rng.getrandbits(64):016x}"
        self.seq = 0
        self._queues: dict[str, list[int]] = {}
        self.mutations: list[tuple[Callable[[], list[Case]], int]] = [
            (self.m_valid, 6),
            (self.m_random_bytes, 5),
            (self.m_truncate, 6),
            (lambda: self.m_bitflip(False), 8),
            (lambda: self.m_bitflip(True), 6),
            (self.m_append, 4),
            (self.m_no_content_size, 1),
            (self.m_zstd_declared_huge, 2),
            (self.m_zstd_bomb_gb, 1),
            (self.m_zstd_bomb_mb, 2),
            (self.m_zstd_size_lie, 2),
            (self.m_msgpack_raw, 6),
            (self.m_env_wrong_type, 8),
            (self.m_env_missing_field, 3),
            (self.m_env_extra_field, 2),
            (self.m_env_not_map, 1),
            (self.m_body_wrong_type, 8),
            (self.m_body_missing_field, 4),
            (self.m_body_extra_field, 2),
            (self.m_deep_nesting, 3),
            (self.m_tensor, 14),
            (self.m_act_labels, 3),
            (self.m_act_lengths, 3),
            (self.m_act_oversize, 2),
            (self.m_field_range, 10),
            (self.m_chunks_valid, 2),
            (self.m_chunk_bad_field, 4),
            (self.m_chunk_count_mismatch, 1),
            (self.m_chunk_million, 2),
            (self.m_chunk_bad_inner, 3),
            (self.m_auth, 6),
            (self.m_route, 5),
        ]

    def pick(self, key: str, items: Sequence[T]) -> T:
        """Every item once (in a seeded order) before any item twice: rare values are not left to chance."""
        queue = self._queues.get(key)
        if not queue:
            queue = self._queues[key] = list(range(len(items)))
            self.rng.shuffle(queue)
        return items[queue.pop()]

    # ------------------------------------------------------------------ valid messages

    def next_seq(self, n: int = 1) -> int:
        self.seq += n
        return self.seq - n + 1

    def message(self, kind: str | None = None) -> Msg:
        kind = kind or self.rng.choice(KINDS)
        body, ctx = getattr(self, f"body_{kind}")()
        if kind in UPSTREAM:
            sender = self.rng.choice(AGENTS)
            topic = TOPICS.agent(sender, kind)
        elif kind == "round":
            sender, topic = COORDINATOR, TOPICS.job_topic("round")
        elif kind == "coordinator_status":
            sender, topic = COORDINATOR, TOPICS.coordinator_status()
        else:
            sender, topic = COORDINATOR, TOPICS.agent("a1", kind)
        env = Envelope(
            type=TYPE_OF[kind],
            job=TOPICS.job,
            sender=sender,
            sid=self.sid,
            seq=self.next_seq(),
            body=body,
            round=self.rng.randint(0, 50),
            step=self.rng.randint(-1, 20),
            corr=self.rng.choice([None, "r1"]),
            ts=self.now,
        )
        return Msg(kind, topic, env, ctx)

    def encode(self, msg: Msg, env: Envelope | None = None, key: bytes | bool | None = True) -> bytes:
        """``key=True``: sign as this mode's members do (with KEY when keyed, not at all otherwise)."""
        if key is True:
            key = KEY if self.keyed else None
        return encode_envelope(env or msg.env, key=key or None, topic=msg.topic)  # type: ignore[arg-type]

    def case(self, mutation: str, msg: Msg, payload: bytes, expect: str, **kw: Any) -> Case:
        topic = kw.pop("topic", msg.topic)
        return Case(mutation, msg.kind, topic, payload, expect, ctx=msg.ctx, **kw)

    def resigned(self, mutation: str, msg: Msg, body: dict[str, Any], expect: str) -> Case:
        """The body changed by a member that holds the key: it passes the Link, the parser must refuse it."""
        return self.case(mutation, msg, self.encode(msg, replace(msg.env, body=body)), expect)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen)

    def timings(self) -> dict[str, float]:
        return {k: self.rng.uniform(0, 2) for k in self.rng.sample(["forward_s", "upload_s", "wait_s", "rss_mb"], 2)}

    def body_act(self, batch: int | None = None, width: int | None = None) -> tuple[dict[str, Any], Any]:
        b, t = batch or self.rng.randint(1, MAX_B), width or self.rng.randint(1, MAX_T)
        labels = torch.randint(0, VOCAB, (b, t), generator=self.gen)
        labels[torch.rand(b, t, generator=self.gen) < 0.3] = -100
        lengths = torch.randint(1, t + 1, (b,), generator=self.gen)
        wire = self.rng.choice(FLOAT_WIRE_DTYPES)
        return act_body(self.randn(b, t, HIDDEN), labels, lengths, wire, self.timings()), None

    def body_grad(self) -> tuple[dict[str, Any], Any]:
        shape = (self.rng.randint(1, MAX_B), self.rng.randint(1, MAX_T), HIDDEN)
        wire = self.rng.choice(FLOAT_WIRE_DTYPES)
        return grad_body(self.randn(*shape), wire, self.rng.uniform(0, 10), self.rng.randint(0, 512)), shape

    def body_tail_act(self) -> tuple[dict[str, Any], Any]:
        shape = (self.rng.randint(1, MAX_B), self.rng.randint(1, MAX_T), HIDDEN)
        return tail_act_body(self.randn(*shape), self.rng.choice(FLOAT_WIRE_DTYPES)), shape

    def body_tail_grad(self) -> tuple[dict[str, Any], Any]:
        shape = (self.rng.randint(1, MAX_B), self.rng.randint(1, MAX_T), HIDDEN)
        loss = self.rng.choice([None, self.rng.uniform(0, 10)])
        return tail_grad_body(self.randn(*shape), self.rng.choice(FLOAT_WIRE_DTYPES), loss), shape

    def body_adapter(self) -> tuple[dict[str, Any], Any]:
        state = {n: self.randn(*s) for n, s in ADAPTER_EXPECT.items()}
        wire = self.rng.choice(FLOAT_WIRE_DTYPES)
        return adapter_body(state, self.rng.randint(1, 10**6), self.rng.randint(1, 64), 2.5, self.timings(), wire), None

    def body_join(self) -> tuple[dict[str, Any], Any]:
        profile: dict[str, Any] = {"cpu_logical": 4, "cpu_physical": 2, "cpu_max_mhz": 2400.0, "memory_total_mb": 8000,
                                   "memory_available_mb": 4000, "load_1m": 0.5, "torch_threads": 4,
                                   "accelerator": "cpu", "class": "jetson-orin-nano", "block_s": 0.01,
                                   "block_tokens": 512}  # fmt: skip
        if self.rng.random() < 0.5:
            profile.update(emulated=True, uplink_mbps=20.0, downlink_mbps=50.0, rtt_ms=30.0, usable_mb=2800,
                           throughput_gflops=120.0)  # fmt: skip
        body = {"profile": profile, "data_samples": self.rng.randint(1, 10**5), "data_tokens": self.rng.randint(1, 10**8),
                "model": MODEL, "version": "0.1.0", "fingerprint": FINGERPRINT}  # fmt: skip
        return body, None

    def body_status(self) -> tuple[dict[str, Any], Any]:
        return {"state": self.rng.choice(["online", "offline"]), "role": "agent"}, None

    def body_coordinator_status(self) -> tuple[dict[str, Any], Any]:
        return {"state": self.rng.choice(["online", "offline"]), "role": COORDINATOR}, None

    def body_assign(self) -> tuple[dict[str, Any], Any]:
        cut = self.rng.randint(1, LAYERS - 1)
        ranks = [self.rng.choice([4, 8]) for _ in range(cut)]
        state = {n: self.randn(*s) for n, s in assign_expect(ranks).items()}
        body = {
            "model": MODEL,
            "fingerprint": FINGERPRINT,
            "cut": cut,
            "ranks": ranks,
            "lora": {"r": 8, "r_cut": 4, "alpha_per_rank": 2.0, "dropout": 0.0},
            "adapter": encode_state(state, self.rng.choice(FLOAT_WIRE_DTYPES)),
            "local_steps": self.rng.randint(1, 8),
            "batch_size": self.rng.randint(1, 8),
            "max_length": self.rng.choice([16, 64, 256]),
            "optimizer": {"name": self.rng.choice(["adamw", "sgd"]), "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.0},
            "wire_dtype": self.rng.choice(FLOAT_WIRE_DTYPES),
            "adapter_wire_dtype": self.rng.choice(FLOAT_WIRE_DTYPES),
            "step_timeout_s": 30.0,
            "seed": self.rng.randint(0, 2**31),
        }
        return body, None

    def body_notice(self) -> tuple[dict[str, Any], Any]:
        event = self.rng.choice(["dropped", "refused", "not_admitted"])
        cause = self.rng.choice(["model", "data"]) if event == "not_admitted" else None
        return notice_body(event, "late " * self.rng.randint(0, 150), cause), None

    def body_round(self) -> tuple[dict[str, Any], Any]:
        return self.rng.choice([{"event": "start", "agents": list(AGENTS)}, {"event": "done"}]), None

    # ------------------------------------------------------------------ the stream

    def cases(self, n: int) -> Iterator[Case]:
        """At least ``n`` cases (a group of chunks is not split): first one sweep over every item of the
        tables of bad values (each once, in a seeded order), then mutations drawn at random."""
        sweep = [
            (self.m_env_wrong_type, len(ENV_CASES)),
            (self.m_body_wrong_type, len(BODY_CASES)),
            (self.m_field_range, len(RANGE_CASES)),
            (self.m_tensor, len(TENSOR_MUTATIONS)),
            (self.m_msgpack_raw, len(RAW_CASES)),
            (self.m_zstd_size_lie, len(SIZE_LIES)),
        ]
        makers = [maker for maker, count in sweep for _ in range(count)]
        self.rng.shuffle(makers)
        draw, weights = zip(*self.mutations, strict=True)
        made = 0
        while made < n:
            maker = makers.pop() if makers else self.rng.choices(draw, weights)[0]
            for case in maker():
                made += 1
                yield case

    # ------------------------------------------------------------------ byte-level mutations

    def m_valid(self) -> list[Case]:
        msg = self.message()
        return [self.case("valid", msg, self.encode(msg), ACCEPT)]

    def m_random_bytes(self) -> list[Case]:
        msg = self.message()
        data = self.rng.randbytes(self.rng.randint(0, self.rng.choice([4, 64, 5000])))
        prefix = self.rng.choice([b"", ZSTD_MAGIC, ZSTD_MAGIC + bytes([self.rng.randrange(256)])])
        return [self.case("random_bytes", msg, prefix + data, REFUSE_WIRE)]

    def m_truncate(self) -> list[Case]:
        msg = self.message()
        good = self.encode(msg)
        cut = self.rng.randrange(min(len(good), 24)) if self.rng.random() < 0.3 else self.rng.randrange(len(good))
        return [self.case("truncate", msg, good[:cut], REFUSE_WIRE)]

    def m_bitflip(self, many: bool) -> list[Case]:
        msg = self.message()
        good = self.encode(msg)
        data = bytearray(good)
        for _ in range(self.rng.randint(2, 16) if many else 1):
            # A third of the flips hit the frame header (magic, descriptor, content size).
            pos = self.rng.randrange(min(len(data), 18)) if self.rng.random() < 0.3 else self.rng.randrange(len(data))
            data[pos] ^= 1 << self.rng.randrange(8)
        name = "bitflip_multi" if many else "bitflip_single"
        return [self.case(name, msg, bytes(data), REFUSE_WIRE, original=decode_envelope(good))]

    def m_append(self) -> list[Case]:
        msg = self.message()
        good = self.encode(msg)
        skippable = struct.pack("<II", 0x184D2A50 + self.rng.randrange(16), 8) + self.rng.randbytes(8)
        tail = self.rng.choice([self.rng.randbytes(self.rng.randint(1, 64)), good, skippable, compress(b"\xc0")])
        payload = skippable + good if self.rng.random() < 0.3 else good + tail
        return [self.case("append_bytes", msg, payload, REFUSE_WIRE)]

    def m_no_content_size(self) -> list[Case]:
        msg = self.message()
        raw = zstandard.ZstdDecompressor().decompress(self.encode(msg, key=None))
        frame = zstandard.ZstdCompressor(write_content_size=False, write_checksum=True).compress(raw)
        if self.rng.random() < 0.5:  # whole, it is read by a stream that stops at the topic's bound
            payload = seal(KEY, msg.topic, frame) if self.keyed else frame
            return [self.case("zstd_no_content_size", msg, payload, ACCEPT)]
        cut = frame[: self.rng.randrange(4, len(frame))]
        payload = seal(KEY, msg.topic, cut) if self.keyed else cut
        return [self.case("zstd_no_content_size", msg, payload, REFUSE_WIRE)]

    def m_zstd_declared_huge(self) -> list[Case]:
        msg = self.message()
        declared = self.rng.choice([DEFAULT_LIMITS.max_decoded_bytes + 1, 2**31, 2**33, 2**40, 2**64 - 1])
        return [self.case("zstd_declares_gbs", msg, rle_frame(declared, self.rng.randint(0, 1000)), REFUSE_WIRE)]

    def m_zstd_bomb_gb(self) -> list[Case]:
        msg = self.message()
        size = self.rng.choice([1 << 30, 3 << 30])  # a real bomb: the blocks do expand to what the frame declares
        return [self.case("zstd_bomb_gb", msg, rle_frame(size, size, self.rng.choice([0, 0x91, 0xC0])), REFUSE_WIRE)]

    def m_zstd_bomb_mb(self) -> list[Case]:
        """Megabytes of zeros in a few hundred bytes: as bare zeros, or as the data of a signed message's tensor."""
        size = self.rng.choice([1, 2, 4, 8]) << 20
        if self.rng.random() < 0.5:
            msg = self.message()
            return [self.case("zstd_bomb_mb", msg, compress(bytes(size)), REFUSE_WIRE)]
        msg = self.message(self.rng.choice(["act", "grad", "adapter", "assign"]))
        body = copy.deepcopy(msg.env.body)
        path = self.rng.choice(tensor_paths(msg.kind, body))
        _at(body, path)["data"] = bytes(size)
        return [self.resigned("zstd_bomb_mb", msg, body, REFUSE_BODY)]

    def m_zstd_size_lie(self) -> list[Case]:
        msg = self.message()
        real, declared = self.pick("zstd_size_lie", SIZE_LIES)
        return [self.case("zstd_size_lie", msg, rle_frame(declared, real, self.rng.randrange(256)), REFUSE_WIRE)]

    def m_msgpack_raw(self) -> list[Case]:
        """A huge-length header, an ext type or too deep nesting, at the top, in the envelope or in the body."""
        msg = self.message()
        raw, where = self.pick("msgpack_raw", RAW_CASES)
        if where == "top":
            return [self.case("msgpack_raw", msg, compress(raw), REFUSE_WIRE)]
        fields = raw_fields(self.encode(msg))
        if where == "envelope":
            fields[self.rng.choice(["corr", "sid", "ts", "auth"])] = PLACEHOLDER
        else:
            name = self.rng.choice([*sorted(fields["body"]), "extra"])
            fields["body"][name] = PLACEHOLDER
        packed = msgpack.packb(fields, use_bin_type=True)
        token = msgpack.packb(PLACEHOLDER, use_bin_type=True)
        assert packed.count(token) == 1
        return [self.case("msgpack_raw", msg, compress(packed.replace(token, raw)), REFUSE_WIRE)]

    # ------------------------------------------------------------------ the envelope

    def m_env_wrong_type(self) -> list[Case]:
        msg = self.message()
        fields = raw_fields(self.encode(msg))
        name, value = self.pick("env_wrong_type", ENV_CASES)
        fields[name] = value() if callable(value) else value
        return [self.case("env_wrong_type", msg, compress(msgpack.packb(fields, use_bin_type=True)), REFUSE_WIRE)]

    def m_env_missing_field(self) -> list[Case]:
        msg = self.message()
        fields = raw_fields(self.encode(msg))
        del fields[self.rng.choice(sorted(fields))]
        return [self.case("env_missing_field", msg, compress(msgpack.packb(fields, use_bin_type=True)), REFUSE_WIRE)]

    def m_env_extra_field(self) -> list[Case]:
        msg = self.message()
        fields = raw_fields(self.encode(msg))
        fields[self.rng.choice(["x", "extra", "V", "body2", "k" * 4000])] = self.rng.choice([1, None, "x", b"\x00"])
        return [self.case("env_extra_field", msg, compress(msgpack.packb(fields, use_bin_type=True)), REFUSE_WIRE)]

    def m_env_not_map(self) -> list[Case]:
        msg = self.message()
        fields = raw_fields(self.encode(msg))
        top = self.rng.choice([list(fields.values()), "envelope", 1, None, [list(fields.items())], b"map"])
        return [self.case("env_not_map", msg, compress(msgpack.packb(top, use_bin_type=True)), REFUSE_WIRE)]

    # ------------------------------------------------------------------ bodies

    def body_message(self, kinds: tuple[str, ...] = tuple(SCHEMA)) -> tuple[Msg, dict[str, Any]]:
        msg = self.message(self.rng.choice(kinds))
        return msg, copy.deepcopy(msg.env.body)

    def m_body_wrong_type(self) -> list[Case]:
        kind, name, value = self.pick("body_wrong_type", BODY_CASES)
        msg, body = self.body_message((kind,))
        body[name] = value
        return [self.resigned("body_wrong_type", msg, body, REFUSE_BODY)]

    def m_body_missing_field(self) -> list[Case]:
        msg, body = self.body_message()
        del body[self.rng.choice(sorted(SCHEMA[msg.kind]))]
        return [self.resigned("body_missing_field", msg, body, REFUSE_BODY)]

    def m_body_extra_field(self) -> list[Case]:
        # Bodies tolerate fields they do not know (a newer sender); the parser must still not crash.
        msg, body = self.body_message((*SCHEMA, "round"))
        body[self.rng.choice(["zz", "extra", "act2"])] = self.rng.choice([1, "x", [1, 2], {"a": None}, b"\x00" * 100])
        return [self.resigned("body_extra_field", msg, body, ANY)]

    def m_deep_nesting(self) -> list[Case]:
        """Nesting the unpacker accepts (up to ~1,000 levels), where the parser expects a scalar, map or tensor."""
        msg, body = self.body_message()
        deep = nested(self.rng.randint(100, 1000), self.rng.random() < 0.5)
        spots = {"join": [("profile", "class"), ("profile", "block_s")], "act": [("timings", "forward_s")]}
        spot = self.rng.choice([(self.rng.choice(sorted(SCHEMA[msg.kind])),), *spots.get(msg.kind, [])])
        _at(body, spot[:-1])[spot[-1]] = deep
        return [self.resigned("deep_nesting", msg, body, REFUSE_BODY)]

    # ------------------------------------------------------------------ tensors

    def m_tensor(self) -> list[Case]:
        kind, slot, sub = self.pick("tensor", TENSOR_MUTATIONS)
        msg, body = self.body_message((kind,))
        path = (slot,) if slot else self.rng.choice(tensor_paths(msg.kind, body))
        t = _at(body, path)
        is_float = t["dtype"] in FLOAT_WIRE_DTYPES
        if sub == "nonfinite" and not is_float:
            sub = "data_len"
        expect = REFUSE_BODY
        if sub == "shape":
            shape = list(t["shape"])
            change = self.rng.choice(["grow", "shrink", "add_dim", "drop_dim", "swap"])
            if change == "swap" and len(set(shape)) > 1:
                shape.reverse()
            elif change == "add_dim":
                shape.insert(self.rng.randrange(len(shape) + 1), 1)
            elif change == "drop_dim" and len(shape) > 1:
                shape.pop(self.rng.randrange(len(shape)))
            else:
                i = self.rng.randrange(len(shape))
                shape[i] = shape[i] - 1 if change == "shrink" and shape[i] > 0 else shape[i] + 1
            t["shape"] = shape
        elif sub == "dtype":
            choices = [d for d in (*WIRE_DTYPES, "float64", "fp8", "int16", "FP32") if d != t["dtype"]]
            new = self.rng.choice([*choices, 3, None, b"fp32"])
            if {new, t["dtype"]} == {"fp16", "bf16"}:
                expect = ANY  # the same bytes read as another 2-byte float: nothing on the wire can tell
            t["dtype"] = new
        elif sub == "data_len":
            k = self.rng.randint(1, 64)
            t["data"] = t["data"][:-k] if self.rng.random() < 0.5 and len(t["data"]) >= k else t["data"] + bytes(k)
        elif sub == "nonfinite":
            poison(self.rng, t)
        elif sub == "extra_key":
            t[self.rng.choice(["bias", "scale2", "scale" if t["dtype"] != "int8" else "zero"])] = b""
        elif sub == "missing_key":
            del t[self.rng.choice(sorted(t))]
        elif sub == "huge_dims":  # no data at all, but a dim that overflows every integer type downstream
            t["shape"] = [0, self.rng.choice([2**40, 2**63, 2**64 - 1]), *t["shape"][2:]]
            t["data"] = b""
            if t["dtype"] == "int8":
                t["scale"] = b""
        elif sub == "not_map":
            _at(body, path[:-1])[path[-1]] = self.rng.choice([[t], list(t.items()), "tensor", None])
        elif sub == "retyped":  # a consistent tensor of the other kind (ints for floats): only its dtype is wrong
            zeros = torch.zeros(t["shape"], dtype=torch.int64 if is_float else torch.float32)
            wire = self.rng.choice(INT_WIRE_DTYPES if is_float else FLOAT_WIRE_DTYPES)
            _at(body, path[:-1])[path[-1]] = encode_tensor(zeros, wire)
        else:  # hostile_field: huge or deep values where dtype or shape belong (error messages must stay small)
            name, value = self.pick(
                "hostile", [(n, v) for n in ("dtype", "shape") for v in ("8 MiB", "deep", "x" * 4000)]
            )
            t[name] = bytes(8 << 20) if value == "8 MiB" else DEEP_IN_BODY if value == "deep" else value
        return [self.resigned(f"tensor_{sub}", msg, body, expect)]

    def m_act_labels(self) -> list[Case]:
        msg, body = self.body_message(("act",))
        set_int32(self.rng, body["labels"], self.rng.choice([VOCAB, VOCAB + 1000, -1, -101, 2**31 - 1, -(2**31)]))
        return [self.resigned("labels_outside_vocab", msg, body, REFUSE_BODY)]

    def m_act_lengths(self) -> list[Case]:
        msg, body = self.body_message(("act",))
        width = body["act"]["shape"][1]
        set_int32(self.rng, body["lengths"], self.rng.choice([0, width + 1, -1, 2**31 - 1]))
        return [self.resigned("lengths_outside_1_T", msg, body, REFUSE_BODY)]

    def m_act_oversize(self) -> list[Case]:
        grow_batch = self.rng.random() < 0.5
        b = self.rng.randint(MAX_B + 1, MAX_B + 4) if grow_batch else self.rng.randint(1, MAX_B)
        t = self.rng.randint(1, MAX_T) if grow_batch else self.rng.randint(MAX_T + 1, MAX_T + 16)
        msg = self.message("act")
        body, _ = self.body_act(b, t)
        return [self.resigned("act_batch_or_T_too_big", msg, body, REFUSE_BODY)]

    def m_field_range(self) -> list[Case]:
        """Values of the right type that the parser must still refuse."""
        kind, path, value = self.pick("field_range", RANGE_CASES)
        msg, body = self.body_message((kind,))
        if callable(value):
            value = value(body)
        _at(body, path[:-1])[path[-1]] = value
        return [self.resigned("field_range", msg, body, REFUSE_BODY)]

    # ------------------------------------------------------------------ chunks

    def chunk_env(self, msg: Msg, body: dict[str, Any], seq: int | None = None) -> Envelope:
        return replace(msg.env, type=Kind.CHUNK, seq=seq or self.next_seq(), body=body)

    def chunk_body(self, count: int = 2, index: int = 0, data: bytes = b"part") -> dict[str, Any]:
        return {"id": f"{self.sid}:{self.next_seq()}", "index": index, "count": count, "data": data}

    def m_chunks_valid(self) -> list[Case]:
        msg = self.message(self.rng.choice(["act", "grad", "assign", "adapter", "join"]))
        full = self.encode(msg)
        max_bytes = max(4096, len(full) // self.rng.randint(2, 8) + 512)
        count = math.ceil(len(full) / (max_bytes - 512))
        header = replace(msg.env, type=Kind.CHUNK, seq=self.next_seq(count), body={})
        parts = chunk_payload(full, max_bytes, header, key=KEY if self.keyed else None, topic=msg.topic)
        order = list(range(len(parts)))
        if self.rng.random() < 0.5:
            self.rng.shuffle(order)
        cases = [self.case("chunks_valid", msg, parts[i], HELD) for i in order[:-1]]
        if cases and self.rng.random() < 0.5:  # a redelivered chunk (QoS 1) before the last one
            cases.append(self.case("chunk_redelivered", msg, cases[0].payload, REFUSE_LINK, reason="duplicate"))
        return [*cases, self.case("chunks_valid", msg, parts[order[-1]], ACCEPT)]

    def m_chunk_bad_field(self) -> list[Case]:
        msg = self.message()
        body = self.chunk_body(count=self.rng.randint(1, 5))
        name = self.rng.choice(["id", "index", "count", "data", "missing"])
        bad = {
            "id": [5, None, b"id", ["id"]],
            "index": [body["count"], -1, 2**20, "0", 1.5, None, True],
            "count": [0, -1, 2**20 + 1, 2**40, "2", None, 1.5, True],
            "data": ["text", None, 5, ["x"]],
        }
        if name == "missing":
            del body[self.rng.choice(sorted(body))]
        else:
            body[name] = self.rng.choice(bad[name])
        payload = self.encode(msg, self.chunk_env(msg, body))
        return [self.case("chunk_bad_field", msg, payload, REFUSE_LINK, reason="bad_schema")]

    def m_chunk_count_mismatch(self) -> list[Case]:
        msg = self.message()
        first = self.chunk_body(count=3)
        second = {**first, "index": 1, "count": self.rng.choice([2, 4, 1 << 20])}
        return [
            self.case("chunk_count_mismatch", msg, self.encode(msg, self.chunk_env(msg, first)), HELD),
            self.case(
                "chunk_count_mismatch",
                msg,
                self.encode(msg, self.chunk_env(msg, second)),
                REFUSE_LINK,
                reason="bad_chunk",
            ),
        ]

    def m_chunk_million(self) -> list[Case]:
        """A chunk announcing a million parts: held (nothing is allocated for the parts not there)."""
        msg = self.message()
        body = self.chunk_body(count=1_000_000, index=self.rng.randrange(1_000_000), data=self.rng.randbytes(512))
        cases = [self.case("chunk_1e6_parts", msg, self.encode(msg, self.chunk_env(msg, body)), HELD)]
        if self.rng.random() < 0.5:
            more = {**body, "index": (body["index"] + 1) % 1_000_000}
            cases.append(self.case("chunk_1e6_parts", msg, self.encode(msg, self.chunk_env(msg, more)), HELD))
        return cases

    def m_chunk_bad_inner(self) -> list[Case]:
        """One chunk whose content is garbage, another chunk, or a message from someone else."""
        msg = self.message()
        variant = self.rng.choice(["garbage", "truncated", "chunk", "sender", "job", "unsigned"])
        inner, reason = self.encode(msg), "bad_chunk"
        if variant == "garbage":
            inner, reason = self.rng.randbytes(self.rng.randint(1, 300)), None
        elif variant == "truncated":
            inner, reason = inner[: self.rng.randrange(len(inner))], None
        elif variant == "chunk":
            inner = self.encode(msg, self.chunk_env(msg, self.chunk_body(count=1)))
        elif variant == "sender":
            other = "a2" if msg.env.sender != "a2" else "a3"
            inner = self.encode(msg, replace(msg.env, sender=other))
        elif variant == "job":
            inner = self.encode(msg, replace(msg.env, job="otherjob"))
        else:
            inner = self.encode(msg, key=None)
            if self.keyed:
                reason = "unauthenticated"
            else:
                return [self.case("chunk_bad_inner", msg, self.wrap(msg, inner), ACCEPT)]
        return [self.case("chunk_bad_inner", msg, self.wrap(msg, inner), REFUSE_LINK, reason=reason)]

    def wrap(self, msg: Msg, inner: bytes) -> bytes:
        return self.encode(msg, self.chunk_env(msg, self.chunk_body(count=1, data=inner)))

    # ------------------------------------------------------------------ authentication and routing

    def m_auth(self) -> list[Case]:
        variant = self.rng.choice(["missing", "wrong_key", "wrong_topic", "stale", "short_tag", "tampered"])
        msg = self.message(self.rng.choice([k for k in KINDS if TYPE_OF[k] != Kind.STATUS]))
        reason = {"missing": "unauthenticated", "stale": "stale"}.get(variant, "bad_auth")
        if variant == "missing":
            payload = self.encode(msg, key=None)
        elif variant == "wrong_key":
            payload = self.encode(msg, key=OTHER_KEY)
        elif variant == "wrong_topic":
            other = Msg(msg.kind, TOPICS.job_topic("metrics"), msg.env)
            payload = self.encode(other, key=KEY)
        elif variant == "stale":
            payload = self.encode(msg, replace(msg.env, ts=self.now + self.rng.choice([-1, 1]) * 3600), key=KEY)
        elif variant == "short_tag":
            sealed = self.encode(msg, key=KEY)
            payload = sealed[:8] + sealed[8 : 8 + self.rng.randrange(32)] + sealed[SEAL_BYTES:]
        else:
            sealed = self.encode(msg, key=KEY)
            fields = raw_fields(sealed)
            fields["round"] += 1  # still a valid message: only the tag can tell
            payload = sealed[:SEAL_BYTES] + compress(msgpack.packb(fields, use_bin_type=True))
        if not self.keyed and variant == "short_tag":  # the frame starts inside the cut tag: not a frame
            return [self.case(f"auth_{variant}", msg, payload, REFUSE_LINK)]
        if not self.keyed:  # without a key nobody checks tags
            return [self.case(f"auth_{variant}", msg, payload, ACCEPT)]
        return [self.case(f"auth_{variant}", msg, payload, REFUSE_LINK, reason=reason)]

    def m_route(self) -> list[Case]:
        variant = self.rng.choice(["wrong_sender", "wrong_job", "bad_topic", "empty", "replay"])
        msg = self.message()
        if variant == "wrong_sender":
            sender = self.rng.choice([s for s in (*AGENTS, COORDINATOR) if s != msg.env.sender])
            payload = self.encode(msg, replace(msg.env, sender=sender))
            return [self.case("wrong_sender", msg, payload, REFUSE_LINK, reason="wrong_sender")]
        if variant == "wrong_job":
            payload = self.encode(msg, replace(msg.env, job="otherjob"))
            return [self.case("wrong_job", msg, payload, REFUSE_LINK, reason="wrong_job")]
        if variant == "bad_topic":
            topic = self.rng.choice(["splitft/v1/otherjob/round", f"{TOPICS.prefix}/agents/a1/unknown",
                                     f"{TOPICS.prefix}/agents/a+b/act", "splitft/v2/fuzz/round", ""])  # fmt: skip
            return [self.case("bad_topic", msg, self.encode(msg), REFUSE_LINK, reason="bad_topic", topic=topic)]
        if variant == "empty":
            return [self.case("empty_payload", msg, b"", REFUSE_LINK, reason="empty")]
        good = self.encode(msg)
        return [self.case("valid", msg, good, ACCEPT), self.case("replay", msg, good, REFUSE_LINK, reason="duplicate")]


# --------------------------------------------------------------------------- helpers of the mutations


def _at(body: Any, path: tuple[str, ...] | list[str]) -> Any:
    for name in path:
        body = body[name]
    return body


def tensor_paths(kind: str, body: dict[str, Any]) -> list[tuple[str, ...]]:
    if kind == "act":
        return [("act",), ("labels",), ("lengths",)]
    if kind == "grad":
        return [("grad",)]
    return [("adapter", name) for name in sorted(body["adapter"])]


def poison(rng: random.Random, t: dict[str, Any]) -> None:
    """Put a NaN or an infinity into a float tensor (into the scale of an int8 one, or a negative scale)."""
    value = rng.choice([NAN, INF, -INF])
    if t["dtype"] == "int8":
        scale = bytearray(t["scale"])
        k = rng.randrange(len(scale) // 4)
        scale[4 * k : 4 * k + 4] = struct.pack("<f", rng.choice([value, -1.0]))
        t["scale"] = bytes(scale)
        return
    size, raw = {"fp32": (4, struct.pack("<f", value)), "fp16": (2, struct.pack("<e", value)),
                 "bf16": (2, struct.pack("<f", value)[2:])}[t["dtype"]]  # fmt: skip
    data = bytearray(t["data"])
    k = rng.randrange(len(data) // size)
    data[size * k : size * (k + 1)] = raw
    t["data"] = bytes(data)


def set_int32(rng: random.Random, t: dict[str, Any], value: int) -> None:
    data = bytearray(t["data"])
    k = rng.randrange(len(data) // 4)
    data[4 * k : 4 * k + 4] = struct.pack("<i", value)
    t["data"] = bytes(data)


def _drop_adapter_name(body: dict[str, Any]) -> dict[str, Any]:
    state = dict(body["adapter"])
    state.pop(sorted(state)[0])
    return state


#: (path in the body, a value of the right type that is still wrong); a callable value is computed from the body
RANGE: dict[str, list[tuple[Any, ...]]] = {
    "act": [
        (("timings",), {"t": NAN}),
        (("timings",), {"t": "1"}),
        (("timings",), {"t": [1.0]}),
        (("timings",), {"t": True}),
        (("timings",), {"t": INF}),
        (("timings",), {f"k{i}": 1.0 for i in range(65)}),
    ],
    "grad": [(("tokens",), -1), (("tokens",), 2**41), (("loss",), NAN), (("loss",), -INF)],
    "adapter": [
        (("tokens",), 0),
        (("samples",), 0),
        (("tokens",), 2**41),
        (("timings",), {"t": NAN}),
        (("adapter",), _drop_adapter_name),
        (("adapter",), lambda body: {**body["adapter"], "h.9.extra": body["adapter"][sorted(body["adapter"])[0]]}),
        (("adapter",), {}),
    ],
    "join": [
        (("data_samples",), 0),
        (("data_samples",), -5),
        (("data_tokens",), 2**49),
        (("profile",), {f"k{i}": 1 for i in range(65)}),
        (("profile", "block_s"), "fast"),
        (("profile", "block_s"), NAN),
        (("profile", "block_s"), INF),
        (("profile", "block_s"), -1.0),
        (("profile", "block_tokens"), True),
        (("profile", "uplink_mbps"), INF),
        (("profile", "rtt_ms"), "30"),
        (("profile", "usable_mb"), [1]),
        (("profile", "memory_available_mb"), -4000),
        (("profile", "class"), {"k": 1}),
        (("profile", "class"), b"\x00" * 100),
        (("profile", "load_1m"), NAN),
        (("fingerprint",), ""),
        (("usable_samples",), -1),
        (("usable_samples",), 1.5),
    ],
    "status": [(("state",), "busy"), (("state",), ""), (("state",), "ONLINE")],
    "coordinator_status": [(("state",), "busy"), (("state",), "")],
    "notice": [(("event",), "kicked"), (("event",), "")],
    "assign": [
        (("fingerprint",), "fedcba9876543210"),  # another model (its name may differ: paths do)
        (("cut",), 0),
        (("cut",), LAYERS),
        (("cut",), -1),
        (("ranks",), []),
        (("ranks",), lambda body: [*body["ranks"], 4]),
        (("ranks",), lambda body: [0] * body["cut"]),
        (("ranks",), lambda body: [5000] * body["cut"]),
        (("ranks",), lambda body: [4.0] * body["cut"]),
        (("ranks",), lambda body: [True] * body["cut"]),
        (("ranks",), lambda body: [12] * body["cut"]),  # valid ranks, but not those of the adapters sent
        (("lora", "r"), "x"),
        (("lora", "r"), 0),
        (("lora", "alpha_per_rank"), -1.0),
        (("lora", "alpha_per_rank"), NAN),
        (("lora", "dropout"), 1.5),
        (("lora", "bogus"), 1),
        (("optimizer", "name"), "lion"),
        (("optimizer", "lr"), -1.0),
        (("optimizer", "lr"), NAN),
        (("optimizer", "lr"), 0),
        (("optimizer", "momentum"), "x"),
        (("optimizer", "bogus"), 1),
        (("local_steps",), 0),
        (("local_steps",), 10**6),
        (("batch_size",), 0),
        (("batch_size",), 5000),
        (("max_length",), 4),
        (("max_length",), 2**21),
        (("step_timeout_s",), 0.0),
        (("step_timeout_s",), -1.0),
        (("step_timeout_s",), 1e8),
        (("wire_dtype",), "fp64"),
        (("adapter_wire_dtype",), "int32"),
        (("adapter",), {}),
        (("adapter",), lambda body: {n: {**t, "dtype": "int32"} for n, t in body["adapter"].items()}),
    ],
}


RANGE_CASES = [(kind, path, value) for kind, entries in RANGE.items() for path, value in entries]


# --------------------------------------------------------------------------- the run


@dataclass
class Tally:
    payloads: Counter[str] = field(default_factory=Counter)  # per mutation kind
    kinds: Counter[str] = field(default_factory=Counter)  # per message type
    link_reasons: Counter[str] = field(default_factory=Counter)
    parser_reasons: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    benign_flips: int = 0  # byte mutations that left the message as it was (accepted, rightly)
    largest_legit: int = 0  # decoded size of the largest message that had to be accepted


def make_link(name: str, keyed: bool) -> Link:
    settings = BrokerSettings(auth_key=KEY if keyed else None)
    return Link(settings, TOPICS, name, [])


def run_mode(keyed: bool, seed: int, n: int, tally: Tally) -> int:
    fuzzer = Fuzzer(seed, keyed, NOW)
    loop = asyncio.new_event_loop()
    links = {"coordinator": make_link(COORDINATOR, keyed), "agent": make_link("a1", keyed)}
    senders = {"coordinator": len(AGENTS), "agent": 1}  # the only senders a topic lets through
    fed = Counter[str]()
    held = Counter[str]()
    accepted = Counter[str]()
    for case in fuzzer.cases(n):
        reader = "coordinator" if case.kind in UPSTREAM else "agent"
        link = links[reader]
        fed[reader] += 1
        tally.payloads[case.mutation] += 1
        tally.kinds[case.kind] += 1
        where = f"{'keyed' if keyed else 'open'} case {sum(fed.values())} ({case.mutation} of {case.kind})"

        # (a) the Link: never raises, and every payload ends exactly one way
        before = Counter(link.rejected)
        loop.run_until_complete(link._accept(case.topic, case.payload))  # (a link not entered decodes inline)
        refused = link.rejected - before
        refused.pop(Refusal.INCOMPLETE, None)  # an earlier chunked message given up for this one's sake
        queued = []
        while link.pending():
            queued.append(link._queue.get_nowait())
        assert sum(refused.values()) + len(queued) <= 1, where
        assert "decode_error" not in refused, f"{where}: the Link's catch-all caught a decoder bug"
        reassembler = link._reassembler
        assert reassembler.pending <= min(reassembler.max_pending, reassembler.per_sender * senders[reader]), where
        if queued:
            outcome, link_reason = "accepted", None
            accepted[reader] += 1
        elif refused:
            (link_reason,) = refused
            outcome = "refused"
            tally.link_reasons[link_reason] += 1
        else:
            outcome, link_reason = "held", None
            held[reader] += 1
        tally.outcomes[outcome] += 1

        # (b) the body parser of its type, on what the payload holds (whatever the Link said of it)
        try:
            direct: Envelope | None = decode_envelope(case.payload)
        except WireError:
            direct = None
        if outcome == "held":
            assert direct is not None and direct.type == Kind.CHUNK, f"{where}: nothing but a chunk may be held"
        env = queued[0].envelope if queued else direct
        parsed: bool | None = None
        parser = PARSERS[case.kind]
        if env is not None and env.type != Kind.CHUNK and parser is not None:
            try:
                parser(env, case.ctx)
                parsed = True
            except WireError as exc:
                parsed = False
                tally.parser_reasons[exc.reason] += 1
            except Exception as exc:
                raise AssertionError(f"{where}: the parser raised {type(exc).__name__}: {exc!s:.200}") from exc

        # what each mutation must come to
        if case.expect == ACCEPT:
            assert outcome == "accepted" and parsed is not False, f"{where}: a valid message was refused ({refused})"
            if direct is not None and direct.type != Kind.CHUNK:
                tally.largest_legit = max(tally.largest_legit, zstandard.frame_content_size(unseal(case.payload)[1]))
        elif case.expect == HELD:
            assert outcome == "held", f"{where}: expected to be held, got {outcome} {refused}"
        elif case.expect == REFUSE_WIRE:
            if direct is not None and case.original is not None and direct == case.original:
                tally.benign_flips += 1  # e.g. two flips of the same bit: the message is the one that was sent
                # (with a key, a flip in the tag leaves the message whole but is refused: the tag no longer fits)
                keyed_flip = link.settings.auth_key is not None and link_reason == "bad_auth"
                assert outcome == "accepted" or keyed_flip, where
            else:
                assert direct is None, f"{where}: a broken payload decoded: {direct!s:.300}"
                assert outcome == "refused", where
        elif case.expect == REFUSE_BODY:
            assert direct is not None, f"{where}: the mutation did not reach the body"
            assert parsed is False, f"{where}: the parser accepted a broken body: {direct.body!s:.300}"
        elif case.expect == REFUSE_LINK:
            assert outcome == "refused", f"{where}: expected the Link to refuse ({case.reason}), got {outcome}"
            assert case.reason is None or link_reason == case.reason, f"{where}: {link_reason} != {case.reason}"

    # every payload: accepted, refused with one reason, or held as a partial chunk
    for reader, link in links.items():
        given_up = link.rejected[Refusal.INCOMPLETE]  # of those held, the partial messages dropped later
        assert sum(link.rejected.values()) - given_up + accepted[reader] + held[reader] == fed[reader], reader
        assert given_up <= held[reader], reader
    loop.close()
    return sum(fed.values())


@pytest.fixture
def quiet_link_logs() -> Iterator[None]:
    """The Link logs every refusal; thousands of warnings would only fill pytest's log capture."""
    logger = logging.getLogger("splitft.shared.wire.link")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@pytest.mark.usefixtures("quiet_link_logs")
def test_fuzz_every_message_type_through_link_and_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    # A frozen clock for check_auth: the same seed then gives the same payloads, byte for byte.
    monkeypatch.setattr(envelope, "time", SimpleNamespace(time=lambda: NOW, monotonic=time.monotonic))
    tally = Tally()
    started = time.perf_counter()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        total = run_mode(False, SEED, PAYLOADS_PER_MODE, tally)
        total += run_mode(True, SEED + 1, PAYLOADS_PER_MODE, tally)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started

    print(f"\nfuzz: {total} payloads in {elapsed:.1f} s, peak traced memory {peak / 2**20:.1f} MiB")
    print(f"  largest legitimate message: {tally.largest_legit / 2**10:.0f} KiB decoded")
    print(f"  outcomes: {dict(tally.outcomes)}; byte mutations that changed nothing: {tally.benign_flips}")
    print(f"  per mutation: {dict(sorted(tally.payloads.items()))}")
    print(f"  per message type: {dict(sorted(tally.kinds.items()))}")
    print(f"  Link refusals per reason: {dict(sorted(tally.link_reasons.items()))}")
    print(f"  parser refusals per reason: {dict(sorted(tally.parser_reasons.items()))}")

    assert total >= 1000
    assert set(tally.kinds) == set(KINDS)
    names = {"valid", "random_bytes", "truncate", "bitflip_single", "bitflip_multi", "append_bytes", "zstd_declares_gbs",
             "zstd_bomb_gb", "zstd_bomb_mb", "zstd_size_lie", "msgpack_raw", "env_wrong_type", "env_missing_field",
             "body_wrong_type", "body_missing_field", "deep_nesting", "labels_outside_vocab", "lengths_outside_1_T",
             "act_batch_or_T_too_big", "field_range", "chunks_valid", "chunk_bad_field", "chunk_1e6_parts",
             "chunk_bad_inner", "wrong_sender", "replay"}  # fmt: skip
    assert names <= set(tally.payloads), names - set(tally.payloads)
    assert {n for n in tally.payloads if n.startswith("tensor_")} >= {"tensor_shape", "tensor_dtype", "tensor_data_len",
                                                                       "tensor_nonfinite", "tensor_huge_dims"}  # fmt: skip
    # Bounded memory. The largest hostile payloads that decoding must take (their declared size is under the
    # default 256 MiB limit, and they do expand to it) hold 8 MiB, and one payload is held at most about five
    # times at once (the fuzzer's copy, zstd's output, msgpack's copy, the keyed Link's re-pack for the tag,
    # the parser's view): about 40 MiB, which is what this run measures. A decoder that allocated what a
    # frame declares rather than what it holds (256 MiB for a 45-byte frame), a table for the million-part
    # chunk, partial messages beyond the reassembler's bound or megabyte error messages go past 64 MiB.
    assert peak < (64 << 20) + tally.largest_legit, f"peak traced memory {peak / 2**20:.1f} MiB"


def test_fuzzer_is_deterministic() -> None:
    """The same seed gives the same payloads: a failure can be replayed."""
    a = [c.payload for _, c in zip(range(60), Fuzzer(SEED, True, 1e9).cases(60), strict=False)]
    b = [c.payload for _, c in zip(range(60), Fuzzer(SEED, True, 1e9).cases(60), strict=False)]
    assert a == b


#: LoRA settings in an assignment that parse_assignment (agent/runtime.py) must refuse with a WireError
#: (LoraSettings checks them); each was once accepted or answered with another error.
ASSIGNMENT_LORA_CASES = [
    ("lora", "r", True),  # a boolean rank
    ("lora", "alpha_per_rank", INF),  # infinite LoRA scaling: NaN training
    ("lora", "targets", [1, 2]),  # module names that are not strings
    ("lora", "targets", "q_proj"),  # a string where PEFT takes a list (a string is a regular expression there)
    ("lora", "r", nested(990, False)),  # RecursionError from the repr in LoraSettings' error message
]


@pytest.mark.parametrize(
    ("section", "name", "value"),
    ASSIGNMENT_LORA_CASES,
    ids=["bool_r", "inf_alpha", "int_targets", "str_targets", "deep_r"],
)
def test_assignment_lora_settings_are_checked(section: str, name: str, value: Any) -> None:
    fuzzer = Fuzzer(SEED, False, 0.0)
    msg = fuzzer.message("assign")
    msg.env.body[section][name] = value
    with pytest.raises(WireError):
        take_assignment(msg.env)
