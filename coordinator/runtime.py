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

:class:`Coordinator` reads setup -> rounds -> finish and holds its parts, one module each: the member
(``shared/member.py``: link, reader, compute thread, background sends), membership (``membership.py``: joins,
Last Wills, admission), the round's participants (``roster.py``), the step exchange (``exchange.py``: one step's
message path, activations in, gradients out), the uploads (``uploads.py``), the cut planner (``cuts.py``) and the
round's record (``record.py``). Compute runs on the member's one compute thread, so the event loop keeps reading
the network (keep-alives, status changes) while the model works.

Faults. An agent that goes offline (its Last Will) and is not back within ``offline_grace_s`` (a broker restart
sends every member's Last Will, and they all reconnect at once), restarts, or misses a step deadline is dropped
from the round and told so (a ``notice``): its client-side update is left out of the aggregate, and it is
assigned again in the next round if it is back. Step deadlines come from the controller's predicted step time
times ``deadline_factor``, within ``[min_step_timeout_s, step_timeout_s]``. A round is only applied if at least
``min_agents`` agents finished it; otherwise the server is rolled back to the round's start and the round runs
again. An adapter upload with NaN/Inf, or an update far larger than the others', is refused and the agent told.
Every assignment carries an id (``corr``) that the agent's activations and upload repeat, so that nothing from
an earlier assignment (another attempt, another coordinator process) is ever applied; a repeated activation is
answered with the gradient already computed, never trained on twice. After a reconnect the agents re-send what
they were waiting on.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from splitft.coordinator.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
    verify_checkpoint,
)
from splitft.coordinator.cuts import CutPlanner
from splitft.coordinator.exchange import StepExchange
from splitft.coordinator.layout import device_ranks
from splitft.coordinator.membership import Membership
from splitft.coordinator.prepare import (
    build_server,
    calibrated_clips,
    encode_assignment,
    eval_batches,
    fleet_estimates,
)
from splitft.coordinator.private import PrivateAdapters
from splitft.coordinator.progress import Event, Progress, silent
from splitft.coordinator.record import MetricsFile, eval_fields, failure_record, jsonable, round_record
from splitft.coordinator.roster import Agents, Participant, Refusals, Roster
from splitft.coordinator.server import ServerModel
from splitft.coordinator.uploads import Uploads
from splitft.coordinator.workers import (
    WorkerGroup,
    assign_ranks,
    figures,
    merge_figures,
    round_message,
    route_step_topics,
)
from splitft.shared.errors import ROUTINE_REFUSALS, JobError, Refusal, SplitFTError, WireError, WorkerLost
from splitft.shared.job.config import JobConfig
from splitft.shared.member import Member
from splitft.shared.model.loading import model_fingerprint
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.control import parse_join, parse_status
from splitft.shared.wire.inbound import SMALL_MESSAGE_BYTES
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.topics import COORDINATOR, Kind, Topic, Topics

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # runs of one round that fall short of min_agents before the job gives up


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
        workers: WorkerGroup | None = None,
        worker_processes: Sequence[subprocess.Popen[bytes]] = (),
        member: Member | None = None,
    ) -> None:
        self.job, self.broker, self.out = job, broker, Path(out_dir)
        self.resume, self.device = resume, device
        self.progress: Progress = progress or silent
        self.topics = Topics(job.job)
        self.fingerprint = model_fingerprint(job.model)  # agents are admitted by their model's content, not path
        self.metrics = MetricsFile(self.out / "metrics.jsonl")
        self.member = member or Member()  # (a benchmark's, timing the model work)
        self.agents = Agents(job.offline_grace_s)
        self.roster = Roster(self.member, self.topics)
        self.refusals = Refusals(self.progress)
        self.exchange = StepExchange(job, self.member, self.topics, self.agents, self.roster, self.refusals)
        self.uploads = Uploads(job, broker.auth_key is not None, self.agents, self.roster, self.refusals, self.exchange)
        self.membership = Membership(
            job, self.fingerprint, self.member, self.topics, self.agents, self.roster, self.progress, self._lost
        )
        self.cuts = CutPlanner(job, self.agents)
        self.server: ServerModel | None = None
        # Several coordinator workers (coordinator/workers.py): this process is rank 0 of ``group``; the worker
        # processes it started on this host; which rank serves each agent. ``_route_steps``: the step topics are
        # subscribed agent by agent (for this rank's agents), not with a wildcard.
        self.group = workers
        self._worker_processes = list(worker_processes)
        self._ranks: dict[str, int] = {}
        self._route_steps = workers is not None
        self._first_round = 1
        self._started = time.monotonic()
        self._elapsed_before = 0.0  # wall time of the rounds before a resume
        self._done = False
        self._now = (0, 0)  # the round and attempt running (for a failure's line)
        self._rejected_written: Counter[str] = Counter()  # the refusals counted in the last line written
        self._rejected_before: Counter[str] = Counter()  # those of the processes before a resume
        self.eval_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.clips: dict[int, float] = {}  # a defense's clip per cut, when it is calibrated per cut
        self.private = PrivateAdapters(job)  # the sealed uploads relayed for the private blocks

    @property
    def link(self) -> Link | None:
        return self.member.link

    # ------------------------------------------------------------------ the job: setup -> rounds -> finish

    async def run(self) -> dict[str, Any]:
        if self.resume and (checkpoint := latest_checkpoint(self.out / "checkpoints")) is not None:
            verify_checkpoint(checkpoint)  # a damaged checkpoint is refused now, not after the agents joined
        self.out.mkdir(parents=True, exist_ok=True)
        # With workers, each rank subscribes to the step topics of its own agents (workers.route_step_topics).
        kinds = [Kind.STATUS, Kind.JOIN, Kind.ADAPTER] + ([] if self._route_steps else [Kind.ACT, Kind.TAIL_GRAD])
        will = (self.topics.coordinator_status(), {"state": "offline", "role": COORDINATOR})
        # Its own status topic too: another message standing there retained (garbage, a forgery) is replaced.
        topics = [self.topics.all_agents(k) for k in kinds] + [self.topics.coordinator_status()]
        async with self.member.connected(
            self.broker, self.topics, COORDINATOR, topics, read=self._read,
            will=will, on_connect=self.membership.announce, expect=self._expect, on_reject=self._rejected_by_link,
        ) as link:  # fmt: skip
            await self.membership.announce()
            try:
                first_round, cuts = await self._setup()
                for round_ in range(first_round, self.job.rounds + 1):
                    record = await self._run_round(round_)
                    state = {"cuts": [list(c) for c in cuts], "elapsed_s": record["time_s"], "job": self.job.job,
                             "rejected": record["rejected"], "private": self.private.state()}  # fmt: skip
                    await self.member.compute(save_checkpoint, self.out / "checkpoints", round_, self.server, state)
                return await self._finish()
            except Exception as exc:
                self._write_failure(exc)
                raise
            finally:
                if self.group is not None:
                    self.group.close()  # (after a failure the workers see rank 0 go, and stop)
                self.member.close()
                try:
                    topic, type_, body = self.membership.status("offline")
                    # Retained with "done": an agent that missed the end learns it when it reconnects.
                    await link.publish(topic, type_, {**body, "done": self._done}, retain=True)
                except SplitFTError:
                    log.warning("could not publish the coordinator's offline status")

    async def _setup(self) -> tuple[int, list[Any]]:
        """From the job file to the first round: the run folder, a checkpoint to resume from, the agents, the
        server segment (and the workers'), the evaluation batches, the fleet's estimates and round 0's evaluation.
        Returns the first round and the layouts the server's adapters were built for."""
        # The job as run (file, flags and defaults merged), once the broker is reached: what a run folder
        # needs to be understood later.
        (self.out / "job.json").write_text(json.dumps(asdict(self.job), indent=2) + "\n")
        checkpoint = latest_checkpoint(self.out / "checkpoints") if self.resume else None
        state: dict[str, Any] = {}
        if self.resume and checkpoint is None:
            log.warning("--resume: no checkpoint in %s; starting from round 1", self.out / "checkpoints")
        if checkpoint is not None:
            state = read_state(checkpoint)
            self._first_round = int(state["round"]) + 1
            self._elapsed_before = float(state.get("elapsed_s", 0.0))
            self._rejected_before = Counter({str(k): int(v) for k, v in state.get("rejected", {}).items()})
            self.private.restore(state.get("private", {}))
            self._rejected_written = Counter(self._rejected_before)
            self.metrics.truncate(after=self._first_round - 1)
        else:
            self.metrics.restart()
        await self.membership.admit(self.job.min_agents)
        self.server, cuts = await build_server(
            self.member, self.job, self.device, self.agents.online(), state, self.group, self._worker_processes,
            self.fingerprint,
        )  # fmt: skip
        self.exchange.start(self.server)
        self.clips = await self.member.compute(calibrated_clips, self.job, self.server.num_layers)
        if checkpoint is not None:
            restored = await self.member.compute(load_checkpoint, checkpoint, self.server)
            log.info("resumed from %s: continuing at round %d", checkpoint, self._first_round)
            data = {"checkpoint": str(checkpoint), "round": self._first_round, "digest": restored["state_digest"]}
            self.progress(Event.RESUMED, data)
        self.eval_batches = await self.member.compute(eval_batches, self.job)
        estimates = await fleet_estimates(self.member, self.job, self.server)
        self.cuts.start(estimates, self.server.num_layers)
        if self._first_round == 1:
            result = await self.member.compute(self.server.evaluate, self.eval_batches)
            baseline = {"round": 0, "time_s": 0.0, **eval_fields(result)}
            self.metrics.write(baseline)
            self.progress(Event.BASELINE, baseline)
        return self._first_round, cuts

    def _write_failure(self, exc: Exception) -> None:
        """The last line of a job that stops on an error: where it stopped, why, the exit code it ends with, and
        the refusals counted (all of them, and those since the last line). It has no evaluation fields."""
        rejected = self._rejected()
        record = failure_record(
            round_=self._now[0], attempt=self._now[1], time_s=self._elapsed_before + time.monotonic() - self._started,
            exc=exc, rejected=rejected, before=self._rejected_written,
        )  # fmt: skip
        try:
            self.metrics.write(record)
        except OSError as error:  # (the folder may be what failed)
            log.error("could not write the failure to %s: %s", self.metrics.path, error)

    async def _finish(self) -> dict[str, Any]:
        """Export the adapter, tell the workers and the agents the job is done; the job's summary."""
        assert self.server is not None
        adapter_dir = await self.member.compute(self.server.export, self.out / "adapter")
        self.private.export(adapter_dir, self.server.module_ranks(), self.job.seed)
        if self.group is not None:
            try:
                await self.member.compute(self.group.broadcast, {"op": "done"})
            except WorkerLost as exc:  # the job is complete: a worker gone since its last round changes nothing
                log.warning("could not tell the workers the job is done: %s", exc)
        link = self.member.connected_link()
        await link.publish(self.topics.job_topic(Kind.ROUND), Kind.ROUND, {"event": "done"}, round_=self.job.rounds)
        self._done = True
        summary = {"adapter": str(adapter_dir), "metrics": str(self.metrics.path), "rounds": self.job.rounds}
        self.progress(Event.DONE, summary)
        return summary

    # ------------------------------------------------------------------ rounds

    async def _run_round(self, round_: int) -> dict[str, Any]:
        """Run a round until at least ``min_agents`` agents finish it; roll back the attempts that fall short."""
        assert self.server is not None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self._now = (round_, attempt)
            snapshot = await self.member.compute(self.server.snapshot)
            reason = "too_few_agents"
            try:
                record = await self._round(round_, attempt)
            except WorkerLost as exc:
                self._lose_workers(round_, exc)
                record, reason = None, "worker_lost"
            if record is not None:
                return record
            await self.member.compute(self.server.restore, snapshot)
            self.progress(Event.ROUND_RETRY, {"round": round_, "attempt": attempt, "reason": reason})
        raise JobError(
            f"round {round_}: fewer than min_agents={self.job.min_agents} agents finished it in {MAX_ATTEMPTS} attempts"
        )

    async def _round(self, round_: int, attempt: int) -> dict[str, Any] | None:
        """One attempt at a round: assign, the steps, the uploads, aggregation, evaluation, the metrics line."""
        assert self.server is not None
        server, job, link = self.server, self.job, self.member.connected_link()
        if len(self.agents.online()) < job.min_agents:
            await self.membership.admit(self.job.min_agents)
        started = time.monotonic()
        self.exchange.begin_round()
        decision = await self.cuts.decide(round_, self._first_round)
        participants: dict[str, Participant] = {}
        self.private.check_round(len(self.agents.online()))
        for name in self.agents.online():
            cut, tail = self.cuts.layout(name)
            ranks = device_ranks(server.num_layers, cut, tail, job.lora)
            state = await self.member.compute(server.client_state, ranks)
            corr = f"{link.sid}:{round_}:{attempt}"
            sid = self.agents.known[name].sid
            participant = Participant(name, cut, ranks, corr, sid, state, tail=tail, private=self.private.blocks)
            participant.assign_body = encode_assignment(
                job, self.fingerprint, round_, attempt, participant, self.clips, self.private, server.ranks
            )
            participants[name] = participant
        self.roster.begin(round_, participants)
        deadlines = self.cuts.deadlines(decision, participants)
        mine = await self._share_round(round_, attempt, participants, deadlines)  # the agents this process serves
        for participant in participants.values():
            await self.roster.assign(participant)
        layout: dict[str, Any] = {"cuts": {n: p.cut for n, p in participants.items()}}
        if job.u_split:
            layout["tails"] = {n: p.tail for n, p in participants.items()}
        self.progress(Event.ROUND_START, {"round": round_, **layout})
        body = {"event": "start", "agents": sorted(participants)}
        await link.publish(self.topics.job_topic(Kind.ROUND), Kind.ROUND, body, round_=round_)

        group = self.group
        for step in range(job.local_steps):
            if group is None and not any(p.dropped is None for p in participants.values()):
                break  # (with workers, every rank takes every step: their collectives must pair up)
            await self.exchange.step(step, mine, deadlines[step])
            await self.member.compute(server.finish_step, group.reduce if group is not None else None)
            self.progress(Event.STEP, {"round": round_, "step": step + 1, "of": job.local_steps})
        if group is not None:
            for served in (await self.member.compute(group.gather, figures({})))[1:]:
                merge_figures(participants, served)

        uploads = await self.uploads.take(participants)
        live = [p for p in participants.values() if p.dropped is None]
        if len(live) < job.min_agents:
            log.warning(
                "round %d (attempt %d): %d of the %d agents needed finished (%s); rolling the round back",
                round_, attempt, len(live), job.min_agents,
                "; ".join(f"{p.name}: {p.dropped}" for p in participants.values() if p.dropped) or "none dropped",
            )  # fmt: skip
            self.roster.end()
            return None
        self.private.keep(round_, uploads, participants)  # the private blocks' sealed uploads, relayed next round
        await self.member.compute(server.aggregate, uploads)
        self.roster.end()
        result = await self.member.compute(server.evaluate, self.eval_batches)
        now = time.monotonic()
        record = round_record(
            round_=round_, attempt=attempt, time_s=self._elapsed_before + now - self._started,
            round_time_s=now - started, result=result, participants=participants, agents=self.agents,
            u_split=job.u_split, workers=self._ranks if self._route_steps else None,
            rejected=self._rejected(), policy=job.policy, decision=decision,
        )  # fmt: skip
        self.cuts.observe(live, server)
        self.metrics.write(record)
        self._rejected_written = Counter(record["rejected"])
        await link.publish(self.topics.job_topic(Kind.METRICS), Kind.METRICS, jsonable(record), round_=round_)
        self.progress(Event.ROUND_END, record)
        return record

    # ------------------------------------------------------------------ several coordinator workers

    async def _share_round(
        self, round_: int, attempt: int, participants: dict[str, Participant], deadlines: list[float]
    ) -> dict[str, Participant]:
        """With workers: deal the agents out to the ranks, send the round to the workers, and return the
        agents this process serves once every rank listens to its own (before any assignment goes out)."""
        if not self._route_steps:
            return participants  # one process from the start: the step topics are subscribed with a wildcard
        assert self.server is not None
        group = self.group
        self._ranks = assign_ranks(sorted(participants), group.world if group is not None else 1, self._ranks)
        mine = {n: p for n, p in participants.items() if self._ranks[n] == 0}
        await route_step_topics(self.member.connected_link(), self.topics, mine)
        if group is not None:
            message = await self.member.compute(
                round_message, round_, attempt, participants, self._ranks, deadlines, self.server
            )
            await self.member.compute(group.broadcast, message)
            await self.member.compute(group.barrier)
        return mine

    def _lose_workers(self, round_: int, exc: WorkerLost) -> None:
        """A worker is gone: leave the group; the round is rolled back and run again on this process alone."""
        log.error("round %d: %s; the job goes on with every device on this process", round_, exc)
        self.progress(Event.WORKER_LOST, {"round": round_, "error": str(exc)})
        if self.group is not None:
            self.group.close()
        self.group = None
        self.roster.end()

    # ------------------------------------------------------------------ network input

    def _expect(self, topic: Topic) -> int | None:
        """The most bytes a message on ``topic`` may decompress to now; None: nothing is expected on it.

        The link asks before it decompresses anything. Anyone may join and report a status (small
        messages); activations, tail gradients and adapter uploads come only from an agent with a live
        assignment, at most the size the job's shapes give (fp32, the widest wire dtype)."""
        if topic.kind in (Kind.STATUS, Kind.JOIN, "coordinator_status"):
            return SMALL_MESSAGE_BYTES
        if topic.kind == Kind.ADAPTER:
            participant = self.roster.live(topic.agent or "")
            return self.uploads.most_bytes(participant) if participant is not None else None
        return self.exchange.expect(topic)

    def _rejected(self) -> Counter[str]:
        """Every message refused in this job this far, by reason: the link's and the parts' since this process
        started, and those of the processes before it (a resumed job's checkpoint carries them)."""
        link = self.member.link
        return (
            self._rejected_before + Counter(link.rejected if link is not None else {}) + Counter(self.refusals.counts)
        )

    def _rejected_by_link(self, reason: str, topic: str) -> None:
        self.progress(Event.REJECTED, {"reason": reason, "topic": topic})
        if topic == self.topics.coordinator_status() and reason not in ROUTINE_REFUSALS:  # (not its own, again)
            self.membership.status_seen(None, f"refused: {reason}")

    def _lost(self, name: str) -> None:
        """An agent's process is gone: the step loop and the upload wait re-check."""
        self.exchange.went_offline(name)
        self.uploads.wake.set()

    async def _read(self, received: Received) -> None:
        name, kind, env = received.topic.agent, received.topic.kind, received.envelope
        if kind == "coordinator_status":
            self.membership.status_seen(env.sid, f"session {env.sid}")
            return
        assert name is not None
        try:
            if kind == Kind.STATUS:
                # A Last Will can arrive after the same agent's new process joined: only the
                # session that joined may take the agent offline.
                info = self.agents.get(name)
                if parse_status(env.body) == "offline" and (info is None or info.sid == env.sid):
                    self.membership.offline(name)
            elif kind == Kind.JOIN:
                self.membership.joined(name, env.sid, parse_join(env.body))
            elif kind in (Kind.ACT, Kind.TAIL_GRAD):
                self.exchange.queue(received)
                self.uploads.wake.set()  # wakes the upload wait, which answers repeated activations
            elif kind == Kind.ADAPTER:
                self.uploads.arrived(received)
        except WireError as exc:
            self.refusals.count(exc.reason, name, exc.detail)
        except Exception as exc:  # never let one message end the reader
            log.exception("unexpected error handling a %s message from %s", kind, name)
            self.refusals.count(Refusal.HANDLER_ERROR, name, f"{type(exc).__name__}: {exc}")
