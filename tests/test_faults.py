"""Faults over a real Mosquitto: agents and the coordinator killed, stragglers, a broker restart,
duplicated, replayed and out-of-order messages, and a flood of garbage. Each outcome is asserted."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch
import zstandard
from test_runtime import assert_equals_centralised, equivalence_job, read_metrics, shards, small_job

from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.checkpoint import state_digest
from splitft.coordinator.runtime import Coordinator
from splitft.coordinator.server import ServerModel
from splitft.shared.errors import WireError
from splitft.shared.job.config import JobConfig, OptimizerSettings
from splitft.shared.model.lora import lora_state
from splitft.shared.model.split import Segment
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import encode_state, encode_tensor
from splitft.shared.wire.control import Assignment
from splitft.shared.wire.envelope import Envelope, decode_envelope, encode_envelope
from splitft.shared.wire.topics import Topics

from conftest import Broker, start_mosquitto, stop_broker

BIN = Path(sys.executable).parent
KEY = bytes(range(32))


def job_config(name: str, **changes: Any) -> JobConfig:
    return dataclasses.replace(small_job(name, rounds=3), **{"local_steps": 3, **changes})


async def run_with(
    coordinator: Coordinator, agents: list[Agent], timeout_s: float = 600, agents_timeout_s: float = 60
) -> None:
    tasks = [asyncio.create_task(a.run(), name=a.name) for a in agents]
    try:
        await asyncio.wait_for(coordinator.run(), timeout=timeout_s)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=agents_timeout_s)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def spawn_agent(
    broker: Broker, job: str, name: str, data: Path, log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """An agent in its own process (``splitft-agent join``, with ``extra`` options), so that it can be killed."""
    command = [str(BIN / "splitft-agent"), "-v", "join", "--broker", broker.url, "--job", job, "--data", str(data)]
    command += ["--model", "tiny-gpt2", "--id", name, *extra]
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


async def wait_online(broker: Broker, job: str, name: str, timeout_s: float = 120) -> None:
    """Until the agent's retained status says it is online (it has loaded its model and joined)."""
    topic = Topics(job).agent(name, "status")
    async with asyncio.timeout(timeout_s), aiomqtt.Client(broker.host, broker.port) as raw:
        await raw.subscribe(topic, qos=1)
        async for message in raw.messages:
            payload = message.payload
            if isinstance(payload, bytes) and payload and decode_envelope(payload).body.get("state") == "online":
                return


# --------------------------------------------------------------------------- an agent dies


async def test_agent_killed_mid_step_is_dropped_and_taken_back(broker: Broker, tmp_path: Path) -> None:
    job = job_config("kill", rounds=4, min_agents=2)
    data = shards(tmp_path)
    log = tmp_path / "a3.log"
    victim = spawn_agent(broker, job.job, "a3", data["a3"], log)
    processes = [victim]
    try:
        await wait_online(broker, job.job, "a3")  # so that a3 is in the first round

        def progress(event: str, info: dict[str, Any]) -> None:
            # Round 1, one step done: a3 is in the middle of its second step. SIGKILL: no goodbye.
            if event == "step" and info["round"] == 1 and info["step"] == 1 and len(processes) == 1:
                victim.send_signal(signal.SIGKILL)
                processes.append(spawn_agent(broker, job.job, "a3", data["a3"], log))  # it comes back
            if event == "round_end" and info["round"] == 1:
                # The next rounds wait for the restarted a3 (a new process loads its model: seconds on a
                # slow machine), so that it is taken back whatever the machine's speed.
                coordinator.job = dataclasses.replace(coordinator.job, min_agents=3)

        settings = BrokerSettings(url=broker.url)
        coordinator = Coordinator(job, settings, tmp_path / "out", progress=progress)
        agents = [Agent(AgentSettings(n, job.job, job.model, data[n]), settings) for n in ("a1", "a2")]
        await run_with(coordinator, agents)
        assert processes[1].wait(timeout=60) == 0  # the restarted a3 ran to the end of the job
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert victim.returncode == -signal.SIGKILL
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    first = metrics[1]["agents"]
    # Its Last Will (or its new process joining, whichever comes first), not a deadline.
    assert first["a3"]["dropped"] in ("went offline", "restarted during the round")
    assert first["a1"]["dropped"] is None and first["a2"]["dropped"] is None
    assert metrics[1]["attempt"] == 1  # two agents finished: min_agents=2 is met, the round counts
    assert metrics[1]["train_tokens"] == first["a1"]["tokens"] + first["a2"]["tokens"]  # a3's part left out
    assert metrics[-1]["agents"]["a3"]["dropped"] is None  # taken back once it rejoined
    assert all(a["dropped"] is None for m in metrics[2:] for a in m["agents"].values())


