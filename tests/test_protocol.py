"""Envelopes, message bodies and chunk reassembly: pure functions, hostile input."""

from __future__ import annotations

import msgpack
import pytest
import torch

from splitft.shared.codec import pack
from splitft.shared.errors import WireError
from splitft.shared.protocol import (
    ACT,
    Envelope,
    Reassembler,
    act_body,
    chunk_payload,
    decode_envelope,
    encode_envelope,
    parse_act,
)
from splitft.shared.topics import Topics

GOOD = Envelope(type=ACT, job="j", sender="a1", sid="s", seq=1, round=2, step=3, body={"x": 1})


def raw_envelope(**changes: object) -> bytes:
    fields = {"v": 1, "type": "act", "job": "j", "sender": "a1", "sid": "s", "seq": 1, "round": 0, "step": 0,
              "corr": None, "ts": 0.0, "auth": None, "body": {}}  # fmt: skip
    fields.update(changes)
    return pack(fields)


def test_envelope_roundtrip() -> None:
    assert decode_envelope(encode_envelope(GOOD)) == GOOD


@pytest.mark.parametrize(
    "changes",
    [
        {"type": [1]},  # unhashable: must be refused, not crash the reader
        {"type": "nope"},
        {"v": 2},
        {"v": [1]},
        {"job": ""},
        {"seq": 1.5},
        {"round": True},
        {"ts": float("nan")},
        {"auth": "text"},
        {"body": []},
        {"corr": 3},
        {"extra": 1},
    ],
)
def test_bad_envelopes(changes: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(WireError):
        decode_envelope(raw_envelope(**changes))
    with pytest.raises(WireError):
        decode_envelope(pack([1, 2]))


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
