"""The MQTT link over a real Mosquitto: envelopes, chunking, refusals, reconnection."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiomqtt
import pytest
import torch

from splitft.shared.errors import LinkError
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import decode_tensor, encode_tensor
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.link import Link
from splitft.shared.wire.topics import Kind, Topics

from conftest import Broker, start_mosquitto, stop_broker

TOPICS = Topics("linktest")


def settings(broker: Broker, **kw: object) -> BrokerSettings:
    return BrokerSettings(url=broker.url, **kw)  # type: ignore[arg-type]


async def test_small_and_chunked_messages(broker: Broker) -> None:
    coord_subs = [TOPICS.all_agents("act"), TOPICS.all_agents("join")]
    async with (
        Link(settings(broker), TOPICS, "coordinator", coord_subs) as coord,
        Link(settings(broker, max_payload_bytes=64_000), TOPICS, "a1", []) as agent,
    ):
        await agent.publish(TOPICS.agent("a1", "join"), Kind.JOIN, {"hello": 1})
        big = torch.randn(4, 100, 128)  # ~200 kB in fp32: four chunks at 64 kB
        sent = await agent.publish(TOPICS.agent("a1", "act"), Kind.ACT, {"act": encode_tensor(big, "fp32")}, step=3)
        assert sent > 150_000
        first = await coord.receive(timeout=10)
        assert first.topic.kind == "join" and first.envelope.body == {"hello": 1}
        second = await coord.receive(timeout=10)
        assert second.topic.kind == "act" and second.topic.agent == "a1" and second.envelope.step == 3
        assert torch.equal(decode_tensor(second.envelope.body["act"]), big)
        assert not coord.rejected


async def test_garbage_wrong_sender_and_duplicates_are_counted(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="splitft.shared.wire.link")
    async with Link(settings(broker), TOPICS, "coordinator", [TOPICS.all_agents("act")]) as coord:
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            topic = TOPICS.agent("a1", "act")
            await raw.publish(topic, b"\x00garbage")
            forged = Envelope(type=Kind.ACT, job=TOPICS.job, sender="a2", sid="s", seq=1, body={})
            await raw.publish(topic, encode_envelope(forged))  # a2 speaking on a1's topic
            other_job = Envelope(type=Kind.ACT, job="other", sender="a1", sid="s", seq=1, body={})
            await raw.publish(topic, encode_envelope(other_job))
            good = Envelope(type=Kind.ACT, job=TOPICS.job, sender="a1", sid="s", seq=7, body={"n": 1})
            await raw.publish(topic, encode_envelope(good), qos=1)
            await raw.publish(topic, encode_envelope(good), qos=1)  # a redelivery
            await raw.publish(TOPICS.agent("a1", "act") + "x", b"")  # not subscribed: never arrives
        got = await coord.receive(timeout=10)
        assert got.envelope.body == {"n": 1}
        with pytest.raises(TimeoutError):
            await coord.receive(timeout=0.5)
        assert coord.rejected == {"bad_compression": 1, "wrong_sender": 1, "wrong_job": 1, "duplicate": 1}
        # A duplicate is normal (a redelivery, a retained status seen again): counted, logged, not a warning.
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warned) == 3 and not any("duplicate" in m for m in warned), warned
        assert any("duplicate" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


async def test_reconnects_after_broker_restart(tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "b1")
    try:
        fast = {"backoff_min_s": 0.05, "backoff_max_s": 0.5}
        async with (
            Link(settings(broker, **fast), TOPICS, "coordinator", [TOPICS.all_agents("join")]) as coord,
            Link(settings(broker, **fast), TOPICS, "a1", []) as agent,
        ):
            stop_broker(broker)
            await asyncio.sleep(0.5)
            assert not agent.connected
            broker = _restart_on(tmp_path / "b2", broker.port)
            # A restarted broker without persistence has forgotten every subscription: publish only once
            # the coordinator has reconnected and subscribed again (its `connected` is set after that).
            async with asyncio.timeout(20):
                while not (coord.connected and coord.connects >= 2 and agent.connected):
                    await asyncio.sleep(0.05)
            await agent.publish(TOPICS.agent("a1", "join"), Kind.JOIN, {"after": "restart"})
            got = await coord.receive(timeout=20)
            assert got.envelope.body == {"after": "restart"}
            assert agent.connects >= 2 and coord.connects >= 2
    finally:
        stop_broker(broker)


def _restart_on(folder: Path, port: int) -> Broker:
    return start_mosquitto(folder, port)


async def test_a_failure_of_the_connection_task_reaches_the_caller(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the connection task (here decoding raises what no handler expects) ended it silently, and the
    caller waited on receive() forever; now the caller is interrupted and leaving the link raises a LinkError."""

    def broken(self: Link, topic_name: str, payload: bytes) -> None:
        raise RuntimeError("injected decoder failure")

    monkeypatch.setattr(Link, "_accept", broken)
    with pytest.raises(LinkError, match="RuntimeError: injected decoder failure") as info:
        async with asyncio.timeout(30):
            async with Link(settings(broker), TOPICS, "coordinator", [TOPICS.all_agents("join")]) as coord:
                async with aiomqtt.Client(broker.host, broker.port) as raw:
                    await raw.publish(TOPICS.agent("a1", "join"), b"x", qos=1)
                await coord.receive()  # before: forever
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not coord.connected
    with pytest.raises(LinkError, match="failed"):
        await coord.publish(TOPICS.agent("a1", "join"), Kind.JOIN, {})  # at once, not after publish_wait_s
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]  # the group's cancel was taken back
