#!/usr/bin/env python3
"""Load: many lightweight agents against one coordinator on loopback; steps/s and the coordinator's cost per message.

The coordinator runs in this process, the agents (tiny-gpt2, B=1, T<=32, every one cut at block 1) in
one ``scripts/agent_fleet.py`` process on one event loop, both against a Mosquitto of this script's own,
all on this machine. Every number is measured per round from the coordinator's metrics.jsonl and from
counters this script keeps on the coordinator's MQTT link (its BrokerSettings' observer: nothing in the runtime
changes):

* global steps/s: local steps per round / round wall time (a global step = every agent's step);
  agent-steps/s = global steps/s x agents; rounds/s = 1 / round wall time;
* messages: every MQTT message the coordinator published or received in the round (assignments,
  gradients, round start and metrics out; activations, adapter uploads, joins and statuses in);
* server compute: the sum over agents of ``agents[*].server_s`` (the mean seconds of the server's
  forward/backward for one of that agent's batches) x the agent's steps;
* per-message overhead (wall) = (round wall time - server compute) / messages. This is everything
  that is not the server's forward/backward, spread over the messages: encoding, MQTT, the broker,
  the per-step barrier, assignment, aggregation, evaluation, and the agents' own compute, which here
  shares the same cores;
* per-message CPU = CPU seconds of the coordinator's event-loop thread in the round / messages: what
  handling one message costs the coordinator itself (decode and checks, encode, MQTT client, asyncio);
  model work runs on another thread and is not in it.

* publish wait: seconds the coordinator spent awaiting its own publishes (QoS 1: until the PUBACK).

A second run (skip it with ``--no-nagle-run``) turns TCP_NODELAY off on every MQTT socket of the
coordinator and the fleet (shared/wire/link.py sets it; ``BrokerSettings.tcp_nodelay``, the fleet's
``--tcp-nodelay``): with Nagle's
algorithm on, the broker's delayed ACK holds up each QoS 1 publish by tens of milliseconds.

The coordinator runs with ``--coordinator-threads`` torch threads (default 1): on a machine whose cores
the fleet and the broker share, a multi-threaded OpenMP pool spin-waits against them (a server step of
~0.07 s took 0.2-8 s with two threads on a loaded 2-core VM).

    python scripts/bench_load.py                              # 50 agents, 5 rounds of 2 steps, twice
    python scripts/bench_load.py --write BENCHMARKS.md        # and replace the "load" section there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig
from splitft.shared.member import Member
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings

SCRIPTS = Path(__file__).resolve().parent
T = TypeVar("T")


class MessageCounts:
    """The MQTT messages the coordinator's links publish and receive, by kind: the observer of its BrokerSettings
    (splitft.shared.wire.broker.LinkObserver)."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.received: Counter[str] = Counter()
        self.publish_wait_s = 0.0  # time spent awaiting publishes (QoS 1: until the PUBACK)

    def on_publish(self, topic: str, size: int, seconds: float) -> None:
        self.publish_wait_s += seconds
        self.sent[topic.rsplit("/", 1)[-1]] += 1

    def on_receive(self, topic: str, size: int) -> None:
        self.received[topic.rsplit("/", 1)[-1]] += 1

    def clear(self) -> None:
        self.sent.clear()
        self.received.clear()
        self.publish_wait_s = 0.0


#: the counts of this process's coordinator links
COUNTS = MessageCounts()


@dataclass
class RoundProbe:
    """Snapshots at each round's end, taken on the coordinator's event-loop thread."""

    compute_s: dict[str, float] = field(default_factory=dict)  # the coordinator's model work, by function
    last_compute: dict[str, float] = field(default_factory=dict)
    last_loop_cpu: float = 0.0
    last_publish_wait: float = 0.0
    last_sent: Counter[str] = field(default_factory=Counter)
    last_received: Counter[str] = field(default_factory=Counter)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)

    def progress(self, event: str, data: dict[str, Any]) -> None:
        if event == "admitted":
            self._reset()
        elif event == "round_end":
            sent, received = COUNTS.sent - self.last_sent, COUNTS.received - self.last_received
            self.rounds[int(data["round"])] = {
                "loop_cpu_s": time.thread_time() - self.last_loop_cpu,
                "sent": dict(sent),
                "received": dict(received),
                "messages": sum(sent.values()) + sum(received.values()),
                "compute_s": {k: v - self.last_compute.get(k, 0.0) for k, v in self.compute_s.items()},
                "publish_wait_s": COUNTS.publish_wait_s - self.last_publish_wait,
            }
            self._reset()

    def _reset(self) -> None:
        self.last_loop_cpu = time.thread_time()  # CPU time of the calling thread: progress runs on the loop's
        self.last_compute = dict(self.compute_s)
        self.last_publish_wait = COUNTS.publish_wait_s
        self.last_sent, self.last_received = Counter(COUNTS.sent), Counter(COUNTS.received)


