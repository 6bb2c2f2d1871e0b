#!/usr/bin/env python3
"""How closely an emulated device keeps to its profile: one client step (forward, upload, download,
backward) on a made-up slow board, timed on the wall clock against what the profile predicts.

The emulation only ever waits (it pads compute to the profile's time and sleeps for the link), so a
step is never shorter than predicted; how much longer it gets is what this measures, and it depends
on the host's load: it belongs here, not in a test.

    python scripts/bench_emulation.py                        # print the table
    python scripts/bench_emulation.py --write BENCHMARKS.md  # and replace its section there
"""

from __future__ import annotations

import argparse
import statistics
from datetime import date
from pathlib import Path

import torch

from splitft.bench.emulation import slow_board, timed_step
from splitft.bench.sections import cpu_name, write_section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--write", type=Path, help="replace the emulation section of this markdown file")
    args = parser.parse_args(argv)
    profile = slow_board()
    ratios = []
    for _ in range(args.repeats):
        elapsed, predicted, _, _ = timed_step(profile)
        ratios.append(elapsed / predicted)
    body = (
        "## Emulation accuracy\n\n"
        f"`python scripts/bench_emulation.py --repeats {args.repeats}` on {cpu_name()}, "
        f"{torch.get_num_threads()} torch threads, {date.today().isoformat()}. One client step of tiny-gpt2 "
        f"(cut 1, 32 tokens) on a made-up 0.01 GFLOP/s board: wall time over the profile's prediction "
        f"({predicted:.3f} s).\n\n"
        "| steps | median | best | worst |\n|---|---|---|---|\n"
        f"| {len(ratios)} | {statistics.median(ratios):.3f}x | {min(ratios):.3f}x | {max(ratios):.3f}x |\n\n"
        "The emulation only ever waits, so no step is shorter than predicted; the excess is the host's own "
        "work between the padded phases (packing, Python) and its load.\n"
    )
    print(body)
    if args.write:
        write_section(args.write, "emulation", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