# --------------------------------------------------------------------------- a straggler


class Straggler(Agent):
    """Fault injection: in one round, do not start until the coordinator has given up on this agent."""

    def __init__(self, *args: Any, coordinator: Coordinator, slow_round: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coordinator = coordinator
        self.slow_round = slow_round
        self.stalled = False

    async def _train(self, a: Assignment) -> None:
        if a.round == self.slow_round and not self.stalled:
            self.stalled = True
            async with asyncio.timeout(120):
                while (p := self.coordinator.roster.participants.get(self.name)) is None or p.dropped is None:
                    await asyncio.sleep(0.05)
        await super()._train(a)


def straggler_fleet(broker: Broker, tmp_path: Path, job: JobConfig) -> tuple[Coordinator, list[Agent], Straggler]:
    """A coordinator, agents a1 and a2, and a3 that straggles in round 2."""
    data = shards(tmp_path)
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, tmp_path / "out")
    agents = [Agent(AgentSettings(n, job.job, job.model, data[n]), settings) for n in ("a1", "a2")]
    slow = Straggler(
        AgentSettings("a3", job.job, job.model, data["a3"]), settings, coordinator=coordinator, slow_round=2
    )
    return coordinator, agents, slow


async def test_straggler_is_dropped_at_the_predicted_deadline(broker: Broker, tmp_path: Path) -> None:
    job = job_config("straggler", rounds=3, local_steps=2, min_agents=2, min_step_timeout_s=3.0)
    coordinator, agents, slow = straggler_fleet(broker, tmp_path, job)
    await run_with(coordinator, [*agents, slow])
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    second = metrics[2]
    # The deadline came from the controller's prediction (x deadline_factor, at least min_step_timeout_s),
    # not from step_timeout_s (60 s): the round went on without a3.
    predicted = second["controller"]["predicted_step_s"]
    expected = min(max(job.deadline_factor * predicted, job.min_step_timeout_s) + job.min_step_timeout_s, 60)
    assert second["agents"]["a3"]["dropped"] == f"no activations for step 0 within the {expected:.1f} s deadline"
    assert second["round_time_s"] < 60
    assert second["attempt"] == 1 and second["agents"]["a1"]["dropped"] is None
    assert [e for e, _ in slow.notices] == ["dropped"]  # it was told
    assert slow.rounds_done == 2  # rounds 1 and 3
    assert metrics[3]["agents"]["a3"]["dropped"] is None


async def test_round_short_of_min_agents_is_rolled_back_and_run_again(broker: Broker, tmp_path: Path) -> None:
    job = job_config("quorum", rounds=2, local_steps=2, min_agents=3, min_step_timeout_s=3.0)
    coordinator, agents, slow = straggler_fleet(broker, tmp_path, job)
    restored: list[str] = []
    original_restore = ServerModel.restore

    def spy(self: ServerModel, snapshot: Any) -> None:
        original_restore(self, snapshot)
        restored.append(state_digest(self))

    at_round_start: list[str] = []

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "round_start" and coordinator.server is not None:
            at_round_start.append(state_digest(coordinator.server))

    coordinator.progress = progress
    ServerModel.restore = spy  # type: ignore[method-assign]
    try:
        await run_with(coordinator, [*agents, slow])
    finally:
        ServerModel.restore = original_restore  # type: ignore[method-assign]
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2]  # one line per round: the failed attempt left none
    assert metrics[2]["attempt"] == 2
    assert all(a["dropped"] is None for a in metrics[2]["agents"].values())
    # Attempt 1 of round 2 trained the server on a1 and a2; the roll-back restored the round's start exactly.
    assert len(restored) == 1 and restored[0] == at_round_start[1] == at_round_start[2]
    assert slow.rounds_done == 2  # round 1 and round 2's second attempt