#: the server's model work of the steps themselves (merged passes), as the member times it by name
STEP_WORK = ("train_batch", "forward_batch", "backward_batch")


class TimedMember(Member):
    """A coordinator's or worker's member that times each piece of its model work (all of it goes through
    ``compute``), by the function's name, into ``compute_s``."""

    def __init__(self, compute_s: dict[str, float]) -> None:
        super().__init__()
        self.compute_s = compute_s

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        started = time.perf_counter()
        try:
            return await super().compute(fn, *args)
        finally:
            name = getattr(fn, "__name__", type(fn).__name__)
            self.compute_s[name] = self.compute_s.get(name, 0.0) + time.perf_counter() - started


def load_job(agents: int, rounds: int, local_steps: int) -> JobConfig:
    return JobConfig(
        job="load-bench", model="tiny-gpt2", rounds=rounds, local_steps=local_steps, batch_size=1, max_length=32,
        cut=1, min_agents=agents, eval_samples=4, join_timeout_s=300, join_window_s=0.2, step_timeout_s=120,
        min_step_timeout_s=120, upload_timeout_s=120,
    )  # fmt: skip


async def run(job: JobConfig, agents: int, folder: Path, probe: RoundProbe, nodelay: bool) -> dict[str, Any]:
    broker = start_mosquitto(folder / "broker")
    report = folder / "fleet.json"
    try:
        fleet = await asyncio.create_subprocess_exec(
            sys.executable, str(SCRIPTS / "agent_fleet.py"), "--count", str(agents), "--broker", broker.url,
            "--job", job.job, "--model", job.model, "--data-dir", str(GSM8K / "train.jsonl"),
            "--max-length", str(job.max_length), "--samples-per-agent", "8", "--prefix", "load-",
            "--timeout", str(60 + job.rounds * 300), "--report", str(report), "--tcp-nodelay", "on" if nodelay else "off",
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        output = asyncio.create_task(fleet.communicate())
        settings = BrokerSettings(url=broker.url, tcp_nodelay=nodelay, observer=COUNTS)
        member = TimedMember(probe.compute_s)
        await Coordinator(job, settings, folder / "out", progress=probe.progress, member=member).run()
        stdout, _ = await asyncio.wait_for(output, timeout=120)
        if fleet.returncode != 0:
            raise SystemExit(f"the fleet failed ({fleet.returncode}): {stdout.decode(errors='replace')[-2000:]}")
        summary = stdout.decode().strip().splitlines()[-1]
    finally:
        stop_broker(broker)
    return {"summary": summary, **json.loads(report.read_text())}


def measure(args: argparse.Namespace, nodelay: bool) -> dict[str, Any]:
    """One run of the coordinator and the fleet; the per-round measurements and their steady-state summary."""
    job = load_job(args.agents, args.rounds, args.local_steps)
    probe = RoundProbe()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="splitft-load-") as tmp:
        fleet = asyncio.run(run(job, args.agents, Path(tmp), probe, nodelay))
        metrics = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()][1:]
    rows = []
    for m in metrics:
        r, agents, probed = m["round"], m["agents"].values(), probe.rounds[m["round"]]
        server_s = sum(a["server_s"] * args.local_steps for a in agents if a["dropped"] is None)
        device_s = sum(
            (a["timings"].get("forward_s", 0.0) + a["timings"].get("backward_s", 0.0)) * args.local_steps
            for a in agents
        )
        # The coordinator's other model work inside the round's wall time (the checkpoint and the rollback
        # snapshot come between rounds): assignments (client_state), optimiser steps, aggregation, evaluation.
        other_s = sum(v for k, v in probed["compute_s"].items() if k not in (*STEP_WORK, "save_checkpoint", "snapshot"))
        messages = probed["messages"]
        rows.append(
            {
                "round": r,
                "agents": sum(a["dropped"] is None for a in agents),
                "wall_s": m["round_time_s"],
                "server_s": server_s,
                "other_s": other_s,
                "device_s": device_s,
                "publish_wait_s": probed["publish_wait_s"],
                "compute": probed["compute_s"],
                "messages": messages,
                "sent": probed["sent"],
                "received": probed["received"],
                "overhead_ms": 1000 * (m["round_time_s"] - server_s) / messages,
                "rest_ms": 1000 * (m["round_time_s"] - server_s - other_s) / messages,
                "loop_cpu_ms": 1000 * probed["loop_cpu_s"] / messages,
                "rss_mb": m["coordinator_rss_mb"],
                "attempt": m["attempt"],
                "rejected": sum(m["rejected"].values()),
            }
        )
    steady = rows[1:]  # round 1 also builds every agent's segment
    wall = sum(r["wall_s"] for r in steady)
    steps_s = args.local_steps * len(steady) / wall
    return {
        "rows": rows,
        "steady": steady,
        "fleet": fleet,
        "total_s": time.monotonic() - started,
        "steps_s": steps_s,
        "agent_steps_s": steps_s * args.agents,
        "rounds_s": len(steady) / wall,
        "messages": statistics.mean(r["messages"] for r in steady),
        "overhead_ms": statistics.mean(r["overhead_ms"] for r in steady),
        "rest_ms": statistics.mean(r["rest_ms"] for r in steady),
        "loop_cpu_ms": statistics.mean(r["loop_cpu_ms"] for r in steady),
        "publish_wait_s": statistics.mean(r["publish_wait_s"] for r in steady),
        "server_share": sum(r["server_s"] for r in steady) / wall,
        "ok": all(r["agents"] == args.agents and r["attempt"] == 1 and r["rejected"] == 0 for r in rows),
    }


