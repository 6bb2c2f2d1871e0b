"""The coordinator's state and its agents: who joined, who is online, admission, assignments sent,
agents dropped from a round. The lowest layer of the :class:`~splitft.coordinator.runtime.Coordinator`
(``Session`` -> ``StepExchange`` -> ``Uploads`` -> ``Rounds`` -> ``Coordinator``, one module each).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from splitft.coordinator.controller import Controller
from splitft.coordinator.estimates import FleetEstimates
from splitft.coordinator.server import MiddleStep, ServerModel
from splitft.shared.errors import ROUTINE_REFUSALS, JobError, Refusal
from splitft.shared.job.config import JobConfig
from splitft.shared.model.loading import model_fingerprint
from splitft.shared.model.memory import MemoryFigures, shortfall
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.control import Join, notice_body
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.queues import ByteQueue
from splitft.shared.wire.topics import COORDINATOR, Kind, Topic, Topics

if TYPE_CHECKING:
    from splitft.coordinator.workers import WorkerGroup

log = logging.getLogger(__name__)
T = TypeVar("T")

#: progress callback: (event, data) with events "waiting", "admitted", "resumed", "baseline" (round 0's
#: evaluation), "round_start", "step", "round_retry", "round_end", "done", and as they happen "agent" (one
#: joined, rejoined or went offline: name, online, profile) and "rejected" (a message refused: reason, agent)
Progress = Callable[[str, dict[str, Any]], None]

#: the most a status or join may decompress to (a join's profile is a few hundred bytes)
SMALL_MESSAGE_BYTES = 64 << 10
#: room for the envelope, names and small fields next to the tensors of a message
ENVELOPE_BYTES = 64 << 10


@dataclass
class AgentInfo:
    name: str
    profile: dict[str, Any]
    sid: str = ""  # the session (process) that joined last
    offline_since: float | None = None  # when its Last Will came (time.monotonic); None while online
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def online(self) -> bool:
        return self.offline_since is None


@dataclass
class Participant:
    """An agent's part in the current round."""

    name: str
    cut: int
    ranks: dict[int, int]  # LoRA rank of every block the agent holds
    corr: str  # this assignment's id; the agent's activations and upload repeat it
    sid: str  # the agent's session (process) when it was assigned
    sent: dict[str, torch.Tensor]  # the adapters it was sent
    assign_body: dict[str, Any] = field(default_factory=dict)
    started: bool = False  # its first activations arrived
    last_grad: tuple[int, dict[str, Any]] | None = None  # (step, body) of the last gradient sent
    update_norm: float = 0.0
    upload: dict[str, torch.Tensor] | None = None  # its adapter upload, once a valid one arrived
    tokens: int = 0
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    server_times: list[float] = field(default_factory=list)  # the server's compute for each of its steps
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: str | None = None
    last_grad_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # the agent's mean per-step timings
    tail: int = 0  # U split: the blocks at the top of the model it holds
    middle: tuple[int, MiddleStep] | None = None  # U split: (step, the server's forward) awaiting its tail gradient
    # U split, server_batching: its tail gradient and loss, kept until every agent's is in (one backward pass)
    tail_grad: tuple[torch.Tensor, float | None] | None = None
    last_tail: tuple[int, dict[str, Any]] | None = None  # U split: (step, body) of the last tail activations sent

    @property
    def blocks(self) -> int:
        """Blocks the agent runs: its cut plus its tail."""
        return self.cut + self.tail

    @property
    def expect(self) -> dict[str, tuple[int, ...]]:
        """The adapter names and shapes it must upload: those it was sent."""
        return {n: tuple(t.shape) for n, t in self.sent.items()}


@dataclass(frozen=True)
class Offline:
    """An agent's Last Will arrived (an event for the step loop)."""

    name: str


