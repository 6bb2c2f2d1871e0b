"""Hostile traffic over a real Mosquitto: what an attacker with broker access can make the coordinator hold.

Kilobytes on the wire can declare hundreds of megabytes once decompressed. Nothing of it may be held
unread: frames are checked against what their topic may carry before they are decompressed, what waits
is bounded in bytes, partial chunked messages expire on a timer, and decoding runs off the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from pathlib import Path

import aiomqtt
import psutil
import pytest

from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import Refusal
from splitft.shared.job.config import JobConfig
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.link import Link
from splitft.shared.wire.topics import Kind, Topic, Topics

from conftest import Broker

MB = 1 << 20


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / MB


def bomb(job: str, sender: str, seq: int, kind: str, declared_mb: int, sid: str = "bomb") -> bytes:
    """An envelope of a few kilobytes on the wire that decompresses to ``declared_mb`` MiB of zeros."""
    if kind == Kind.CHUNK:  # the first of two chunks of a message nobody will finish
        body = {"id": f"{sid}:{seq}", "index": 0, "count": 2, "data": bytes(declared_mb * MB)}
    else:
        body = {"act": {"dtype": "fp32", "shape": [1], "data": bytes(declared_mb * MB)}}
    env = Envelope(type=kind, job=job, sender=sender, sid=sid, seq=seq, round=1, step=0, body=body)
    return encode_envelope(env)


async def wait_for(predicate, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.05)


async def test_floods_of_bombs_do_not_grow_the_coordinators_memory(broker: Broker, tmp_path: Path) -> None:
    """The attacks of the report, against a coordinator waiting for its agents: six activation envelopes
    of 200 MB each once decoded (distinct sessions) and 24 first-of-two chunks of 60 MB from fake senders
    raised RSS by 1.2 GB and 2.6 GB, held for good. Now each is refused before it is decompressed."""
    job = JobConfig(job="flood", model="tiny-gpt2", rounds=1, min_agents=1, join_timeout_s=300)
    topics = Topics(job.job)
    acts = [bomb(job.job, "ghost", 1, Kind.ACT, 200, sid=f"s{i}") for i in range(6)]
    chunks = [bomb(job.job, f"fake{i}", 1, Kind.CHUNK, 60) for i in range(24)]
    big_joins = [bomb(job.job, f"joiner{i}", 1, Kind.CHUNK, 60) for i in range(4)]  # anyone may join, but briefly
    assert max(map(len, acts + chunks + big_joins)) < 64 << 10  # kilobytes on the wire
    coordinator = Coordinator(job, BrokerSettings(url=broker.url), tmp_path / "out")
    task = asyncio.create_task(coordinator.run())
    try:
        await wait_for(lambda: coordinator.link is not None and coordinator.link.connected)
        link = coordinator.link
        assert link is not None
        before = rss_mb()
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            for payload in acts:
                await raw.publish(topics.agent("ghost", "act"), payload, qos=1)
            for i, payload in enumerate(chunks):
                await raw.publish(topics.agent(f"fake{i}", "act"), payload, qos=1)
            for i, payload in enumerate(big_joins):
                await raw.publish(topics.agent(f"joiner{i}", "join"), payload, qos=1)
        await wait_for(lambda: sum(link.rejected.values()) >= len(acts) + len(chunks) + len(big_joins))
        grown = rss_mb() - before
        assert link.rejected[Refusal.UNEXPECTED] == len(acts) + len(chunks)  # no assignment: not decompressed
        assert link.rejected[Refusal.TOO_LARGE] == len(big_joins)  # a join is small
        assert link.pending() == 0 and link._reassembler.pending == 0 and coordinator.exchange.events.empty()
        assert grown < 100, f"the coordinator's RSS grew by {grown:.0f} MB"
        assert not task.done()  # still waiting for its agents
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


TOPICS = Topics("hostile")


def only_a1(limit: int):  # type: ignore[no-untyped-def]
    """An ``expect`` hook: a1 may send activations of up to ``limit`` bytes, nobody else anything."""

    def expect(topic: Topic) -> int | None:
        return limit if topic.agent == "a1" else None

    return expect


async def test_partial_chunked_messages_expire_on_a_timer(broker: Broker) -> None:
    """Before, a partial message was dropped only when another chunk arrived: one chunk, then silence,
    held its bytes for good."""
    settings = BrokerSettings(url=broker.url, reassembly_timeout_s=0.5)
    async with Link(settings, TOPICS, "coordinator", [TOPICS.all_agents("act")], expect=only_a1(100 * MB)) as coord:
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.publish(TOPICS.agent("a1", "act"), bomb(TOPICS.job, "a1", 1, Kind.CHUNK, 8), qos=1)
            await wait_for(lambda: coord._reassembler.pending == 1, 10)
            assert coord._reassembler.bytes == 8 * MB
            await wait_for(lambda: coord._reassembler.pending == 0, 10)  # with no further traffic at all
        assert coord.rejected == {Refusal.INCOMPLETE: 1}
        assert coord._reassembler.bytes == 0


async def test_what_waits_unread_is_bounded_in_bytes(broker: Broker) -> None:
    """A receiver that does not read (the coordinator between steps) holds at most its bound per sender;
    the rest is refused and counted, and the sender is heard again once its messages were taken."""
    settings = BrokerSettings(url=broker.url, max_queued_bytes_per_sender=3 * MB + MB // 2)  # three of them
    act = {"act": {"dtype": "fp32", "shape": [1], "data": bytes(MB)}}  # about 1 MiB decoded each
    async with (
        Link(settings, TOPICS, "coordinator", [TOPICS.all_agents("act")], expect=only_a1(2 * MB)) as coord,
        Link(BrokerSettings(url=broker.url), TOPICS, "a1", []) as agent,
    ):
        for _ in range(10):
            await agent.publish(TOPICS.agent("a1", "act"), Kind.ACT, act)
        await wait_for(lambda: coord.pending() + sum(coord.rejected.values()) == 10, 30)
        assert coord.pending() == 3 and coord.rejected == {Refusal.OVERLOADED: 7}
        assert coord._queue.bytes <= 3 * MB + MB // 2
        for _ in range(3):
            await coord.receive(timeout=5)
        await agent.publish(TOPICS.agent("a1", "act"), Kind.ACT, act)
        assert (await coord.receive(timeout=10)).envelope.sender == "a1"
        # larger than a1's activations may be: refused before it is decompressed
        await agent.publish(TOPICS.agent("a1", "act"), Kind.ACT, {"act": {"data": bytes(3 * MB)}})
        await wait_for(lambda: coord.rejected[Refusal.TOO_LARGE] == 1, 10)


async def test_decoding_runs_off_the_event_loop(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that takes long to decode (a flood of them, in the report, stretched a round from 4.7 s to
    13.7 s) must leave the event loop free: here decoding blocks until a coroutine on the loop lets it go.
    Decoding on the loop, that coroutine could not run, and decoding would give up waiting after 10 s."""
    released: list[bool] = []
    go = threading.Event()
    decode = Link._decode

    def slow_decode(self: Link, frame: bytes, topic_name: str, cap: int | None) -> Envelope:
        released.append(go.wait(timeout=10))
        return decode(self, frame, topic_name, cap)

    monkeypatch.setattr(Link, "_decode", slow_decode)
    async with Link(BrokerSettings(url=broker.url), TOPICS, "coordinator", [TOPICS.all_agents("join")]) as coord:
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            env = Envelope(type=Kind.JOIN, job=TOPICS.job, sender="a1", sid="s", seq=1, body={})
            await raw.publish(TOPICS.agent("a1", "join"), encode_envelope(env), qos=1)
        await asyncio.sleep(0.3)  # the loop runs while the frame decodes
        go.set()
        received = await coord.receive(timeout=15)
    assert received.envelope.sender == "a1"
    assert released == [True]