def summary_row(name: str, run: dict[str, Any]) -> str:
    return (
        f"| {name} | {run['steps_s']:.3f} | {run['agent_steps_s']:.1f} | {run['rounds_s']:.4f} | {run['messages']:.0f} | "
        f"{run['overhead_ms']:.2f} ms | {run['rest_ms']:.2f} ms | {run['loop_cpu_ms']:.2f} ms | "
        f"{run['publish_wait_s']:.2f} s | {run['server_share']:.0%} |"
    )


def report(args: argparse.Namespace, base: dict[str, Any], nagle: dict[str, Any] | None) -> str:
    rows, steady = base["rows"], base["steady"]
    last = steady[-1]
    in_kinds = ", ".join(f"{n} {k}" for k, n in sorted(last["received"].items()))
    out_kinds = ", ".join(f"{n} {k}" for k, n in sorted(last["sent"].items()))
    other: Counter[str] = Counter()
    for r in steady:
        other.update({k: v for k, v in r["compute"].items() if k not in STEP_WORK})
    other_text = ", ".join(f"{k} {v / len(steady):.2f} s" for k, v in other.most_common() if v / len(steady) >= 0.005)
    rss = [r["rss_mb"] for r in steady]
    lines = [
        f"Rounds 2-{args.rounds} (round 1 also builds every agent's segment: {rows[0]['wall_s']:.1f} s):",
        "",
        "| run | global steps/s | agent-steps/s | rounds/s | messages / round | overhead / message (wall) "
        "| of which not compute | loop CPU / message | publish wait / round | server compute share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        summary_row("as shipped (TCP_NODELAY)", base),
    ]
    if nagle is not None:
        lines.append(summary_row("Nagle's algorithm on (TCP_NODELAY off)", nagle))
    lines += [
        "",
        "Per round, as shipped:",
        "",
        "| round | agents | wall s | server compute s | other coordinator compute s | agents' compute s "
        "| publish wait s | messages | overhead / message (wall) ms | of which not compute ms "
        "| loop CPU / message ms | coordinator RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['round']} | {r['agents']} | {r['wall_s']:.2f} | {r['server_s']:.2f} | {r['other_s']:.2f} | "
            f"{r['device_s']:.2f} | {r['publish_wait_s']:.2f} | {r['messages']} | {r['overhead_ms']:.2f} | "
            f"{r['rest_ms']:.2f} | {r['loop_cpu_ms']:.2f} | {r['rss_mb']:.1f} |"
            for r in rows
        ),
        "",
        f"Messages of round {last['round']}: in: {in_kinds}; out: {out_kinds} (the last element of the topic).",
        f"The coordinator's model work per round besides the server steps (mean of rounds 2-{args.rounds}; "
        f"save_checkpoint and snapshot run between rounds): {other_text}.",
        f"Coordinator RSS over rounds 2-{args.rounds}: {min(rss):.1f}-{max(rss):.1f} MiB, "
        f"last - round 2 = {rss[-1] - rss[0]:+.1f} MiB. The swings are freed transient buffers that glibc keeps; "
        "what the coordinator holds is flat: live tensor storage +0.0 MiB and +30 to +100 objects tracked by "
        "the garbage collector a round, over rounds 2-4 (tests/test_load.py asserts it).",
        f"Every round of every run: all {args.agents} agents, attempt 1, no rejection: "
        f"{'yes' if base['ok'] and (nagle is None or nagle['ok']) else 'NO'}.",
        f"Fleet: {base['fleet']['summary'].removeprefix('fleet: ')}.",
    ]
    return "\n".join(lines)


