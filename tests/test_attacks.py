"""Attacks by a client of the broker, through a real Mosquitto, against real agents: a forged upload that would
veto an agent, zstd bombs on a device's topics, retained garbage on the coordinator's status, a device that
joins and stays silent; and what a job that fails leaves behind (its last metrics line, its progress bar)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import psutil
import pytest
import torch
import zstandard
from rich.console import Console
from test_faults import KEY, BadUploads, run_with, spawn_agent, wait_online
from test_runtime import assert_equals_centralised, equivalence_job, read_metrics, shards, small_job

from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.cli_jobs import ProgressView
from splitft.coordinator.local import stop_processes
from splitft.coordinator.runtime import MAX_ATTEMPTS, Coordinator
from splitft.shared.errors import JobError
from splitft.shared.job.config import OptimizerSettings
from splitft.shared.model.lora import lora_state
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import decode_state
from splitft.shared.wire.control import Assignment
from splitft.shared.wire.envelope import Envelope, decode_envelope, encode_envelope
from splitft.shared.wire.keys import load_key, write_key
from splitft.shared.wire.messages import adapter_body
from splitft.shared.wire.topics import Kind, Topics

from conftest import Broker

MB = 1 << 20


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    stop_processes(processes, timeout_s=30)


# --------------------------------------------------------------------------- no cheap veto


async def test_a_forged_outlier_upload_does_not_veto_an_agent(broker: Broker, tmp_path: Path) -> None:
    """Without a job key, a client of the broker reads each assignment of a2 off the wire and at once publishes an
    upload in a2's name, its adapters scaled by a million. It used to be taken as a2's own, refused as an outlier,
    and a2 dropped: with min_agents equal to the fleet, the job failed after three attempts of round 1. Now the
    forgery is counted and a2's real upload awaited: nobody is dropped, and the result is exactly the clean one."""
    job = equivalence_job("forge")
    topics = Topics(job.job)
    data = shards(tmp_path)
    forged: list[str] = []

    async def forge() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            await raw.subscribe(topics.agent("a2", "assign"), qos=1)
            async for message in raw.messages:
                env = decode_envelope(message.payload)  # type: ignore[arg-type]
                sent = decode_state(env.body["adapter"])
                body = adapter_body({n: t * 1e6 + 1 for n, t in sent.items()}, 4, 2, 1.0, {})
                forgery = Envelope(
                    type=Kind.ADAPTER, job=job.job, sender="a2", sid="forger", seq=len(forged) + 1, round=env.round,
                    corr=env.corr, ts=time.time(), body=body,
                )  # fmt: skip
                await raw.publish(topics.agent("a2", "adapter"), encode_envelope(forgery), qos=1)
                forged.append(str(env.corr))

    forger = asyncio.create_task(forge())
    processes = [spawn_agent(broker, job.job, name, path, tmp_path / f"{name}.log") for name, path in data.items()]
    try:
        coordinator = Coordinator(job, BrokerSettings(url=broker.url), tmp_path / "out")
        await asyncio.wait_for(coordinator.run(), timeout=300)
        assert all(p.wait(timeout=60) == 0 for p in processes)
    finally:
        forger.cancel()
        await asyncio.gather(forger, return_exceptions=True)
        stop(processes)
    metrics = read_metrics(tmp_path / "out")
    assert [m["round"] for m in metrics] == [0, 1, 2, 3] and all(m["attempt"] == 1 for m in metrics[1:])
    assert all(a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())
    assert len(forged) == job.rounds  # one forgery per assignment of a2
    assert metrics[-1]["rejected"].get("outlier", 0) >= 1  # (a forgery that came after a2's own was never used)
    assert coordinator.server is not None
    assert_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)


# --------------------------------------------------------------------------- a device's memory under bombs