# --------------------------------------------------------------------------- the coordinator dies


async def test_coordinator_killed_resumes_bit_for_bit_and_agents_carry_on(broker: Broker, tmp_path: Path) -> None:
    out, data = tmp_path / "out", shards(tmp_path)
    config = tmp_path / "job.toml"
    config.write_text(
        'job = "crash"\nmodel = "tiny-gpt2"\nrounds = 3\nlocal_steps = 3\nbatch_size = 2\nmax_length = 96\n'
        "min_agents = 3\neval_samples = 4\nstep_timeout_s = 60\nupload_timeout_s = 60\njoin_window_s = 0.2\n"
        "[cuts]\na1 = 1\na2 = 2\na3 = 3\n"
    )
    command = [str(BIN / "splitft-coordinator"), "run", "--broker", broker.url, "--out", str(out), "--config"]
    command.append(str(config))
    settings = BrokerSettings(url=broker.url)
    agents = [Agent(AgentSettings(n, "crash", "tiny-gpt2", p), settings) for n, p in data.items()]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        wide = {**os.environ, "COLUMNS": "400"}  # one line per message, whatever the terminal
        first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=wide)
        async with asyncio.timeout(300):  # kill it in round 2, once round 1 is checkpointed
            while not (out / "checkpoints" / "round-00001" / "state.json").is_file():
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
        resumed = await asyncio.to_thread(
            subprocess.run, [*command, "--resume"], capture_output=True, text=True, timeout=300, env=wide
        )
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)  # the same agents, never restarted
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if first.poll() is None:
            first.kill()
    said = re.search(r"resumed from (\S+) at round (\d+) \(state digest ([0-9a-f]{64}) verified\)", resumed.stdout)
    assert said, resumed.stdout
    checkpoint, round_, digest = Path(said[1]), int(said[2]), said[3]
    assert round_ == int(checkpoint.name.split("-")[1]) + 1 >= 2
    # The state rebuilt in memory hashes to the digest taken of the live state when the checkpoint was saved.
    assert digest == json.loads((checkpoint / "state.json").read_text())["state_digest"]
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    assert all(a["dropped"] is None for m in metrics[round_:] for a in m["agents"].values())
    assert (out / "run.png").read_bytes()[:4] == b"\x89PNG" and f"plot:    {out / 'run.png'}" in resumed.stdout
    assert all(a.rounds_done >= 3 for a in agents)  # round 2 may have been started twice


# --------------------------------------------------------------------------- the broker restarts


@pytest.mark.parametrize("split", ["two-part", "u"])
async def test_broker_restart_mid_run_loses_nothing(tmp_path: Path, split: str) -> None:
    """In the U split what is in flight may be either half of a step: both are re-sent and answered."""
    broker = start_mosquitto(tmp_path / "broker-1")
    brokers = [broker]
    try:
        job = job_config("restart", rounds=3, split=split)
        data = shards(tmp_path)
        settings = BrokerSettings(url=broker.url, backoff_min_s=0.1, backoff_max_s=1.0)

        async def restart() -> None:
            await asyncio.to_thread(stop_broker, brokers[0])
            await asyncio.sleep(1.0)
            brokers.append(await asyncio.to_thread(start_mosquitto, tmp_path / "broker-2", brokers[0].port))

        restarts: list[asyncio.Task[None]] = []

        def progress(event: str, info: dict[str, Any]) -> None:
            if event == "step" and info["round"] == 2 and info["step"] == 1 and not restarts:
                restarts.append(asyncio.get_running_loop().create_task(restart()))

        coordinator = Coordinator(job, settings, tmp_path / "out", progress=progress)
        agents = [Agent(AgentSettings(n, job.job, job.model, p), settings) for n, p in data.items()]
        await run_with(coordinator, agents)
        await restarts[0]
    finally:
        for b in brokers:
            stop_broker(b)
    assert len(brokers) == 2
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    # Nothing in flight was lost: every agent finished every round, re-sending what the restart swallowed.
    assert all(a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())
    assert all(m["attempt"] == 1 for m in metrics[1:])
    assert coordinator.link is not None and coordinator.link.connects >= 2