DEFINITIONS = (
    "Global step: every agent's step (a round has local_steps of them); agent-steps/s = global steps/s x agents. "
    "Messages: every MQTT message the coordinator published or received in the round. Server compute: the sum "
    "over agents of `server_s` (mean seconds of the server's forward/backward for one of its batches) x its "
    "steps. Overhead / message (wall) = (round wall time - server compute) / messages: everything else "
    "(encoding, MQTT and the broker, the per-step barrier, assignment, aggregation, evaluation, and the agents' "
    "own compute, which shares the cores here) spread over the messages; an upper bound on what a message "
    "costs. Of which not compute: the same without the coordinator's other model work in the round "
    "(assignment, optimiser steps, aggregation, evaluation): messaging, the broker, waiting and the agents' "
    "compute, per message. Loop CPU / message: CPU seconds of the coordinator's event-loop thread (decode and "
    "checks, encode, MQTT client, asyncio; the model runs on another thread) / messages. Publish wait: seconds "
    "the coordinator spent awaiting its own publishes (QoS 1: until the broker's PUBACK), during which it "
    "serves no other agent."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--coordinator-threads", type=int, default=1, help="torch threads of the coordinator")
    parser.add_argument(
        "--no-nagle-run", action="store_true", help="skip the second run, with TCP_NODELAY off on every MQTT socket"
    )
    parser.add_argument("--write", type=Path, help="replace the 'load' section of this markdown file")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 also pays for the agents' start-up)")

    torch.set_num_threads(args.coordinator_threads)
    started = time.monotonic()
    base = measure(args, nodelay=True)
    nagle = None if args.no_nagle_run else measure(args, nodelay=False)
    text = report(args, base, nagle) + f"\nBoth runs took {time.monotonic() - started:.0f} s."
    print(text)
    print()
    print(DEFINITIONS)
    if args.write:
        command = (
            f"python scripts/bench_load.py --agents {args.agents} --rounds {args.rounds} "
            f"--local-steps {args.local_steps} --coordinator-threads {args.coordinator_threads}"
            + (" --no-nagle-run" if args.no_nagle_run else "")
            + " --write BENCHMARKS.md"
        )
        write_section(
            args.write,
            "load",
            f"## Load: {args.agents} agents, one coordinator\n\n"
            f"tiny-gpt2 (12 blocks, hidden 128), LoRA r=16 / r_cut=8, B=1, T<=32, every agent cut at block 1, "
            f"{args.rounds} rounds of {args.local_steps} steps; the coordinator in one process "
            f"({args.coordinator_threads} torch thread), the {args.agents} agents in one `scripts/agent_fleet.py` "
            f"process on one event loop, Mosquitto 2 on loopback, all on one machine ({cpu_name()}, "
            f"{psutil.cpu_count()} cores), {date.today().isoformat()}.\n\n"
            f"`{command}`\n\n{text}\n\n{DEFINITIONS}",
        )


if __name__ == "__main__":
    main()