def bomb(topics: Topics, kind: str, declared_mb: int, seq: int) -> bytes:
    """An envelope of a few kilobytes from "the coordinator" that decompresses to ``declared_mb`` MiB."""
    env = Envelope(
        type=kind, job=topics.job, sender="coordinator", sid=f"bomb{seq}", seq=seq, round=1, step=0,
        body={"grad": {"dtype": "fp32", "shape": [1], "data": bytes(declared_mb * MB)}},
    )  # fmt: skip
    return encode_envelope(env)


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "job-key"])
async def test_bomb_floods_on_a_devices_topics_leave_its_memory_flat(
    broker: Broker, tmp_path: Path, keyed: bool
) -> None:
    """Bombs on every topic an agent reads. Twelve on `grad` took an agent from 622 MB to 1.39 GB (1.02 GB with a
    job key: the tag was checked after decompressing). Now the tag is checked first, and every topic is bounded by
    the job's shapes before anything is decompressed: the agent's RSS stays within 64 MiB of its idle RSS."""
    job = dataclasses.replace(small_job("bombs", rounds=1), min_agents=2, join_timeout_s=600)
    topics = Topics(job.job)
    data = shards(tmp_path, n=1)
    key = load_key(write_key(tmp_path / "job.key"))
    extra = ["--auth-key-file", str(tmp_path / "job.key")] if keyed else []
    log = tmp_path / "a1.log"
    agent = spawn_agent(broker, job.job, "a1", data["a1"], log, extra)
    settings = BrokerSettings(url=broker.url, auth_key=key if keyed else None)
    coordinator = Coordinator(job, settings, tmp_path / "out")  # waits for a second agent that never comes
    task = asyncio.create_task(coordinator.run())
    try:
        await wait_online(broker, job.job, "a1")
        async with asyncio.timeout(60):
            while "a1" not in coordinator.agents.known:  # it joined: it read the coordinator's status
                await asyncio.sleep(0.1)
        process = psutil.Process(agent.pid)
        idle = []
        for _ in range(20):
            idle.append(process.memory_info().rss)
            await asyncio.sleep(0.1)
        kinds = {Kind.ASSIGN: "assign", Kind.GRAD: "grad", Kind.TAIL_ACT: "tail_act", Kind.NOTICE: "notice"}
        targets = [(topics.agent("a1", name), kind) for kind, name in kinds.items()]
        targets += [(topics.job_topic("round"), Kind.ROUND), (topics.coordinator_status(), Kind.STATUS)]
        payloads = [(topic, bomb(topics, kind, 200, i)) for i, (topic, kind) in enumerate(targets * 6)]
        assert max(len(p) for _, p in payloads) < 64 << 10
        peak = 0
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            for topic, payload in payloads:
                await raw.publish(topic, payload, qos=1)
                peak = max(peak, process.memory_info().rss)
            for _ in range(50):  # while the agent takes them in
                await asyncio.sleep(0.1)
                peak = max(peak, process.memory_info().rss)
        assert agent.poll() is None, log.read_text()[-2000:]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        stop([agent])
    text = log.read_text()
    refused = Counter(re.findall(r"rejected a message on \S+: (\w+) \(", text))
    expected = {"unauthenticated"} if keyed else {"too_large", "unexpected"}
    assert sum(refused[r] for r in expected) >= len(payloads), refused
    grown = (peak - max(idle)) / MB
    assert grown < 64, (
        f"the agent's RSS grew by {grown:.0f} MiB under {len(payloads)} bombs (idle {max(idle) / MB:.0f})"
    )


# --------------------------------------------------------------------------- a failing job's last line


async def test_a_failing_job_ends_its_metrics_with_why_and_its_bar_within_the_total(
    broker: Broker, tmp_path: Path
) -> None:
    """a3's upload is NaN in round 2 on every attempt (with a job key: its own), so round 2 falls short of
    min_agents three times and the job fails. Its refusals used to vanish with it (the last line was round 1's)
    and the bar passed its total after the retries. Now the last line says where and why it stopped, with the
    exit code and the refusals since round 1; the bar counted the current attempt's steps only."""

    def corrupt(round_: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: torch.full_like(t, float("nan")) for n, t in state.items()} if round_ == 2 else state

    job = dataclasses.replace(
        small_job("fails", rounds=3), optimizer=OptimizerSettings(name="adamw", lr=1e-3), min_agents=3
    )
    data = shards(tmp_path)
    settings = BrokerSettings(url=broker.url, auth_key=KEY)
    view = ProgressView(Console(file=io.StringIO(), width=120), job)
    seen: list[float] = []

    def progress(event: Any, info: dict[str, Any]) -> None:
        view(event, info)
        seen.append(view.progress.tasks[0].completed)

    coordinator = Coordinator(job, settings, tmp_path / "out", progress=progress)
    agents: list[Agent] = [Agent(AgentSettings(n, job.job, job.model, data[n]), settings) for n in ("a1", "a2")]
    bad = BadUploads(AgentSettings("a3", job.job, job.model, data["a3"]), settings, corrupt=corrupt)
    with pytest.raises(JobError, match="fewer than min_agents"):
        await run_with(coordinator, [*agents, bad], agents_timeout_s=5)
    lines = [line for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if line]
    *rounds, last = [json.loads(line) for line in lines]
    assert [r["round"] for r in rounds] == [0, 1]
    assert last["failed"] is True and last["round"] == 2 and last["attempt"] == MAX_ATTEMPTS
    assert last["exit_code"] == 8 and "fewer than min_agents=3" in last["reason"]
    assert "eval_loss" not in last
    assert last["rejected_since"].get("nonfinite", 0) >= MAX_ATTEMPTS  # a3's three refused uploads
    assert last["rejected"]["nonfinite"] >= last["rejected_since"]["nonfinite"]
    total = job.rounds * job.local_steps
    assert max(seen) <= total and seen[-1] == 2 * job.local_steps  # round 1, and round 2's last attempt