# --------------------------------------------------------------------------- duplicates and replays


async def test_duplicated_replayed_and_reordered_messages_are_never_applied_twice(
    broker: Broker, tmp_path: Path
) -> None:
    """A meddler on the broker sends every message of the job again: at once (the same message), and
    later re-numbered (a new sequence number, so only round, step and assignment ids can tell).
    The adapters still equal centralised SGD exactly: nothing was applied twice."""
    job = equivalence_job("replay")
    stop = asyncio.Event()
    counts: Counter[str] = Counter()

    async def meddle() -> None:
        sent: set[bytes] = set()
        rng = random.Random(0)
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.subscribe(f"splitft/v1/{job.job}/#", qos=1)
            later: list[asyncio.Task[None]] = []

            async def replay(topic: str, payload: bytes, delay: float) -> None:
                await asyncio.sleep(delay)
                await raw.publish(topic, payload, qos=1)
                counts["replayed"] += 1

            async for message in raw.messages:
                payload, topic = message.payload, str(message.topic)
                if not isinstance(payload, bytes) or not payload or hashlib.sha256(payload).digest() in sent:
                    continue
                env = decode_envelope(payload)
                copy = encode_envelope(dataclasses.replace(env, seq=env.seq + 10_000_000))
                for p in (payload, copy):
                    sent.add(hashlib.sha256(p).digest())
                await raw.publish(topic, payload, qos=1)  # a duplicate, as QoS 1 may deliver
                counts["duplicated"] += 1
                later.append(asyncio.create_task(replay(topic, copy, rng.uniform(0.05, 0.5))))
                if stop.is_set():
                    break

    meddler = asyncio.create_task(meddle())
    await asyncio.sleep(0.5)
    data = shards(tmp_path)
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, tmp_path / "out")
    agents = [Agent(AgentSettings(n, job.job, job.model, p), settings) for n, p in data.items()]
    await run_with(coordinator, agents)
    meddler.cancel()
    await asyncio.gather(meddler, return_exceptions=True)
    assert counts["duplicated"] > 30 and counts["replayed"] > 20, counts
    assert coordinator.link is not None and coordinator.link.rejected["duplicate"] > 0
    assert coordinator.server is not None
    assert_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)


# --------------------------------------------------------------------------- a flood of garbage


BOMB = zstandard.ZstdCompressor().compress(bytes(300 << 20))  # 10 kB that would expand to 300 MiB


def _round_of(corr: str | None) -> int:
    """The round of an assignment id ("coordinator-session:round:attempt")."""
    return int(corr.split(":")[1]) if corr else 1


