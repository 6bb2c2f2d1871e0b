"""Several coordinator workers on ``torch.distributed``: the server segment of a fleet, sharded.

``splitft-coordinator run --workers N`` is rank 0: it admits the agents, decides the cuts, assigns,
collects the adapter uploads, aggregates, evaluates, checkpoints and exports, as one coordinator does.
Ranks 1..N-1 (``splitft-coordinator worker``, started by ``run`` on this host or by hand on others) run
the server segment for their share of the devices and nothing else. Per round::

    rank 0 -> all   broadcast: the round, its assignments, which rank serves which agent (explicit
                    assignment), the step deadlines, and the server's adapters and optimiser state
    every rank      subscribes to the ``act``/``tail_grad`` topics of its own agents; barrier
    rank 0          publishes the assignments (agents send nothing before theirs)
    every step      every rank serves its agents' activations (the grads go to the agents from the rank
                    that computed them); then one all-reduce of the step's server-side LoRA gradients and
                    block token counts, and every rank takes the same optimiser step
    all -> rank 0   gather: each agent's figures (tokens, losses, times, bytes, dropped)
    rank 0          uploads, aggregation, evaluation, metrics, checkpoint (the next broadcast carries
                    the result to the workers, so they never drift from rank 0)

Sharding is explicit, not MQTT v5 shared subscriptions: a broker deals a shared subscription's messages
out one by one, but a U-split step's two halves, and a device's repeated message, must reach the rank
that holds its state. An agent stays on its rank while it is online (:func:`assign_ranks`); the
agents see one coordinator (every rank publishes as ``coordinator``, with the job's key).

Nothing in this channel is pickled: commands are msgpack, tensors travel as safetensors bytes or as the
all-reduced gradient tensor itself. The rendezvous port (torch's TCP store) has no authentication:
bind it to a private network, as any ``torch.distributed`` job.

A worker lost (killed, its host gone): the next collective on rank 0 fails at once (gloo notices the
closed connection). Rank 0 rolls the round back, leaves the process group, and runs the round again with
every device on itself; the job goes on in one process (the surviving workers stop: a process group
cannot be re-formed without them all). Rank 0 lost: the workers stop; ``run --resume`` continues the job
from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any, TypeVar

import msgpack
import torch
import torch.distributed as dist
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from splitft.coordinator.checkpoint import load_server_state, server_state
from splitft.coordinator.exchange import StepExchange
from splitft.coordinator.progress import silent
from splitft.coordinator.roster import AgentInfo, Agents, Participant, Refusals, Roster
from splitft.coordinator.server import ServerModel
from splitft.shared.errors import ConfigError, JobError, SplitFTError, WorkerLost
from splitft.shared.job.config import JobConfig
from splitft.shared.member import Member
from splitft.shared.model.loading import model_fingerprint
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.control import parse_status
from splitft.shared.wire.inbound import SMALL_MESSAGE_BYTES
from splitft.shared.wire.link import Link, Received
from splitft.shared.wire.topics import COORDINATOR, Kind, Topic, Topics

log = logging.getLogger(__name__)
T = TypeVar("T")

#: the kinds of message a rank takes for the agents it serves
STEP_KINDS = ("act", "tail_grad")
#: how long the broker keeps a worker's session (its subscriptions and what arrives) over a dropped connection
WORKER_SESSION_S = 120


def parse_rendezvous(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for an IPv6 address) of rank 0's rendezvous store."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rendezvous must look like HOST:PORT, got {address!r}")
    return host, int(port)


class WorkerGroup:
    """This process's place in the group of coordinator workers: blocking collectives (run them on the
    compute thread); any failure of one is a :class:`WorkerLost`."""

    def __init__(self, rank: int, world: int, rendezvous: str, *, timeout_s: float = 1800.0) -> None:
        if world < 2:
            raise ConfigError(f"a worker group needs at least 2 workers, got {world}")
        if not 0 <= rank < world:
            raise ConfigError(f"--rank must be in 0..{world - 1}, got {rank}")
        if not 0 < timeout_s < 1e6:
            raise ConfigError(f"--worker-timeout must be a positive number of seconds, got {timeout_s}")
        self.rank, self.world = rank, world
        self.host, self.port = parse_rendezvous(rendezvous)
        self.timeout_s = timeout_s
        self._open = False

    def open(self, device: str = "cpu") -> None:
        """Join the group (rank 0 hosts the rendezvous store); returns when every rank has joined.

        gloo carries everything on the CPU; with a CUDA server the gradients go over NCCL."""
        if self.host in ("127.0.0.1", "localhost", "::1") and sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: gloo's connections stay on loopback
        backend = "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{self.host}:{self.port}",
                rank=self.rank,
                world_size=self.world,
                timeout=datetime.timedelta(seconds=self.timeout_s),
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise WorkerLost(f"cannot join the worker group at {self.host}:{self.port}: {exc}") from exc
        self._open = True
        log.info("worker %d of %d joined the group at %s:%d", self.rank, self.world, self.host, self.port)

    def close(self) -> None:
        if self._open:
            self._open = False
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError) as exc:
                log.debug("leaving the worker group: %s", exc)

    def _run(self, what: str, fn: Callable[[], T]) -> T:
        if not self._open:
            raise WorkerLost(f"{what}: this process left the worker group")
        try:
            return fn()
        except (RuntimeError, ValueError, OSError) as exc:  # gloo: "Connection closed by peer", timeouts
            raise WorkerLost(f"{what} failed: {exc}") from exc

    def broadcast(self, message: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0's ``message`` to every rank (the others give None); every rank returns it."""

        def run() -> dict[str, Any]:
            payload = msgpack.packb(message, use_bin_type=True) if self.rank == 0 else b""
            size = torch.tensor([len(payload)], dtype=torch.int64)
            dist.broadcast(size, src=0)
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == 0 else None
            if data is None:
                data = torch.empty(int(size), dtype=torch.uint8)
            dist.broadcast(data, src=0)
            return _unpack(data.numpy().tobytes())

        return self._run("broadcast", run)

    def gather(self, message: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``message``, in rank order, on every rank."""

        def run() -> list[dict[str, Any]]:
            payload = msgpack.packb(message, use_bin_type=True)
            size = torch.tensor([len(payload)], dtype=torch.int64)
            sizes = [torch.empty(1, dtype=torch.int64) for _ in range(self.world)]
            dist.all_gather(sizes, size)
            longest = max(int(s) for s in sizes)
            data = torch.zeros(longest, dtype=torch.uint8)
            data[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
            dist.all_gather(parts, data)
            return [_unpack(p[: int(s)].numpy().tobytes()) for p, s in zip(parts, sizes, strict=True)]

        return self._run("gather", run)

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier())

    def reduce(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        """Sum a step's gradients and counts over every rank, in place (``ServerModel.finish_step``)."""

        def run() -> None:
            dist.all_reduce(flat)
            dist.all_reduce(counts)

        self._run("gradient all-reduce", run)


def _unpack(raw: bytes) -> dict[str, Any]:
    value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    if not isinstance(value, dict):
        raise WorkerLost(f"a worker message is not a map: {type(value).__name__}")
    return value


def assign_ranks(names: Sequence[str], world: int, previous: Mapping[str, int]) -> dict[str, int]:
    """Which rank serves each agent: an agent keeps its rank (its subscriptions stay put), new agents go to
    the ranks with the fewest, and the counts are evened out (at most one apart) by moving the fewest."""
    ranks = {n: previous[n] for n in names if n in previous and 0 <= previous[n] < world}
    load = [0] * world
    for rank in ranks.values():
        load[rank] += 1
    for name in sorted(n for n in names if n not in ranks):
        rank = min(range(world), key=lambda r: (load[r], r))
        ranks[name] = rank
        load[rank] += 1
    while max(load) - min(load) > 1:
        src = max(range(world), key=lambda r: (load[r], -r))
        dst = min(range(world), key=lambda r: (load[r], r))
        moved = max(n for n, r in ranks.items() if r == src)
        ranks[moved] = dst
        load[src] -= 1
        load[dst] += 1
    return dict(sorted(ranks.items()))


# --------------------------------------------------------------------------- what rank 0 sends


def job_table(job: JobConfig) -> dict[str, Any]:
    """``job`` as a job file's table (what :meth:`JobConfig.from_dict` reads: no None, which means unset)."""

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: table(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [table(v) for v in value]
        return value

    data = table(asdict(job))
    if JobConfig.from_dict(data) != job:  # every field must survive the trip to the workers
        raise JobError("the job does not survive its trip to the workers as a job table (a bug: report it)")
    return data


def job_message(job: JobConfig, cuts: Sequence[Sequence[int]], fingerprint: str) -> dict[str, Any]:
    return {"op": "job", "job": json.dumps(job_table(job)), "cuts": [list(c) for c in cuts], "fingerprint": fingerprint}


def round_message(
    round_: int,
    attempt: int,
    participants: Mapping[str, Participant],
    ranks: Mapping[str, int],
    deadlines: Sequence[float],
    server: ServerModel,
) -> dict[str, Any]:
    """A round for the workers: the assignments, the step deadlines and the server's state at its start."""
    adapters, tensors, scalars, groups = server_state(server)
    return {
        "op": "round",
        "round": round_,
        "attempt": attempt,
        "participants": [[p.name, p.cut, p.tail, p.corr, p.sid, ranks[p.name]] for p in participants.values()],
        "deadlines": list(deadlines),
        "adapters": save_tensors(adapters),
        "optimizer": save_tensors(tensors) if tensors else b"",
        "optimizer_rest": json.dumps([scalars, groups]),
    }


def take_round_state(server: ServerModel, message: Mapping[str, Any]) -> None:
    """Make this worker's server what rank 0's was at the round's start (adapters and optimiser state)."""
    server.discard_step()
    server.round_tokens.clear()
    tensors = load_tensors(message["optimizer"]) if message["optimizer"] else {}
    load_server_state(server, load_tensors(message["adapters"]), tensors, *json.loads(message["optimizer_rest"]))


FIGURES = ("tokens", "losses", "accuracies", "step_times", "server_times", "bytes_up", "bytes_down", "started")


def figures(participants: Mapping[str, Participant]) -> dict[str, Any]:
    """What rank 0 needs of each agent a worker served: its figures and whether it was dropped."""
    return {
        "agents": {n: {**{k: getattr(p, k) for k in FIGURES}, "dropped": p.dropped} for n, p in participants.items()}
    }


def merge_figures(participants: Mapping[str, Participant], served: Mapping[str, Any]) -> None:
    """Rank 0: a worker's figures of its agents added to rank 0's own (the assignment it sent, the upload it
    took: bytes); a drop on either side stands."""
    for name, got in served.get("agents", {}).items():
        participant = participants.get(name)
        if participant is None:
            continue
        for key in FIGURES:
            mine, theirs = getattr(participant, key), got[key]
            setattr(participant, key, (mine or theirs) if isinstance(mine, bool) else mine + theirs)
        if participant.dropped is None and got["dropped"] is not None:
            participant.dropped = got["dropped"]  # the worker told the agent already


# --------------------------------------------------------------------------- ranks 1..N-1


class ServerWorker:
    """Rank 1..N-1: serve the steps of the agents rank 0 gives this rank, round after round. It holds a member
    (link, reader, compute thread), the agents' presence, the round's participants and the step exchange: no
    admission, uploads or rounds of its own."""

    def __init__(
        self,
        job: JobConfig,
        broker: BrokerSettings,
        group: WorkerGroup,
        *,
        device: str = "cpu",
        member: Member | None = None,
    ) -> None:
        self.job, self.broker, self.group, self.device = job, broker, group, device
        self.topics = Topics(job.job)
        self.fingerprint = model_fingerprint(job.model)
        self.member = member or Member()  # (a benchmark's, timing the model work)
        self.agents = Agents(job.offline_grace_s)
        self.roster = Roster(self.member, self.topics)
        self.refusals = Refusals(silent)
        self.exchange = StepExchange(job, self.member, self.topics, self.agents, self.roster, self.refusals)
        self.server: ServerModel | None = None

    async def serve(self, start: Mapping[str, Any]) -> None:
        if start["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"worker {self.group.rank}: its model {self.job.model!r} (fingerprint {self.fingerprint}) is not "
                f"rank 0's (fingerprint {start['fingerprint']}): give every worker a copy of the job's model"
            )
        cuts = [list(c) for c in start["cuts"]]
        self.server = await self.member.compute(ServerModel, self.job, cuts, self.device)
        self.exchange.start(self.server)
        # No Last Will and no status: the agents follow rank 0's coordinator status, not a worker's. So nothing
        # makes the agents re-send what a worker missed while its connection was down: its session outlives a
        # drop instead (MQTT v5), and the broker delivers what came meanwhile when it is back.
        broker = replace(self.broker, session_expiry_s=WORKER_SESSION_S) if self.broker.protocol == "5" else self.broker
        async with self.member.connected(
            broker, self.topics, COORDINATOR, [self.topics.all_agents(Kind.STATUS)], read=self._read,
            expect=self._expect,
        ):  # fmt: skip
            await self.member.compute(self.group.barrier)  # ready: rank 0 may assign
            while await self._serve_round():
                pass

    async def _serve_round(self) -> bool:
        """One round's steps for this rank's agents; False when rank 0 says the job is over."""
        assert self.server is not None
        message = await self._while_waiting(self.group.broadcast)
        if message["op"] != "round":
            log.info("worker %d: rank 0 ended the job (%s)", self.group.rank, message.get("reason", message["op"]))
            return False
        await self.member.compute(take_round_state, self.server, message)
        round_, attempt = int(message["round"]), int(message["attempt"])
        mine: dict[str, Participant] = {}
        for name, cut, tail, corr, sid, rank in message["participants"]:
            if rank == self.group.rank:
                mine[name] = Participant(name, cut, {}, corr, sid, {}, tail=tail)
                info = self.agents.known.setdefault(name, AgentInfo(name, {}))
                info.sid, info.offline_since = sid, None
        self.roster.begin(round_, mine)
        self.exchange.begin_round()
        await route_step_topics(self.member.connected_link(), self.topics, mine)
        await self.member.compute(self.group.barrier)
        log.info("worker %d: round %d (attempt %d): serving %s", self.group.rank, round_, attempt, ", ".join(mine))
        for step, deadline in enumerate(message["deadlines"]):
            await self.exchange.step(step, mine, float(deadline))
            await self.member.compute(self.server.finish_step, self.group.reduce)
        await self.member.compute(self.group.gather, figures(mine))
        return True

    async def _while_waiting(self, fn: Callable[[], T]) -> T:
        """Run a collective; meanwhile answer what the agents repeat (a reconnect after their last step)."""
        future = asyncio.ensure_future(self.member.compute(fn))
        while not future.done():
            await asyncio.wait({future}, timeout=0.25)
            while not self.exchange.events.empty():
                item = self.exchange.events.get_nowait()
                if isinstance(item, Received) and (participant := self.roster.current(item.envelope)) is not None:
                    self.exchange.answer_again(item, participant)
        return future.result()

    def _expect(self, topic: Topic) -> int | None:
        """What this rank takes: the step messages of the agents it serves this round (see the coordinator's)."""
        return SMALL_MESSAGE_BYTES if topic.kind == Kind.STATUS else self.exchange.expect(topic)

    async def _read(self, received: Received) -> None:
        name, kind, env = received.topic.agent, received.topic.kind, received.envelope
        if kind == Kind.STATUS and name is not None:
            info = self.agents.get(name)
            try:
                offline = parse_status(env.body) == "offline"
            except SplitFTError:
                return
            if offline and info is not None and info.sid == env.sid and self.agents.went_offline(name):
                log.warning("agent %s went offline", name)
                self.exchange.went_offline(name)
        elif kind in STEP_KINDS:
            self.exchange.queue(received)


async def route_step_topics(link: Link, topics: Topics, served: Mapping[str, Any]) -> None:
    """Subscribe ``link`` to the step topics of the agents in ``served``, and to no other agent's."""
    wanted = {topics.agent(name, kind) for name in served for kind in STEP_KINDS}
    current = {f for f in link.subscriptions if f.endswith(tuple(f"/{k}" for k in STEP_KINDS))}
    await link.unsubscribe(sorted(current - wanted))
    await link.subscribe(sorted(wanted - current))


async def run_worker(
    group: WorkerGroup, broker: BrokerSettings, device: str = "cpu", *, member: Member | None = None
) -> ServerWorker | None:
    """A worker process from start to end: join the group, take the job from rank 0, serve its rounds. Returns the
    worker once the job is over (None if rank 0 ended it before it started); ``member``: see :class:`ServerWorker`."""
    await asyncio.to_thread(group.open, device)
    try:
        start = await asyncio.to_thread(group.broadcast)
        if start["op"] != "job":
            log.info("worker %d: rank 0 ended the job before it started", group.rank)
            return None
        job = JobConfig.from_dict(json.loads(start["job"]))
        worker = ServerWorker(job, broker, group, device=device, member=member)
        await worker.serve(start)
        return worker
    finally:
        group.close()


# --------------------------------------------------------------------------- workers on this host


def start_local_workers(
    world: int, rendezvous: str, args: Sequence[str], env: Mapping[str, str] | None = None
) -> list[subprocess.Popen[bytes]]:
    """Start ranks 1..world-1 on this host: ``splitft-coordinator worker`` with ``args`` (broker, device)."""
    procs = []
    for rank in range(1, world):
        command = [
            sys.executable, "-m", "splitft.coordinator.cli", "worker", "--rendezvous", rendezvous,
            "--rank", str(rank), "--workers", str(world), *args,
        ]  # fmt: skip
        procs.append(subprocess.Popen(command, env={**os.environ, **(env or {})}))
    return procs


def stop_local_workers(procs: Sequence[subprocess.Popen[bytes]], wait_s: float = 15.0) -> None:
    """Wait for the workers this process started to end (they do when the job does); kill the late ones."""
    deadline = time.monotonic() + wait_s
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("worker process %d did not end; killing it", proc.pid)
            proc.kill()
            proc.wait()


async def open_group(group: WorkerGroup, device: str, procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Rank 0 joins the group; returns once every rank has. A worker started here that exits first fails it.

    The rendezvous blocks a thread of its own (a daemon: a rendezvous that never completes must not keep
    the process from ending)."""
    loop = asyncio.get_running_loop()
    joined: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if not joined.done():
            joined.set_result(None) if error is None else joined.set_exception(error)

    def join() -> None:
        error: BaseException | None = None
        try:
            group.open(device)
        except BaseException as exc:  # handed to the waiting coroutine
            error = exc
        loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=join, name="splitft-rendezvous", daemon=True).start()
    while not joined.done():
        await asyncio.wait({joined}, timeout=0.5)
        for rank, proc in enumerate(procs, start=1):
            if proc.poll() is not None and not joined.done():
                raise JobError(
                    f"worker {rank} (process {proc.pid}) exited with code {proc.returncode} before it joined the group"
                )
    joined.result()
