"""The MQTT link both runtimes use: one long-lived connection with envelopes, chunking and reconnects.

A :class:`Link` is an async context manager that owns one background task. That task connects
(MQTT v5, or 3.1.1 for brokers that speak nothing newer), subscribes, runs the caller's
``on_connect`` hook (publish a status, re-join), then decodes every incoming payload: topic checked,
envelope checked, the sender of an agent topic must be that agent, chunks reassembled, duplicates
(QoS 1 redeliveries) dropped. What passes lands in an unbounded queue read with :meth:`receive`;
what fails is logged with its reason and counted in :attr:`rejected`, and the link carries on.

When the connection drops, the task reconnects with capped, jittered exponential backoff and
subscribes again; :meth:`publish` waits for the connection (up to ``publish_wait_s``) and retries.
Every wait has a timeout: aiomqtt's default of 10 s per call is too short for a multi-megabyte
payload on a slow uplink, so publish timeouts grow with the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY

from .codec import Limits
from .errors import ConfigError, LinkError, WireError
from .protocol import CHUNK, Envelope, Reassembler, chunk_payload, decode_envelope, encode_envelope, new_session_id
from .topics import Topic, Topics

log = logging.getLogger(__name__)

_PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


@dataclass(frozen=True)
class BrokerSettings:
    """How to reach the broker, and the limits of this end of the link."""

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: str | None = None
    client_id: str | None = None  # MQTT client id (for broker ACLs on %c); default: the member name + a session suffix
    protocol: str = "5"  # "5", or "3.1.1" for brokers without v5 (the embedded amqtt)
    keepalive_s: int = 30
    connect_timeout_s: float = 30.0  # first connection; later ones retry until the link closes
    publish_wait_s: float = 60.0  # how long a publish waits for a lost connection to come back
    publish_timeout_s: float = 10.0  # per publish, plus the time the payload needs at min_bandwidth
    min_bandwidth_bytes_s: float = 250_000.0
    max_payload_bytes: int = 1_000_000  # larger payloads are chunked (EMQX's default packet cap is 1 MB)
    reassembly_timeout_s: float = 120.0
    backoff_min_s: float = 0.2
    backoff_max_s: float = 10.0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
            raise ConfigError(f"broker url must look like mqtt://HOST:PORT, got {self.url!r}")
        if self.protocol not in _PROTOCOLS:
            raise ConfigError(f"broker protocol must be one of {sorted(_PROTOCOLS)}, got {self.protocol!r}")
        if self.max_payload_bytes < 4096:
            raise ConfigError(f"max_payload_bytes must be at least 4096, got {self.max_payload_bytes}")

    @property
    def host(self) -> str:
        return urlparse(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlparse(self.url).port or 1883


@dataclass(frozen=True)
class Received:
    topic: Topic
    envelope: Envelope
    size: int  # bytes on the wire (all chunks)


class Link:
    """One MQTT connection for one job member (the coordinator or an agent)."""

    def __init__(
        self,
        settings: BrokerSettings,
        topics: Topics,
        name: str,
        subscriptions: Sequence[str],
        *,
        will: tuple[str, dict[str, Any]] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.name = name
        self.sid = new_session_id()
        self.subscriptions = list(subscriptions)
        self.will = will
        self.on_connect = on_connect
        self.rejected: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connects = 0
        self._seq = 0
        self._queue: asyncio.Queue[Received] = asyncio.Queue()  # unbounded: never drop acknowledged messages
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._reassembler = Reassembler(settings.limits.max_compressed_bytes, timeout_s=settings.reassembly_timeout_s)
        self._seen: OrderedDict[tuple[str, str, int], None] = OrderedDict()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Link:
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"mqtt-link-{self.name}")
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await asyncio.shield(self._first)
        except TimeoutError as exc:
            await self.close()
            raise LinkError(
                f"cannot reach the MQTT broker at {self.settings.url} within {self.settings.connect_timeout_s:g} s"
            ) from exc
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ------------------------------------------------------------------ sending

    def envelope(
        self, type_: str, body: dict[str, Any], *, round_: int = -1, step: int = -1, corr: str | None = None
    ) -> Envelope:
        self._seq += 1
        return Envelope(
            type=type_,
            job=self.topics.job,
            sender=self.name,
            sid=self.sid,
            seq=self._seq,
            body=body,
            round=round_,
            step=step,
            corr=corr,
            ts=time.time(),
        )

    async def publish(
        self,
        topic: str,
        type_: str,
        body: dict[str, Any],
        *,
        round_: int = -1,
        step: int = -1,
        corr: str | None = None,
        retain: bool = False,
        qos: int = 1,
    ) -> int:
        """Send one message (chunked if it is large); returns the bytes sent."""
        env = self.envelope(type_, body, round_=round_, step=step, corr=corr)
        payload = encode_envelope(env)
        if len(payload) <= self.settings.max_payload_bytes:
            parts = [payload]
        else:
            self._seq += 1
            first = self.envelope(CHUNK, {}, round_=round_, step=step)
            parts = chunk_payload(payload, self.settings.max_payload_bytes, first)
            self._seq = first.seq + len(parts) - 1
        for part in parts:
            await self._publish_raw(topic, part, qos=qos, retain=retain)
        return sum(len(p) for p in parts)

    async def _publish_raw(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        timeout = self.settings.publish_timeout_s + len(payload) / self.settings.min_bandwidth_bytes_s
        deadline = time.monotonic() + self.settings.publish_wait_s
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await self._connected.wait()
            except TimeoutError as exc:
                raise LinkError(
                    f"no broker connection for {self.settings.publish_wait_s:g} s; could not publish"
                ) from exc
            client = self._client
            try:
                assert client is not None
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
                self.bytes_sent += len(payload)
                return
            except aiomqtt.MqttError as exc:
                if time.monotonic() > deadline:
                    raise LinkError(f"publish to {topic} failed: {exc}") from exc
                # A timed-out publish leaves the connection up; a real disconnect is the connection
                # task's to notice (it clears `_connected` and reconnects). Either way: try again.
                log.info("publish to %s failed (%s); retrying", topic, exc)
                await asyncio.sleep(self.settings.backoff_min_s)

    # ------------------------------------------------------------------ receiving

    async def receive(self, timeout: float | None = None) -> Received:
        """The next accepted message. Raises ``TimeoutError`` after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def pending(self) -> int:
        return self._queue.qsize()

    def _reject(self, reason: str, topic: str, detail: str) -> None:
        self.rejected[reason] += 1
        log.warning("%s: rejected a message on %s: %s (%s)", self.name, topic, reason, detail)

    def _accept(self, topic_name: str, payload: bytes) -> None:
        """Decode one MQTT message; queue it, or count and log why not. Never raises."""
        self.bytes_received += len(payload)
        topic = self.topics.parse(topic_name)
        if topic is None:
            self._reject("bad_topic", topic_name, "not a topic of this job")
            return
        try:
            env = decode_envelope(payload, self.settings.limits)
            size = len(payload)
            if env.job != self.topics.job:
                raise WireError("wrong_job", f"message for job {env.job!r}")
            if env.sender != topic.publisher:
                raise WireError(
                    "wrong_sender", f"{env.sender!r} published on {topic_name}, reserved to {topic.publisher!r}"
                )
            if env.key in self._seen:
                raise WireError("duplicate", f"message {env.key} seen before")
            self._remember(env.key)
            if env.type == CHUNK:
                sender = env.sender
                whole = self._reassembler.add(sender, env.body)
                if whole is None:
                    return
                size = len(whole)  # the chunks' envelopes add about 100 bytes per chunk on top
                env = decode_envelope(whole, self.settings.limits)
                if env.sender != sender or env.job != self.topics.job or env.type == CHUNK:
                    raise WireError("bad_chunk", "reassembled message does not match its chunks")
                if env.key in self._seen:
                    raise WireError("duplicate", f"message {env.key} seen before")
                self._remember(env.key)
        except WireError as exc:
            self._reject(exc.reason, topic_name, exc.detail)
            return
        except Exception as exc:  # a decoder bug must not end the link: count it like any refusal
            log.exception("%s: unexpected error decoding a message on %s", self.name, topic_name)
            self._reject("decode_error", topic_name, f"{type(exc).__name__}: {exc}")
            return
        self._queue.put_nowait(Received(topic, env, size))

    def _remember(self, key: tuple[str, str, int]) -> None:
        self._seen[key] = None
        if len(self._seen) > 100_000:
            self._seen.popitem(last=False)

    # ------------------------------------------------------------------ the connection task

    async def _run(self) -> None:
        backoff = self.settings.backoff_min_s
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    for sub in self.subscriptions:
                        await client.subscribe(sub, qos=1, timeout=self.settings.publish_timeout_s)
                    self.connects += 1
                    self._connected.set()
                    backoff = self.settings.backoff_min_s
                    log.info("%s connected to %s (connection %d)", self.name, self.settings.url, self.connects)
                    if self.on_connect is not None:
                        await self.on_connect()
                    if self._first is not None and not self._first.done():
                        self._first.set_result(None)
                    async for message in client.messages:
                        payload = message.payload
                        if not isinstance(payload, (bytes, bytearray)):
                            self._reject("bad_schema", str(message.topic), "payload is not bytes")
                            continue
                        self._accept(str(message.topic), bytes(payload))
            except asyncio.CancelledError:
                self._connected.clear()
                raise
            except (aiomqtt.MqttError, OSError, LinkError) as exc:
                self._connected.clear()
                self._client = None
                delay = backoff * random.uniform(0.5, 1.5)  # jitter: a fleet must not reconnect in lockstep
                log.warning("%s: broker connection lost (%s); reconnecting in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _make_client(self) -> aiomqtt.Client:
        will = None
        if self.will is not None:
            topic, body = self.will
            payload = encode_envelope(self.envelope("status", body))
            will = aiomqtt.Will(topic, payload, qos=1, retain=True)
        v5 = self.settings.protocol == "5"
        kwargs: dict[str, Any] = {"clean_start": MQTT_CLEAN_START_FIRST_ONLY} if v5 else {"clean_session": True}
        return aiomqtt.Client(
            self.settings.host,
            self.settings.port,
            username=self.settings.username,
            password=self.settings.password,
            identifier=self.settings.client_id or f"{self.name}-{self.sid[:6]}",
            protocol=_PROTOCOLS[self.settings.protocol],
            will=will,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.publish_timeout_s,
            **kwargs,
        )