def garbage(topics: Topics, rng: random.Random, corr: dict[str, str]) -> list[tuple[str, bytes]]:
    """Invalid payloads of every kind, addressed to every topic the coordinator and the agents read.

    Forged envelopes claim the right sender and, where the meddler has seen it, the right assignment
    id, so that they get as far as the body checks."""
    nan = encode_tensor(torch.full((2, 16, 128), float("nan")), "fp32")
    wrong_shape = encode_tensor(torch.zeros(2, 16, 64), "fp32")
    ok_hidden = encode_tensor(torch.zeros(2, 16, 128), "fp32")
    bad_labels = encode_tensor(torch.full((2, 16), 60000, dtype=torch.int32), "int32")
    lengths = encode_tensor(torch.full((2,), 16, dtype=torch.int32), "int32")
    bad_bodies: dict[str, list[dict[str, Any]]] = {
        "act": [
            {"act": nan, "labels": bad_labels, "lengths": lengths, "timings": {}},
            {"act": wrong_shape, "labels": bad_labels, "lengths": lengths, "timings": {}},
            {"act": ok_hidden, "labels": bad_labels, "lengths": lengths, "timings": {}},
            {"act": ok_hidden, "labels": {"dtype": "int32"}, "lengths": lengths, "timings": {}},
            {"act": "x"},
        ],
        "adapter": [
            {"adapter": encode_state({"nope": torch.zeros(2)}), "tokens": 1, "samples": 1, "loss": 1.0, "timings": {}},
            {"adapter": {}, "tokens": -1, "samples": 1, "loss": 1.0, "timings": {}},
        ],
        "join": [{"profile": [], "data_samples": 1}, {"model": 3}],
        "status": [{"state": "sideways"}, {}],
        "assign": [{"model": "tiny-gpt2", "cut": 99}, {"cut": "two"}],
        "grad": [{"grad": wrong_shape, "loss": 1.0, "tokens": 5}, {"grad": nan, "loss": float("nan"), "tokens": 1}],
        "notice": [{"event": "explode", "reason": "x"}],
        "round": [{"event": 7}],
        "coordinator_status": [{"state": "maybe"}],
    }
    targets: list[tuple[str, str, str]] = []  # (topic, kind, publisher)
    for agent in ("a1", "a2", "a3"):
        for kind in ("status", "join", "act", "adapter"):
            targets.append((topics.agent(agent, kind), kind, agent))
        for kind in ("assign", "grad", "notice"):
            targets.append((topics.agent(agent, kind), kind, "coordinator"))
    targets += [(topics.job_topic("round"), "round", "coordinator")]
    targets += [(topics.coordinator_status(), "coordinator_status", "coordinator")]
    out: list[tuple[str, bytes]] = []
    for topic, kind, sender in targets:
        agent = topic.split("/")[-2] if "/agents/" in topic else ""
        for body in bad_bodies[kind]:
            env = Envelope(
                type=kind if kind != "coordinator_status" else "status", job=topics.job, sender=sender,
                sid=f"g{rng.getrandbits(32):x}", seq=rng.randrange(1 << 30), round=_round_of(corr.get(agent)),
                step=0, corr=corr.get(agent), ts=0.0, body=body,
            )  # fmt: skip
            good = encode_envelope(env)
            flipped = bytearray(good)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            out += [(topic, good), (topic, bytes(flipped)), (topic, good[: rng.randrange(1, len(good))])]
        out += [
            (topic, rng.randbytes(rng.randrange(1, 200))),
            (topic, BOMB),
            (topic, b"\x28\xb5\x2f\xfd" + b"\xff" * 9),
        ]
    return out


