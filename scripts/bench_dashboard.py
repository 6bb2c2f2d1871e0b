#!/usr/bin/env python3
"""What watching a job costs: the load benchmark's 50 agents with the observers off and on, side by side.

"On" is everything a watched job runs: the dashboard and /metrics served by the coordinator, the
TensorBoard log, a headless Chromium showing the page (on this machine, so its rendering shares the
cores with the coordinator, the fleet and the broker: the harsh case; an operator's browser is on
another machine), and a scraper reading /metrics every second (Prometheus' default is 15 s). Runs
alternate off, on, off, on, ... so that drift of the shared VM hits both alike.

Reported:
* round wall time, mean of the steady rounds (2..R) of each run, off and on, and their ratio;
* the coordinator's own time on the observers, measured (Observatory.busy_s: the progress events, the
  JSON snapshots, the /metrics text) as a share of the rounds' wall time: the cost that does not
  depend on where the browser runs;
* the page: time from a round's end on the coordinator to its point on the page's loss chart (both
  clocks are this machine's), the time the page takes to draw one snapshot, and the snapshot's size.

    python scripts/bench_dashboard.py                          # 50 agents, 5 rounds, 2 pairs of runs
    python scripts/bench_dashboard.py --write BENCHMARKS.md    # and replace the "dashboard" section
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_load

from splitft.bench.browser import Page, chromium
from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.observe.dashboard import Address, Observatory


class ForwardingProbe(bench_load.RoundProbe):
    """The load benchmark's probe, handing every event on to the observers too, and noting round ends."""

    def __init__(self, observatory: Observatory | None) -> None:
        super().__init__()
        self.observatory = observatory
        self.ended: dict[int, float] = {}  # round -> time.time() at its end

    def progress(self, event: str, data: dict[str, Any]) -> None:
        super().progress(event, data)
        if self.observatory is not None:
            self.observatory(event, data)
        if event == "round_end":
            self.ended[int(data["round"])] = time.time()


async def watch(page: Page, seen: dict[int, float]) -> None:
    """Note when each point appears on the page's loss chart (point k+1: round k evaluated)."""
    while True:
        points = await page.evaluate("document.querySelectorAll('#loss-chart circle.pt').length")
        now = time.time()
        for k in range(points):
            seen.setdefault(k, now)  # point k is round k (round 0: the base)
        await asyncio.sleep(0.05)


async def scrape(url: str, stop: asyncio.Event) -> int:
    count = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.get(url) as response:
                await response.read()
            count += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return count


async def observed_run(args: argparse.Namespace, folder: Path, on: bool) -> dict[str, Any]:
    job = bench_load.load_job(args.agents, args.rounds, args.local_steps)
    if not on:
        probe = ForwardingProbe(None)
        await bench_load.run(job, args.agents, folder, probe, True)
        return {"probe": probe}
    observatory = Observatory(job, dashboard=Address("127.0.0.1", 0), tensorboard=folder / "tb")
    probe = ForwardingProbe(observatory)
    seen: dict[int, float] = {}
    async with observatory, chromium() as page:
        assert observatory.url is not None
        await page.goto(observatory.url)
        stop = asyncio.Event()
        scraper = asyncio.create_task(scrape(observatory.url + "metrics", stop))
        watcher = asyncio.create_task(watch(page, seen))
        try:
            await bench_load.run(job, args.agents, folder, probe, True)
            await asyncio.sleep(1.0)  # the last round's point reaches the page
        finally:
            stop.set()
            watcher.cancel()
        scrapes = await scraper
        render = await page.evaluate("window.splitftRender")
    return {"probe": probe, "observatory": observatory, "seen": seen, "scrapes": scrapes, "render": render}


