"""The edge agent's asyncio runtime: its settings, and its life in a job: connect, join, take assignments.

The agent connects with a Last Will (a retained ``offline`` status), publishes a retained ``online``
status and a join message (its device profile, the size of its data), and (re)joins whenever the
coordinator's retained status says it is online, so either side may start first or restart.

An assignment is one round's work on the device (agent/training.py: the segment for its cut, the local
steps, the adapter upload). A gradient that does not come by the step deadline, a ``notice`` that the
coordinator dropped it, or the coordinator going offline ends the round for this agent cleanly: nothing
is uploaded, and it waits for the next assignment.

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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

import splitft.agent.profile as agent_profile
import splitft.shared.model.split as model_split
import splitft.shared.model.tokenizer as model_tokenizer
from splitft.agent.bounds import InboundBounds
from splitft.agent.emulation import Emulation
from splitft.agent.profile import device_profile, measure_memory, runtime_mb, usable_mb
from splitft.agent.training import Trainer, batch_seed, upload_state
from splitft.shared import __version__
from splitft.shared.errors import ConfigError, DataError, LinkError, ModelError, RoundAborted, SplitFTError, WireError
from splitft.shared.job.records import load_records, record_text
from splitft.shared.member import Member
from splitft.shared.model.loading import check_weights, load_config, max_positions, model_fingerprint, num_layers
from splitft.shared.model.memory import MemoryFigures
from splitft.shared.model.precision import torch_dtype
from splitft.shared.model.split import Segment
from splitft.shared.profiles import load_profile
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.control import (
    Assignment,
    Join,
    join_body,
    parse_assign,
    parse_coordinator_status,
    parse_notice,
    parse_round,
)
from splitft.shared.wire.envelope import Envelope
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.topics import Kind, Topics

__all__ = ["Agent", "AgentSettings", "AgentTools", "batch_seed"]

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
    fleet_key: bytes | None = field(default=None, repr=False)  # private adapters (shared/wire/sealed.py)


@dataclass(frozen=True)
class AgentTools:
    """What an agent loads its tokenizer, measures a block and builds its segments with.

    The defaults are the real functions, for an agent alone in its process. A harness running many agents
    in one process gives them all the same tools that share the work (splitft.bench.fleet: one tokenizer,
    one block measurement, one copy of the frozen weights); each must answer as the real function would.
    """

    load_tokenizer: Callable[[str], PreTrainedTokenizerBase] = model_tokenizer.load_tokenizer
    #: ``measure_block(model, device=..., dtype=...)``: (seconds, forward FLOPs) of one block's step
    measure_block: Callable[..., tuple[float, float]] = agent_profile.measure_block
    #: ``build_segment(model, spec, lora=..., ranks=..., lora_seed=..., device=..., dtype=...)``
    build_segment: Callable[..., Segment] = model_split.build_segment


class Agent:
    """One device in a job; ``await Agent(...).run()`` returns when the job is done.

    ``tools``: see :class:`AgentTools` (the default: the real functions)."""

    def __init__(self, settings: AgentSettings, broker: BrokerSettings, *, tools: AgentTools = AgentTools()) -> None:
        self.settings = settings
        self.broker = broker
        self.topics = Topics(settings.job)
        self.name = settings.name
        self.rounds_done = 0
        self._stashed: list[Received] = []
        self._done = False
        self._last_assign: tuple[str, int, int] | None = None  # (coordinator session, round, attempt) last taken
        self._announced: tuple[str, int] | None = None  # (its session, its connection) of the last online status
        self.notices: list[tuple[str, str]] = []  # (event, reason) the coordinator sent
        self._memory: dict[tuple[int, int], MemoryFigures] = {}  # (batch, length) -> this device's figures
        self._runtime_mb: float | None = settings.runtime_mb
        self._refused: SplitFTError | None = None  # why the coordinator did not admit this agent
        self.rejected: Counter[str] = Counter()  # message bodies refused, by reason (the link counts the rest)
        # Its link, its compute thread (all model work on one thread: one OpenMP pool, no model shared across
        # threads) and its background sends, opened and closed together, as the coordinator's.
        self.member = Member()

        # Fail before connecting if the data or the model cannot be used.
        self.records = load_records(settings.data, settings.prompt_field, settings.response_field, settings.max_samples)
        self.model_config = load_config(settings.model)
        check_weights(settings.model, self.model_config)
        self.fingerprint = model_fingerprint(settings.model)  # what the coordinator compares, not the path
        self.bounds = InboundBounds(self.model_config)  # what its topics may carry (the link asks before decoding)
        self.tokenizer = tools.load_tokenizer(settings.model)
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
        started = time.perf_counter()
        seconds, flops = tools.measure_block(settings.model, device=settings.device, dtype=self.dtype)
        self.block_s = 2 * self.emulation.compute_s(flops) if self.emulation is not None else seconds
        # How long building a segment (and timing it) took: what the coordinator allows, times deadline_factor,
        # for taking an assignment in before its first step, until this agent's first report.
        self.load_s = time.perf_counter() - started
        self.trainer = Trainer(
            self.name, self.topics, settings.model, self.model_config, self.tokenizer, self.records,
            device=settings.device, dtype=self.dtype, emulation=self.emulation, member=self.member,
            build_segment=tools.build_segment, refuse=self._refuse, interrupt=self._interrupt,
            upload_state=self._upload_state, fleet_key=settings.fleet_key,
        )  # fmt: skip

    @property
    def link(self) -> Link | None:
        """The agent's MQTT link, once run() made it (it stays after run() returns: its counters are final)."""
        return self.member.link

    @property
    def _coordinator_sid(self) -> str | None:
        """The coordinator process last seen online."""
        return self._announced[0] if self._announced is not None else None

    @property
    def num_layers(self) -> int:
        return num_layers(self.model_config)

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
        async with self.member.connected(
            self.broker, self.topics, self.name, subscriptions, will=will, on_connect=self._hello, expect=self.bounds
        ) as link:
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
        if self._refused is not None:
            raise self._refused

    def _goodbye(self) -> tuple[str, str, dict[str, Any]]:
        return self.topics.agent(self.name, "status"), Kind.STATUS, {"state": "offline", "role": "agent"}

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
        link = self.member.link
        if link is None:
            return  # the first connection: run() says hello once the link is up
        await link.publish(
            self.topics.agent(self.name, "status"), Kind.STATUS, {"state": "online", "role": "agent"}, retain=True
        )
        status = self.bounds.status
        if status is None:
            return  # the join follows the coordinator's (retained) status, which gives the job's step shape
        memory = await self._memory_profile(status.batch_size, status.max_length)
        join = Join(
            profile={
                **device_profile(),
                **self._link_profile(),
                "block_s": self.block_s,
                "load_s": self.load_s,
                "block_tokens": 4 * 128,
                "base_dtype": self.dtype_name,
                **memory,
            },
            data_samples=len(self.records),
            data_tokens=max(sum(len(record_text(r)) for r in self.records) // 4, 1),  # rough, for planning
            model=self.settings.model,
            version=__version__,
            fingerprint=self.fingerprint,
            usable_samples=self.trainer.usable(status.max_length, status.chat_template),
        )
        await link.publish(self.topics.agent(self.name, "join"), Kind.JOIN, join_body(join))
        for out in (self.trainer.pending, self.trainer.last_upload):  # what may have been lost with a connection
            if out is not None:
                log.info("%s: re-sending %s of round %d step %d", self.name, out.type, out.round, out.step)
                await link.publish(out.topic, out.type, out.body, round_=out.round, step=out.step, corr=out.corr)

    async def _memory_profile(self, batch: int, length: int) -> dict[str, float]:
        """This device's memory figures at the job's step shape (memory.py), as the coordinator's status gave it."""
        if self._runtime_mb is None:
            self._runtime_mb = runtime_mb()  # before any segment of this job: the first join
        if (batch, length) not in self._memory:
            usable = float(self.emulation.profile.usable_mb) if self.emulation is not None else usable_mb()
            measure = functools.partial(
                measure_memory, self.settings.model, batch, length, usable=usable, runtime=self._runtime_mb,
                dtype=self.dtype, device=self.settings.device,
            )  # fmt: skip
            self._memory[(batch, length)] = await self.member.compute(measure)
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
                # Checked whole: a status with a bad field (retained garbage, say) is refused, and the agent
                # waits for a valid one (the coordinator restores its status when it sees another on its topic).
                status = parse_coordinator_status(env.body)
                if status.state == "online" and self._announced == (env.sid, status.connection):
                    log.debug("%s: the coordinator's status again, on the same connection", self.name)
                elif status.state == "online" and status.private_blocks and self.settings.fleet_key is None:
                    self._refused = ConfigError(
                        f"{self.name}: job {self.topics.job} keeps its client adapters private (they travel sealed "
                        "with the fleet key): join with --fleet-key-file"
                    )
                    self._done = True
                    log.error("%s", self._refused)
                elif status.state == "online":
                    self._announced = (env.sid, status.connection)
                    # The job's shapes: what examples fit and what memory a step needs here (the join says both),
                    # and what an assignment of this job may hold (the link's bounds).
                    self.bounds.status = status
                    await self._hello()
                elif status.done and env.sid == self._coordinator_sid:
                    log.info("%s: the coordinator finished the job", self.name)
                    self._done = True
            elif kind == "round" and parse_round(env.body) == "done":
                log.info("%s: the job is done", self.name)
                self._done = True
            elif kind == "assign" and not self._is_new(env):
                log.info("%s: ignoring a repeated or older assignment (round %d, %s)", self.name, env.round, env.corr)
            elif kind == "assign":
                assignment = self._parse_assignment(env)
                self._last_assign = (env.sid, assignment.round, assignment.attempt)
                self.trainer.last_upload = None
                self.bounds.assignment = assignment  # the gradients it takes are of its shape
                try:
                    await self._train(assignment)
                    self.rounds_done += 1
                except RoundAborted as exc:
                    log.warning("%s: round %d ended early: %s", self.name, assignment.round, exc)
                finally:
                    self.trainer.pending = None
                    self.bounds.assignment = None
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

    # ------------------------------------------------------------------ one round (agent/training.py)

    async def _train(self, a: Assignment) -> None:
        """One round's work on the device. Fault-injection harnesses override this and :meth:`_upload_state`."""
        assert self.member.link is not None
        await self.trainer.train(a, self.member.link)

    def _upload_state(self, segment: Segment) -> dict[str, torch.Tensor]:
        """The client-side adapters this agent uploads at the end of a round."""
        return upload_state(segment)

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
        try:  # what it says is checked whatever it is for (a malformed one is counted)
            event = parse_round(env.body) if kind == "round" else None
            notice = parse_notice(env.body) if kind == "notice" else None
        except WireError as exc:
            self._refuse(kind, exc)
            return
        if kind == "assign" or event == "done":
            self._stashed.append(received)  # the coordinator moved on without us
            raise RoundAborted(f"the coordinator moved on ({kind})")
        if notice is not None and (env.corr == a.corr or notice.event == "not_admitted"):
            self._stashed.append(received)
            raise RoundAborted(f"the coordinator dropped this agent: {notice.reason}")
        if kind == "coordinator_status":
            try:
                status = parse_coordinator_status(env.body)
            except WireError as exc:
                self._refuse(kind, exc)
                return
            state = status.state
            if state == "online" and self._announced == (env.sid, status.connection):
                return  # announced again on the same connection: nothing was lost
            if state == "online" and env.sid == self._coordinator_sid:
                self._announced = (env.sid, status.connection)
                await self._hello()  # the coordinator reconnected: it may have missed our activations
                return
            if state == "offline" and not status.done:
                # Its Last Will: it may only be reconnecting (a broker restart sends every Will). Wait on;
                # a new coordinator process ends the wait (below), or the deadline does.
                log.warning("%s: the coordinator went offline; waiting for it", self.name)
                return
            self._stashed.append(received)
            raise RoundAborted(f"the coordinator {'finished' if state == 'offline' else 'restarted'}")