async def test_flood_of_garbage_on_every_topic_changes_nothing(broker: Broker, tmp_path: Path) -> None:
    job = dataclasses.replace(equivalence_job("flood"), rounds=4)
    topics = Topics(job.job)
    sent: Counter[str] = Counter()
    corr: dict[str, str] = {}

    async def flood() -> None:
        rng = random.Random(1)
        async with aiomqtt.Client(broker.host, broker.port) as raw, aiomqtt.Client(broker.host, broker.port) as spy:
            await spy.subscribe(topics.all_agents("assign"), qos=1)

            async def learn() -> None:  # the meddler reads the assignment ids off the wire
                async for message in spy.messages:
                    with contextlib.suppress(WireError):  # its own garbage goes by on these topics too
                        env = decode_envelope(message.payload)  # type: ignore[arg-type]
                        if env.corr and ":" in env.corr:
                            corr[str(message.topic).split("/")[-2]] = env.corr

            learner = asyncio.create_task(learn())
            try:
                while sum(sent.values()) < 3000:  # about 220 a burst
                    for topic, payload in garbage(topics, rng, corr):
                        await raw.publish(topic, payload, qos=0)
                        sent[topic.split("/")[-1]] += 1
                    await asyncio.sleep(0.2)
            finally:
                learner.cancel()

    flooder = asyncio.create_task(flood())
    data = shards(tmp_path)
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, tmp_path / "out")
    agents = [Agent(AgentSettings(n, job.job, job.model, p), settings) for n, p in data.items()]
    await run_with(coordinator, agents)
    flooder.cancel()
    (outcome,) = await asyncio.gather(flooder, return_exceptions=True)
    assert outcome is None or isinstance(outcome, asyncio.CancelledError), outcome
    total = sum(sent.values())
    assert total >= 1000, sent
    refused = Counter(coordinator.link.rejected if coordinator.link else {}) + Counter(coordinator.refusals.counts)
    for agent in agents:
        assert agent.link is not None
        refused += Counter(agent.link.rejected) + agent.rejected
    # Every kind of refusal happened, each with its reason; the run's result is exactly the clean one.
    for reason in ("bad_compression", "too_large", "bad_shape", "nonfinite", "bad_schema"):
        assert refused[reason] > 0, refused
    assert sum(refused.values()) >= 500, refused  # most of the flood arrived while the members listened
    metrics = read_metrics(tmp_path / "out")
    assert all(a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())
    assert coordinator.server is not None
    assert_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)


# --------------------------------------------------------------------------- bad adapter uploads


class BadUploads(Agent):
    """Fault injection: this agent's upload is replaced, per round, by what ``corrupt`` makes of it."""

    def __init__(self, *args: Any, corrupt: Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
        super().__init__(*args)
        self.corrupt = corrupt
        self.round = 0

    async def _train(self, a: Assignment) -> None:
        self.round = a.round
        await super()._train(a)

    def _upload_state(self, segment: Segment) -> dict[str, torch.Tensor]:
        return self.corrupt(self.round, super()._upload_state(segment))


async def test_nan_and_outlier_uploads_are_refused_and_the_agent_told(broker: Broker, tmp_path: Path) -> None:
    def corrupt(round_: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if round_ == 1:  # a diverged update: NaN
            return {n: torch.full_like(t, float("nan")) if i == 0 else t for i, (n, t) in enumerate(state.items())}
        if round_ == 2:  # a poisoned or exploded one: 1000 x larger than any honest change
            return {n: t * 1000 + 1 for n, t in state.items()}
        return state

    job = job_config(
        "refuse", rounds=3, local_steps=2, min_agents=2, cuts={"a1": 2, "a2": 2, "a3": 2, "a4": 2},
        optimizer=OptimizerSettings(name="adamw", lr=1e-3),
    )  # fmt: skip
    data = shards(tmp_path, n=4, samples=64)
    settings = BrokerSettings(url=broker.url, auth_key=KEY)  # authenticated: a bad upload is the agent's own
    coordinator = Coordinator(job, settings, tmp_path / "out")
    agents: list[Agent] = [Agent(AgentSettings(n, job.job, job.model, data[n]), settings) for n in ("a1", "a2", "a3")]
    bad = BadUploads(AgentSettings("a4", job.job, job.model, data["a4"]), settings, corrupt=corrupt)
    await run_with(coordinator, [*agents, bad])
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    r1, r2, r3 = (m["agents"]["a4"] for m in metrics[1:])
    assert r1["dropped"].startswith("upload refused: ") and "NaN or Inf" in r1["dropped"]
    assert r2["dropped"].startswith("upload refused: update norm")
    assert r3["dropped"] is None
    assert [e for e, _ in bad.notices] == ["refused", "refused"]
    assert metrics[1]["rejected"]["nonfinite"] >= 1
    assert all(m["eval_loss"] == m["eval_loss"] for m in metrics)  # no NaN reached the global model
    assert all(a["dropped"] is None for m in metrics[1:] for n, a in m["agents"].items() if n != "a4")
