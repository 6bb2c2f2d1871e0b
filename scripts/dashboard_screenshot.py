#!/usr/bin/env python3
"""Screenshot the live dashboard of a real run: start a job command with ``--dashboard`` on a free port,
open the page in a headless Chromium, wait for the job to finish, and save the page as PNG.

    python scripts/dashboard_screenshot.py --out benchmarks/dashboard.png -- bash scripts/demo.sh --out /tmp/demo

The command after ``--`` must take ``--dashboard`` (``splitft-coordinator local`` or ``run``, or
scripts/demo.sh, which hands it on); its output is passed through.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from splitft.bench.browser import chromium


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def shoot(command: list[str], out: Path, timeout_s: float) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    job = subprocess.Popen([*command, "--dashboard", f"127.0.0.1:{port}"])
    try:
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as session:
            while True:  # the dashboard comes up once the command has checked its flags (and pretrained)
                try:
                    async with session.get(url + "api/state") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if job.poll() is not None:
                    raise SystemExit(f"the job exited ({job.returncode}) before its dashboard came up")
                if time.monotonic() > deadline:
                    raise SystemExit(f"no dashboard at {url} within {timeout_s:g} s")
                await asyncio.sleep(0.5)
        async with chromium(width=1400, height=1000) as page:
            await page.goto(url)
            remaining = max(deadline - time.monotonic(), 1.0)
            await page.wait_for("document.body.dataset.status === 'done'", timeout_s=remaining, poll_s=0.5)
            await page.screenshot(out)
        print(f"screenshot: {out}", flush=True)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.terminate()
            job.wait(timeout=30)
    if job.returncode != 0:
        raise SystemExit(f"the job exited with {job.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/dashboard.png"))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole job")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the job command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the job command after --, e.g. -- bash scripts/demo.sh")
    asyncio.run(shoot(command, args.out, args.timeout))


if __name__ == "__main__":
    sys.exit(main())
