#!/usr/bin/env python3
"""Runtime overhead: the same LoRA training in one process vs. split across 3 agents through Mosquitto.

(a) one process: the whole model, each step on the union of the three agents' batches;
(b) split: the coordinator in this process and 3 agent processes (cuts 1, 2, 3; one torch thread
    each, as `splitft-coordinator local` starts them), talking through a real Mosquitto on loopback;
    each global step = every agent's forward, activations up, server step, gradient down.

Both run on the same batches on the same machine, one after the other, so the ratio compares like
with like. The split's step time is its round time divided by the steps, over the rounds after the
first (which also pays for the agents' start-up); it includes assignment, adapter upload and
aggregation (evaluation is cut to one sample). Where the time goes comes from the agents' own
per-step timings and the coordinator's measured server compute.

    python scripts/bench_runtime.py                        # print the table
    python scripts/bench_runtime.py --write BENCHMARKS.md  # and replace the runtime section there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from splitft.agent.runtime import batch_seed
from splitft.bench.sections import cpu_name, write_section
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.local import LocalRun, run_local
from splitft.shared.job.config import JobConfig, OptimizerSettings
from splitft.shared.job.data import Batches, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.lora import LoraSettings, block_ranks
from splitft.shared.model.loss import causal_lm_loss
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer


def union_step_batches(data: dict[str, Path], batch: int, length: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    tokenizer = load_tokenizer("tiny-gpt2")
    pad = int(tokenizer.pad_token_id)
    streams = {
        n: Batches(tokenize(load_records(p), tokenizer, length), batch, pad, seed=batch_seed(0, n))
        for n, p in data.items()
    }
    out = []
    for _ in range(steps):
        parts = [streams[n].next() for n in sorted(data)]
        width = max(p[0].shape[1] for p in parts)
        pad_to = torch.nn.functional.pad
        ids = torch.cat([pad_to(p[0], (0, width - p[0].shape[1]), value=pad) for p in parts])
        labels = torch.cat([pad_to(p[1], (0, width - p[1].shape[1]), value=-100) for p in parts])
        lengths = torch.cat([p[2] for p in parts])
        out.append((ids, labels, lengths))
    return out


def centralised(batches: list[tuple[torch.Tensor, ...]], lora: LoraSettings, lr: float) -> float:
    """Seconds per step of plain LoRA training in one process (the first step is a warm-up)."""
    whole = build_segment("tiny-gpt2", SegmentSpec.whole(12), lora=lora, ranks=block_ranks(12, [2], lora))
    optimizer = torch.optim.AdamW(whole.lora_parameters().values(), lr=lr)
    times = []
    for ids, labels, lengths in batches:
        start = time.perf_counter()
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        causal_lm_loss(whole(ids, mask), labels).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return statistics.mean(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per agent per step")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--wire", default="fp16")
    parser.add_argument("--write", type=Path)
    args = parser.parse_args()

    lora, lr = LoraSettings(), 1e-3
    steps = args.rounds * args.local_steps
    tmp = Path(tempfile.mkdtemp(prefix="splitft-bench-"))
    job = JobConfig(
        job="bench", model="tiny-gpt2", rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch,
        max_length=args.length, lora=lora, wire_dtype=args.wire, optimizer=OptimizerSettings(lr=lr), eval_samples=1,
    )  # fmt: skip
    broker = start_mosquitto(tmp / "broker")
    try:
        run = LocalRun(job, tmp / "out", agents=3, cuts=(1, 2, 3), samples_per_agent=64, broker_url=broker.url)
        asyncio.run(run_local(run))
    finally:
        stop_broker(broker)
    data = {name: tmp / "out" / "data" / f"{name}.jsonl" for name in run.agent_names()}
    one_process_s = centralised(union_step_batches(data, args.batch, args.length, steps + 1), lora, lr)

    records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()][2:]
    split_s = statistics.mean(r["round_time_s"] for r in records) / args.local_steps
    per_agent = [a for r in records for a in r["agents"].values()]
    parts = ("forward_s", "encode_s", "upload_s", "wait_s", "decode_s", "backward_s")
    mean = {k: statistics.mean(a["timings"][k] for a in per_agent) for k in parts}
    server_step_s = statistics.mean(a["server_s"] for a in per_agent) * len(run.agent_names())
    bytes_step = statistics.mean(r["bytes_up"] + r["bytes_down"] for r in records) / args.local_steps

    rows = [
        "| run | s / global step | ratio | bytes / global step |",
        "|---|---:|---:|---:|",
        f"| (a) one process, union batch of {3 * args.batch} | {one_process_s:.3f} | 1.00 | 0 |",
        f"| (b) split, 3 agents via Mosquitto ({args.wire} wire) | {split_s:.3f} | {split_s / one_process_s:.2f} | "
        f"{bytes_step / 1e6:.2f} MB |",
        "",
        "Where an agent's step goes (mean seconds per step, agents' own timings):",
        "",
        "| forward | encode | publish | wait for gradient (server compute + broker + other agents) | decode | backward |",
        "|---:|---:|---:|---:|---:|---:|",
        "| " + " | ".join(f"{mean[k]:.3f}" for k in parts) + " |",
        "",
        f"The server's own compute for the three agents' batches: {server_step_s:.3f} s per global step "
        f"({server_step_s / split_s:.0%} of the split's step); the rest, {split_s - server_step_s:.3f} s, is the "
        "orchestration: encode, publish, broker, decode, the per-step barrier, assignment, adapter upload and "
        "aggregation. Here the three agent processes share the machine's cores with the server, which slows the "
        f"server's compute against the one-process run ({server_step_s:.3f} s vs {one_process_s:.3f} s); on a real "
        "fleet the devices run elsewhere. "
        + (
            f"Target ratio <= 1.25: met ({split_s / one_process_s:.2f})."
            if split_s / one_process_s <= 1.25
            else f"Target ratio <= 1.25: missed ({split_s / one_process_s:.2f})."
        ),
    ]
    text = "\n".join(rows)
    print(text)
    if args.write:
        command = (
            f"python scripts/bench_runtime.py --batch {args.batch} --length {args.length} --rounds {args.rounds} "
            f"--local-steps {args.local_steps} --wire {args.wire}"
        )
        write_section(
            args.write,
            "runtime",
            f"## Runtime overhead of the split\n\n"
            f"tiny-gpt2 (12 blocks, hidden 128), LoRA r=16 / r_cut=8, B={args.batch} per agent, T<={args.length}, "
            f"{steps} global steps; agents cut at 1, 2, 3; coordinator, agents and Mosquitto on one machine "
            f"({cpu_name()}, {torch.get_num_threads()} threads), {date.today().isoformat()}.\n\n"
            f"`{command} --write BENCHMARKS.md`\n\n{text}",
        )


if __name__ == "__main__":
    main()
