"""Envelopes, message bodies and chunk reassembly: pure functions, hostile input."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import msgpack
import pytest
import torch
import zstandard

from splitft.shared.errors import Refusal, WireError
from splitft.shared.job.config import OptimizerSettings
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.lora import LoraSettings
from splitft.shared.wire.codec import encode_tensor, pack, unpack
from splitft.shared.wire.control import (
    Assignment,
    Join,
    assign_body,
    join_body,
    parse_assign,
    parse_coordinator_status,
    parse_join,
)
from splitft.shared.wire.envelope import (
    SEAL_BYTES,
    Envelope,
    Reassembler,
    check_tag,
    chunk_payload,
    decode_envelope,
    encode_envelope,
    seal,
    unseal,
)
from splitft.shared.wire.messages import act_body, grad_body, parse_act, parse_grad
from splitft.shared.wire.topics import Kind, Topics

GOOD = Envelope(type=Kind.ACT, job="j", sender="a1", sid="s", seq=1, round=2, step=3, body={"x": 1})


def raw_envelope(**changes: object) -> bytes:
    fields = {"v": 2, "type": "act", "job": "j", "sender": "a1", "sid": "s", "seq": 1, "round": 0, "step": 0,
              "corr": None, "ts": 0.0, "body": {}}  # fmt: skip
    fields.update(changes)
    return pack(fields)


def test_envelope_roundtrip() -> None:
    assert decode_envelope(encode_envelope(GOOD)) == GOOD


@pytest.mark.parametrize(
    ("changes", "reason", "detail"),
    [
        ({"type": [1]}, "bad_schema", "unknown message type"),  # unhashable: must be refused, not crash the reader
        ({"type": "nope"}, "bad_schema", "unknown message type 'nope'"),
        ({"v": 1}, "bad_version", "protocol version 1"),  # (version 1's keys differ: the version is named)
        ({"v": 3}, "bad_version", "protocol version 3"),
        ({"v": [1]}, "bad_version", "protocol version [1]"),
        ({"job": ""}, "bad_schema", "job must be a non-empty string"),
        ({"seq": 1.5}, "bad_schema", "seq must be an integer"),
        ({"round": True}, "bad_schema", "round must be an integer"),
        ({"ts": float("nan")}, "bad_schema", "ts must be a finite number"),
        ({"auth": None}, "bad_schema", "1 unknown"),  # version 1's tag field
        ({"body": []}, "bad_schema", "body must be a map"),
        ({"corr": 3}, "bad_schema", "corr must be a string or nil"),
        ({"extra": 1}, "bad_schema", "1 unknown"),
    ],
)
def test_bad_envelopes(changes: dict, reason: str, detail: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(WireError) as info:
        decode_envelope(raw_envelope(**changes))
    assert info.value.reason == reason and detail in info.value.detail, info.value


def test_a_sealed_frame_is_checked_before_it_is_decompressed() -> None:
    """Version 2: the tag covers the topic and the compressed frame, in a zstd skippable frame in front of it."""
    key, topic = bytes(range(32)), "splitft/j/agents/a1/act"
    sealed = encode_envelope(GOOD, key=key, topic=topic)
    tag, frame = unseal(sealed)
    assert tag is not None and len(tag) == 32 and frame == encode_envelope(GOOD)
    assert len(sealed) == len(frame) + SEAL_BYTES
    check_tag(tag, frame, topic, key)
    assert decode_envelope(sealed) == GOOD  # a member without the key reads past the tag
    assert unseal(frame) == (None, frame)
    for args, reason in [
        ((None, frame, topic, key), "unauthenticated"),
        ((tag, frame, topic + "x", key), "bad_auth"),
        ((tag, frame, topic, bytes(32)), "bad_auth"),
        ((tag[:-1] + bytes([tag[-1] ^ 1]), frame, topic, key), "bad_auth"),
        ((tag, frame[:-1] + bytes([frame[-1] ^ 1]), topic, key), "bad_auth"),
    ]:
        with pytest.raises(WireError) as info:
            check_tag(*args)  # type: ignore[arg-type]
        assert info.value.reason == reason
    # The check never touches the frame's content: a zstd bomb with a wrong tag costs one hash.
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    with pytest.raises(WireError, match="bad_auth"):
        check_tag(*unseal(seal(bytes(32), topic, bomb)), topic, key)


def test_a_frame_without_a_declared_size_is_streamed_to_a_cap() -> None:
    raw = msgpack.packb({"x": bytes(100_000)}, use_bin_type=True)
    stream = zstandard.ZstdCompressor().compressobj()
    frame = stream.compress(raw) + stream.flush()
    assert zstandard.frame_content_size(frame) == -1
    assert unpack(frame) == {"x": bytes(100_000)}
    assert unpack(frame, cap=len(raw)) == {"x": bytes(100_000)}
    for data, cap, reason in [(frame, len(raw) - 1, "too_large"), (frame + b"xx", None, "bad_compression"),
                              (frame[:-3], None, "bad_compression")]:  # fmt: skip
        with pytest.raises(WireError) as info:
            unpack(data, cap=cap)
        assert info.value.reason == reason
    with pytest.raises(WireError) as info:
        unpack(pack({"x": bytes(100_000)}), cap=1000)  # a declared size past the cap: refused unread
    assert info.value.reason == "too_large"


def test_an_envelope_must_be_a_map() -> None:
    with pytest.raises(WireError) as info:
        decode_envelope(pack([1, 2]))
    assert info.value.reason == "bad_schema" and "must be a map, got list" in info.value.detail


def test_refusal_reasons_are_the_documented_codes() -> None:
    """Every reason a member counts is a Refusal, and OPERATIONS.md's table explains each one, no more."""
    table = (Path(__file__).parents[1] / "OPERATIONS.md").read_text().split("### Refusal reasons", 1)[1]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M)
    assert documented == [r.value for r in Refusal]
    with pytest.raises(ValueError):
        WireError("no_such_reason", "a bug")  # type: ignore[arg-type]
    counted: Counter[str] = Counter()
    counted[WireError(Refusal.STALE, "x").reason] += 1
    assert json.dumps(counted) == '{"stale": 1}'  # counts serialise under the plain code


