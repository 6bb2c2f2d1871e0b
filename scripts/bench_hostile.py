#!/usr/bin/env python3
"""Hostile traffic: what kilobytes on the wire make a coordinator hold, measured as its RSS.

Each attack runs against a fresh coordinator (in this process) that waits for its agents, through a
real Mosquitto on 127.0.0.1; a raw MQTT client sends envelopes of a few kilobytes that declare hundreds
of megabytes once decompressed. RSS is read before the attack, once the coordinator has taken the
attack in (every message counted, or 30 s), and again 5 s later (whether it is held).

    python scripts/bench_hostile.py                        # print the table
    python scripts/bench_hostile.py --write BENCHMARKS.md  # and replace its section there
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import time
from datetime import date
from pathlib import Path

import aiomqtt
import psutil

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.topics import Kind, Topics

MB = 1 << 20


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / MB


def bomb(job: str, sender: str, kind: str, declared_mb: int, sid: str) -> bytes:
    if kind == Kind.CHUNK:
        body = {"id": f"{sid}:1", "index": 0, "count": 2, "data": bytes(declared_mb * MB)}
    else:
        body = {"act": {"dtype": "fp32", "shape": [1], "data": bytes(declared_mb * MB)}}
    return encode_envelope(Envelope(type=kind, job=job, sender=sender, sid=sid, seq=1, round=1, step=0, body=body))


#: (name, description, [(agent, topic kind, message type, declared MB)])
ATTACKS = [
    ("act flood", "6 `act` envelopes of 200 MB decoded, distinct sessions, no assignment",
     [("ghost", "act", Kind.ACT, 200)] * 6),
    ("chunk flood", "24 first-of-two chunks of 60 MB from fake senders",
     [(f"fake{i}", "act", Kind.CHUNK, 60) for i in range(24)]),
    ("join chunks", "8 first-of-two chunks of 60 MB on `join` topics (anyone may join)",
     [(f"joiner{i}", "join", Kind.CHUNK, 60) for i in range(8)]),
]  # fmt: skip


async def attack(broker_url: str, host: str, port: int, folder: Path, name: str, sends: list) -> dict:  # type: ignore[type-arg]
    job = JobConfig(job=name.replace(" ", "-"), model="tiny-gpt2", rounds=1, min_agents=1, join_timeout_s=600)
    topics = Topics(job.job)
    payloads = [
        (agent, kind, bomb(job.job, agent, type_, mb, f"s{i}")) for i, (agent, kind, type_, mb) in enumerate(sends)
    ]
    coordinator = Coordinator(job, BrokerSettings(url=broker_url), folder / job.job)
    task = asyncio.create_task(coordinator.run())
    try:
        while coordinator.link is None or not coordinator.link.connected:
            await asyncio.sleep(0.05)
        link = coordinator.link
        await asyncio.sleep(0.5)
        before = rss_mb()
        async with aiomqtt.Client(host, port) as raw:
            for agent, kind, payload in payloads:
                await raw.publish(topics.agent(agent, kind), payload, qos=1)
        deadline = time.monotonic() + 30
        while sum(link.rejected.values()) < len(payloads) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after = rss_mb()
        await asyncio.sleep(5)
        held = rss_mb()
        return {
            "wire_kb": sum(len(p) for *_, p in payloads) / 1024,
            "declared_mb": sum(s[3] for s in sends),
            "before": before,
            "after": after,
            "held": held,
            "refused": dict(link.rejected),
        }
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def main_async(write: Path | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_mosquitto(Path(tmp) / "broker")
        try:
            rows = []
            for name, what, sends in ATTACKS:
                r = await attack(broker.url, broker.host, broker.port, Path(tmp), name, sends)
                print(f"{name}: {r}")
                refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "none counted"
                rows.append(
                    f"| {what} | {r['wire_kb']:.0f} KB / {r['declared_mb']:,} MB | {r['before']:.0f} | "
                    f"{r['after']:.0f} (+{r['after'] - r['before']:.0f}) | {r['held']:.0f} | {refused} |"
                )
        finally:
            stop_broker(broker)
    body = "\n".join(
        [
            "## Reliability: hostile traffic and the coordinator's memory",
            "",
            f"`python scripts/bench_hostile.py --write BENCHMARKS.md` ({date.today()}, {cpu_name()}): each attack",
            "against a fresh coordinator waiting for its agents, through Mosquitto on 127.0.0.1; RSS in MB before,",
            "once the attack was taken in, and 5 s later.",
            "",
            "| attack | on the wire / declared | RSS before | after | 5 s later | refused |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if write is not None:
        write_section(write, "hostile", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="replace this section of a markdown file (BENCHMARKS.md)")
    asyncio.run(main_async(parser.parse_args().write))


if __name__ == "__main__":
    main()
