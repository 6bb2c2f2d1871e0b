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
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from splitft.agent.emulation import Emulation
from splitft.agent.runtime import _backward, _forward
from splitft.shared.codec import pack
from splitft.shared.defense import DefenseSettings
from splitft.shared.models import block_flops, load_config
from splitft.shared.profiles import DeviceProfile, load_profile
from splitft.shared.split import SegmentSpec, build_segment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_report import cpu_name, write_section

SLOW_BOARD = """
name = "slow-board"
description = "a made-up device, slower than any test host"

[compute]
peak_gflops = 0.2     # assumed, for the benchmark: far slower than any host, even a busy one
efficiency = 0.5      # assumed
dtype = "fp32"

[memory]
total_mb = 1024
usable_mb = 512

[link]
uplink_mbps = 20.0    # assumed
downlink_mbps = 40.0  # assumed
rtt_ms = 30.0         # assumed
"""


def slow_board() -> DeviceProfile:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "slow-board.toml"
        path.write_text(SLOW_BOARD)
        return load_profile(path)


def timed_step(profile: DeviceProfile, length: int = 32) -> tuple[float, float, float, float]:
    """One emulated client step of tiny-gpt2 at cut 1 on ``profile``: (wall seconds, predicted seconds,
    reported forward seconds, reported backward seconds)."""
    emulation = Emulation(profile)
    config = load_config("tiny-gpt2")
    segment = build_segment("tiny-gpt2", SegmentSpec.client(1))
    optimizer = torch.optim.SGD(segment.lora_parameters().values(), lr=0.1)
    ids = torch.randint(0, 50257, (1, length))
    lengths = torch.tensor([length])
    flops = block_flops(config, 1, length)
    segment(ids, torch.ones_like(ids)).sum().backward()  # warm-up, not timed
    optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    hidden, _, body, forward_s = _forward(
        segment, ids, ids, lengths, "fp16", {}, emulation, flops, DefenseSettings(), torch.Generator()
    )
    up = len(pack(body))
    time.sleep(emulation.uplink_s(up))
    grad = torch.randn_like(hidden) * 1e-3
    down = len(pack({"grad": grad.half().numpy().tobytes()}))
    time.sleep(emulation.downlink_s(down))
    backward_s = _backward(hidden, grad, optimizer, emulation, flops)
    elapsed = time.perf_counter() - started
    predicted = profile.compute_seconds(2 * flops) + profile.transfer_seconds(up, down)
    return elapsed, predicted, forward_s, backward_s


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
        f"(cut 1, 32 tokens) on a made-up 0.1 GFLOP/s board: wall time over the profile's prediction "
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
