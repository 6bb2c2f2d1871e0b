"""The coordinator's asyncio runtime: admit agents, run rounds, aggregate, evaluate, checkpoint, export.

One round::

    assign (cut, ranks, the global adapters of the device's blocks, steps, optimiser)  -> every agent
    for each local step:
        agent: activations up  ->  server: forward/backward from the cut, gradient down  -> agent
        U split: activations up -> server: forward to the agent's tail, activations down -> agent: tail,
                 loss, gradient up -> server: backward, gradient at the cut down -> agent
        (after every agent's step is in: one server optimiser step)
    adapter upload <- every agent;  aggregate (token-weighted, every block over its holders)
    evaluate; metrics line; checkpoint

Compute runs in a worker thread (``asyncio.to_thread``) one item at a time, so the event loop keeps
reading the network (keep-alives, status changes) while the model works.

Faults. An agent that goes offline (its Last Will) and is not back within ``offline_grace_s`` (a
broker restart sends every member's Last Will, and they all reconnect at once), restarts, or misses a
step deadline is dropped from the round and told so (a ``notice``): its client-side update is left out of the aggregate, and it
is assigned again in the next round if it is back. Step deadlines come from the controller's predicted
step time times ``deadline_factor``, within ``[min_step_timeout_s, step_timeout_s]``. A round is only
applied if at least ``min_agents`` agents finished it; otherwise the server is rolled back to the
round's start and the round runs again. An adapter upload with NaN/Inf, or an update far larger than
the others', is refused and the agent told. Every assignment carries an id (``corr``) that the agent's
activations and upload repeat, so that nothing from an earlier assignment (another attempt, another
coordinator process) is ever applied; a repeated activation is answered with the gradient already
computed, never trained on twice. After a reconnect the agents re-send what they were waiting on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from splitft.shared.codec import encode_state
from splitft.shared.config import JobConfig
from splitft.shared.data import collate, load_records, tokenize
from splitft.shared.errors import JobError, Refusal, SplitFTError, WireError
from splitft.shared.link import BrokerSettings, Link, Received
from splitft.shared.models import block_params, check_max_length, load_config, num_layers
from splitft.shared.protocol import (
    ASSIGN,
    GRAD,
    METRICS,
    NOTICE,
    ROUND,
    STATUS,
    TAIL_ACT,
    Assignment,
    Join,
    assign_body,
    grad_body,
    notice_body,
    parse_act,
    parse_adapter,
    parse_join,
    parse_status,
    parse_tail_grad,
    tail_act_body,
)
from splitft.shared.text import GSM8K, load_tokenizer
from splitft.shared.topics import COORDINATOR, Topics

from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .controller import Controller, ControllerSettings, Decision, split_blocks
from .estimates import FleetEstimates
from .server import MiddleStep, ServerModel, device_layout, device_ranks

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_ATTEMPTS = 3  # runs of one round that fall short of min_agents before the job gives up

#: progress callback: (event, data) with events "waiting", "admitted", "resumed", "round_start", "step",
#: "round_retry", "round_end", "done"
Progress = Callable[[str, dict[str, Any]], None]


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
class _Offline:
    name: str


class Coordinator:
    """Runs one job to the end; ``await Coordinator(...).run()``."""

    def __init__(
        self,
        job: JobConfig,
        broker: BrokerSettings,
        out_dir: Path,
        *,
        resume: bool = False,
        device: str = "cpu",
        progress: Progress | None = None,
    ) -> None:
        self.job = job
        self.broker = broker
        self.out = Path(out_dir)
        self.resume = resume
        self.device = device
        self.progress = progress or (lambda event, data: None)
        self.topics = Topics(job.job)
        self.agents: dict[str, AgentInfo] = {}
        self.server: ServerModel | None = None
        self.metrics_path = self.out / "metrics.jsonl"
        self.rejected_bodies: dict[str, int] = {}
        self._events: asyncio.Queue[Received | _Offline] = asyncio.Queue()
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

    # ------------------------------------------------------------------ main

    async def run(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        subscriptions = [self.topics.all_agents(k) for k in ("status", "join", "act", "tail_grad", "adapter")]
        will = (self.topics.coordinator_status(), {"state": "offline", "role": COORDINATOR})
        async with Link(
            self.broker, self.topics, COORDINATOR, subscriptions, will=will, on_connect=self._announce
        ) as link:
            self._link = link
            await self._announce()
            try:
                # The reader is owned by a TaskGroup: should it fail, the job stops with its error.
                async with asyncio.TaskGroup() as group:
                    reader = group.create_task(self._read(), name="coordinator-reader")
                    try:
                        return await self._run_job()
                    finally:
                        reader.cancel()
            except BaseExceptionGroup as failed:
                raise failed.exceptions[0] from None
            finally:
                self._executor.shutdown(wait=False, cancel_futures=True)
                for task in list(self._background):
                    task.cancel()
                try:
                    topic, type_, body = self._status("offline")
                    # Retained with "done": an agent that missed the end learns it when it reconnects.
                    await link.publish(topic, type_, {**body, "done": self._done}, retain=True)
                except SplitFTError:
                    log.warning("could not publish the coordinator's offline status")

    async def _run_job(self) -> dict[str, Any]:
        # The job as run (file, flags and defaults merged), once the broker is reached: what a run folder
        # needs to be understood later.
        (self.out / "job.json").write_text(json.dumps(asdict(self.job), indent=2) + "\n")
        first_round = 1
        checkpoint = latest_checkpoint(self.out / "checkpoints") if self.resume else None
        state: dict[str, Any] = {}
        if self.resume and checkpoint is None:
            log.warning("--resume: no checkpoint in %s; starting from round 1", self.out / "checkpoints")
        if checkpoint is not None:
            state = read_state(checkpoint)
            first_round = int(state["round"]) + 1
            self._first_round = first_round
            self._elapsed_before = float(state.get("elapsed_s", 0.0))
            self._truncate_metrics(after=first_round - 1)
        elif self.metrics_path.exists():
            self.metrics_path.unlink()  # a fresh run starts a fresh metrics file

        await self._admit()
        total = num_layers(load_config(self.job.model, self.job.attn_implementation))
        layouts = [device_layout(total, self.job.cut_of(n), self.job.tail_of(n)) for n in self._online()]
        cuts = state.get("cuts") or sorted({tuple(spec.cuts(total)) for spec in layouts})
        self.server = await self._compute(ServerModel, self.job, cuts, self.device)
        self.job.check_cuts(self.server.num_layers)
        check_max_length(self.server.segment.config, self.job.max_length)
        if checkpoint is not None:
            restored = await self._compute(load_checkpoint, checkpoint, self.server)
            log.info("resumed from %s: continuing at round %d", checkpoint, first_round)
            self.progress(
                "resumed", {"checkpoint": str(checkpoint), "round": first_round, "digest": restored["state_digest"]}
            )
        eval_batches = await self._compute(self._eval_batches)
        # Every policy predicts step times: they set the step deadlines and the achieved/ideal ratio.
        calibration = await self._compute(
            self.server.calibrate, self.job.batch_size, self.job.max_length, self.job.c_min
        )
        log.info(
            "server calibration: %.4f s per block, %.4f s head, per device batch",
            calibration.block_s,
            calibration.head_s,
        )
        block_mb = (
            block_params(self.server.segment.config) * 4
            + self.job.batch_size * self.job.max_length * self.server.hidden_size * 64
        ) / 2**20
        if self.job.u_split:  # the head is on the devices: the server's work per batch is its blocks alone
            calibration = replace(calibration, head_s=0.0)
        self.estimates = FleetEstimates(
            self.job.ewma, calibration, block_mb, self.job.server_speedup, round_trips=2 if self.job.u_split else 1
        )
        self.controller = Controller(self._controller_settings(self.server.num_layers))
        if first_round == 1:
            result = await self._compute(self.server.evaluate, eval_batches)
            self._write_metrics({"round": 0, "time_s": 0.0, **_eval_fields(result)})

        for round_ in range(first_round, self.job.rounds + 1):
            record = await self._run_round(round_, eval_batches)
            await self._compute(
                save_checkpoint,
                self.out / "checkpoints",
                round_,
                self.server,
                {"cuts": [list(c) for c in cuts], "elapsed_s": record["time_s"], "job": self.job.job},
            )

        adapter_dir = await self._compute(self.server.export, self.out / "adapter")
        assert self._link is not None
        await self._link.publish(self.topics.job_topic("round"), ROUND, {"event": "done"}, round_=self.job.rounds)
        self._done = True
        summary = {"adapter": str(adapter_dir), "metrics": str(self.metrics_path), "rounds": self.job.rounds}
        self.progress("done", summary)
        return summary

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ------------------------------------------------------------------ network input

    def _status(self, state: str) -> tuple[str, str, dict[str, Any]]:
        return self.topics.coordinator_status(), STATUS, {"state": state, "role": COORDINATOR}

    async def _announce(self) -> None:
        # Retained: agents that start later, or reconnect, learn that the coordinator is up and (re)join.
        if self._link is not None:  # None during the first connection: run() announces right after
            await self._link.publish(*self._status("online"), retain=True)

    async def _read(self) -> None:
        assert self._link is not None
        link = self._link
        while True:
            received = await link.receive()
            name, kind, env = received.topic.agent, received.topic.kind, received.envelope
            assert name is not None
            try:
                if kind == "status":
                    # A Last Will can arrive after the same agent's new process joined: only the
                    # session that joined may take the agent offline.
                    info = self.agents.get(name)
                    if parse_status(env.body) == "offline" and (info is None or info.sid == env.sid):
                        self._agent_offline(name)
                elif kind == "join":
                    self._agent_joined(name, env.sid, parse_join(env.body))
                elif kind in ("act", "tail_grad"):
                    self._events.put_nowait(received)
                    self._upload_arrived.set()  # wakes the upload wait, which answers repeated activations
                elif kind == "adapter":
                    self._adapter_arrived(received)
            except WireError as exc:
                self._count_rejection(exc.reason, name, exc.detail)
            except Exception as exc:  # never let one message end the reader
                log.exception("unexpected error handling a %s message from %s", kind, name)
                self._count_rejection(Refusal.HANDLER_ERROR, name, f"{type(exc).__name__}: {exc}")

    def _adapter_arrived(self, received: Received) -> None:
        """Check an upload as it arrives: the first valid one of the current assignment is kept, nothing else."""
        env, name = received.envelope, received.envelope.sender
        plan = self._plans.get(name)
        if plan is None or plan.dropped is not None or env.round != self._round_now or env.corr != plan.corr:
            log.info("ignoring an adapter upload from %s: not of a current assignment", name)
            return
        if plan.upload is not None:
            return  # a repeat (re-sent after a reconnect)
        try:
            upload = parse_adapter(env.body, plan.expect)
        except WireError as exc:
            self._count_rejection(exc.reason, name, exc.detail)
            # Authenticated, a NaN/Inf upload is the agent's own diverged update: refuse it and tell it.
            # Unauthenticated it may be a forgery: wait for the agent's real upload.
            if exc.reason == Refusal.NONFINITE and self.broker.auth_key is not None:
                self._drop(plan, f"upload refused: {exc.detail}", event="refused")
                self._upload_arrived.set()
            return
        plan.bytes_up += received.size
        plan.timings = upload.timings
        plan.upload = upload.state
        self._upload_arrived.set()

    def _count_rejection(self, reason: Refusal, agent: str, detail: str) -> None:
        self.rejected_bodies[reason] = self.rejected_bodies.get(reason, 0) + 1
        log.warning("rejected a message from %s: %s (%s)", agent, reason, detail)

    def _agent_joined(self, name: str, sid: str, join: Join) -> None:
        if join.model != self.job.model:
            log.warning("agent %s runs model %r, the job uses %r: not admitted", name, join.model, self.job.model)
            return
        info = self.agents.get(name)
        if info is None:
            self.agents[name] = info = AgentInfo(name, dict(join.profile))
            log.info("agent %s joined (%d samples)", name, join.data_samples)
        info.offline_since = None
        info.sid = sid
        self._joined.set()
        plan = self._plans.get(name)
        if plan is None or plan.dropped is not None:
            return
        if sid != plan.sid:
            # A new process: whatever the old one did in this round is gone with it.
            self._drop(plan, "restarted during the round", notify=False)
            self._events.put_nowait(_Offline(name))
        elif not plan.started:
            # Reconnected before its first step: the assignment may have been lost with the connection.
            self._spawn(self._publish_plan(plan))

    def _agent_offline(self, name: str) -> None:
        info = self.agents.get(name)
        if info is not None and info.online:
            info.offline_since = time.monotonic()
            log.warning("agent %s went offline", name)
            self._events.put_nowait(_Offline(name))
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
            await _wait_briefly(self._joined, remaining)
        await asyncio.sleep(self.job.join_window_s)
        self.progress("admitted", {"agents": self._online()})

    # ------------------------------------------------------------------ rounds

    async def _run_round(self, round_: int, eval_batches: list[Any]) -> dict[str, Any]:
        """Run a round until at least ``min_agents`` agents finish it; roll back the attempts that fall short."""
        assert self.server is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            snapshot = await self._compute(self.server.snapshot)
            record = await self._round(round_, attempt, eval_batches)
            if record is not None:
                return record
            await self._compute(self.server.restore, snapshot)
            self.progress("round_retry", {"round": round_, "attempt": attempt})
        raise JobError(
            f"round {round_}: fewer than min_agents={self.job.min_agents} agents finished it in {MAX_ATTEMPTS} attempts"
        )

    async def _round(self, round_: int, attempt: int, eval_batches: list[Any]) -> dict[str, Any] | None:
        assert self.server is not None and self._link is not None
        server, link, job = self.server, self._link, self.job
        if len(self._online()) < job.min_agents:
            await self._admit()
        started = time.monotonic()
        self._round_now = round_
        self._early.clear()
        decision = self._decide()
        plans: dict[str, Participant] = {}
        self._plans = plans
        for name in self._online():
            cut, tail = self._cuts.get(name, (job.cut_of(name), job.tail_of(name)))
            ranks = device_ranks(server.num_layers, cut, tail, job.lora)
            state = await self._compute(server.client_state, ranks)
            corr = f"{link.sid}:{round_}:{attempt}"
            plan = Participant(name, cut, ranks, corr, self.agents[name].sid, state, tail=tail)
            assignment = Assignment(
                round=round_,
                model=job.model,
                cut=cut,
                ranks=ranks,
                lora=job.lora,
                adapter=encode_state(state, job.adapter_wire_dtype),
                local_steps=job.local_steps,
                batch_size=job.batch_size,
                max_length=job.max_length,
                optimizer=job.optimizer,
                wire_dtype=job.wire_dtype,
                adapter_wire_dtype=job.adapter_wire_dtype,
                step_timeout_s=job.step_timeout_s,
                seed=job.seed,
                attempt=attempt,
                corr=corr,
                split=job.split,
                tail=tail,
                report_loss=job.report_loss,
                defense=job.defense,
            )
            plan.assign_body = assign_body(assignment)
            plans[name] = plan
            await self._publish_plan(plan)
        layout: dict[str, Any] = {"cuts": {n: p.cut for n, p in plans.items()}}
        if job.u_split:
            layout["tails"] = {n: p.tail for n, p in plans.items()}
        self.progress("round_start", {"round": round_, **layout})
        await link.publish(
            self.topics.job_topic("round"), ROUND, {"event": "start", "agents": sorted(plans)}, round_=round_
        )

        for step in range(job.local_steps):
            if not any(p.dropped is None for p in plans.values()):
                break
            await self._step(round_, step, plans, self._step_deadline_s(decision, step))
            await self._compute(server.finish_step)
            self.progress("step", {"round": round_, "step": step + 1, "of": job.local_steps})

        uploads = self._screen_uploads(await self._collect_uploads(round_, plans), plans)
        live = [p for p in plans.values() if p.dropped is None]
        if len(live) < job.min_agents:
            log.warning(
                "round %d (attempt %d): %d of the %d agents needed finished (%s); rolling the round back",
                round_, attempt, len(live), job.min_agents,
                "; ".join(f"{p.name}: {p.dropped}" for p in plans.values() if p.dropped) or "none dropped",
            )  # fmt: skip
            self._plans = {}
            return None
        await self._compute(server.aggregate, uploads)
        self._plans = {}
        result = await self._compute(server.evaluate, eval_batches)
        now = time.monotonic()
        train_tokens = sum(p.tokens for p in live)
        record: dict[str, Any] = {
            "round": round_,
            "attempt": attempt,
            "time_s": round(self._elapsed_before + now - self._started, 3),
            "round_time_s": round(now - started, 3),
            **_eval_fields(result),
            # None in a U-split job whose agents do not report their loss
            "train_loss": (
                sum(sum(p.losses) for p in live) / sum(len(p.losses) for p in live)
                if any(p.losses for p in live)
                else None
            ),
            "train_tokens": train_tokens,
            "cuts": {p.name: p.cut for p in plans.values()},
            **({"tails": {p.name: p.tail for p in plans.values()}} if job.u_split else {}),
            "agents": {
                p.name: {
                    "class": self.agents[p.name].profile.get("class", "unknown"),
                    "cut": p.cut,
                    **({"tail": p.tail} if job.u_split else {}),
                    "tokens": p.tokens,
                    "step_time_s": sum(p.step_times) / max(len(p.step_times), 1),
                    "server_s": sum(p.server_times) / max(len(p.server_times), 1),
                    "bytes_up": p.bytes_up,
                    "bytes_down": p.bytes_down,
                    "update_norm": p.update_norm,
                    "dropped": p.dropped,
                    "timings": p.timings,
                }
                for p in plans.values()
            },
            "bytes_up": sum(p.bytes_up for p in plans.values()),
            "bytes_down": sum(p.bytes_down for p in plans.values()),
            "rejected": {**dict(link.rejected), **self.rejected_bodies},
            "coordinator_rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
        }
        record["step_time_s"] = max(
            (a["step_time_s"] for a in record["agents"].values() if not a["dropped"]), default=0
        )
        if decision is not None:
            record["controller"] = {
                "policy": job.policy,
                "reason": decision.reason,
                "kept": decision.kept,
                "predicted_step_s": decision.makespan_s,
                "predicted_server_s": decision.server_s,
                "predicted_device_s": decision.device_s,
                "ideal_step_s": decision.ideal_s,
                "achieved_over_ideal": record["step_time_s"] / decision.ideal_s if decision.ideal_s > 0 else None,
            }
        self._observe(live)
        self._write_metrics(record)
        await link.publish(self.topics.job_topic("metrics"), METRICS, _jsonable(record), round_=round_)
        self.progress("round_end", record)
        return record

    async def _publish_plan(self, plan: Participant) -> None:
        assert self._link is not None
        topic = self.topics.agent(plan.name, "assign")
        plan.bytes_down += await self._link.publish(
            topic, ASSIGN, plan.assign_body, round_=self._round_now, corr=plan.corr
        )

    def _step_deadline_s(self, decision: Decision | None, step: int) -> float:
        """How long a step may take: the predicted step times ``deadline_factor``, within bounds.

        The first step of a round also covers taking the assignment in (a new cut builds a new segment).
        """
        job = self.job
        if decision is None or not math.isfinite(decision.makespan_s):
            return job.step_timeout_s
        deadline = max(job.deadline_factor * decision.makespan_s, job.min_step_timeout_s)
        if step == 0:
            deadline += job.min_step_timeout_s
        return min(deadline, job.step_timeout_s)

    def _decide(self) -> Decision | None:
        """The controller's cuts for this round, once every online agent has been measured."""
        if self.controller is None or self.estimates is None:
            return None
        if self._round_now == self._first_round:
            return None  # the configured cuts first; decisions rest on this run's own measurements
        for name in self._online():  # a device that joined since the last round has only its own measurement
            self.estimates.observe_join(name, self.agents[name].profile, self.job.batch_size * self.job.max_length)
        devices = [self.estimates.device(name) for name in self._online()]
        if not devices or any(d is None for d in devices):
            return None  # first round (or a new agent): the configured cuts, and measure
        decision = self.controller.decide([d for d in devices if d is not None], self.estimates.server())
        if self.job.u_split:
            # The controller placed blocks per device; the split puts them at the bottom or the top.
            job, k_max = self.job, self._k_max(self.controller.settings.num_layers)
            self._cuts = {
                name: split_blocks(blocks, job.tail_of(name), job.c_min, job.k_min, k_max)
                for name, blocks in decision.cuts.items()
            }
        else:
            self._cuts = {name: (cut, 0) for name, cut in decision.cuts.items()}
        log.info(
            "cuts %s (%s): predicted step %.3f s (server %.3f s), ideal %.3f s",
            self._cuts, decision.reason, decision.makespan_s, decision.server_s, decision.ideal_s,
        )  # fmt: skip
        return decision

    def _k_max(self, total: int) -> int:
        return min(self.job.k_max if self.job.k_max is not None else total, total - 1 - self.job.c_min)

    def _controller_settings(self, total: int) -> ControllerSettings:
        """The controller plans the blocks each device runs: its cut, plus its tail in the U split."""
        job = self.job
        if not job.u_split:
            return ControllerSettings(
                policy=job.policy, num_layers=total, c_min=job.c_min, c_max=job.c_max, fixed_cut=job.cut,
                fixed_cuts=dict(job.cuts), gamma=job.gamma, hysteresis=job.hysteresis,
            )  # fmt: skip
        c_max = job.c_max if job.c_max is not None else total - 1
        names = {*job.cuts, *job.tails}
        return ControllerSettings(
            policy=job.policy, num_layers=total, c_min=job.c_min + job.k_min,
            c_max=min(c_max + self._k_max(total), total - 1), fixed_cut=job.cut + job.tail,
            fixed_cuts={n: job.cut_of(n) + job.tail_of(n) for n in names}, gamma=job.gamma,
            hysteresis=job.hysteresis,
        )  # fmt: skip

    def _observe(self, live: list[Participant]) -> None:
        if self.estimates is None or self.server is None:
            return
        for plan in live:
            if plan.accuracies:
                score: float | None = sum(plan.accuracies) / len(plan.accuracies)
            elif plan.losses:  # the U split: no accuracy on the server; the agent's reported loss ranks it
                score = -sum(plan.losses) / len(plan.losses)
            else:
                score = None
            self.estimates.observe_device(plan.name, plan.timings, self.agents[plan.name].profile, score)
            for seconds in plan.server_times:
                self.estimates.observe_server(self.server.num_layers, plan.blocks, seconds)

    def _is_repeat(self, item: Received, plans: dict[str, Participant], round_: int) -> bool:
        """A repeated message of a step already answered: answer it the same way again (re-sent, not
        recomputed), since the agent re-sends only when it did not get the answer. True if it was one.

        Activations are answered with the gradient (two-part) or the tail activations (U split); a U split's
        tail gradient with the gradient at the cut."""
        env = item.envelope
        plan = plans.get(env.sender)
        if plan is None or plan.dropped is not None or env.round != round_ or env.corr != plan.corr:
            return False
        kind = item.topic.kind
        if kind == "act" and self.job.u_split:
            answer, type_ = plan.last_tail, TAIL_ACT
        elif kind == "act" or kind == "tail_grad":
            answer, type_ = plan.last_grad, GRAD
        else:
            return False
        if answer is None or answer[0] != env.step:
            return False
        assert self._link is not None
        log.info("%s repeated its %s of step %d: re-sending the answer", plan.name, kind, env.step)
        topic = self.topics.agent(plan.name, type_)
        self._spawn(self._link.publish(topic, type_, answer[1], round_=round_, step=env.step, corr=plan.corr))
        return True

    async def _step(self, round_: int, step: int, plans: dict[str, Participant], timeout_s: float) -> None:
        """Serve one step of every agent still in the round."""
        assert self.server is not None and self._link is not None
        job = self.job
        pending = {n for n, p in plans.items() if p.dropped is None}
        # Activations that arrived early (an agent a step ahead of the others) go first.
        for key in [k for k in self._early if k[1] < step]:
            del self._early[key]
        ready = [item for n in sorted(pending) for item in self._early.pop((n, step), [])]
        ready.reverse()  # popped from the end: oldest first
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in [n for n in pending if plans[n].dropped is not None or self._gone(n)]:
                self._drop(plans[name], "went offline", notify=False)  # (no change if dropped already)
                pending.discard(name)
            if not pending:
                return
            if ready:
                item: Received | _Offline = ready.pop()
            else:
                # Wake up at the deadline, or when an offline agent's grace ends.
                offline = [self.agents[n].offline_since for n in pending]
                ends = [since + job.offline_grace_s for since in offline if since is not None]
                wake = min([deadline, *ends])
                try:
                    async with asyncio.timeout(max(wake - time.monotonic(), 0.0)):
                        item = await self._events.get()
                except TimeoutError:
                    if time.monotonic() < deadline:
                        continue
                    for name in pending:
                        self._drop(plans[name], f"no activations for step {step} within the {timeout_s:.1f} s deadline")
                    return
            if isinstance(item, _Offline):
                continue  # the loop's top drops it once its grace is over
            env = item.envelope
            name = env.sender  # the link checked it is the agent named in the topic
            plan = plans.get(name)
            if self._is_repeat(item, plans, round_):
                continue
            if plan is None or plan.dropped is not None or env.round != round_ or env.corr != plan.corr:
                log.info("ignoring %s from %s of another assignment (%s)", item.topic.kind, name, env.corr)
                continue
            if env.step < step or (env.step == step and name not in pending):
                log.info("ignoring a stale %s from %s (round %d step %d)", item.topic.kind, name, env.round, env.step)
                continue
            if env.step > step:
                early = self._early.setdefault((name, env.step), [])
                if item.topic.kind == "act" and env.step < job.local_steps and len(early) < 4:  # bounded
                    early.append(item)
                continue
            if item.topic.kind == "tail_grad":
                done = await self._serve_tail_grad(item, plan, step)
            elif job.u_split and plan.middle is not None:
                log.info("ignoring activations from %s: step %d is waiting for its tail gradient", name, step)
                continue
            else:
                done = await self._serve_act(item, plan, step)
            if done:
                pending.discard(name)

    async def _serve_act(self, item: Received, plan: Participant, step: int) -> bool:
        """An agent's activations at its cut: the server's part of its step (the first half in the U split).

        True when the agent's step is done (two-part: its gradient was sent, or it was dropped)."""
        assert self.server is not None and self._link is not None
        server, job, name = self.server, self.job, plan.name
        try:
            act = parse_act(
                item.envelope.body, server.hidden_size, job.batch_size, job.max_length, server.vocab_size,
                with_labels=not job.u_split,
            )  # fmt: skip
        except WireError as exc:
            # Counted and ignored; the agent's real activations may still come before the deadline.
            self._count_rejection(exc.reason, name, exc.detail)
            return False
        plan.started = True
        plan.bytes_up += item.size
        t0 = time.perf_counter()
        try:
            if job.u_split:
                middle = await self._compute(server.forward_middle, plan.cut, server.num_layers - plan.tail, act)
            else:
                result = await self._compute(server.train_on, plan.cut, act)
        except RuntimeError as exc:  # e.g. out of memory on this batch: lose the agent's round, not the job
            log.exception("server step for %s failed", name)
            self._drop(plan, f"the server could not process its batch ({exc})")
            return True
        plan.server_times.append(time.perf_counter() - t0)
        if job.u_split:
            plan.middle = (step, middle)
            body = tail_act_body(middle.top.detach(), job.wire_dtype)
            plan.last_tail = (step, body)
            plan.bytes_down += await self._link.publish(
                self.topics.agent(name, "tail_act"), TAIL_ACT, body, round_=self._round_now, step=step, corr=plan.corr
            )
            return False
        body = grad_body(result.grad, job.wire_dtype, result.loss, result.tokens)
        await self._send_grad(plan, step, body)
        plan.tokens += result.tokens
        plan.losses.append(result.loss)
        plan.accuracies.append(result.accuracy)
        return True

    async def _serve_tail_grad(self, item: Received, plan: Participant, step: int) -> bool:
        """U split: the agent's gradient at its tail finishes the server's backward pass; the gradient at its
        cut goes down. True when the agent's step is done."""
        assert self.server is not None
        if plan.middle is None or plan.middle[0] != step:
            log.info("ignoring a tail gradient from %s: no forward pass of step %d waits for it", plan.name, step)
            return False
        middle = plan.middle[1]
        try:
            tail_grad, loss = parse_tail_grad(item.envelope.body, tuple(middle.top.shape))
        except WireError as exc:
            self._count_rejection(exc.reason, plan.name, exc.detail)
            return False
        plan.bytes_up += item.size
        t0 = time.perf_counter()
        try:
            grad = await self._compute(self.server.backward_middle, middle, tail_grad)
        except RuntimeError as exc:
            log.exception("server backward for %s failed", plan.name)
            self._drop(plan, f"the server could not process its batch ({exc})")
            return True
        plan.server_times[-1] += time.perf_counter() - t0
        plan.middle = None
        await self._send_grad(plan, step, grad_body(grad, self.job.wire_dtype))
        plan.tokens += middle.tokens
        if loss is not None:
            plan.losses.append(loss)
        return True

    async def _send_grad(self, plan: Participant, step: int, body: dict[str, Any]) -> None:
        assert self._link is not None
        plan.last_grad = (step, body)
        plan.bytes_down += await self._link.publish(
            self.topics.agent(plan.name, "grad"), GRAD, body, round_=self._round_now, step=step, corr=plan.corr
        )
        now = time.monotonic()
        if plan.last_grad_at:
            plan.step_times.append(now - plan.last_grad_at)
        plan.last_grad_at = now

    async def _collect_uploads(self, round_: int, plans: dict[str, Participant]) -> dict[str, dict[str, torch.Tensor]]:
        """Wait for every agent still in the round to upload (checked on arrival by :meth:`_adapter_arrived`)."""
        deadline = time.monotonic() + self.job.upload_timeout_s
        while True:
            while not self._events.empty():  # activations repeated after a reconnect still get their gradient
                item = self._events.get_nowait()
                if isinstance(item, Received):
                    self._is_repeat(item, plans, round_)
            for name, plan in plans.items():
                if plan.dropped is None and plan.upload is None and self._gone(name):
                    self._drop(plan, "went offline before uploading", notify=False)
            remaining = deadline - time.monotonic()
            for plan in plans.values():
                if plan.dropped is None and plan.upload is None and remaining <= 0:
                    self._drop(plan, f"no adapter upload within {self.job.upload_timeout_s:g} s")
            if all(p.dropped is not None or p.upload is not None for p in plans.values()):
                return {n: p.upload for n, p in plans.items() if p.dropped is None and p.upload is not None}
            await _wait_briefly(self._upload_arrived, remaining)

    def _screen_uploads(
        self, uploads: dict[str, dict[str, torch.Tensor]], plans: dict[str, Participant]
    ) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """Refuse updates far larger than the round's median (a diverged or poisoned device); weight the
        rest by the tokens the server counted for each agent, not by what the agent claims."""
        for name, state in uploads.items():
            plan = plans[name]
            plan.update_norm = math.sqrt(sum(float((state[k] - plan.sent[k]).double().pow(2).sum()) for k in state))
        ratio = self.job.max_update_ratio
        norms = sorted(plans[n].update_norm for n in uploads)
        median = norms[len(norms) // 2] if norms else 0.0
        kept: list[tuple[float, dict[str, torch.Tensor]]] = []
        for name, state in uploads.items():
            plan = plans[name]
            if plan.dropped is not None:
                continue
            if ratio > 0 and len(uploads) >= 3 and median > 0 and plan.update_norm > ratio * median:
                reason = f"upload refused: update norm {plan.update_norm:.3g} > {ratio:g} x the median {median:.3g}"
                self._drop(plan, reason, event="refused")
                continue
            kept.append((float(plan.tokens), state))
        return kept

    def _drop(self, plan: Participant, reason: str, *, notify: bool = True, event: str = "dropped") -> None:
        """Take an agent out of this round (its client-side update is not aggregated); tell it if it can hear."""
        if plan.dropped is not None:
            return
        plan.dropped = reason
        log.warning("round %d: dropped agent %s: %s", self._round_now, plan.name, reason)
        if notify and self._link is not None:
            topic = self.topics.agent(plan.name, "notice")
            body = notice_body(event, reason)
            self._spawn(self._link.publish(topic, NOTICE, body, round_=self._round_now, corr=plan.corr))

    # ------------------------------------------------------------------ evaluation and output

    def _eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        tokenizer = load_tokenizer(self.job.model)
        source = Path(self.job.eval_data) if self.job.eval_data else GSM8K / "test.jsonl"
        pairs = load_records(source, limit=self.job.eval_samples)
        examples = tokenize(pairs, tokenizer, self.job.max_length)
        size = self.job.eval_batch_size
        pad = int(tokenizer.pad_token_id)
        return [collate(examples[i : i + size], pad) for i in range(0, len(examples), size)]

    def _truncate_metrics(self, after: int) -> None:
        """Drop metrics lines of rounds after the checkpoint (written before a crash, redone now)."""
        if not self.metrics_path.exists():
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["round"] <= after]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _write_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a background send failed: %s", task.exception())


async def _wait_briefly(event: asyncio.Event, remaining_s: float) -> None:
    """Wait for ``event`` (cleared first) at most ``remaining_s`` and at most 1 s, so the caller re-checks."""
    event.clear()
    try:
        async with asyncio.timeout(min(remaining_s, 1.0)):
            await event.wait()
    except TimeoutError:
        pass


def _eval_fields(result: Any) -> dict[str, float]:
    return {
        "eval_loss": round(result.loss, 6),
        "eval_ppl": round(result.perplexity, 4),
        "eval_acc": round(result.accuracy, 6),
        "eval_tokens": result.tokens,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value
