#!/usr/bin/env python3
"""Scale: hundreds of lightweight agents in several fleet processes against one and two coordinator workers.

The successor of scripts/bench_load.py (same job shape: tiny-gpt2, B=1, T<=32, every agent cut at block 1,
two-part split) at fleet scale. Each run starts a Mosquitto of its own, ``--fleets`` ``scripts/agent_fleet.py``
processes sharing the agents out (each process holds one copy of the model's frozen weights, see
splitft.bench.fleet.share_frozen_weights), the coordinator's rank 0 in this process and, with 2 workers,
rank 1 as a process of this script (``--as-worker``), all on this machine. The server merges each step's
activations (``server_batching``, ``server_max_batch_tokens`` at its default, 4096: up to 128 of these batches a pass) in
every run, so the runs compare like with like.

Measured, per round (rounds 2.. are the steady state; round 1 also builds every agent's segment):

* messages: every MQTT message the coordinator's ranks published or received, counted on their links
  (rank 0 per round; a worker's over the job, divided by the rounds: its traffic is the same every round,
  an act in and a grad out per agent and step);
* server compute: the sum over agents of ``server_s`` (each agent's share of the merged passes' time, by
  its tokens) x its steps, per rank; the critical path is the largest rank's;
* overhead / message (wall) = (round wall time - the critical path's server compute) / messages: all that
  is not the server's forward/backward (messaging, the broker, the agents' compute on the same cores,
  assignment, aggregation, evaluation, the workers' collectives) spread over the messages;
* loop CPU / message: CPU seconds of each rank's event-loop thread / that rank's messages: what one
  message costs the coordinator itself (decode and checks, encode, MQTT client, asyncio);
* devices per server pass: the batches each merged forward/backward took, on every rank;
* coordinator memory: rank 0's RSS after every round, and per agent: the difference between the runs
  with 500 and 50 agents (one worker), divided by the 450 agents between them (every run in a process of
  its own);
* the workers' synchronisation, on rank 0: the round's broadcast (assignments and the server's state), the
  barriers, the gradient all-reduce inside each step's ``finish_step`` (which also waits for the slower
  rank), and the figures' gather.

    python scripts/bench_scale.py                                   # 50 x 1, 500 x 1, 500 x 2 workers
    python scripts/bench_scale.py --write BENCHMARKS.md             # and replace its "scale" section
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from bench_load import COUNTS, STEP_WORK, RoundProbe, TimedMember

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.brokers import free_port, start_mosquitto, stop_broker
from splitft.coordinator.runtime import Coordinator
from splitft.coordinator.workers import WorkerGroup, run_worker
from splitft.shared.job.config import JobConfig
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings

SCRIPTS = Path(__file__).resolve().parent
T = TypeVar("T")
PASSES: Counter[str] = Counter()  # merged server passes of this process: passes, devices


def as_worker(args: argparse.Namespace) -> None:
    """Rank ``--rank``: a coordinator worker with counters; writes them to ``--counts`` when the job ends."""
    torch.set_num_threads(1)
    compute_s: dict[str, float] = {}

    async def main() -> float:
        started = time.thread_time()  # this thread runs the event loop
        broker = BrokerSettings(url=args.broker, observer=COUNTS)  # the worker's link counts its messages
        group = WorkerGroup(args.rank, args.world, args.rendezvous)
        worker = await run_worker(group, broker, member=TimedMember(compute_s))
        if worker is not None and worker.server is not None:
            PASSES.update(worker.server.passes)
        return time.thread_time() - started

    loop_cpu = asyncio.run(main())
    counts = {
        "sent": dict(COUNTS.sent),
        "received": dict(COUNTS.received),
        "loop_cpu_s": loop_cpu,
        "passes": dict(PASSES),
        "compute_s": compute_s,
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
    }
    Path(args.counts).write_text(json.dumps(counts))


def scale_job(agents: int, rounds: int, local_steps: int) -> JobConfig:
    return JobConfig(
        job="scale-bench", model="tiny-gpt2", rounds=rounds, local_steps=local_steps, batch_size=1, max_length=32,
        cut=1, min_agents=agents, eval_samples=4, join_timeout_s=900, join_window_s=0.2, step_timeout_s=900,
        min_step_timeout_s=900, upload_timeout_s=900, server_batching=True,
    )  # fmt: skip


class ScaleProbe(RoundProbe):
    def __init__(self) -> None:
        super().__init__()
        self.baseline_rss_mb = 0.0

    def progress(self, event: str, data: dict[str, Any]) -> None:
        if event == "baseline":
            self.baseline_rss_mb = psutil.Process().memory_info().rss / 2**20
        super().progress(event, data)


async def run(job: JobConfig, agents: int, fleets: int, world: int, folder: Path, probe: ScaleProbe) -> dict[str, Any]:
    broker = start_mosquitto(folder / "broker")
    procs: list[asyncio.subprocess.Process] = []
    workers: list[subprocess.Popen[bytes]] = []
    sizes = [agents // fleets + (1 if k < agents % fleets else 0) for k in range(fleets)]
    try:
        for k, count in enumerate(sizes):
            command = [
                str(SCRIPTS / "agent_fleet.py"), "--count", str(count), "--broker", broker.url, "--job", job.job,
                "--model", job.model, "--data-dir", str(GSM8K / "train.jsonl"), "--max-length", str(job.max_length),
                "--samples-per-agent", "8", "--prefix", f"f{k}-", "--timeout", str(300 + job.rounds * 900),
                "--report", str(folder / f"fleet-{k}.json"),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs.append(
                await asyncio.create_subprocess_exec(sys.executable, *command, stdout=asyncio.subprocess.PIPE, env=env)
            )
        outputs = [asyncio.create_task(p.communicate()) for p in procs]
        group = None
        if world > 1:
            address = f"127.0.0.1:{free_port()}"
            for rank in range(1, world):
                command = [
                    sys.executable, __file__, "--as-worker", "--rendezvous", address, "--rank", str(rank),
                    "--world", str(world), "--broker", broker.url, "--counts", str(folder / f"worker-{rank}.json"),
                ]  # fmt: skip
                workers.append(subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}))
            group = WorkerGroup(0, world, address)
        beat = asyncio.ensure_future(watch_loop(WATCH_S)()) if WATCH_S else None
        loop_started = time.thread_time()
        try:
            coordinator = Coordinator(
                job, BrokerSettings(url=broker.url, observer=COUNTS), folder / "out", progress=probe.progress,
                workers=group, worker_processes=workers, member=TimedMember(probe.compute_s),
            )  # fmt: skip
            await coordinator.run()
            if coordinator.server is not None:
                PASSES.update(coordinator.server.passes)
        finally:
            if beat is not None:
                beat.cancel()
        loop_cpu = time.thread_time() - loop_started
        summaries = []
        for p, output in zip(procs, outputs, strict=True):
            stdout, _ = await asyncio.wait_for(output, timeout=300)
            if p.returncode != 0:
                raise SystemExit(f"a fleet failed ({p.returncode}): {stdout.decode(errors='replace')[-2000:]}")
            summaries.append(stdout.decode().strip().splitlines()[-1])
        for proc in workers:
            if await asyncio.to_thread(proc.wait, 120) != 0:
                raise SystemExit(f"worker process {proc.pid} failed ({proc.returncode})")
    finally:
        stop_broker(broker)
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
    fleet_reports = [json.loads((folder / f"fleet-{k}.json").read_text()) for k in range(fleets)]
    worker_counts = [json.loads((folder / f"worker-{r}.json").read_text()) for r in range(1, world)]
    return {"fleets": fleet_reports, "summaries": summaries, "workers": worker_counts, "loop_cpu_s": loop_cpu}


def watch_loop(lag_s: float) -> Callable[[], Any]:
    """Diagnostics: a thread that prints every thread's stack when this event loop has not run for ``lag_s``
    (a blocked loop misses MQTT keep-alives). Returns the coroutine function to run on the loop."""
    import threading
    import traceback

    beat = [time.monotonic()]
    loop_thread = threading.get_ident()

    def watch() -> None:
        reported = 0.0
        while True:
            time.sleep(lag_s / 4)
            late = time.monotonic() - beat[0]
            if late > lag_s and beat[0] != reported:
                reported = beat[0]
                frames = sys._current_frames()
                print(f"-- the event loop has not run for {late:.1f} s; its thread:", file=sys.stderr)
                traceback.print_stack(frames[loop_thread], file=sys.stderr)
                for ident, frame in frames.items():
                    if ident not in (loop_thread, threading.get_ident()):
                        print(f"-- thread {ident}:", file=sys.stderr)
                        traceback.print_stack(frame, limit=8, file=sys.stderr)

    threading.Thread(target=watch, daemon=True).start()

    async def heartbeat() -> None:
        while True:
            beat[0] = time.monotonic()
            await asyncio.sleep(lag_s / 10)

    return heartbeat


WATCH_S = float(os.environ.get("SPLITFT_WATCH_LOOP_S", "0"))  # diagnostics: see watch_loop
SYNC = ("broadcast", "barrier", "gather", "round_message", "finish_step")


def measure(agents: int, world: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run: the per-round figures and the steady rounds' summary."""
    COUNTS.clear()
    PASSES.clear()
    job = scale_job(agents, args.rounds, args.local_steps)
    probe = ScaleProbe()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="splitft-scale-") as tmp:
        folder = Path(tmp) if args.keep is None else args.keep / f"{agents}x{world}"
        got = asyncio.run(run(job, agents, args.fleets, world, folder, probe))
        metrics = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()][1:]
    worker_messages = [
        (sum(w["sent"].values()) + sum(w["received"].values())) / args.rounds for w in got["workers"]
    ]  # per round
    rows = []
    for m in metrics:
        probed, live = probe.rounds[m["round"]], [a for a in m["agents"].values() if a["dropped"] is None]
        per_rank = [0.0] * world
        for a in live:
            per_rank[a.get("worker", 0)] += a["server_s"] * args.local_steps
        messages = probed["messages"] + sum(worker_messages)
        rows.append(
            {
                "round": m["round"],
                "agents": len(live),
                "attempt": m["attempt"],
                "rejected": sum(m["rejected"].values()),
                "wall_s": m["round_time_s"],
                "server_s": per_rank,
                "messages": messages,
                "rank0_messages": probed["messages"],
                "overhead_ms": 1000 * (m["round_time_s"] - max(per_rank)) / messages,
                "loop_cpu_ms": 1000 * probed["loop_cpu_s"] / probed["messages"],
                "sync_s": {k: probed["compute_s"].get(k, 0.0) for k in SYNC},
                "other_s": sum(
                    v
                    for k, v in probed["compute_s"].items()
                    if k not in (*SYNC, *STEP_WORK, "save_checkpoint", "snapshot")
                ),
                "publish_wait_s": probed["publish_wait_s"],
                "rss_mb": m["coordinator_rss_mb"],
            }
        )
    steady = rows[1:]
    wall = sum(r["wall_s"] for r in steady)
    fleet_rss = sum(f["peak_rss_mb"] - f["rss_start_mb"] for f in got["fleets"])
    worker_loop_ms = [
        1000 * w["loop_cpu_s"] / max(sum(w["sent"].values()) + sum(w["received"].values()), 1) for w in got["workers"]
    ]
    passes = Counter(PASSES)
    for w in got["workers"]:
        passes.update(w["passes"])
    return {
        "agents": agents,
        "world": world,
        "rows": rows,
        "steady": steady,
        "total_s": time.monotonic() - started,
        "steps_s": args.local_steps * len(steady) / wall,
        "messages": statistics.mean(r["messages"] for r in steady),
        "messages_s": sum(r["messages"] for r in steady) / wall,
        "overhead_ms": statistics.mean(r["overhead_ms"] for r in steady),
        "loop_cpu_ms": [statistics.mean(r["loop_cpu_ms"] for r in steady), *worker_loop_ms],
        "server_s": [statistics.mean(r["server_s"][k] for r in steady) for k in range(world)],
        "wall_s": wall / len(steady),
        "sync_s": {k: statistics.mean(r["sync_s"][k] for r in steady) for k in SYNC},
        "other_s": statistics.mean(r["other_s"] for r in steady),
        "publish_wait_s": statistics.mean(r["publish_wait_s"] for r in steady),
        "devices_per_pass": passes["devices"] / max(passes["passes"], 1),
        "passes_per_step": passes["passes"] / (args.rounds * args.local_steps),
        "rss": [r["rss_mb"] for r in rows],
        "baseline_rss_mb": probe.baseline_rss_mb,
        "worker_rss_mb": [w["rss_mb"] for w in got["workers"]],
        "fleet_mb_per_agent": fleet_rss / agents,
        "fleet_summaries": got["summaries"],
        "ok": all(r["agents"] == agents and r["attempt"] == 1 and r["rejected"] == 0 for r in rows)
        and all(
            o["error"] is None and o["rounds_done"] == args.rounds for f in got["fleets"] for o in f["agents"].values()
        ),
    }


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    def ms(values: list[float]) -> str:
        return " / ".join(f"{v:.2f}" for v in values)

    lines = [
        f"Rounds 2-{args.rounds} (round 1 also builds every agent's segment), means per round:",
        "",
        "| agents | workers | global steps/s | messages / round | messages/s | overhead / message (wall) "
        "| loop CPU / message, rank 0 / 1 | devices per server pass | server compute / round, rank 0 / 1 "
        "| round wall | all steps answered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['agents']} | {r['world']} | {r['steps_s']:.3f} | {r['messages']:.0f} | {r['messages_s']:.0f} | "
            f"{r['overhead_ms']:.2f} ms | {ms(r['loop_cpu_ms'])} ms | {r['devices_per_pass']:.0f} | "
            f"{' / '.join(f'{s:.2f}' for s in r['server_s'])} s | {r['wall_s']:.2f} s | {'yes' if r['ok'] else 'NO'} |"
        )
    lines += ["", "Where a round's time goes (rank 0's view, seconds per round):", ""]
    lines += [
        "| agents | workers | round wall | server compute (critical path) | other model work | publish wait "
        "| round broadcast + barriers | all-reduce in finish_step | figures' gather |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        sync = r["sync_s"]
        lines.append(
            f"| {r['agents']} | {r['world']} | {r['wall_s']:.2f} | {max(r['server_s']):.2f} | {r['other_s']:.2f} | "
            f"{r['publish_wait_s']:.2f} | {sync['broadcast'] + sync['barrier'] + sync['round_message']:.2f} | "
            f"{sync['finish_step']:.2f} | {sync['gather']:.2f} |"
        )
    lines += ["", "Coordinator memory (rank 0's RSS after each round, MiB):", ""]
    for r in runs:
        rss = r["rss"]
        extra = f"; rank 1: {ms(r['worker_rss_mb'])} MiB at the end" if r["worker_rss_mb"] else ""
        lines.append(
            f"- {r['agents']} agents, {r['world']} worker(s): before round 1 {r['baseline_rss_mb']:.0f}; rounds "
            f"{', '.join(f'{v:.0f}' for v in rss)}; last - round 2 = {rss[-1] - rss[1]:+.1f}{extra}. Fleet: "
            f"{r['fleet_mb_per_agent']:.1f} MiB per agent (peak RSS of the fleet processes over their start)."
        )
    by = {(r["agents"], r["world"]): r for r in runs}
    if (50, 1) in by and (500, 1) in by:
        small, big = by[(50, 1)], by[(500, 1)]
        per_agent = (statistics.mean(big["rss"][1:]) - statistics.mean(small["rss"][1:])) / 450
        lines += [
            "",
            f"Per agent on the coordinator (500 - 50 agents, rounds 2.., one worker): {per_agent:.2f} MiB.",
            f"Overhead per message, 500 vs 50 agents (one worker): {big['overhead_ms'] / small['overhead_ms']:.2f}x "
            f"(wall), {big['loop_cpu_ms'][0] / small['loop_cpu_ms'][0]:.2f}x (rank 0's loop CPU).",
        ]
    if (500, 1) in by and (500, 2) in by:
        one, two = by[(500, 1)], by[(500, 2)]
        sync = sum(two["sync_s"][k] for k in ("broadcast", "barrier", "round_message", "gather"))
        predicted = one["wall_s"] - sum(one["server_s"]) + max(two["server_s"]) + sync
        lines += [
            f"2 workers vs 1, 500 agents: {one['wall_s'] / two['wall_s']:.2f}x the rounds per second. "
            f"Per rank, the server compute is {ms(two['server_s'])} s a round (one worker: {one['server_s'][0]:.2f} s). "
            f"On hosts of their own (the agents elsewhere), a round would take about the one-worker round less "
            f"its server compute plus the largest rank's and the synchronisation: {predicted:.2f} s, "
            f"{one['wall_s'] / predicted:.2f}x.",
        ]
    lines += ["", "Fleets:", *(f"- {r['agents']} x {r['world']}: " + "; ".join(r["fleet_summaries"]) for r in runs)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="50x1,500x1,500x2", help="AGENTSxWORKERS, comma separated")
    parser.add_argument("--fleets", type=int, default=5, help="fleet processes the agents are shared out to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--write", type=Path, help="replace the 'scale' section of this markdown file")
    parser.add_argument("--keep", type=Path, help="keep each run's folder (broker log, metrics) under this one")
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)  # one run: its measurements into this file
    parser.add_argument("--as-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rendezvous", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--counts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.as_worker:
        as_worker(args)
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 also pays for the agents' start-up)")
    try:
        plan = [tuple(int(x) for x in run.split("x")) for run in args.runs.split(",")]
    except ValueError:
        parser.error(f"--runs must look like 50x1,500x2, got {args.runs!r}")
    torch.set_num_threads(1)
    if args.json is not None:  # one run, in a process of its own (see below)
        (agents, world), *_ = plan
        args.json.write_text(json.dumps(measure(agents, world, args)))
        return
    started = time.monotonic()
    runs = []
    for agents, world in plan:
        # Each run in a fresh process: a process keeps the memory an earlier run freed (glibc), and the fleets
        # it starts inherit its peak RSS as their own starting peak (ru_maxrss survives fork and exec).
        print(f"== {agents} agents, {world} worker(s)", flush=True)
        with tempfile.TemporaryDirectory(prefix="splitft-scale-run-") as tmp:
            out = Path(tmp) / "run.json"
            command = [
                sys.executable, __file__, "--runs", f"{agents}x{world}", "--fleets", str(args.fleets),
                "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--json", str(out),
                *(["--keep", str(args.keep)] if args.keep is not None else []),
            ]  # fmt: skip
            subprocess.run(command, check=True)
            runs.append(json.loads(out.read_text()))
        print(report(args, runs[-1:]).split("\n\nWhere")[0], flush=True)  # this run's line, as it ends
    text = report(args, runs) + f"\n\nAll runs took {time.monotonic() - started:.0f} s."
    print(text)
    if args.write:
        command = (
            f"python scripts/bench_scale.py --runs {args.runs} --fleets {args.fleets} --rounds {args.rounds} "
            f"--local-steps {args.local_steps} --write BENCHMARKS.md"
        )
        write_section(
            args.write,
            "scale",
            f"## Scale: 500 agents, one and two coordinator workers\n\n"
            f"tiny-gpt2 (12 blocks, hidden 128), LoRA r=16 / r_cut=8, B=1, T<=32, every agent cut at block 1, two-part, "
            f"server_batching on, {args.rounds} rounds of {args.local_steps} steps; the agents in {args.fleets} "
            f"`scripts/agent_fleet.py` processes (one copy of the frozen weights each), rank 0 in the benchmark's "
            f"process and rank 1 in another (1 torch thread each), Mosquitto 2 on loopback, all on one machine "
            f"({cpu_name()}, {psutil.cpu_count()} cores), {date.today().isoformat()}.\n\n`{command}`\n\n{text}\n\n"
            + (__doc__ or "").split("Measured, per round")[1].split("    python")[0].strip(),
        )


if __name__ == "__main__":
    main()