def test_act_body_checks_shapes_lengths_and_labels() -> None:
    hidden, labels = torch.randn(2, 5, 8), torch.randint(0, 100, (2, 5))
    body = msgpack.unpackb(msgpack.packb(act_body(hidden, labels, torch.tensor([5, 3]), "fp32", {"t": 1.0})))
    act = parse_act(body, hidden_size=8, max_batch=4, max_length=16, vocab_size=100)
    assert torch.equal(act.hidden, hidden) and act.attention_mask.tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    with pytest.raises(WireError, match="outside"):
        parse_act(body, hidden_size=8, max_batch=1, max_length=16, vocab_size=100)
    with pytest.raises(WireError, match="does not match"):
        parse_act(body, hidden_size=16, max_batch=4, max_length=16, vocab_size=100)
    with pytest.raises(WireError, match="token ids"):
        parse_act(body, hidden_size=8, max_batch=4, max_length=16, vocab_size=50)  # labels up to 99
    bad = act_body(hidden, labels, torch.tensor([6, 3]), "fp32", {})
    with pytest.raises(WireError, match="lengths"):
        parse_act(bad, hidden_size=8, max_batch=4, max_length=16, vocab_size=100)


def chunks_of(payload: bytes, seq: int = 1, sender: str = "a1") -> list[dict]:  # type: ignore[type-arg]
    header = Envelope(type="chunk", job="j", sender=sender, sid="s", seq=seq)
    return [decode_envelope(c).body for c in chunk_payload(payload, 4096, header)]


def test_reassembly_in_any_order_with_redelivery() -> None:
    payload = bytes(range(256)) * 100
    parts = chunks_of(payload)
    assert len(parts) > 3
    r = Reassembler(max_message_bytes=1 << 20)
    out = [r.add("a1", b) for b in [parts[2], *parts[::-1]]]
    assert out.count(None) == len(out) - 1 and payload in out and r.pending == 0


