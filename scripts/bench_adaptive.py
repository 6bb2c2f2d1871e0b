#!/usr/bin/env python3
"""Fixed cut vs. the splitft policy on the same emulated heterogeneous fleet, round by round.

Both runs: the local run's embedded broker, coordinator and three agent processes emulating a Jetson
Nano, a Jetson Orin Nano and a laptop (profiles in firmware_profiles/, compute scaled by
--emulate-scale so the tiny preset's ratios stay visible on this host), the same data partition and
the same first-round cut. `fixed` keeps it; `splitft` re-decides cuts every round from the measured
latencies. The step time is the slowest agent's mean time between gradients; "ideal" is the balanced
lower bound the controller computed for that round.

    python scripts/bench_adaptive.py                        # print the table
    python scripts/bench_adaptive.py --write BENCHMARKS.md  # and replace the adaptive section there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import torch

from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.local import LocalRun, run_local
from splitft.shared.job.config import JobConfig

FLEET = ("jetson-nano", "jetson-orin-nano", "laptop")


def run(policy: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    job = JobConfig(
        job=f"adaptive-{policy}", model="tiny-gpt2", rounds=args.rounds, local_steps=args.local_steps,
        batch_size=args.batch, max_length=args.length, cut=args.cut, policy=policy, eval_samples=4,
    )  # fmt: skip
    plan = LocalRun(job, out, agents=3, cuts=(args.cut,), samples_per_agent=64, emulate=FLEET, emulate_scale=args.scale)
    asyncio.run(run_local(plan))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--cut", type=int, default=2, help="the fixed cut, and splitft's first-round cut")
    parser.add_argument("--scale", type=float, default=0.01, help="--emulate-scale of the agents")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="splitft-adaptive-"))
    fixed = run("fixed", args, tmp / "fixed")
    adaptive = run("splitft", args, tmp / "splitft")

    lines = [
        "| round | fixed: cuts | fixed: step s | splitft: cuts | splitft: step s | predicted s | ideal s | achieved/ideal |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for f, a in zip(fixed, adaptive, strict=True):
        c = a.get("controller") or {}
        predicted = f"{c['predicted_step_s']:.3f}" if c else "-"
        ideal = f"{c['ideal_step_s']:.3f}" if c else "-"
        ratio = f"{c['achieved_over_ideal']:.2f}" if c else "-"
        lines.append(
            f"| {f['round']} | {'/'.join(map(str, f['cuts'].values()))} | {f['step_time_s']:.3f} | "
            f"{'/'.join(map(str, a['cuts'].values()))} | {a['step_time_s']:.3f} | {predicted} | {ideal} | {ratio} |"
        )
    tail_fixed = sum(r["step_time_s"] for r in fixed[1:]) / max(len(fixed) - 1, 1)
    tail_adaptive = sum(r["step_time_s"] for r in adaptive[1:]) / max(len(adaptive) - 1, 1)
    lines += [
        "",
        f"Rounds 2..{args.rounds}: fixed {tail_fixed:.3f} s per step, splitft {tail_adaptive:.3f} s per step "
        f"({tail_fixed / tail_adaptive:.2f}x faster); final eval loss fixed {fixed[-1]['eval_loss']:.4f}, "
        f"splitft {adaptive[-1]['eval_loss']:.4f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        command = (
            f"python scripts/bench_adaptive.py --rounds {args.rounds} --local-steps {args.local_steps} "
            f"--batch {args.batch} --length {args.length} --cut {args.cut} --scale {args.scale}"
        )
        write_section(
            args.write,
            f"adaptive-{args.scale}",
            f"## Adaptive cuts: fixed vs. splitft (device compute x {args.scale})\n\n"
            f"Regime: the server is this host ({cpu_name()}, {torch.get_num_threads()} threads) running tiny-gpt2 "
            f"(12 blocks, hidden 128, a 50,257-token head); the fleet is N=3 emulated devices ({', '.join(FLEET)}; "
            f"profile compute x {args.scale}), B={args.batch}, T<={args.length}, cuts listed agent 1/2/3. "
            f"{date.today().isoformat()}.\n\n`{command} --write BENCHMARKS.md`\n\n{text}",
        )


if __name__ == "__main__":
    main()