def measure(args: argparse.Namespace, on: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="splitft-dashboard-") as tmp:
        folder = Path(tmp)
        result = asyncio.run(observed_run(args, folder, on))
        metrics = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()][1:]
    steady = [m for m in metrics if m["round"] >= 2]
    wall = [m["round_time_s"] for m in steady]
    out: dict[str, Any] = {
        "on": on, "wall_s": statistics.mean(wall), "job_s": sum(m["round_time_s"] for m in metrics),
        "ok": all(len(m["agents"]) == args.agents and m["attempt"] == 1 and not m["rejected"] for m in metrics),
    }  # fmt: skip
    if on:
        probe, seen = result["probe"], result["seen"]
        out["busy_s"] = result["observatory"].busy_s
        out["pushes"] = result["observatory"].pushes
        out["lag_s"] = [seen[r] - probe.ended[r] for r in probe.ended if r in seen]
        out["render"], out["scrapes"] = result["render"], result["scrapes"]
    return out


def report(args: argparse.Namespace, runs: list[dict[str, Any]]) -> str:
    off = [r for r in runs if not r["on"]]
    on = [r for r in runs if r["on"]]
    off_s, on_s = statistics.mean(r["wall_s"] for r in off), statistics.mean(r["wall_s"] for r in on)
    busy = sum(r["busy_s"] for r in on) / sum(r["job_s"] for r in on)
    lags = [lag for r in on for lag in r["lag_s"]]
    render = [r["render"] for r in on]
    lines = [
        "## Watching a job: what the dashboard, /metrics and TensorBoard cost",
        "",
        "The load benchmark's fleet (tiny-gpt2, B=1, T<=32, cut 1, one coordinator with 1 torch thread, all "
        "agents in one `scripts/agent_fleet.py` process, Mosquitto on loopback) with the observers off, and on: "
        "the dashboard and /metrics served, the TensorBoard log written, a headless Chromium showing the page "
        "and a scraper reading /metrics every second. The browser runs on the same two cores as everything "
        "else (an operator's runs elsewhere), so the wall-time ratio is an upper bound; the coordinator's own "
        "time on the observers is measured directly.",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()} ({torch.get_num_threads()} torch threads available), "
        f"{args.agents} agents, {args.rounds} rounds of {args.local_steps} steps, {len(off)} runs off and {len(on)} on, "
        "alternating; steady rounds 2.."
        f"{args.rounds}. Command: `python scripts/bench_dashboard.py --pairs {args.pairs} --write BENCHMARKS.md`.",
        "",
        "| run | observers | round wall s (mean of steady rounds) |",
        "|---|---|---:|",
        *(f"| {i + 1} | {'on' if r['on'] else 'off'} | {r['wall_s']:.3f} |" for i, r in enumerate(runs)),
        "",
        "| | value |",
        "|---|---:|",
        f"| round wall time, on / off (browser on this machine) | {on_s / off_s:.3f} |",
        f"| coordinator's own time on the observers, share of the rounds' wall time | {100 * busy:.2f}% |",
        f"| a round's end to its point on the page: median / worst | {statistics.median(lags):.2f} s / {max(lags):.2f} s |",
        f"| the page drawing one snapshot ({args.agents} agents): mean / worst | "
        f"{sum(x['totalMs'] for x in render) / sum(x['count'] for x in render):.1f} ms / {max(x['maxMs'] for x in render):.1f} ms |",
        f"| snapshot size | {max(x['bytes'] for x in render) / 1024:.1f} KiB |",
        f"| snapshots pushed per run / /metrics scrapes per run | {statistics.mean(r['pushes'] for r in on):.0f} / "
        f"{statistics.mean(r['scrapes'] for r in on):.0f} |",
        f"| every round of every run: all agents, attempt 1, nothing refused | {'yes' if all(r['ok'] for r in runs) else 'NO'} |",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2, help="pairs of runs (off, on)")
    parser.add_argument("--write", type=Path, help="replace the 'dashboard' section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the load benchmark: one torch thread for the coordinator
    runs = []
    for pair in range(args.pairs):
        for on in (False, True):
            print(f"pair {pair + 1}/{args.pairs}: observers {'on' if on else 'off'}...", flush=True)
            runs.append(measure(args, on))
            print(f"  round wall {runs[-1]['wall_s']:.3f} s", flush=True)
    text = report(args, runs)
    print(text)
    if args.write:
        write_section(args.write, "dashboard", text)


if __name__ == "__main__":
    main()