# --------------------------------------------------------------------------- a silent joiner


class Silent(Agent):
    """Joins like any device, takes its assignments, and never sends an activation."""

    async def _train(self, a: Assignment) -> None:
        return None


async def test_a_silent_joiner_holds_the_first_round_for_seconds(broker: Broker, tmp_path: Path) -> None:
    """Before the controller has a report, a step's deadline was step_timeout_s (300 s): a device that joins and
    stays silent held the first round for five minutes. Now it comes from the devices' join measurements."""
    job = dataclasses.replace(small_job("silent", rounds=1), min_agents=1, step_timeout_s=300, upload_timeout_s=300)
    data = shards(tmp_path, n=2)
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, tmp_path / "out")
    agents = [
        Agent(AgentSettings("a1", job.job, job.model, data["a1"]), settings),
        Silent(AgentSettings("a2", job.job, job.model, data["a2"]), settings),
    ]
    started = time.monotonic()
    await run_with(coordinator, agents, timeout_s=150, agents_timeout_s=10)
    (record,) = read_metrics(tmp_path / "out")[1:]
    assert record["agents"]["a1"]["dropped"] is None
    dropped = record["agents"]["a2"]["dropped"]
    assert dropped is not None and "no activations" in dropped, dropped
    assert record["round_time_s"] < 100 and time.monotonic() - started < 150


# --------------------------------------------------------------------------- retained garbage on the status


async def test_retained_garbage_on_the_coordinators_status_is_replaced(broker: Broker, tmp_path: Path) -> None:
    """Garbage retained on the coordinator's status topic stood in place of its status for any agent that
    connected later, which then waited for good. The coordinator now sees it and announces again; an agent
    refuses a status that is not valid in every field and waits for a valid one."""
    job = dataclasses.replace(small_job("status", rounds=1), min_agents=1)
    topics = Topics(job.job)
    data = shards(tmp_path, n=1)
    coordinator = Coordinator(job, BrokerSettings(url=broker.url), tmp_path / "out")
    task = asyncio.create_task(coordinator.run())
    forged = Envelope(
        type=Kind.STATUS, job=job.job, sender="coordinator", sid="forged", seq=1,
        body={"state": "online", "role": "coordinator", "max_length": "long"},
    )  # fmt: skip
    # (the last one stands retained: bytes that are no message at all)
    garbage = [encode_envelope(forged), zstandard.ZstdCompressor().compress(b"\xc1"), b"\x00garbage"]
    agent_process = None
    try:
        async with asyncio.timeout(60):
            while coordinator.link is None or not coordinator.link.connected:
                await asyncio.sleep(0.05)
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            for payload in garbage:
                await raw.publish(topics.coordinator_status(), payload, qos=1, retain=True)
        await asyncio.sleep(3)  # (the coordinator announces at most once a second)
        log = tmp_path / "a1.log"
        agent_process = spawn_agent(broker, job.job, "a1", data["a1"], log)
        await asyncio.wait_for(task, timeout=240)
        assert agent_process.wait(timeout=60) == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if agent_process is not None:
            stop([agent_process])
    assert [m["round"] for m in read_metrics(tmp_path / "out")] == [0, 1]
    assert coordinator.link is not None and sum(coordinator.link.rejected.values()) >= 2  # the two not decodable
