#!/usr/bin/env python3
"""Zstd bombs on a device's topics: what a flood makes an agent hold, measured as its process's RSS.

A real agent process (`splitft-agent join`, the tiny-gpt2 preset) joins a job whose coordinator (in this process)
waits for a second agent, through a real Mosquitto on 127.0.0.1. Once it has joined, its RSS is read for 2 s
(idle: the highest reading); then a raw MQTT client publishes, on each of the six topics the agent reads
(assign, grad, tail_act, notice, the job's round topic, the coordinator's status), twelve envelopes of a few
kilobytes that declare 200 MiB each once decompressed, while the agent's RSS is read every 50 ms, and for 5 s
after. Run once without a job key (the bombs are well-formed for their topic) and once with one (the agent
holds the key; the bombs are not signed with it).

    python scripts/bench_agent_bombs.py                        # print the table
    python scripts/bench_agent_bombs.py --write BENCHMARKS.md  # and replace its section there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import aiomqtt
import psutil

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig
from splitft.shared.job.records import load_records, record_json
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.keys import load_key, write_key
from splitft.shared.wire.topics import Kind, Topics

MiB = 1 << 20
PER_TOPIC = 12
DECLARED_MIB = 200


def bomb(topics: Topics, kind: str, seq: int) -> bytes:
    env = Envelope(
        type=kind, job=topics.job, sender="coordinator", sid=f"bomb{seq}", seq=seq, round=1, step=0,
        body={"grad": {"dtype": "fp32", "shape": [1], "data": bytes(DECLARED_MIB * MiB)}},
    )  # fmt: skip
    return encode_envelope(env)


async def flood(folder: Path, keyed: bool) -> dict:  # type: ignore[type-arg]
    broker = start_mosquitto(folder / "broker")
    job = JobConfig(job="bombs", model="tiny-gpt2", rounds=1, min_agents=2, join_timeout_s=600, join_window_s=0.2)
    topics = Topics(job.job)
    data = folder / "a1.jsonl"
    records = load_records(GSM8K / "train.jsonl", limit=16)
    data.write_text("".join(json.dumps(record_json(r)) + "\n" for r in records))
    key = load_key(write_key(folder / "job.key")) if keyed else None
    command = [str(Path(sys.executable).parent / "splitft-agent"), "-v", "join", "--broker", broker.url, "--job",
               job.job, "--data", str(data), "--model", "tiny-gpt2", "--id", "a1"]  # fmt: skip
    command += ["--auth-key-file", str(folder / "job.key")] if keyed else []
    log = folder / "a1.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    coordinator = Coordinator(job, BrokerSettings(url=broker.url, auth_key=key), folder / "out")
    task = asyncio.create_task(coordinator.run())
    try:
        while "a1" not in coordinator.agents.known:
            if agent.poll() is not None:
                raise RuntimeError(f"the agent ended: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)
        process = psutil.Process(agent.pid)
        await asyncio.sleep(1.0)
        idle = 0
        for _ in range(40):
            idle = max(idle, process.memory_info().rss)
            await asyncio.sleep(0.05)
        kinds = [Kind.ASSIGN, Kind.GRAD, Kind.TAIL_ACT, Kind.NOTICE]
        targets = [(topics.agent("a1", k), k) for k in kinds]
        targets += [(topics.job_topic("round"), Kind.ROUND), (topics.coordinator_status(), Kind.STATUS)]
        payloads = [(topic, bomb(topics, kind, i)) for i, (topic, kind) in enumerate(targets * PER_TOPIC)]
        peak = idle
        started = time.monotonic()
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            for topic, payload in payloads:
                await raw.publish(topic, payload, qos=1)
                peak = max(peak, process.memory_info().rss)
            until = time.monotonic() + 5
            while time.monotonic() < until:
                await asyncio.sleep(0.05)
                peak = max(peak, process.memory_info().rss)
        after = process.memory_info().rss
        return {
            "keyed": keyed, "bombs": len(payloads), "wire_kb": sum(len(p) for _, p in payloads) / 1024,
            "idle": idle / MiB, "peak": peak / MiB, "after": after / MiB, "seconds": time.monotonic() - started,
            "refused": Counter(re.findall(r"rejected a message on \S+: (\w+) \(", log.read_text())),
        }  # fmt: skip
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if agent.poll() is None:
            agent.terminate()
            agent.wait(timeout=30)
        stop_broker(broker)


async def main_async(write: Path | None) -> None:
    rows = []
    for keyed in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            r = await flood(Path(tmp), keyed)
        print(r)
        refused = ", ".join(f"{k} {v}" for k, v in sorted(r["refused"].items())) or "none counted"
        rows.append(
            f"| {'with' if keyed else 'without'} | {r['bombs']} / {r['wire_kb']:.0f} KB / "
            f"{r['bombs'] * DECLARED_MIB:,} MiB | {r['idle']:.0f} | {r['peak']:.0f} (+{r['peak'] - r['idle']:.0f}) | "
            f"{r['after']:.0f} | {refused} |"
        )
    body = "\n".join(
        [
            "### A device's memory under a bomb flood",
            "",
            f"`python scripts/bench_agent_bombs.py --write BENCHMARKS.md` ({date.today()}, {cpu_name()}): a real",
            "agent process (tiny-gpt2) joined and idle; twelve bombs of 200 MiB declared on each of the six topics it",
            "reads; its RSS in MiB (idle: the highest of 2 s; peak: the highest while the flood came in and 5 s after).",
            "",
            "| job key | bombs / on the wire / declared | idle | peak | 5 s later | refused (the agent's log) |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(body)
    if write is not None:
        write_section(write, "hostile-agent", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", type=Path, help="replace this section of a markdown file (BENCHMARKS.md)")
    asyncio.run(main_async(parser.parse_args().write))


if __name__ == "__main__":
    main()