class Session:
    """The coordinator's state, its agents and their admission (see the module docstring)."""

    def __init__(
        self,
        job: JobConfig,
        broker: BrokerSettings,
        out_dir: Path,
        *,
        resume: bool = False,
        device: str = "cpu",
        progress: Progress | None = None,
        workers: WorkerGroup | None = None,
        worker_processes: Sequence[subprocess.Popen[bytes]] = (),
    ) -> None:
        self.job = job
        self.broker = broker
        self.out = Path(out_dir)
        self.resume = resume
        self.device = device
        self.progress = progress or (lambda event, data: None)
        self.topics = Topics(job.job)
        self.fingerprint = model_fingerprint(job.model)  # agents are admitted by their model's content, not path
        self.agents: dict[str, AgentInfo] = {}
        self.server: ServerModel | None = None
        self.metrics_path = self.out / "metrics.jsonl"
        self.rejected_bodies: dict[str, int] = {}
        # Messages for the step loop, bounded per agent: a few steps' activations (an agent a step ahead, repeats).
        self._events: ByteQueue[Received | Offline] = ByteQueue(1 << 30, 1 << 62)  # per agent: set with the server
        # Activations for a later step of this round (an agent ahead of the others), a few per (agent, step).
        self._early: dict[tuple[str, int], list[Received]] = {}
        self._upload_arrived = asyncio.Event()
        self._round_now = 0
        self._first_round = 1
        self.controller: Controller | None = None
        self.estimates: FleetEstimates | None = None
        self._cuts: dict[str, tuple[int, int]] = {}  # the controller's latest decision: (cut, tail) per agent
        self._joined = asyncio.Event()
        self._link: Link | None = None
        self._started = time.monotonic()
        # All model work runs on one thread: the model is not shared between threads, and torch keeps one
        # OpenMP pool per calling thread (several pools on few cores spin against each other).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="splitft-compute")
        self._elapsed_before = 0.0  # wall time of the rounds before a resume
        self._plans: dict[str, Participant] = {}  # the current round's participants
        self._background: set[asyncio.Task[Any]] = set()  # notices and re-sends in flight
        self._done = False
        # Several coordinator workers (coordinator/workers.py): this process is rank 0 of ``group``; the
        # worker processes it started on this host; which rank serves each agent. ``_route_steps``: the
        # step topics are subscribed agent by agent (for this rank's agents), not with a wildcard.
        self.group = workers
        self._worker_processes = list(worker_processes)
        self._ranks: dict[str, int] = {}
        self._route_steps = workers is not None

    # ------------------------------------------------------------------ compute

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ what the coordinator expects

    def _expect(self, topic: Topic) -> int | None:
        """The most bytes a message on ``topic`` may decompress to now; None: nothing is expected on it.

        The link asks before it decompresses anything. Anyone may join and report a status (small
        messages); activations, tail gradients and adapter uploads come only from an agent with a live
        assignment, at most the size the job's shapes give (fp32, the widest wire dtype)."""
        if topic.kind in ("status", "join"):
            return SMALL_MESSAGE_BYTES
        plan = self._plans.get(topic.agent or "")
        if plan is None or plan.dropped is not None or self.server is None:
            return None
        if topic.kind in ("act", "tail_grad"):
            return self._act_bytes()
        if topic.kind == "adapter":
            return ENVELOPE_BYTES + sum(4 * t.numel() + 256 for t in plan.sent.values())
        return None

    def _act_bytes(self) -> int:
        """The most an activation message may decompress to: (B, T, C) fp32 activations, int32 labels."""
        assert self.server is not None
        tokens = self.job.batch_size * self.job.max_length
        return ENVELOPE_BYTES + tokens * (4 * self.server.hidden_size + 8)

    def _queue_step_message(self, received: Received) -> None:
        """Hand an activation or tail gradient of the current assignment to the step loop, within bounds."""
        env, name = received.envelope, received.envelope.sender
        plan = self._plans.get(name)
        if plan is None or plan.dropped is not None or env.round != self._round_now or env.corr != plan.corr:
            self._count_rejection(Refusal.UNEXPECTED, name, f"{received.topic.kind} of another assignment ({env.corr})")
            return
        if not self._events.offer(name, received, max(received.decoded, 1)):
            self._count_rejection(
                Refusal.OVERLOADED, name, f"{self._events.held(name)} bytes of its messages wait for the step loop"
            )

    # ------------------------------------------------------------------ membership

    def _status(self, state: str) -> tuple[str, str, dict[str, Any]]:
        # max_length, chat_template: so that a joining agent can say how many of its examples fit
        body = {
            "state": state,
            "role": COORDINATOR,
            "max_length": self.job.max_length,
            "chat_template": self.job.chat_template,
            "batch_size": self.job.batch_size,  # and what memory a step needs on it
        }
        return self.topics.coordinator_status(), Kind.STATUS, body

    async def _announce(self) -> None:
        # Retained: agents that start later, or reconnect, learn that the coordinator is up and (re)join.
        if self._link is not None:  # None during the first connection: run() announces right after
            await self._link.publish(*self._status("online"), retain=True)

    def _count_rejection(self, reason: Refusal, agent: str, detail: str) -> None:
        self.rejected_bodies[reason] = self.rejected_bodies.get(reason, 0) + 1
        self.progress("rejected", {"reason": str(reason), "agent": agent})
        level = logging.INFO if reason in ROUTINE_REFUSALS else logging.WARNING
        log.log(level, "rejected a message from %s: %s (%s)", agent, reason, detail)

    def _agent_joined(self, name: str, sid: str, join: Join) -> None:
        refusal = self._refusal(join)
        if refusal is not None:
            cause, reason = refusal
            log.warning("agent %s not admitted: %s", name, reason)
            if name in self.agents and self.agents[name].sid in (sid, ""):
                self._agent_offline(name)  # admitted before it could say (its first join came before our status)
            if self._link is not None:
                topic = self.topics.agent(name, "notice")
                self._spawn(self._link.publish(topic, Kind.NOTICE, notice_body("not_admitted", reason, cause)))
            return
        info = self.agents.get(name)
        if info is None:
            self.agents[name] = info = AgentInfo(name, dict(join.profile))
            log.info("agent %s joined (%d samples)", name, join.data_samples)
        info.profile = dict(join.profile)  # the latest: a join before our status lacks the job-shaped figures
        info.offline_since = None
        info.sid = sid
        self._joined.set()
        self.progress("agent", {"name": name, "online": True, "profile": info.profile})
        plan = self._plans.get(name)
        if plan is None or plan.dropped is not None:
            return
        if sid != plan.sid:
            # A new process: whatever the old one did in this round is gone with it.
            self._drop(plan, "restarted during the round", notify=False)
            self._events.offer(name, Offline(name), 0)
        elif not plan.started:
            # Reconnected before its first step: the assignment may have been lost with the connection.
            self._spawn(self._publish_plan(plan))

    def _refusal(self, join: Join) -> tuple[str, str] | None:
        """Why an agent cannot take part (cause, reason), or None."""
        job = self.job
        if join.fingerprint != self.fingerprint:
            return "model", (
                f"its model {join.model!r} (fingerprint {join.fingerprint}) is not the job's model {job.model!r} "
                f"(fingerprint {self.fingerprint}): give --model a copy of the job's model"
            )
        if join.usable_samples == 0:
            return "data", (
                f"none of its {join.data_samples} examples fits the job's max_length of {job.max_length} tokens "
                "(an example needs its prompt and at least one response token): give it shorter prompts, or "
                "raise max_length"
            )
        memory = MemoryFigures.from_profile(join.profile)
        if memory is not None:
            blocks, where = job.c_min, f"cut {job.c_min}, the shallowest the job allows"
            if job.u_split:
                blocks, where = job.c_min + job.k_min, f"cut {job.c_min} and tail {job.k_min}, the least the job allows"
            reason = shortfall(memory, job.model, blocks, job.u_split, where)
            if reason is not None:
                return "memory", reason
        return None

    def _agent_offline(self, name: str) -> None:
        info = self.agents.get(name)
        if info is not None and info.online:
            info.offline_since = time.monotonic()
            log.warning("agent %s went offline", name)
            self.progress("agent", {"name": name, "online": False, "profile": info.profile})
            self._events.offer(name, Offline(name), 0)
            self._upload_arrived.set()

    def _online(self) -> list[str]:
        return sorted(n for n, a in self.agents.items() if a.online)

    def _gone(self, name: str) -> bool:
        """Offline for longer than the grace a reconnecting agent gets."""
        since = self.agents[name].offline_since
        return since is not None and time.monotonic() - since >= self.job.offline_grace_s

    def _spawn(self, coro: Any) -> None:
        """Run a send in the background (notices, re-sends); failures are logged, never raised."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    # ------------------------------------------------------------------ admission

    async def _admit(self) -> None:
        """Wait for ``min_agents`` agents, then a short window for more."""
        deadline = time.monotonic() + self.job.join_timeout_s
        while len(self._online()) < self.job.min_agents:
            self.progress("waiting", {"online": self._online(), "needed": self.job.min_agents})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise JobError(
                    f"only {len(self._online())} of the {self.job.min_agents} agents needed joined "
                    f"within {self.job.join_timeout_s:g} s"
                )
            await wait_briefly(self._joined, remaining)
        await asyncio.sleep(self.job.join_window_s)
        self.progress("admitted", {"agents": self._online()})

    # ------------------------------------------------------------------ the round's participants

    async def _publish_plan(self, plan: Participant) -> None:
        assert self._link is not None
        topic = self.topics.agent(plan.name, "assign")
        plan.bytes_down += await self._link.publish(
            topic, Kind.ASSIGN, plan.assign_body, round_=self._round_now, corr=plan.corr
        )

    def _drop(self, plan: Participant, reason: str, *, notify: bool = True, event: str = "dropped") -> None:
        """Take an agent out of this round (its client-side update is not aggregated); tell it if it can hear."""
        if plan.dropped is not None:
            return
        plan.dropped = reason
        log.warning("round %d: dropped agent %s: %s", self._round_now, plan.name, reason)
        if notify and self._link is not None:
            topic = self.topics.agent(plan.name, "notice")
            body = notice_body(event, reason)
            self._spawn(self._link.publish(topic, Kind.NOTICE, body, round_=self._round_now, corr=plan.corr))

    # ------------------------------------------------------------------ metrics

    def _truncate_metrics(self, after: int) -> None:
        """Drop metrics lines of rounds after the checkpoint (written before a crash, redone now)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["round"] <= after]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _write_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(jsonable(record)) + "\n")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background send failed: %s", task.exception())


async def wait_briefly(event: asyncio.Event, remaining_s: float) -> None:
    """Wait for ``event`` (cleared first) at most ``remaining_s`` and at most 1 s, so the caller re-checks."""
    event.clear()
    try:
        async with asyncio.timeout(min(remaining_s, 1.0)):
            await event.wait()
    except TimeoutError:
        pass


def eval_fields(result: Any) -> dict[str, float]:
    return {
        "eval_loss": round(result.loss, 6),
        "eval_ppl": round(result.perplexity, 4),
        "eval_acc": round(result.accuracy, 6),
        "eval_tokens": result.tokens,
    }


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value