def test_reassembly_bounds() -> None:
    payload = bytes(50_000)
    r = Reassembler(max_message_bytes=20_000)
    with pytest.raises(WireError, match="exceeds"):
        for b in chunks_of(payload):
            r.add("a1", b)
    r = Reassembler(max_message_bytes=1 << 20, per_sender=2, timeout_s=10)
    for seq in (1, 100, 200):  # a third unfinished message from one sender pushes out its first
        r.add("a1", chunks_of(payload, seq)[0], now=0.0)
    assert r.pending == 2 and r.dropped == 1
    r.add("a2", chunks_of(payload, 5, "a2")[0], now=5.0)
    r.expire(now=12.0)  # a1's messages saw no chunk for 12 s; a2's for 7 s
    assert r.pending == 1 and r.dropped == 3
    first = chunks_of(payload, 7)
    with pytest.raises(WireError, match="announces"):
        r.add("a3", first[0])
        r.add("a3", {**first[1], "count": 99})


def test_topic_names_are_strict() -> None:
    topics = Topics("job")
    assert topics.parse(topics.agent("a1", "act")).agent == "a1"  # type: ignore[union-attr]
    assert topics.parse("splitft/v1/job/agents/a\n/act") is None
    assert topics.parse("splitft/v1/other/round") is None
    with pytest.raises(ValueError, match="agent name"):
        topics.agent("a1\n", "act")


# --------------------------------------------------------------------------- regressions found by tests/test_fuzz.py


def test_integer_tensors_are_not_activations_or_gradients() -> None:
    """An int32 "activation" (fp32's byte length) decoded as an int64 hidden state; a gradient too."""
    labels, lengths = torch.randint(0, 100, (2, 5)), torch.tensor([5, 3])
    body = act_body(torch.randn(2, 5, 8), labels, lengths, "fp32", {})
    body["act"] = encode_tensor(torch.zeros(2, 5, 8, dtype=torch.int64), "int32")
    with pytest.raises(WireError) as info:
        parse_act(body, hidden_size=8, max_batch=4, max_length=16, vocab_size=100)
    assert info.value.reason == "bad_dtype"
    grad = {
        **grad_body(torch.randn(2, 5, 8), "fp32", 1.0, 8),
        "grad": encode_tensor(torch.ones(2, 5, 8).long(), "int64"),
    }
    with pytest.raises(WireError) as info:
        parse_grad(grad, (2, 5, 8))
    assert info.value.reason == "bad_dtype"


def test_booleans_are_not_numbers() -> None:
    """``ts: true`` passed the envelope check, and ``loss: true`` the number fields (a tuple of types)."""
    with pytest.raises(WireError) as info:
        decode_envelope(raw_envelope(ts=True))
    assert info.value.reason == "bad_schema" and "ts must be a finite number" in info.value.detail
    good = grad_body(torch.randn(1, 2, 3), "fp32", 1.0, 2)
    assert parse_grad(good, (1, 2, 3))[1:] == (1.0, 2)
    for field in ("loss", "tokens"):
        with pytest.raises(WireError, match="wrong type"):
            parse_grad({**good, field: True}, (1, 2, 3))


def test_hostile_envelope_values_give_short_errors() -> None:
    """The repr of a deeply nested ``type`` or ``v`` raised RecursionError, caught by the Link as a decoder bug."""
    deep: object = 0
    for _ in range(1015):
        deep = [deep]
    for changes in ({"type": deep}, {"v": deep}, {"type": "x" * 4000}, {"v": bytes(1 << 20)}):
        with pytest.raises(WireError) as info:
            decode_envelope(raw_envelope(**changes))
        assert len(str(info.value)) < 300


JOIN_PROFILE = {"cpu_logical": 4, "accelerator": "cpu", "class": "jetson-orin-nano", "block_s": 0.01,
                "block_tokens": 512, "emulated": True, "uplink_mbps": 20.0, "usable_mb": 2800, "maybe": None}  # fmt: skip


