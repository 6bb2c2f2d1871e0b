"""The MQTT link both runtimes use: one long-lived connection with envelopes, chunking and reconnects.

A :class:`Link` is an async context manager that owns one background task. That task connects
(MQTT v5, or 3.1.1 for brokers that speak nothing newer), subscribes, runs the caller's
``on_connect`` hook (publish a status, re-join), then decodes every incoming payload: topic checked,
envelope checked, the sender of an agent topic must be that agent, chunks reassembled, duplicates
(QoS 1 redeliveries) dropped (the checks beside the envelope's own: inbound.py). What passes lands
in a queue read with :meth:`receive`; what fails is logged with its reason and counted in
:attr:`rejected`, and the link carries on.

Hostile traffic must not grow the receiver's memory or stall it. Verify, then bound, then decode: with a
job key the payload's tag is checked first, over the compressed bytes (a forgery is refused without being
decompressed); then the link reads the size the zstd frame declares and asks the owner's ``expect`` hook what
the topic may carry now: nothing (no assignment: ``unexpected``) or at most so many bytes (more:
``too_large``; a frame that declares no size is decompressed by a stream that stops there). Decoding runs
on a thread of its own, so that frames that are expensive to decode leave the event loop free for honest
agents' messages and deadlines. The queue is bounded in bytes per sender and in total (``ByteQueue``; beyond:
``overloaded``); chunked messages only start for topics that expect that many bytes, are bounded in total, and
expire on a timer (``incomplete``).

When the connection drops, the task reconnects with capped, jittered exponential backoff and
subscribes again; :meth:`publish` waits for the connection (up to ``publish_wait_s``) and retries.
Every wait has a timeout: aiomqtt's default of 10 s per call is too short for a multi-megabyte
payload on a slow uplink, so publish timeouts grow with the payload.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from splitft.shared.errors import ROUTINE_REFUSALS, LinkError, Refusal, WireError
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.envelope import (
    Envelope,
    Reassembler,
    check_tag,
    check_time,
    chunk_payload,
    decode_envelope,
    encode_envelope,
    new_session_id,
    unseal,
)
from splitft.shared.wire.inbound import Expect, SeenMessages, check_frame, check_type
from splitft.shared.wire.queues import ByteQueue
from splitft.shared.wire.topics import Kind, Topic, Topics

log = logging.getLogger(__name__)

_PROTOCOLS = {"5": aiomqtt.ProtocolVersion.V5, "3.1.1": aiomqtt.ProtocolVersion.V311}


#: topic filters per SUBSCRIBE packet (a coordinator worker subscribes to its agents' topics one by one)
_FILTERS_PER_PACKET = 100
#: CONNACK reason codes that retrying will not change: bad user name or password, not authorized, banned,
#: bad authentication method (Mosquitto 2.0 answers a wrong password with 135, "not authorized")
_REFUSED_CODES = frozenset({134, 135, 138, 140})
#: payloads up to this size have their tag checked on the event loop (microseconds); larger ones on the decoder
_HASH_ON_LOOP_BYTES = 1 << 16


def _refusal(exc: BaseException) -> str | None:
    """What to tell the operator when the broker refused this member for good (None: worth retrying)."""
    text = str(exc)
    if isinstance(exc, aiomqtt.MqttCodeError) and getattr(exc.rc, "value", exc.rc) in _REFUSED_CODES:
        return "check the user name and password this member connects with"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return "the broker's certificate does not verify: give the CA that signed it (--ca-file) and a host it names"
    return None


@dataclass(frozen=True)
class Received:
    topic: Topic
    envelope: Envelope
    size: int  # bytes on the wire (all chunks)
    decoded: int = 0  # bytes it decompressed to (what it holds in memory, about)


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
        expect: Expect | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.name = name
        self.sid = new_session_id()
        self.subscriptions = list(subscriptions)
        self.will = will
        self.on_connect = on_connect
        self.expect = expect
        self.on_reject = on_reject  # (reason, topic) of every message refused, as it happens
        self.rejected: Counter[str] = Counter()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.connects = 0
        self.last_error: str | None = None  # why the latest connection attempt failed or dropped
        self._seq = 0
        self._queue: ByteQueue[Received] = ByteQueue(settings.max_queued_bytes_per_sender, settings.max_queued_bytes)
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None  # what ended the connection task, if it failed
        self._first: asyncio.Future[None] | None = None
        self._reassembler = Reassembler(
            settings.limits.max_compressed_bytes,
            timeout_s=settings.reassembly_timeout_s,
            max_total_bytes=settings.max_reassembly_bytes,
            on_drop=lambda sender, detail: self._reject(Refusal.INCOMPLETE, f"a chunked message of {sender}", detail),
        )
        self._decoder: ThreadPoolExecutor | None = None  # decompression and decoding, off the event loop
        self._expiry: asyncio.Task[None] | None = None
        self._seen = SeenMessages()  # (QoS 1 redeliveries, replays)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Link:
        # The connection task lives in a TaskGroup entered here: should it fail (a bug, an on_connect hook
        # that raises), the group cancels the task that entered the link, and leaving the link raises a
        # LinkError naming the failure. Nothing waits on a dead link forever.
        self._first = asyncio.get_running_loop().create_future()
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"splitft-decode-{self.name}")
        self._group = asyncio.TaskGroup()
        await self._group.__aenter__()
        self._task = self._group.create_task(self._run(), name=f"mqtt-link-{self.name}")
        self._expiry = self._group.create_task(self._expire_chunks(), name=f"mqtt-link-{self.name}-expiry")
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await asyncio.shield(self._first)
        except TimeoutError as exc:
            await self.close()
            reason = f" (last error: {self.last_error})" if self.last_error else ""
            raise LinkError(
                f"cannot reach the MQTT broker at {self.settings.url} within "
                f"{self.settings.connect_timeout_s:g} s{reason}"
            ) from exc
        except BaseException as exc:
            await self._leave(exc)
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        await self._leave(exc)

    async def close(self) -> None:
        await self._leave(None)

    async def _leave(self, exc: BaseException | None) -> None:
        """Stop the connection task and leave its group; a failure of the task is raised as a LinkError."""
        group, self._group = self._group, None
        if group is None:
            return
        for task in (self._task, self._expiry):
            if task is not None:
                task.cancel()
        # Only a cancellation is handed to the group (it may be the group's own, after the task failed);
        # the caller's other errors go on as they are, not wrapped in an ExceptionGroup.
        cancelled = exc if isinstance(exc, asyncio.CancelledError) else None
        try:
            await group.__aexit__(type(cancelled) if cancelled else None, cancelled, None)
        except BaseExceptionGroup as failed:
            cause = failed.exceptions[0]
            raise self._failure(cause) from cause
        finally:
            self._task = self._expiry = None
            if self._decoder is not None:
                self._decoder.shutdown(wait=False, cancel_futures=True)
                self._decoder = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set() and self._failed is None

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
        key = self.settings.auth_key
        payload = encode_envelope(env, key=key, topic=topic)
        if len(payload) <= self.settings.max_payload_bytes:
            parts = [payload]
        else:
            self._seq += 1
            first = self.envelope(Kind.CHUNK, {}, round_=round_, step=step)
            parts = chunk_payload(payload, self.settings.max_payload_bytes, first, key=key, topic=topic)
            self._seq = first.seq + len(parts) - 1
        for part in parts:
            await self._publish_raw(topic, part, qos=qos, retain=retain)
        return sum(len(p) for p in parts)

    async def subscribe(self, filters: Sequence[str]) -> None:
        """Add subscriptions (kept across reconnects); returns once the broker acknowledged them."""
        new = [f for f in dict.fromkeys(filters) if f not in self.subscriptions]
        self.subscriptions.extend(new)
        await self._send_subscriptions("subscribe", new)

    async def unsubscribe(self, filters: Sequence[str]) -> None:
        """Drop subscriptions (not made again on a reconnect)."""
        gone = [f for f in dict.fromkeys(filters) if f in self.subscriptions]
        self.subscriptions = [f for f in self.subscriptions if f not in gone]
        await self._send_subscriptions("unsubscribe", gone)

    async def _send_subscriptions(self, what: str, filters: Sequence[str]) -> None:
        client = self._client
        if not filters or client is None or not self.connected:
            return  # the next connection subscribes to what the list holds
        try:
            for first in range(0, len(filters), _FILTERS_PER_PACKET):
                part = list(filters[first : first + _FILTERS_PER_PACKET])
                if what == "subscribe":
                    await client.subscribe([(f, 1) for f in part], timeout=self.settings.publish_timeout_s)
                else:
                    await client.unsubscribe(part, timeout=self.settings.publish_timeout_s)
        except aiomqtt.MqttError as exc:  # the connection dropped: the reconnect subscribes from the list
            log.warning(
                "%s: %s of %d topics failed (%s); the next connection takes the list",
                self.name,
                what,
                len(filters),
                exc,
            )

    async def _publish_raw(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        started = time.perf_counter()
        timeout = self.settings.publish_timeout_s + len(payload) / self.settings.min_bandwidth_bytes_s
        deadline = time.monotonic() + self.settings.publish_wait_s
        while True:
            try:  # a failed link sets `_connected`, so the check below comes at once
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                    await self._connected.wait()
            except TimeoutError as exc:
                raise LinkError(
                    f"no broker connection for {self.settings.publish_wait_s:g} s; could not publish"
                ) from exc
            self._check_alive()
            client = self._client
            try:
                assert client is not None
                await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
                self.bytes_sent += len(payload)
                if self.settings.observer is not None:
                    self.settings.observer.on_publish(topic, len(payload), time.perf_counter() - started)
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
        self._check_alive()
        async with asyncio.timeout(timeout):
            return await self._queue.get()

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise self._failure(self._failed)

    def _failure(self, cause: BaseException) -> LinkError:
        return LinkError(f"the MQTT link of {self.name} failed: {type(cause).__name__}: {cause}")

    def pending(self) -> int:
        return self._queue.qsize()

    def _reject(self, reason: Refusal, topic: str, detail: str) -> None:
        self.rejected[reason] += 1
        level = logging.INFO if reason in ROUTINE_REFUSALS else logging.WARNING
        log.log(level, "%s: rejected a message on %s: %s (%s)", self.name, topic, reason, detail)
        if self.on_reject is not None:
            self.on_reject(str(reason), topic)

    async def _accept(self, topic_name: str, payload: bytes) -> None:
        """Decode one MQTT message; queue it, or count and log why not. Never raises."""
        self.bytes_received += len(payload)
        if self.settings.observer is not None:
            self.settings.observer.on_receive(topic_name, len(payload))
        topic = self.topics.parse(topic_name)
        if topic is None:
            self._reject(Refusal.BAD_TOPIC, topic_name, "not a topic of this job")
            return
        if not payload:
            # An empty payload is how MQTT clears a retained message; nobody of ours sends one otherwise.
            self._reject(Refusal.EMPTY, topic_name, "empty payload")
            return
        try:
            frame = await self._verify_off_loop(payload, topic_name)
            # What the topic may carry, from the frame's header alone: nothing is decompressed yet.
            decoded, bound = check_frame(topic, frame, topic_name, self.settings.limits, self.expect)
            env = await self._decode_off_loop(frame, topic_name, bound)
            size = len(payload)
            if env.job != self.topics.job:
                raise WireError(Refusal.WRONG_JOB, f"message for job {env.job!r}")
            if env.sender != topic.publisher:
                raise WireError(
                    Refusal.WRONG_SENDER, f"{env.sender!r} published on {topic_name}, reserved to {topic.publisher!r}"
                )
            self._seen.add(env.key)
            check_type(env.type, topic, chunk_ok=True)
            if env.type == Kind.CHUNK:
                sender = env.sender
                whole = self._reassembler.add(sender, env.body, limit=bound)
                if whole is None:
                    return
                size = len(whole)  # the chunks' envelopes add about 100 bytes per chunk on top
                frame = await self._verify_off_loop(whole, topic_name)
                decoded, _ = check_frame(topic, frame, topic_name, self.settings.limits, self.expect)
                env = await self._decode_off_loop(frame, topic_name, bound)
                if env.sender != sender or env.job != self.topics.job or env.type == Kind.CHUNK:
                    raise WireError(Refusal.BAD_CHUNK, "reassembled message does not match its chunks")
                check_type(env.type, topic, chunk_ok=False)
                self._seen.add(env.key)
        except WireError as exc:
            self._reject(exc.reason, topic_name, exc.detail)
            return
        except Exception as exc:  # a decoder bug must not end the link: count it like any refusal
            log.exception("%s: unexpected error decoding a message on %s", self.name, topic_name)
            self._reject(Refusal.DECODE_ERROR, topic_name, f"{type(exc).__name__}: {exc}")
            return
        if not self._queue.offer(env.sender, Received(topic, env, size, decoded), decoded):
            held, total = self._queue.held(env.sender), self._queue.bytes
            self._reject(Refusal.OVERLOADED, topic_name, f"{env.sender} holds {held} bytes unread, all senders {total}")

    async def _decode_off_loop(self, frame: bytes, topic_name: str, cap: int | None) -> Envelope:
        if self._decoder is None:  # (not entered: decoding where we are is all there is)
            return self._decode(frame, topic_name, cap)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._decoder, self._decode, frame, topic_name, cap)

    async def _verify_off_loop(self, payload: bytes, topic_name: str) -> bytes:
        """With a job key: the payload's tag, checked before anything is decompressed. Returns the frame."""
        tag, frame = unseal(payload)
        key = self.settings.auth_key
        if key is not None and (self._decoder is None or len(payload) <= _HASH_ON_LOOP_BYTES):
            check_tag(tag, frame, topic_name, key)
        elif key is not None:
            await asyncio.get_running_loop().run_in_executor(self._decoder, check_tag, tag, frame, topic_name, key)
        return frame

    async def _expire_chunks(self) -> None:
        """Drop partial chunked messages nobody completes, on a timer (not only when the next chunk comes)."""
        period = min(max(self.settings.reassembly_timeout_s / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            self._reassembler.expire()

    def _decode(self, frame: bytes, topic_name: str, cap: int | None) -> Envelope:
        env = decode_envelope(frame, self.settings.limits, cap=cap)
        if self.settings.auth_key is not None:  # (the tag was checked before: the time stamp is the sender's)
            check_time(env, None if env.type == Kind.STATUS else self.settings.auth_window_s)
        return env

    # ------------------------------------------------------------------ the connection task

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except Exception as exc:
            self._failed = exc
            self._client = None
            self._connected.set()  # wakes publishers waiting for a connection: they find the link failed
            log.error("%s: the MQTT link failed: %s: %s", self.name, type(exc).__name__, exc)
            raise  # the group cancels the task that entered the link, which then raises a LinkError

    async def _connection_loop(self) -> None:
        backoff = self.settings.backoff_min_s
        while True:
            try:
                async with self._make_client() as client:
                    self._client = client
                    subscriptions = list(self.subscriptions)
                    for first in range(0, len(subscriptions), _FILTERS_PER_PACKET):
                        part = subscriptions[first : first + _FILTERS_PER_PACKET]
                        await client.subscribe([(f, 1) for f in part], timeout=self.settings.publish_timeout_s)
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
                            self._reject(Refusal.BAD_SCHEMA, str(message.topic), "payload is not bytes")
                            continue
                        await self._accept(str(message.topic), bytes(payload))
            except asyncio.CancelledError:
                self._connected.clear()
                raise
            except (aiomqtt.MqttError, OSError, LinkError) as exc:
                self._connected.clear()
                self._client = None
                self.last_error = str(exc) or type(exc).__name__
                hint = _refusal(exc)
                if hint is not None and self._first is not None and not self._first.done():
                    # Refused at the first connection: wrong password or CA. Retrying cannot help; say why now.
                    # (Later, a refusal is retried: a password may be restored while the member keeps running.)
                    self._first.set_exception(
                        LinkError(
                            f"the MQTT broker at {self.settings.url} refused {self.name}: {self.last_error}; {hint}"
                        )
                    )
                    return
                delay = backoff * random.uniform(0.5, 1.5)  # jitter: a fleet must not reconnect in lockstep
                log.warning("%s: broker connection lost (%s); reconnecting in %.1f s", self.name, exc, delay)
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.settings.backoff_max_s)

    def _make_client(self) -> aiomqtt.Client:
        will = None
        if self.will is not None:
            topic, body = self.will
            # Signed now, delivered maybe much later: receivers take a Last Will's age into account.
            payload = encode_envelope(self.envelope("status", body), key=self.settings.auth_key, topic=topic)
            will = aiomqtt.Will(topic, payload, qos=1, retain=True)
        v5 = self.settings.protocol == "5"
        kwargs: dict[str, Any] = {"clean_start": MQTT_CLEAN_START_FIRST_ONLY} if v5 else {"clean_session": True}
        if v5 and self.settings.session_expiry_s > 0:
            kwargs["properties"] = Properties(PacketTypes.CONNECT)
            kwargs["properties"].SessionExpiryInterval = self.settings.session_expiry_s
        if self.settings.tcp_nodelay:
            kwargs["socket_options"] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
        if self.settings.tls:
            kwargs["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=self.settings.ca_file, certfile=self.settings.cert_file, keyfile=self.settings.key_file
            )
            kwargs["tls_insecure"] = self.settings.tls_insecure
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
