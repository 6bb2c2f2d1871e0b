"""The edge agent's asyncio runtime: join, train the client segment when assigned, upload adapters.

The agent connects with a Last Will (a retained ``offline`` status), publishes a retained ``online``
status and a join message (its device profile, the size of its data), and (re)joins whenever the
coordinator's retained status says it is online, so either side may start first or restart.

On an assignment it builds (or reuses) the client segment for its cut, loading only those blocks,
loads the global adapters it is sent, and trains ``local_steps`` steps: forward, activations up,
wait for the gradient, backward, optimiser step. Every step reports its timings in the next
message. A gradient that does not come by the step deadline, a ``notice`` that the coordinator
dropped it, or the coordinator going offline ends the round for this agent cleanly: nothing is
uploaded, and it waits for the next assignment.

In the U split (``split = "u"``) the device also holds the last ``tail`` blocks, the final norm and
the LM head: a step sends the activations at the cut up (no labels), receives the server's
activations entering its tail, computes the loss on its own labels, sends the gradient at the tail
up and receives the gradient at the cut. No token id or label leaves the device.

Activations and the adapter upload repeat the assignment's id (``corr``). After any reconnect, its
own or the coordinator's, the agent re-sends the activations it is waiting on and its last upload:
the coordinator answers a repeated step with the gradient it already computed, and takes only one
upload, so nothing is lost with a dropped connection and nothing is applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import zlib
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from splitft.agent.emulation import Emulation, block_flops
from splitft.agent.profile import device_profile, measure_block, measure_memory, peak_rss_mb, runtime_mb, usable_mb
from splitft.shared import __version__
from splitft.shared.errors import ConfigError, DataError, LinkError, ModelError, RoundAborted, SplitFTError, WireError
from splitft.shared.job.data import Batches, Example, check_chat_template, tokenize
from splitft.shared.job.records import load_records, record_text
from splitft.shared.model.defense import DefenseSettings, defend, nopeek_loss
from splitft.shared.model.loading import (
    check_weights,
    head_flops,
    load_config,
    max_positions,
    model_fingerprint,
    num_layers,
)
from splitft.shared.model.lora import load_lora_state, lora_state
from splitft.shared.model.loss import IGNORE_INDEX, padding_mask
from splitft.shared.model.memory import MemoryFigures
from splitft.shared.model.precision import torch_dtype
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.shared.profiles import load_profile
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import decode_state
from splitft.shared.wire.control import Assignment, Join, join_body, parse_assign, parse_notice, parse_status
from splitft.shared.wire.envelope import Envelope
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.messages import act_body, adapter_body, parse_grad, parse_tail_act, tail_grad_body
from splitft.shared.wire.topics import Kind, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class AgentSettings:
    name: str
    job: str
    model: str
    data: Path
    prompt_field: str | None = None
    response_field: str | None = None
    max_samples: int | None = None
    device: str = "cpu"
    profile: str | None = None  # the device class this agent says it is (e.g. "jetson-orin-nano")
    emulate: str | None = None  # a profile name or file: behave like that device (see agent/emulation.py)
    emulate_scale: float = 1.0  # multiplies the emulated profile's compute throughput
    emulate_virtual: bool = False  # report the profile's times without waiting for them (agent/emulation.py)
    dtype: str | None = None  # the frozen base weights' dtype (precision.py); None: the emulated profile's, or fp32
    # The memory the agent's runtime takes before its segment (memory.py): None measures this process, which
    # is right for an agent alone in its process; harnesses running several agents in one give a figure.
    runtime_mb: float | None = None


@dataclass(frozen=True)
class _Outgoing:
    """A message kept to be sent again after a reconnect."""

    topic: str
    type: str
    body: dict[str, Any]
    round: int
    step: int
    corr: str


class Agent:
    """One device in a job; ``await Agent(...).run()`` returns when the job is done."""

    def __init__(self, settings: AgentSettings, broker: BrokerSettings) -> None:
        self.settings = settings
        self.broker = broker
        self.topics = Topics(settings.job)
        self.name = settings.name
        self.rounds_done = 0
        self._segment: Segment | None = None
        self._segment_key: tuple[Any, ...] | None = None
        self._examples: dict[tuple[int, str | bool], list[Example]] = {}
        self._batches: dict[tuple[int, int, int, str | bool], Batches] = {}
        self._stashed: list[Received] = []
        self._link: Link | None = None
        self._done = False
        self._pending_act: _Outgoing | None = None  # activations waiting for their gradient
        self._last_upload: _Outgoing | None = None  # the adapter upload of the last assignment
        self._last_assign: tuple[str, int, int] | None = None  # (coordinator session, round, attempt) last taken
        self._coordinator_sid: str | None = None  # the coordinator process last seen online
        self.notices: list[tuple[str, str]] = []  # (event, reason) the coordinator sent
        self._job_max_length: int | None = None  # the job's, from the coordinator's status
        self._job_chat_template: str | bool = "auto"  # likewise
        self._job_batch_size: int | None = None  # likewise
        self._memory: dict[tuple[int, int], MemoryFigures] = {}  # (batch, length) -> this device's figures
        self._runtime_mb: float | None = settings.runtime_mb
        self._refused: SplitFTError | None = None  # why the coordinator did not admit this agent
        self.rejected: Counter[str] = Counter()  # message bodies refused, by reason (the link counts the rest)
        # All model work on one thread (see the coordinator): one OpenMP pool, no model shared across threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitft-compute")

        # Fail before connecting if the data or the model cannot be used.
        self.records = load_records(settings.data, settings.prompt_field, settings.response_field, settings.max_samples)
        self.model_config = load_config(settings.model)
        check_weights(settings.model, self.model_config)
        self.fingerprint = model_fingerprint(settings.model)  # what the coordinator compares, not the path
        self.tokenizer = load_tokenizer(settings.model)
        if settings.emulate_scale <= 0:
            raise ConfigError(f"emulate_scale must be positive, got {settings.emulate_scale}")
        self.emulation = (
            Emulation(load_profile(settings.emulate), settings.emulate_scale, settings.emulate_virtual)
            if settings.emulate
            else None
        )
        profile_dtype = self.emulation.profile.dtype if self.emulation is not None else "fp32"
        self.dtype_name = settings.dtype or profile_dtype
        self.dtype = torch_dtype(self.dtype_name, "dtype")
        # The per-block cost, measured once at start (an emulated device's from its profile), so that the
        # controller can place this agent before its first round's reports.
        seconds, flops = measure_block(settings.model, device=settings.device, dtype=self.dtype)
        self.block_s = 2 * self.emulation.compute_s(flops) if self.emulation is not None else seconds

    async def run(self) -> None:
        subscriptions = [
            self.topics.agent(self.name, "assign"),
            self.topics.agent(self.name, "grad"),
            self.topics.agent(self.name, "tail_act"),
            self.topics.agent(self.name, "notice"),
            self.topics.job_topic("round"),
            self.topics.coordinator_status(),
        ]
        will = (self.topics.agent(self.name, "status"), {"state": "offline", "role": "agent"})
        async with Link(self.broker, self.topics, self.name, subscriptions, will=will, on_connect=self._hello) as link:
            self._link = link
            try:
                await self._hello()
                while not self._done:
                    received = self._stashed.pop(0) if self._stashed else await link.receive()
                    await self._handle(received)
            finally:
                # Also on Ctrl-C: a clean disconnect discards the Last Will, so say goodbye ourselves.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    async with asyncio.timeout(2):
                        await link.publish(*self._goodbye(), retain=True)
        self._executor.shutdown(wait=False)
        if self._refused is not None:
            raise self._refused

    def _goodbye(self) -> tuple[str, str, dict[str, Any]]:
        return self.topics.agent(self.name, "status"), Kind.STATUS, {"state": "offline", "role": "agent"}

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _parse_assignment(self, env: Envelope) -> Assignment:
        layers, positions = num_layers(self.model_config), max_positions(self.model_config)
        return parse_assign(env.round, env.body, self.fingerprint, layers, positions, corr=env.corr)

    def _is_new(self, env: Envelope) -> bool:
        """An assignment is taken once, and never one older than the last from the same coordinator process
        (a delayed or replayed one); a new coordinator process (a restart) may start anywhere."""
        if self._last_assign is None or env.sid != self._last_assign[0]:
            return True
        attempt = env.body.get("attempt", 1)
        return isinstance(attempt, int) and (env.round, attempt) > self._last_assign[1:]

    def _refuse(self, kind: str, exc: WireError) -> None:
        self.rejected[exc.reason] += 1
        log.warning("%s: refused a %s message: %s (%s)", self.name, kind, exc.reason, exc.detail)

    async def _hello(self) -> None:
        link = self._link
        if link is None:
            return  # the first connection: run() says hello once the link is up
        await link.publish(
            self.topics.agent(self.name, "status"), Kind.STATUS, {"state": "online", "role": "agent"}, retain=True
        )
        if self._coordinator_sid is None:
            return  # the join follows the coordinator's (retained) status, which gives the job's step shape
        length = self._job_max_length
        memory = await self._memory_profile()
        join = Join(
            profile={
                **device_profile(),
                **self._link_profile(),
                "block_s": self.block_s,
                "block_tokens": 4 * 128,
                "base_dtype": self.dtype_name,
                **memory,
            },
            data_samples=len(self.records),
            data_tokens=max(sum(len(record_text(r)) for r in self.records) // 4, 1),  # rough, for planning
            model=self.settings.model,
            version=__version__,
            fingerprint=self.fingerprint,
            usable_samples=None if length is None else self._usable(length, self._job_chat_template),
        )
        await link.publish(self.topics.agent(self.name, "join"), Kind.JOIN, join_body(join))
        for out in (self._pending_act, self._last_upload):  # what may have been lost with a connection
            if out is not None:
                log.info("%s: re-sending %s of round %d step %d", self.name, out.type, out.round, out.step)
                await link.publish(out.topic, out.type, out.body, round_=out.round, step=out.step, corr=out.corr)

    async def _memory_profile(self) -> dict[str, float]:
        """This device's memory figures at the job's step shape (memory.py), once the coordinator said it."""
        batch, length = self._job_batch_size, self._job_max_length
        if batch is None or length is None:
            return {}
        if self._runtime_mb is None:
            self._runtime_mb = runtime_mb()  # before any segment of this job: the first join
        if (batch, length) not in self._memory:
            usable = float(self.emulation.profile.usable_mb) if self.emulation is not None else usable_mb()
            measure = functools.partial(
                measure_memory, self.settings.model, batch, length, usable=usable, runtime=self._runtime_mb,
                dtype=self.dtype, device=self.settings.device,
            )  # fmt: skip
            self._memory[(batch, length)] = await self._compute(measure)
        return self._memory[(batch, length)].to_profile()

    def _link_profile(self) -> dict[str, Any]:
        """The device class and its link, as far as this agent knows them (an emulated profile's own)."""
        if self.emulation is None:
            return {"class": self.settings.profile or "unknown"}
        p = self.emulation.profile
        return {"class": p.name, "emulated": True, "uplink_mbps": p.uplink_mbps, "downlink_mbps": p.downlink_mbps,
                "rtt_ms": p.rtt_ms, "usable_mb": p.usable_mb, "throughput_gflops": p.throughput_gflops}  # fmt: skip

    async def _handle(self, received: Received) -> None:
        kind, env = received.topic.kind, received.envelope
        try:
            if kind == "coordinator_status":
                state = parse_status(env.body)
                if state == "online":
                    self._coordinator_sid = env.sid
                    length = env.body.get("max_length")
                    if type(length) is int and 1 <= length <= 1 << 20:
                        self._job_max_length = length  # so that the join says how many examples fit
                    batch = env.body.get("batch_size")
                    if type(batch) is int and 1 <= batch <= 1 << 16:
                        self._job_batch_size = batch  # and what memory a step of the job needs here
                    template = env.body.get("chat_template", "auto")
                    with contextlib.suppress(ConfigError):  # an unknown value: the assignment will say
                        check_chat_template(template)
                        self._job_chat_template = template
                    await self._hello()
                elif env.body.get("done") is True and env.sid == self._coordinator_sid:
                    log.info("%s: the coordinator finished the job", self.name)
                    self._done = True
            elif kind == "round" and env.body.get("event") == "done":
                log.info("%s: the job is done", self.name)
                self._done = True
            elif kind == "assign" and not self._is_new(env):
                log.info("%s: ignoring a repeated or older assignment (round %d, %s)", self.name, env.round, env.corr)
            elif kind == "assign":
                assignment = self._parse_assignment(env)
                self._last_assign = (env.sid, assignment.round, assignment.attempt)
                self._last_upload = None
                try:
                    await self._train(assignment)
                    self.rounds_done += 1
                except RoundAborted as exc:
                    log.warning("%s: round %d ended early: %s", self.name, assignment.round, exc)
                finally:
                    self._pending_act = None
            elif kind == "notice":
                notice = parse_notice(env.body)
                self.notices.append((notice.event, notice.reason))
                if notice.event == "not_admitted":
                    error = ModelError if notice.cause in ("model", "memory") else DataError
                    self._refused = error(f"the coordinator did not admit {self.name}: {notice.reason}")
                    self._done = True
                    log.error("%s: not admitted: %s", self.name, notice.reason)
                else:
                    log.warning("%s: the coordinator says: %s (%s)", self.name, notice.event, notice.reason)
            elif kind == "grad":
                log.debug("%s: ignoring a gradient outside a step (round %d step %d)", self.name, env.round, env.step)
        except WireError as exc:
            self._refuse(kind, exc)
        except ConfigError as exc:
            log.warning("%s: refused a %s message: %s", self.name, kind, exc)
        except LinkError:
            raise  # the broker is gone for longer than the link waits: the agent cannot go on
        except (SplitFTError, OSError, RuntimeError, ValueError, TypeError, KeyError) as exc:
            # A failure in one round (out of memory, a model error) must not end the agent: log it in
            # full, let the coordinator drop us from this round, and take the next assignment.
            log.exception("%s: %s message failed: %s", self.name, kind, exc)

    # ------------------------------------------------------------------ one round

    async def _train(self, a: Assignment) -> None:
        assert self._link is not None
        link = self._link
        segment = await self._compute(self._segment_for, a)
        expect = {n: tuple(p.shape) for n, p in segment.lora_parameters().items()}
        state = decode_state(a.adapter, expect={n: list(s) for n, s in expect.items()})
        load_lora_state(segment.peft_model, {n: t.to(segment.device) for n, t in state.items()})
        optimizer = a.optimizer.build(segment.lora_parameters().values())
        batches = self._batches_for(a)
        # The batches of (round, step) are a function of the seed and this agent's name alone: a round that
        # runs again (a retry, a resumed coordinator) trains on the same data, and two runs on the same data.
        batches.seek((a.round - 1) * a.local_steps)
        totals: dict[str, float] = {}
        timings: dict[str, float] = {}
        tokens, losses = 0, []
        noise = torch.Generator(device=segment.device).manual_seed(batch_seed(a.seed, self.name) + a.round)
        for step in range(a.local_steps):
            started = time.perf_counter()
            input_ids, labels, lengths = batches.next()

            flops = a.cut * block_flops(self.model_config, input_ids.shape[0], input_ids.shape[1])
            hidden, extra, body, forward_s = await self._compute(
                _forward, segment, input_ids, None if a.u_split else labels, lengths, a.wire_dtype, timings,
                self.emulation, flops, a.defense, noise,
            )  # fmt: skip
            encode_s = time.perf_counter() - started - forward_s
            upload_s, bytes_up = await self._send(a, step, Kind.ACT, body)
            sent_at = time.perf_counter()
            tail = await self._tail_exchange(a, step, segment, labels, lengths, hidden) if a.u_split else None
            received, (grad, server_loss, server_tokens), received_at, decode_s = await self._wait_reply(
                a, step, "grad", functools.partial(parse_grad, shape=tuple(hidden.shape), with_loss=tail is None)
            )
            if tail is not None:
                # Tokens: the rows' real lengths (they travel as the mask); the target count stays here.
                loss, step_tokens = (tail.loss if a.report_loss else None), int(lengths.sum())
                upload_s += tail.upload_s
                bytes_up += tail.bytes_up
                wait_s = received_at - sent_at - tail.compute_s - tail.upload_s
            else:
                assert server_loss is not None and server_tokens is not None  # parse_grad(with_loss=True)
                loss, step_tokens = server_loss, server_tokens
                wait_s = received_at - sent_at
            self._pending_act = None

            backward_s = await self._compute(_backward, hidden, grad, optimizer, self.emulation, flops, extra)
            blocks = a.cut + a.tail
            timings = {
                "forward_s": forward_s,
                "encode_s": encode_s,
                "upload_s": upload_s,
                "wait_s": wait_s,
                "decode_s": decode_s,
                "backward_s": backward_s,
                "step_s": time.perf_counter() - started,
                "bytes_up": float(bytes_up),
                "bytes_down": float(received.size),
                "tokens_padded": float(input_ids.numel()),  # the batch as computed and sent, padding included
                "rss_mb": psutil.Process().memory_info().rss / 2**20,
                "peak_rss_mb": peak_rss_mb(),
            }
            if tail is not None:
                # The tail's time split by FLOPs between its blocks and the head (norm, LM head, loss).
                timings.update(
                    tail_s=tail.compute_s, head_s=tail.head_s, bytes_down=float(received.size + tail.bytes_down)
                )
                timings["decode_s"] += tail.decode_s
            # This device's cost of one block, forward + backward (the head apart).
            timings["block_s"] = (
                forward_s + backward_s + timings.get("tail_s", 0.0) - timings.get("head_s", 0.0)
            ) / blocks
            for key, value in timings.items():
                totals[key] = totals.get(key, 0.0) + value
            tokens += step_tokens
            if loss is not None:
                losses.append(loss)
        mean = {k: v / a.local_steps for k, v in totals.items()}
        state_out = self._upload_state(segment)
        body = adapter_body(
            state_out,
            max(tokens, 1),
            a.local_steps * a.batch_size,
            sum(losses) / len(losses) if losses else None,
            mean,
            a.adapter_wire_dtype,
        )
        self._last_upload = _Outgoing(self.topics.agent(self.name, "adapter"), Kind.ADAPTER, body, a.round, -1, a.corr)
        await link.publish(self.topics.agent(self.name, "adapter"), Kind.ADAPTER, body, round_=a.round, corr=a.corr)

    async def _send(self, a: Assignment, step: int, type_: str, body: dict[str, Any]) -> tuple[float, int]:
        """Publish a step's message (kept to re-send after a reconnect until its answer comes): (seconds, bytes)."""
        assert self._link is not None
        t0 = time.perf_counter()
        topic = self.topics.agent(self.name, type_)
        self._pending_act = _Outgoing(topic, type_, body, a.round, step, a.corr)
        sent = await self._link.publish(topic, type_, body, round_=a.round, step=step, corr=a.corr)
        if self.emulation is not None:
            await self.emulation.wait_link(self.emulation.uplink_s(sent))
        return time.perf_counter() - t0, sent

    async def _tail_exchange(
        self,
        a: Assignment,
        step: int,
        segment: Segment,
        labels: torch.Tensor,
        lengths: torch.Tensor,
        hidden: torch.Tensor,
    ) -> _TailStep:
        """U split: take the server's activations at the tail, run the tail and the loss here, send the gradient up."""
        tail_start = self.num_layers - a.tail
        received, top, _, decode_s = await self._wait_reply(
            a, step, "tail_act", functools.partial(parse_tail_act, shape=tuple(hidden.shape))
        )
        config = self.model_config
        batch, length = labels.shape
        head = head_flops(config, 1, int((labels[:, 1:] != IGNORE_INDEX).sum()))  # the head runs on targets only
        flops = 2 * (a.tail * block_flops(config, batch, length) + head)
        grad, loss, compute_s = await self._compute(
            _tail_step, segment, top, labels, lengths, tail_start, self.emulation, flops
        )
        body = tail_grad_body(grad, a.wire_dtype, loss if a.report_loss else None)
        upload_s, sent = await self._send(a, step, Kind.TAIL_GRAD, body)
        head_s = compute_s * 2 * head / flops  # the head's share, by FLOPs
        return _TailStep(loss, compute_s, head_s, upload_s, sent, received.size, decode_s)

    def _upload_state(self, segment: Segment) -> dict[str, torch.Tensor]:
        """The client-side adapters this agent uploads at the end of a round."""
        return {n: t.detach().cpu() for n, t in lora_state(segment.peft_model).items()}

    async def _wait_reply(
        self, a: Assignment, step: int, kind: str, parse: Callable[[dict[str, Any]], T]
    ) -> tuple[Received, T, float, float]:
        """This step's answer of ``kind`` ("grad", or "tail_act" in the U split), parsed:
        (message, what ``parse`` made of its body, when it arrived, decode seconds).

        A malformed answer is refused and the wait goes on (the real one may still come)."""
        assert self._link is not None
        # The coordinator's deadline runs from the start of its step and it serves agents one after the
        # other: wait twice as long, so that it is always the coordinator that gives up first.
        deadline = time.monotonic() + 2 * a.step_timeout_s
        while True:
            try:
                received = await self._link.receive(timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError as exc:
                raise RoundAborted(f"no {kind} for step {step} within {a.step_timeout_s:g} s") from exc
            got, env = received.topic.kind, received.envelope
            if got == kind and env.round == a.round and env.step == step and env.corr == a.corr:
                received_at = time.perf_counter()
                if self.emulation is not None:
                    await self.emulation.wait_link(self.emulation.downlink_s(received.size))
                t_dec = time.perf_counter()
                try:
                    parsed = parse(env.body)
                except WireError as exc:
                    self._refuse(got, exc)
                    continue
                return received, parsed, received_at, time.perf_counter() - t_dec
            if got in ("grad", "tail_act"):
                continue  # a stale or repeated answer (an earlier step, an abandoned assignment)
            await self._interrupt(a, received)

    async def _interrupt(self, a: Assignment, received: Received) -> None:
        """A message other than the awaited answer came during a step: raise RoundAborted if the round is over."""
        kind, env = received.topic.kind, received.envelope
        if kind == "assign" and (env.corr == a.corr or not self._is_new(env)):
            return  # this assignment repeated (the coordinator did not know we had it), or an older one
        if kind == "assign":
            try:  # a malformed assignment must not end a good round
                self._parse_assignment(env)
            except WireError as exc:
                self._refuse(kind, exc)
                return
        if kind == "assign" or (kind == "round" and env.body.get("event") == "done"):
            self._stashed.append(received)  # the coordinator moved on without us
            raise RoundAborted(f"the coordinator moved on ({kind})")
        if kind == "notice" and (env.corr == a.corr or env.body.get("event") == "not_admitted"):
            try:
                reason = parse_notice(env.body).reason
            except WireError as exc:
                self._refuse(kind, exc)
                return
            self._stashed.append(received)
            raise RoundAborted(f"the coordinator dropped this agent: {reason}")
        if kind == "coordinator_status":
            try:
                state = parse_status(env.body)
            except WireError:
                return
            if state == "online" and env.sid == self._coordinator_sid:
                await self._hello()  # the coordinator reconnected: it may have missed our activations
                return
            if state == "offline" and env.body.get("done") is not True:
                # Its Last Will: it may only be reconnecting (a broker restart sends every Will). Wait on;
                # a new coordinator process ends the wait (below), or the deadline does.
                log.warning("%s: the coordinator went offline; waiting for it", self.name)
                return
            self._stashed.append(received)
            raise RoundAborted(f"the coordinator {'finished' if state == 'offline' else 'restarted'}")

    # ------------------------------------------------------------------ segments and data

    @property
    def num_layers(self) -> int:
        return num_layers(self.model_config)

    def _segment_for(self, a: Assignment) -> Segment:
        key = (a.cut, a.tail, a.split, tuple(sorted(a.ranks.items())), a.lora)
        if self._segment is None or self._segment_key != key:
            # Only the blocks held are loaded (0..cut-1, and the tail in the U split); a new cut, a new segment.
            spec = SegmentSpec.u_device(a.cut, a.tail, self.num_layers) if a.u_split else SegmentSpec.client(a.cut)
            self._segment = build_segment(
                self.settings.model,
                spec,
                lora=a.lora,
                ranks=a.ranks,
                lora_seed=a.seed,
                device=self.settings.device,
                dtype=self.dtype,
            )
            self._segment_key = key
        return self._segment

    def _examples_at(self, max_length: int, chat_template: str | bool) -> list[Example]:
        """This agent's examples at ``max_length`` tokens (tokenized once per length and rendering)."""
        key = (max_length, chat_template)
        if key not in self._examples:
            self._examples[key] = tokenize(self.records, self.tokenizer, max_length, chat_template)
        return self._examples[key]

    def _usable(self, max_length: int, chat_template: str | bool) -> int:
        """How many records the job's settings leave something to learn in (0 where they cannot render this
        agent's data). A long text makes several examples: the count is capped at the records."""
        try:
            return min(len(self._examples_at(max_length, chat_template)), len(self.records))
        except ConfigError as exc:  # e.g. chat_template = true and this tokenizer has none
            log.warning("%s: %s", self.name, exc)
            return 0

    def _batches_for(self, a: Assignment) -> Batches:
        key = (a.max_length, a.batch_size, a.seed, a.chat_template)
        if key not in self._batches:
            pad = int(self.tokenizer.pad_token_id)
            seed = batch_seed(a.seed, self.name)
            examples = self._examples_at(a.max_length, a.chat_template)
            self._batches[key] = Batches(examples, a.batch_size, pad, seed=seed)
        return self._batches[key]


@dataclass(frozen=True)
class _TailStep:
    """What a U-split device did between its activations going up and the gradient at its cut coming down."""

    loss: float  # mean cross-entropy over its target tokens
    compute_s: float  # the tail's forward and backward, head and loss included
    head_s: float  # the head's share of compute_s (by FLOPs)
    upload_s: float
    bytes_up: int
    bytes_down: int
    decode_s: float


def _forward(
    segment: Segment,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    lengths: torch.Tensor,
    wire_dtype: str,
    timings: Mapping[str, float],
    emulation: Emulation | None,
    flops: float,
    defense: DefenseSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], float]:
    """Client forward (B, T) -> (B, T, C), the defense applied, and the encoded activation message.

    Returns (the activations as sent, the NoPeek term to add to the loss or None, the message body, the
    forward time). ``labels`` go into the message only in the two-part split (None in the U split)."""
    t0 = time.perf_counter()
    mask = padding_mask(lengths, input_ids.shape[1]).to(segment.device)
    segment.train()
    hidden = segment(input_ids.to(segment.device), mask)  # (B, T, C)
    extra = nopeek_loss(input_ids.to(segment.device), hidden, mask, defense.nopeek) if defense.nopeek > 0 else None
    sent = defend(hidden, defense, generator) if defense.active else hidden  # (B, T, C)
    forward_s = time.perf_counter() - t0
    if emulation is not None:
        forward_s = emulation.pad_compute(forward_s, flops)
    return sent, extra, act_body(sent, labels, lengths, wire_dtype, timings), forward_s


def _tail_step(
    segment: Segment,
    top: torch.Tensor,
    labels: torch.Tensor,
    lengths: torch.Tensor,
    tail_start: int,
    emulation: Emulation | None,
    flops: float,
) -> tuple[torch.Tensor, float, float]:
    """U split: the device's tail blocks, norm, head and loss on its own labels, and their backward pass.

    Returns d(mean loss)/d(top) (B, T, C), the loss and the time; the tail's LoRA gradients stay in the
    segment for the optimiser step that ends the step.
    """
    t0 = time.perf_counter()
    mask = padding_mask(lengths, top.shape[1]).to(segment.device)
    top = top.to(segment.device).requires_grad_()  # (B, T, C)
    result = segment.target_loss(top, mask, labels.to(segment.device), tail_start)
    loss = result.loss_sum / max(result.tokens, 1)  # the mean over this device's targets
    loss.backward()
    assert top.grad is not None
    seconds = time.perf_counter() - t0
    if emulation is not None:
        seconds = emulation.pad_compute(seconds, flops)
    return top.grad.cpu(), float(loss.detach()), seconds


def _backward(
    hidden: torch.Tensor,
    grad: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    emulation: Emulation | None,
    flops: float,
    extra: torch.Tensor | None = None,
) -> float:
    """Finish the backward pass from the server's activation gradient (and a NoPeek term) and step;
    returns the time."""
    t0 = time.perf_counter()
    if extra is None:
        hidden.backward(grad.to(hidden))  # the device and dtype of the activations
    else:
        torch.autograd.backward([hidden, extra], [grad.to(hidden), torch.ones_like(extra)])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    backward_s = time.perf_counter() - t0
    return emulation.pad_compute(backward_s, flops) if emulation is not None else backward_s


def batch_seed(job_seed: int, agent: str) -> int:
    """Each agent its own data order, fixed by the job seed and its name: reruns see the same batches."""
    return job_seed * 1_000_003 + zlib.crc32(agent.encode())