@pytest.mark.parametrize(
    "changes",
    [
        {"block_s": "fast"},
        {"block_s": float("nan")},
        {"uplink_mbps": float("inf")},
        {"rtt_ms": -1.0},
        {"block_tokens": True},
        {"usable_mb": [1]},
        {"class": {"nested": 1}},
        {"class": b"bytes"},
        {"class": "x" * 257},
        {"load": float("nan")},
        {"k" * 65: 1},
        {f"k{i}": 1 for i in range(60)},
    ],
    ids=str,
)
def test_join_profile_is_flat_and_its_numbers_are_numbers(changes: dict) -> None:  # type: ignore[type-arg]
    """Any value passed: the coordinator's estimates then computed with strings, NaN or infinities."""
    body = {"profile": JOIN_PROFILE, "data_samples": 3, "data_tokens": 300, "model": "tiny-gpt2", "version": "0.1",
            "fingerprint": "f1", "usable_samples": 2}  # fmt: skip
    join = parse_join(body)
    assert join == Join(JOIN_PROFILE, 3, 300, "tiny-gpt2", "0.1", "f1", 2) and join_body(join) == body
    for bad in ({"usable_samples": 4}, {"usable_samples": -1}, {"fingerprint": ""}, {"fingerprint": 3}):
        with pytest.raises(WireError) as info:
            parse_join({**body, **bad})
        assert info.value.reason == "bad_schema"
    with pytest.raises(WireError) as info:
        parse_join({**body, "profile": {**JOIN_PROFILE, **changes}})
    assert info.value.reason == "bad_schema" and "profile" in info.value.detail


def test_an_assignment_survives_the_wire() -> None:
    """assign_body and parse_assign are inverse, custom LoRA targets, defense and U layout included."""
    sent = Assignment(
        round=3, model="tiny-gpt2", fingerprint="f1", cut=2, ranks={0: 4, 1: 8, 11: 4}, corr="sid:3:2", attempt=2,
        lora=LoraSettings(r=8, r_cut=4, targets=("c_attn",)), adapter={"x": b"1"}, local_steps=2, batch_size=3,
        max_length=64, optimizer=OptimizerSettings(name="sgd", lr=0.5, momentum=0.9), wire_dtype="fp16",
        adapter_wire_dtype="fp32", step_timeout_s=30.0, seed=5, split="u", tail=1, report_loss=False,
        defense=DefenseSettings(clip=2.0, noise=0.1),
    )  # fmt: skip
    body = msgpack.unpackb(msgpack.packb(assign_body(sent)))
    assert parse_assign(3, body, "f1", 12, corr="sid:3:2") == sent
    with pytest.raises(WireError) as info:
        parse_assign(3, body, "f2", 12)  # another model, wherever it is kept
    assert info.value.reason == "bad_schema" and "this agent's model has fingerprint f2" in info.value.detail


def test_a_coordinator_status_is_checked_whole() -> None:
    """An agent takes the job's shapes from the coordinator's retained status: one bad field refuses all of it
    (retained garbage or a forgery must not become the job's shape)."""
    good = {"state": "online", "role": "coordinator", "max_length": 256, "batch_size": 2, "lora_rank": 16, "connection": 1,
            "chat_template": "auto"}  # fmt: skip
    status = parse_coordinator_status(good)
    assert (status.max_length, status.batch_size, status.lora_rank, status.chat_template) == (256, 2, 16, "auto")
    assert parse_coordinator_status({"state": "offline", "done": True}).done
    for changes in ({"max_length": "long"}, {"batch_size": 0}, {"lora_rank": True}, {"chat_template": ["x"]},
                    {"state": "sideways"}, {"done": "yes"}, {"lora_rank": None}):  # fmt: skip
        with pytest.raises(WireError) as info:
            parse_coordinator_status({**good, **changes})
        assert info.value.reason == "bad_schema"
    with pytest.raises(WireError):
        parse_coordinator_status({k: v for k, v in good.items() if k != "lora_rank"})
