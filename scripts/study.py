#!/usr/bin/env python3
"""The SplitFT benchmark study: every method on the same emulated fleet, data, base model and token budget.

    python scripts/study.py --quick                      # about 12 minutes on 2 cores (base model included)
    python scripts/study.py                              # the full study (about 55 minutes, 10 more for the base)
    python scripts/study.py --write BENCHMARKS.md        # and replace the study's section there

Methods, each on the same length-Dirichlet partition of GSM8K train among five devices (Jetson Nano,
2 x Jetson Orin Nano, Raspberry Pi 5, laptop), for each alpha:

* ``centralised``: LoRA in one process on the pooled data, one step on every device's batch at once
  (the quality reference; its data would have to leave the devices);
* ``fedavg``: federated LoRA without a split: every block and the head on the device, adapters
  averaged (by tokens) each round; run in this process, device by device;
* ``fixed``: SplitFT's runtime with one cut for all (SplitLoRA / SFL style), uniform LoRA rank;
* ``paper``: the SplitFT paper's rule (cuts follow local accuracy), uniform rank;
* ``splitft``: the ``splitft`` policy (latency-optimal cuts, performance term, hysteresis) with the
  lower rank at the cut blocks.

The split methods are real runs: a Mosquitto broker (the embedded one when Mosquitto is missing), the
coordinator, and five ``splitft-agent join`` processes emulating the devices *virtually* (they report
their profiles' compute times without waiting for them, agent/emulation.py). Time is measured twice:
host wall time, and a simulated clock (scripts/virtual_clock.py) that replays every round on the
devices' profiles against a server ``--server-speedup`` times faster than this host (a GPU server's
stand-in; the coordinator's controller plans with the same speed-up). The wire-dtype study reruns
``splitft`` with fp32, bf16 and int8 activations (fp16 is the main run).

Written to ``--out``: ``runs/<alpha>/<method>/rounds.jsonl`` (one line per round: simulated and wall
time, eval perplexity and accuracy, bytes, cuts), the split runs' coordinator metrics and logs,
``summary.jsonl`` (one line per run), ``study.json`` (settings and machine) and the plots
``study_ppl.png``, ``study_bytes.png``, ``study_cuts.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import torch
from transformers.utils import logging as hf_logging

from splitft.agent.runtime import batch_seed
from splitft.coordinator.controller import DeviceEstimate, ServerEstimate, ideal_bound, makespan_s
from splitft.coordinator.local import LocalRun, run_local
from splitft.shared.codec import encode_state
from splitft.shared.config import JobConfig, OptimizerSettings
from splitft.shared.data import Batches, collate, load_records, tokenize
from splitft.shared.lora import LoraSettings, load_lora_state, lora_state
from splitft.shared.models import block_flops, block_params, load_config, num_layers
from splitft.shared.partition import length_dirichlet_partition, token_lengths, write_partition
from splitft.shared.profiles import load_profile
from splitft.shared.split import (
    Segment,
    SegmentSpec,
    build_segment,
    causal_lm_loss,
    evaluate_lm,
    padding_mask,
)
from splitft.shared.text import GSM8K, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain_base
from bench_report import cpu_name, write_section
from virtual_clock import (
    CostModel,
    Device,
    LocalParticipant,
    RoundTiming,
    Server,
    SplitParticipant,
    SplitStep,
    calibrate_server,
    local_round,
    split_round,
)

FLEET = ("jetson-nano", "jetson-orin-nano", "jetson-orin-nano", "raspberry-pi-5", "laptop")
METHODS = ("centralised", "fedavg", "fixed", "paper", "splitft")
SPLIT_METHODS = ("fixed", "paper", "splitft")
WIRE_DTYPES = ("fp32", "fp16", "bf16", "int8")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class StudySettings:
    """One study: the budget every method gets, and how it is measured."""

    variant: str
    alphas: tuple[float, ...] = (0.1, 1.0)
    rounds: int = 12
    local_steps: int = 4
    batch_size: int = 4  # sequences per device per step
    max_length: int = 256  # the base's positions (GSM8K's median is 187 tokens, 20% are truncated)
    samples_per_agent: int = 120  # GSM8K train problems per device on average (the partition is uneven)
    lr: float = 3e-3
    r: int = 16
    r_cut: int = 8  # splitft's rank at the cut blocks; the other methods use r everywhere
    fixed_cut: int = 2  # the fixed method's cut, and everyone's first-round cut
    eval_samples: int = 64  # GSM8K test problems evaluated every round (perplexity against time)
    final_eval_samples: int = 200  # for the final perplexity and next-token accuracy
    gen_samples: int = 50  # GSM8K test problems answered by greedy generation
    gen_tokens: int = 128
    server_speedup: float = 100.0
    split: str = "two-part"  # the split runs' split, "two-part" or "u" (their devices then also hold `tail` blocks)
    tail: int = 1
    wire_alpha: float = 1.0
    target_margin: float = 0.05  # target perplexity: centralised's final x (1 + margin)
    seed: int = 0
    base_tokens: int = 0  # pretraining token budget (0: pretrain_base.py's default)
    methods: tuple[str, ...] = METHODS
    wire_dtypes: tuple[str, ...] = WIRE_DTYPES  # splitft reruns at wire_alpha (fp16 is its main run)

    def __post_init__(self) -> None:
        if "centralised" not in self.methods or not set(self.methods) <= set(METHODS):
            raise ValueError(f"methods must be among {METHODS} and include centralised (the target's reference)")
        if not set(self.wire_dtypes) <= set(WIRE_DTYPES):
            raise ValueError(f"wire dtypes must be among {WIRE_DTYPES}")
        if self.wire_alpha not in self.alphas:
            raise ValueError(f"wire_alpha {self.wire_alpha} is not one of the alphas {self.alphas}")

    @property
    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings("adamw", self.lr)

    @property
    def agents(self) -> int:
        return len(FLEET)


QUICK = StudySettings(
    variant="quick",
    rounds=5,
    local_steps=2,
    batch_size=2,
    samples_per_agent=40,
    eval_samples=16,
    final_eval_samples=48,
    gen_samples=8,
    gen_tokens=64,
    base_tokens=300_000,
)
FULL = StudySettings(variant="full")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Fleet:
    """The devices of one alpha: names, profiles and data shards."""

    names: tuple[str, ...]
    devices: tuple[Device, ...]
    shards: tuple[tuple[tuple[str, str], ...], ...]  # (prompt, response) pairs per device


def make_fleet(settings: StudySettings, base: Path, alpha: float, folder: Path) -> Fleet:
    """The same partition run_local makes for these settings (checked against its files after each run)."""
    names = tuple(f"agent-{i + 1}" for i in range(settings.agents))
    pairs = load_records(GSM8K / "train.jsonl", limit=settings.agents * settings.samples_per_agent)
    lengths = token_lengths(pairs, load_tokenizer(str(base)))
    partition = length_dirichlet_partition(lengths, settings.agents, alpha, seed=settings.seed)
    write_partition(pairs, partition, folder, prefix="shard")
    shards = tuple(tuple(pairs[i] for i in part) for part in partition.parts)
    devices = tuple(Device.from_profile(load_profile(name)) for name in FLEET)
    return Fleet(names, devices, shards)


def agent_streams(settings: StudySettings, base: Path, fleet: Fleet) -> dict[str, Batches]:
    """The batches each device draws, in order (agent/runtime.py tokenizes and seeds them the same way)."""
    tokenizer = load_tokenizer(str(base))
    pad = int(tokenizer.pad_token_id)
    streams = {}
    for name, shard in zip(fleet.names, fleet.shards, strict=True):
        examples = tokenize(list(shard), tokenizer, settings.max_length)
        streams[name] = Batches(examples, settings.batch_size, pad, seed=batch_seed(settings.seed, name))
    return streams


def eval_batches(tokenizer: Any, max_length: int, samples: int, batch: int = 8) -> list[tuple[Any, Any, Any]]:
    """The first ``samples`` GSM8K test problems, as the coordinator evaluates them."""
    examples = tokenize(load_records(GSM8K / "test.jsonl", limit=samples), tokenizer, max_length)
    pad = int(tokenizer.pad_token_id)
    return [collate(examples[i : i + batch], pad) for i in range(0, len(examples), batch)]


# --------------------------------------------------------------------------- in-process methods


def evaluate(segment: Segment, batches: Sequence[tuple[Any, Any, Any]]) -> dict[str, float]:
    """Perplexity and shifted next-token accuracy on the response tokens, as the coordinator evaluates."""
    segment.eval()
    result = evaluate_lm(segment, batches)
    return {"eval_ppl": result.perplexity, "eval_acc": result.accuracy}


def whole_segment(settings: StudySettings, base: Path) -> Segment:
    layers = num_layers(load_config(str(base)))
    lora = LoraSettings(r=settings.r, r_cut=settings.r)
    return build_segment(str(base), SegmentSpec.whole(layers), lora=lora, lora_seed=settings.seed)


def adapter_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of an adapter message body (the codec's encoding, fp32 as SplitFT sends adapters)."""
    return len(msgpack.packb(encode_state(state, "fp32"), use_bin_type=True))


def run_centralised(
    settings: StudySettings, base: Path, fleet: Fleet, costs: CostModel, evals: list[Any], out: Path
) -> list[dict[str, Any]]:
    segment = whole_segment(settings, base)
    optimizer = settings.optimizer.build(segment.lora_parameters().values())
    streams = list(agent_streams(settings, base, fleet).values())
    data_bytes = sum(len(p.encode()) + len(r.encode()) for shard in fleet.shards for p, r in shard)
    rows = [_row(0, 0.0, 0.0, evaluate(segment, evals), data_bytes, 0, {})]
    virtual, wall = 0.0, 0.0
    for round_ in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        for _ in range(settings.local_steps):
            segment.train()
            batches = [stream.next() for stream in streams]
            total = sum(int((labels[:, 1:] != IGNORE_INDEX).sum()) for _, labels, _ in batches)
            for input_ids, labels, lengths in batches:  # one step on all of them: the mean over their tokens
                loss_sum = causal_lm_loss(
                    segment(input_ids, padding_mask(lengths, input_ids.shape[1])), labels, num_targets=1
                )
                (loss_sum / max(total, 1)).backward()
                virtual += costs.server_batch_s(0, *input_ids.shape)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        result = evaluate(segment, evals)
        wall += time.perf_counter() - t0  # training and evaluation, as the coordinator's round time
        rows.append(_row(round_, virtual, wall, result, data_bytes, 0, {}))
        say(f"  centralised round {round_}/{settings.rounds}: eval ppl {rows[-1]['eval_ppl']:.1f}")
    _export(segment, base, out / "adapter")
    return rows


def run_fedavg(
    settings: StudySettings, base: Path, fleet: Fleet, costs: CostModel, evals: list[Any], out: Path
) -> list[dict[str, Any]]:
    segment = whole_segment(settings, base)
    global_state = lora_state(segment.peft_model)
    size = adapter_bytes(global_state)
    streams = list(agent_streams(settings, base, fleet).values())
    rows = [_row(0, 0.0, 0.0, evaluate(segment, evals), 0, 0, {})]
    virtual, wall, up, down = 0.0, 0.0, 0, 0
    for round_ in range(1, settings.rounds + 1):
        t0 = time.perf_counter()
        uploads: list[tuple[int, dict[str, torch.Tensor]]] = []
        participants = []
        for name, device, stream in zip(fleet.names, fleet.devices, streams, strict=True):
            load_lora_state(segment.peft_model, global_state)
            optimizer = settings.optimizer.build(segment.lora_parameters().values())
            tokens, compute = 0, []
            for _ in range(settings.local_steps):
                segment.train()
                input_ids, labels, lengths = stream.next()
                causal_lm_loss(segment(input_ids, padding_mask(lengths, input_ids.shape[1])), labels).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
                compute.append(2 * costs.device_pass_s(device, costs.layers, *input_ids.shape, head=True))
            uploads.append((tokens, lora_state(segment.peft_model)))
            participants.append(LocalParticipant(name, device.down_s(size), compute, device.up_s(size)))
        total = sum(t for t, _ in uploads)
        global_state = {n: sum(t * s[n] for t, s in uploads) / total for n in global_state}
        load_lora_state(segment.peft_model, global_state)
        result = evaluate(segment, evals)
        wall += time.perf_counter() - t0  # training and evaluation, as the coordinator's round time
        virtual += local_round(participants).seconds
        up, down = up + size * len(uploads), down + size * len(uploads)
        rows.append(_row(round_, virtual, wall, result, up, down, {}))
        say(f"  fedavg round {round_}/{settings.rounds}: eval ppl {rows[-1]['eval_ppl']:.1f}")
    _export(segment, base, out / "adapter")
    return rows


def _export(segment: Segment, base: Path, folder: Path) -> None:
    peft_model = segment.peft_model
    peft_model.peft_config["default"].base_model_name_or_path = str(base)
    peft_model.save_pretrained(str(folder), save_embedding_layers=False)


def _row(
    round_: int, virtual: float, wall: float, result: Mapping[str, float], up: int, down: int, cuts: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "round": round_,
        "virtual_s": round(virtual, 4),
        "wall_s": round(wall, 3),
        "eval_ppl": round(result["eval_ppl"], 4),
        "eval_acc": round(result["eval_acc"], 6),
        "bytes_up": up,
        "bytes_down": down,
        "cuts": dict(cuts),
    }


# --------------------------------------------------------------------------- split methods


def split_job(settings: StudySettings, base: Path, method: str, alpha: float, wire: str) -> JobConfig:
    return JobConfig(
        job=f"study-{method}-{wire}-a{alpha:g}".replace(".", "p"),
        model=str(base),
        rounds=settings.rounds,
        local_steps=settings.local_steps,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        cut=settings.fixed_cut,
        split=settings.split,
        tail=settings.tail,
        policy=method,
        wire_dtype=wire,
        lora=LoraSettings(r=settings.r, r_cut=settings.r_cut if method == "splitft" else settings.r),
        optimizer=settings.optimizer,
        eval_samples=settings.eval_samples,
        seed=settings.seed,
        server_speedup=settings.server_speedup,
        # Wall-clock guards only: every part shares this host's two cores, far slower than the plan.
        min_step_timeout_s=300.0,
        step_timeout_s=600.0,
        upload_timeout_s=600.0,
    )


def run_split(
    settings: StudySettings,
    base: Path,
    fleet: Fleet,
    costs: CostModel,
    method: str,
    alpha: float,
    wire: str,
    broker: tuple[str, str] | None,
    out: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One real run through the broker; then its rounds replayed on the simulated clock."""
    job = split_job(settings, base, method, alpha, wire)
    plan = LocalRun(
        job,
        out,
        agents=settings.agents,
        cuts=(settings.fixed_cut,),
        samples_per_agent=settings.samples_per_agent,
        alpha=alpha,
        broker_url=broker[0] if broker else None,
        mqtt_protocol=broker[1] if broker else "5",
        emulate=FLEET,
        emulate_virtual=True,
    )

    def progress(event: str, data: dict[str, Any]) -> None:
        if event == "round_end":
            cuts = "/".join(str(c) for c in data["cuts"].values())
            say(
                f"  {method} ({wire}) round {data['round']}/{settings.rounds}: eval ppl {data['eval_ppl']:.1f}, cuts {cuts}"
            )
        elif event == "round_retry":
            say(f"  {method}: round {data['round']} runs again (attempt {data['attempt']})")

    summary = asyncio.run(run_local(plan, progress))
    for i, name in enumerate(fleet.names):  # the harness's partition must be the run's
        theirs = load_records(out / "data" / f"{name}.jsonl")
        if tuple(theirs) != fleet.shards[i]:
            raise RuntimeError(f"{out}: {name}'s shard differs from the study's partition")
    metrics = read_jsonl(out / "metrics.jsonl")
    return replay_split(settings, base, fleet, costs, metrics), summary


def replay_split(
    settings: StudySettings, base: Path, fleet: Fleet, costs: CostModel, metrics: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per-round rows of a split run, with each round replayed on the simulated clock.

    The batch shapes are the agents' own (the same seeded streams); the bytes are the ones the run
    sent (per step: the agent's mean activation and gradient messages; the rest of a round's traffic
    is the assignment and the adapter upload).
    """
    streams = agent_streams(settings, base, fleet)
    devices = dict(zip(fleet.names, fleet.devices, strict=True))
    rows = [_row(0, 0.0, 0.0, metrics[0], 0, 0, {})]
    virtual, wall, up, down = 0.0, 0.0, 0, 0
    for record in metrics[1:]:
        wall += record["round_time_s"]  # from the round's assignments to its evaluation (not start-up)
        participants, estimates, shapes = [], [], []
        for name, agent in record["agents"].items():
            device, steps_run = devices[name], []
            timings = agent.get("timings") or {}
            act, grad = float(timings.get("bytes_up", 0.0)), float(timings.get("bytes_down", 0.0))
            for _ in range(settings.local_steps):
                input_ids, labels, _ = streams[name].next()
                b, t = input_ids.shape
                shapes.append((b, t))
                targets = int((labels[:, 1:] != -100).sum())  # the head runs on the targets only
                steps_run.append(split_step(costs, device, agent["cut"], agent.get("tail"), b, t, targets, act, grad))
            adapter_up = max(agent["bytes_up"] - settings.local_steps * act, 0.0)
            adapter_down = max(agent["bytes_down"] - settings.local_steps * grad, 0.0)
            participants.append(SplitParticipant(name, device.down_s(adapter_down), steps_run, device.up_s(adapter_up)))
            estimates.append((device, agent["cut"], act, grad))
        timing = split_round(participants)
        virtual += timing.seconds
        up, down = up + record["bytes_up"], down + record["bytes_down"]
        row = _row(record["round"], virtual, wall, record, up, down, record["cuts"])
        if settings.split == "two-part":
            row.update(_balance(costs, timing, estimates, shapes, record))
        else:  # the balance bound models the two-part split only
            row.update(step_s=round(timing.mean_step_s, 5), attempt=record.get("attempt", 1))
        rows.append(row)
    return rows


def split_step(
    costs: CostModel,
    device: Device,
    cut: int,
    tail: int | None,
    b: int,
    t: int,
    targets: int,
    up: float,
    down: float,
) -> SplitStep:
    """One device step on the simulated clock; ``up``/``down`` are the step's bytes each way (in the U split, two
    messages each way of about the same size: activations and the tail's gradient up, tail activations and the
    gradient at the cut down); the head runs on the ``targets`` positions."""
    one_way = costs.device_pass_s(device, cut, b, t)
    if tail is None:
        server = costs.server_batch_s(cut, b, t, head_tokens=targets)
        return SplitStep(one_way, device.up_s(up), server, device.down_s(down), one_way)
    middle = costs.server_middle_s(cut, tail, b, t)
    tail_s = 2 * costs.device_pass_s(device, tail, b, t, head=True, head_tokens=targets)
    return SplitStep(
        one_way, device.up_s(up / 2), middle, device.down_s(down / 2), one_way,
        tail=(device.down_s(down / 2), tail_s, device.up_s(up / 2), middle),
    )  # fmt: skip


def _balance(
    costs: CostModel,
    timing: RoundTiming,
    estimates: Sequence[tuple[Device, int, float, float]],
    shapes: Sequence[tuple[int, int]],
    record: Mapping[str, Any],
) -> dict[str, Any]:
    """The round's cuts against the balanced lower bound, both in the controller's step model at the round's
    mean batch shape: the step time M of these cuts over the least M of any fractional cuts (>= 1)."""
    b = sum(s[0] for s in shapes) / len(shapes)
    t = round(sum(s[1] for s in shapes) / len(shapes))
    flops = block_flops(costs.config, 1, t) * b
    server = ServerEstimate(
        block_s=2 * flops / costs.server.block_flops_per_s,
        head_s=costs.server_batch_s(costs.layers, 1, t) * b,
    )
    devices = [
        DeviceEstimate(
            name=f"{i}",
            block_s=2 * flops / d.flops_per_s,
            up_bytes=act,
            down_bytes=grad,
            uplink_bps=d.uplink_bps,
            downlink_bps=d.downlink_bps,
            rtt_s=d.rtt_s,
        )
        for i, (d, _, act, grad) in enumerate(estimates)
    ]
    cuts = {f"{i}": float(cut) for i, (_, cut, _, _) in enumerate(estimates)}
    achieved = makespan_s(devices, server, costs.layers, cuts)
    ideal = ideal_bound(devices, server, costs.layers, 1, costs.layers - 1)
    one_cut = {c: makespan_s(devices, server, costs.layers, dict.fromkeys(cuts, float(c))) for c in range(1, 7)}
    return {
        "attempt": record.get("attempt", 1),
        "step_s": round(timing.mean_step_s, 5),  # simulated, with the actual batches
        "model_step_s": round(achieved, 5),
        "ideal_step_s": round(ideal, 5),
        "one_cut_step_s": {str(c): round(v, 5) for c, v in one_cut.items() if c < costs.layers},
        "achieved_over_ideal": round(achieved / ideal, 4) if ideal > 0 else None,
        "train_loss": record.get("train_loss"),
        "rss_mb": {n: a.get("timings", {}).get("rss_mb") for n, a in record["agents"].items()},
    }


# --------------------------------------------------------------------------- final evaluation


def load_adapted(base: Path, adapter: Path) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    model.eval()
    return model


ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def gsm8k_answer(text: str) -> str | None:
    match = ANSWER.search(text)
    return match.group(1).replace(",", "").rstrip(".") if match else None


@torch.no_grad()
def final_evaluation(settings: StudySettings, base: Path, adapter: Path) -> dict[str, Any]:
    """Perplexity and next-token accuracy on more of GSM8K test; answer accuracy by greedy generation."""
    tokenizer = load_tokenizer(str(base))
    model = load_adapted(base, adapter)
    evals = eval_batches(tokenizer, settings.max_length, settings.final_eval_samples)
    result = evaluate_lm(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits, evals)
    # The first gen_samples problems whose question leaves the model room to answer (all of GSM8K test at 256).
    room_needed = min(settings.gen_tokens, settings.max_length // 4)
    problems = [
        (q, a)
        for q, a in load_records(GSM8K / "test.jsonl")
        if len(tokenizer(q + "\n", add_special_tokens=False)["input_ids"]) <= settings.max_length - room_needed
    ][: settings.gen_samples]
    tokenizer.padding_side = "left"
    correct, answered = 0, 0
    for i in range(0, len(problems), 8):
        chunk = problems[i : i + 8]
        enc = tokenizer([p + "\n" for p, _ in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        room = max(settings.max_length - enc["input_ids"].shape[1], 1)
        generated = model.generate(
            **enc,
            max_new_tokens=min(settings.gen_tokens, room),
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, (_, reference) in zip(texts, chunk, strict=True):
            got = gsm8k_answer(text)
            answered += got is not None
            correct += got is not None and got == gsm8k_answer(reference)
    return {
        "final_ppl": round(result.perplexity, 4),
        "final_acc": round(result.accuracy, 6),
        "gsm8k_correct": correct,
        "gsm8k_answered": answered,
        "gsm8k_problems": len(problems),
    }


# --------------------------------------------------------------------------- memory


def memory_estimate_mb(settings: StudySettings, base: Path, blocks: int, head: bool) -> float:
    """Training memory of a device's part: fp32 weights, LoRA with AdamW, saved activations.

    Activations per block follow Korthikanti et al. (2022), ``s b h (34 + 5 a s / h)`` bytes at 16 bits,
    doubled for fp32; the head keeps its logits and their gradient.
    """
    config = load_config(str(base))
    h, v, a = int(config.hidden_size), int(config.vocab_size), int(config.num_attention_heads)
    b, s = settings.batch_size, settings.max_length
    positions = int(getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0) or 0)
    weights = (v * h + positions * h + blocks * block_params(config)) * 4
    lora = blocks * 6 * settings.r * h * 4 * 4  # about 6 adapted matrices per block; weight, grad, two moments
    activations = blocks * s * b * h * (34 + 5 * a * s / h) * 2
    if head:
        activations += 2 * b * s * v * 4
    return round((weights + lora + activations) / 2**20, 1)


# --------------------------------------------------------------------------- the study


@contextlib.contextmanager
def mqtt_broker(folder: Path) -> Iterator[tuple[str, str] | None]:
    """Mosquitto on a free 127.0.0.1 port when installed; else None (the runs use the embedded broker)."""
    import local_broker

    try:
        binary = local_broker.mosquitto_binary()
    except (FileNotFoundError, RuntimeError, OSError):
        binary = None
    if binary is None:
        say("Mosquitto not found: the split runs use the embedded amqtt broker")
        yield None
        return
    broker = local_broker.start_mosquitto(folder)
    try:
        yield broker.url, "5"
    finally:
        local_broker.stop_broker(broker)


def time_to(rows: Sequence[Mapping[str, Any]], target: float, key: str) -> float | None:
    """When (``key``) the eval perplexity first reached ``target``: log-linear between the evaluations
    of the round before and the first round at or below it; None if it never did."""
    previous = None
    for row in rows:
        if row["eval_ppl"] <= target:
            if previous is None:
                return float(row[key])
            high, low = math.log(previous["eval_ppl"]), math.log(row["eval_ppl"])
            fraction = (high - math.log(target)) / (high - low) if high > low else 1.0
            return float(previous[key] + fraction * (row[key] - previous[key]))
        previous = row
    return None


def replay_runs(settings: StudySettings, out: Path) -> None:
    """Replay every split run of ``out`` on the simulated clock again, from its metrics (the clock is a pure
    function of them, the settings and the recorded server speed), and rewrite its rows and summary."""
    meta = json.loads((out / "study.json").read_text())
    base = Path(meta["base"])
    rates = meta["server_tflops"]
    costs = CostModel(load_config(str(base)), Server(rates["blocks"] * 1e12, rates["head"] * 1e12))
    summaries = read_jsonl(out / "summary.jsonl")
    for i, s in enumerate(summaries):
        if s["method"] not in SPLIT_METHODS:
            continue
        run_dir = out / Path(s["rounds"]).parent
        fleet = make_fleet(settings, base, s["alpha"], run_dir / "partition")
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        rows = replay_split(settings, base, fleet, costs, metrics)
        write_jsonl(run_dir / "rounds.jsonl", rows)
        final = {k: s[k] for k in ("final_ppl", "final_acc", "gsm8k_correct", "gsm8k_answered", "gsm8k_problems")}
        summaries[i] = summarise(settings, base, s["alpha"], s["method"], s["wire_dtype"], rows, final, s["wall_s"])
    write_jsonl(out / "summary.jsonl", summaries)


def with_targets(out: Path, summaries: Sequence[Mapping[str, Any]], margin: float) -> list[dict[str, Any]]:
    """The runs of every alpha with a centralised run, each with the target perplexity (centralised's final
    round x (1 + margin)) and the simulated and wall time it took to reach it."""
    done = []
    for s in summaries:
        reference = next((r for r in summaries if r["alpha"] == s["alpha"] and r["method"] == "centralised"), None)
        if reference is None:
            continue
        target = reference["final_round_ppl"] * (1 + margin)
        rows = read_jsonl(out / s["rounds"])
        done.append(
            {
                **s,
                "target_ppl": round(target, 3),
                "time_to_target_s": time_to(rows, target, "virtual_s"),
                "wall_to_target_s": time_to(rows, target, "wall_s"),
            }
        )
    return done


def run_study(settings: StudySettings, out: Path, base: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    if base is None:
        pre = pretrain_base.Settings(family="gpt2", tokens=settings.base_tokens) if settings.base_tokens else None
        pre = pre or pretrain_base.Settings(family="gpt2")
        pre = dataclasses.replace(pre, precision="bf16" if pretrain_base.bf16_is_fast("cpu") else "fp32")
        say("base model: pretraining (or the cached build) ...")
        base = pretrain_base.build_base(pre, log=lambda m: say(f"  pretrain: {m}"))
    config = load_config(str(base))
    server, calibration = calibrate_server(str(base), settings.batch_size, settings.max_length)
    server = Server(
        server.block_flops_per_s * settings.server_speedup, server.head_flops_per_s * settings.server_speedup
    )
    costs = CostModel(config, server)
    say(
        f"base {base}; server: this host x {settings.server_speedup:g} = "
        f"{server.block_flops_per_s / 1e12:.2f} TFLOP/s blocks, {server.head_flops_per_s / 1e12:.2f} head"
    )
    tokenizer = load_tokenizer(str(base))
    evals = eval_batches(tokenizer, settings.max_length, settings.eval_samples)
    meta = {
        "settings": dataclasses.asdict(settings),
        "base": str(base),
        "base_facts": json.loads((base / pretrain_base.FACTS_FILE).read_text()),
        "fleet": list(FLEET),
        "host": cpu_name(),
        "threads": torch.get_num_threads(),
        "calibration": calibration,
        "server_tflops": {"blocks": server.block_flops_per_s / 1e12, "head": server.head_flops_per_s / 1e12},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/study.py", *sys.argv[1:]]),
    }
    (out / "study.json").write_text(json.dumps(meta, indent=2, default=str))
    summaries: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    plan = [(alpha, method, "fp16") for alpha in settings.alphas for method in settings.methods]
    if "splitft" in settings.methods:
        plan += [(settings.wire_alpha, "splitft", w) for w in settings.wire_dtypes if w != "fp16"]
    with mqtt_broker(out / "broker") as broker:
        for index, (alpha, method, wire) in enumerate(plan, 1):
            label = method if wire == "fp16" else f"{method}-{wire}"
            run_dir = out / "runs" / f"alpha-{alpha:g}" / label
            if run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            say(f"[{index}/{len(plan)}] alpha {alpha:g}: {label}")
            fleet = make_fleet(settings, base, alpha, run_dir / "partition")
            t0 = time.perf_counter()
            try:
                if method == "centralised":
                    rows = run_centralised(settings, base, fleet, costs, evals, run_dir)
                    adapter = run_dir / "adapter"
                elif method == "fedavg":
                    rows = run_fedavg(settings, base, fleet, costs, evals, run_dir)
                    adapter = run_dir / "adapter"
                else:
                    rows, summary = run_split(settings, base, fleet, costs, method, alpha, wire, broker, run_dir)
                    adapter = Path(summary["adapter"])
                run_wall = time.perf_counter() - t0
                write_jsonl(run_dir / "rounds.jsonl", rows)
                final = final_evaluation(settings, base, adapter)
            except Exception as exc:  # one failed run must not lose the others: recorded, reported, skipped
                say(f"  FAILED: {type(exc).__name__}: {exc} (see {run_dir})")
                failed.append(
                    {"alpha": alpha, "method": method, "wire_dtype": wire, "error": f"{type(exc).__name__}: {exc}"}
                )
                continue
            summaries.append(summarise(settings, base, alpha, method, wire, rows, final, run_wall))
            say(
                f"  done in {run_wall:.0f} s: final ppl {final['final_ppl']:.1f}, "
                f"simulated {rows[-1]['virtual_s']:.1f} s, GSM8K {final['gsm8k_correct']}/{final['gsm8k_problems']}"
            )
    write_jsonl(out / "summary.jsonl", summaries)
    write_jsonl(out / "failed.jsonl", failed)
    plot_study(settings, out, with_targets(out, summaries, settings.target_margin))
    meta["failed_runs"] = len(failed)
    meta["study_wall_s"] = round(time.perf_counter() - started, 1)
    (out / "study.json").write_text(json.dumps(meta, indent=2, default=str))
    say(f"study finished in {meta['study_wall_s'] / 60:.1f} min; results in {out}")
    return meta


def summarise(
    settings: StudySettings,
    base: Path,
    alpha: float,
    method: str,
    wire: str,
    rows: Sequence[Mapping[str, Any]],
    final: Mapping[str, Any],
    run_wall: float,
) -> dict[str, Any]:
    layers = num_layers(load_config(str(base)))
    trained = rows[1:]
    tokens = settings.rounds * settings.local_steps * settings.agents * settings.batch_size
    summary: dict[str, Any] = {
        "alpha": alpha,
        "method": method,
        "wire_dtype": wire if method in SPLIT_METHODS else None,
        "rounds": f"runs/alpha-{alpha:g}/{method if wire == 'fp16' else f'{method}-{wire}'}/rounds.jsonl",
        "sequences": tokens,
        "virtual_s": rows[-1]["virtual_s"],
        "round_virtual_s": rows[-1]["virtual_s"] / max(len(trained), 1),
        "wall_s": round(run_wall, 1),
        "round_wall_s": round(rows[-1]["wall_s"] / max(len(trained), 1), 3),
        "final_round_ppl": rows[-1]["eval_ppl"],
        "bytes_up": rows[-1]["bytes_up"],
        "bytes_down": rows[-1]["bytes_down"],
        **final,
    }
    if method in SPLIT_METHODS:
        ratios = [r["achieved_over_ideal"] for r in trained[1:] if r.get("achieved_over_ideal")]
        summary["achieved_over_ideal"] = round(sum(ratios) / len(ratios), 4) if ratios else None
        summary["retried_rounds"] = sum(1 for r in trained if r.get("attempt", 1) > 1)
        peak = {}
        for r in trained:
            for name, rss in (r.get("rss_mb") or {}).items():
                if rss is not None:
                    peak[name] = max(peak.get(name, 0.0), rss)
        summary["agent_rss_mb"] = {n: round(v, 1) for n, v in sorted(peak.items())}
        deepest = max(max(r["cuts"].values()) for r in trained)
        summary["device_memory_mb"] = memory_estimate_mb(settings, base, deepest, head=False)
        summary["final_cuts"] = trained[-1]["cuts"]
    elif method == "fedavg":
        summary["device_memory_mb"] = memory_estimate_mb(settings, base, layers, head=True)
    else:
        summary["device_memory_mb"] = 0.0  # the devices only hold their data
    return summary


# --------------------------------------------------------------------------- plots and report


COLORS = {
    "centralised": "black",
    "fedavg": "tab:red",
    "fixed": "tab:orange",
    "paper": "tab:purple",
    "splitft": "tab:blue",
}


def plot_study(settings: StudySettings, out: Path, summaries: Sequence[Mapping[str, Any]]) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    main = [s for s in summaries if s["wire_dtype"] in (None, "fp16")]
    alphas = settings.alphas
    fig = Figure(figsize=(6 * len(alphas), 8))
    axes = fig.subplots(2, len(alphas), squeeze=False)
    for col, alpha in enumerate(alphas):
        for s in (s for s in main if s["alpha"] == alpha):
            rows = read_jsonl(out / s["rounds"])
            for row_index, key in enumerate(("virtual_s", "wall_s")):
                ax = axes[row_index][col]
                ax.plot([r[key] for r in rows], [r["eval_ppl"] for r in rows], marker="o", ms=3, label=s["method"],
                        color=COLORS[s["method"]])  # fmt: skip
        for row_index, label in enumerate(("simulated time on the fleet (s)", "wall time on this host (s)")):
            ax = axes[row_index][col]
            target = next(s["target_ppl"] for s in main if s["alpha"] == alpha)
            ax.axhline(target, color="grey", ls=":", lw=1)
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=0)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("eval perplexity (GSM8K test)")
            ax.set_title(f"length-Dirichlet alpha = {alpha:g}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study_ppl.png", dpi=110)

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    rows_ = [s for s in main if s["alpha"] == settings.wire_alpha]
    xs = range(len(rows_))
    ax.bar([x - 0.2 for x in xs], [s["bytes_up"] / 2**20 for s in rows_], 0.4, label="up (devices to server)")
    ax.bar([x + 0.2 for x in xs], [s["bytes_down"] / 2**20 for s in rows_], 0.4, label="down")
    ax.set_xticks(list(xs), [s["method"] for s in rows_])
    ax.set_ylabel("MiB over the whole run")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(0, 30 * max([s["bytes_up"] / 2**20 for s in rows_] + [s["bytes_down"] / 2**20 for s in rows_] + [1]))
    ax.set_title(f"Bytes per method (alpha = {settings.wire_alpha:g}; centralised: its raw data once)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "study_bytes.png", dpi=110)

    split = [s for s in main if s["method"] in SPLIT_METHODS]
    fig = Figure(figsize=(4 * len(SPLIT_METHODS), 3.2 * len(alphas)))
    axes = fig.subplots(len(alphas), len(SPLIT_METHODS), squeeze=False)
    for r, alpha in enumerate(alphas):
        for c, method in enumerate(SPLIT_METHODS):
            ax = axes[r][c]
            s = next((s for s in split if s["alpha"] == alpha and s["method"] == method), None)
            if s is None:
                continue
            rows = read_jsonl(out / s["rounds"])[1:]
            for i, (name, profile) in enumerate(zip(rows[0]["cuts"], FLEET, strict=False)):
                ax.plot([row["round"] for row in rows], [row["cuts"].get(name, 0) + i * 0.06 for row in rows],
                        marker="o", ms=3, label=f"{name} ({profile})")  # fmt: skip
            ax.set_title(f"{method}, alpha = {alpha:g}")
            ax.set_xlabel("round")
            ax.set_ylabel("cut layer (agents offset slightly)")
            deepest = max(max(row["cuts"].values()) for row in rows)
            ax.set_ylim(0.5, max(deepest, 3) + 0.7)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    with_data = [ax for ax in axes.flat if ax.has_data()]
    if with_data:
        with_data[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "study_cuts.png", dpi=110)


def _fmt_s(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.2f}"


def report(out: Path) -> str:
    """The study's section of BENCHMARKS.md, from its files."""
    meta = json.loads((out / "study.json").read_text())
    summaries = read_jsonl(out / "summary.jsonl")
    summaries = with_targets(out, summaries, meta["settings"]["target_margin"])
    failed_path = out / "failed.jsonl"
    failed = read_jsonl(failed_path) if failed_path.exists() else []
    st = meta["settings"]
    lines = [f"**Failed run**: alpha {f['alpha']:g}, {f['method']} ({f['wire_dtype']}): {f['error']}" for f in failed]
    for alpha in st["alphas"]:
        rows = [s for s in summaries if s["alpha"] == alpha and s["wire_dtype"] in (None, "fp16")]
        if not rows:
            continue
        ref = {s["method"]: s for s in rows}
        lines += [
            f"**alpha = {alpha:g}** (target perplexity {rows[0]['target_ppl']:.1f} = centralised final x "
            f"{1 + st['target_margin']:g})",
            "",
            "| method | sim. round s | sim. time to target s | wall round s | wall to target s | final ppl | "
            "next-token acc | GSM8K correct | MiB up | MiB down | device memory MiB: est. (agent RSS) | final cuts | "
            "achieved/ideal |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
        ]
        for method in METHODS:
            s = ref.get(method)
            if s is None:
                continue
            cuts = "/".join(str(c) for c in s.get("final_cuts", {}).values()) or "-"
            ratio = s.get("achieved_over_ideal")
            lines.append(
                f"| {method} | {s['round_virtual_s']:.3f} | {_fmt_s(s['time_to_target_s'])} | {s['round_wall_s']:.1f} | "
                f"{_fmt_s(s['wall_to_target_s'])} | {s['final_ppl']:.2f} | {s['final_acc']:.4f} | "
                f"{s['gsm8k_correct']}/{s['gsm8k_problems']} | {s['bytes_up'] / 2**20:.2f} | "
                f"{s['bytes_down'] / 2**20:.2f} | {_memory(s)} | {cuts} | "
                f"{'-' if ratio is None else f'{ratio:.2f}'} |"
            )
        lines.append("")
        lines += _ratios(ref, st)
        if "splitft" in ref:
            lines += _cut_sensitivity(out, ref["splitft"], st["fixed_cut"])
        lines.append("")
    wire = [s for s in summaries if s["method"] == "splitft" and s["alpha"] == st["wire_alpha"]]
    if wire:
        fp32 = next((s for s in wire if s["wire_dtype"] == "fp32"), None)
        lines += [
            f"**Wire dtype** (splitft, alpha = {st['wire_alpha']:g}): activation and gradient bytes per token of "
            "the padded batch, against fp32",
            "",
            "| wire | bytes/token up | bytes/token down | bytes vs fp32 | final ppl | ppl vs fp32 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for dtype in WIRE_DTYPES:
            s = next((s for s in wire if s["wire_dtype"] == dtype), None)
            if s is None:
                continue
            per_token = _bytes_per_token(out, s)
            base_bytes = _bytes_per_token(out, fp32) if fp32 else per_token
            lines.append(
                f"| {dtype} | {per_token[0]:.1f} | {per_token[1]:.1f} | "
                f"{(base_bytes[0] + base_bytes[1]) / (per_token[0] + per_token[1]):.2f}x smaller | {s['final_ppl']:.3f} | "
                f"{(s['final_ppl'] / fp32['final_ppl'] - 1) * 100 if fp32 else 0:+.2f}% |"
            )
    return "\n".join(lines)


def _memory(s: Mapping[str, Any]) -> str:
    """The estimate for the deepest device part, and the largest measured agent process (Python and torch too)."""
    rss = s.get("agent_rss_mb") or {}
    return f"{s['device_memory_mb']:.0f}" + (f" ({max(rss.values()):.0f})" if rss else "")


def _ratios(ref: Mapping[str, Mapping[str, Any]], st: Mapping[str, Any]) -> list[str]:
    def speedup(other: str, goal: str) -> str:
        if "splitft" not in ref or other not in ref:
            return ""
        a, b = ref["splitft"]["time_to_target_s"], ref[other]["time_to_target_s"]
        if a is None:
            return f"splitft did not reach the target (goal: {goal} sooner than {other})"
        if b is None:
            whole = ref[other]["virtual_s"]
            return (
                f"{other} did not reach the target within its whole budget ({whole:.1f} s), splitft did in {a:.2f} s: "
                f"more than {whole / a:.1f}x sooner (goal {goal})"
            )
        if a == 0:
            return "splitft's starting point already meets the target"
        return f"splitft {b / a:.2f}x sooner than {other} (goal {goal})"

    parts = [text for text in (speedup("fixed", "1.5x"), speedup("fedavg", "3x")) if text]
    lines = [f"- Time to target (simulated): {'; '.join(parts)}."] if parts else []
    if "splitft" in ref and "centralised" in ref:
        gap = (ref["splitft"]["final_ppl"] / ref["centralised"]["final_ppl"] - 1) * 100
        lines.append(f"- Final perplexity: splitft {gap:+.2f}% against centralised LoRA (goal within 2%).")
    if ref.get("splitft", {}).get("achieved_over_ideal"):
        lines.append(
            f"- Achieved step time over the balanced ideal, splitft rounds 2+: {ref['splitft']['achieved_over_ideal']:.2f} "
            "(goal within 1.15)."
        )
    return lines


def _cut_sensitivity(out: Path, s: Mapping[str, Any], fixed: int) -> list[str]:
    """What any cut could do: the controller's step model at the run's batches, one cut for all vs. the run's."""
    rows = read_jsonl(out / s["rounds"])[2:]
    rows = [r for r in rows if "one_cut_step_s" in r]
    if not rows:
        return []

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    one = {c: mean([r["one_cut_step_s"][c] for r in rows]) for c in rows[0]["one_cut_step_s"]}
    ideal, chosen = mean([r["ideal_step_s"] for r in rows]), mean([r["model_step_s"] for r in rows])
    listed = ", ".join(f"{c}: {v * 1000:.0f}" for c, v in one.items())
    return [
        f"- Step time in the controller's model (ms, rounds 2+ of splitft's run): one cut for all {listed}; "
        f"splitft's cuts {chosen * 1000:.0f}; the balanced ideal {ideal * 1000:.0f}. So no cuts can make a step more "
        f"than {one[str(fixed)] / ideal:.2f}x faster than the fixed cut {fixed}."
    ]


def _bytes_per_token(out: Path, s: Mapping[str, Any]) -> tuple[float, float]:
    """Mean activation (up) and gradient (down) message bytes per token of the padded batch."""
    run = out / Path(s["rounds"]).parent
    up = down = tokens = 0.0
    for record in read_jsonl(run / "metrics.jsonl")[1:]:
        for agent in record["agents"].values():
            timings = agent.get("timings") or {}
            up += timings.get("bytes_up", 0.0)
            down += timings.get("bytes_down", 0.0)
            tokens += timings.get("tokens_padded", 0.0)
    return (up / tokens, down / tokens) if tokens else (math.nan, math.nan)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick variant (about 12 minutes)")
    parser.add_argument("--out", type=Path, help="results folder (default: study-quick/ or study-full/)")
    parser.add_argument("--base", type=Path, help="a base model folder (default: pretrain_base.py's cached build)")
    parser.add_argument("--alphas", type=float, nargs="+", help="length-Dirichlet alphas (default 0.1 1.0)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--server-speedup", type=float)
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (with centralised)")
    parser.add_argument("--wire-dtypes", nargs="+", choices=WIRE_DTYPES, help="the wire-dtype study's dtypes")
    parser.add_argument(
        "--report-only", action="store_true", help="replay the split runs of --out, rewrite its report and plots"
    )
    parser.add_argument("--write", type=Path, help="replace the study's section of this markdown file")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    changes: dict[str, Any] = {}
    if args.alphas:
        changes["alphas"] = tuple(args.alphas)
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.server_speedup:
        changes["server_speedup"] = args.server_speedup
    if args.methods:
        changes["methods"] = tuple(args.methods)
    if args.wire_dtypes:
        changes["wire_dtypes"] = tuple(args.wire_dtypes)
    if "alphas" in changes and settings.wire_alpha not in changes["alphas"]:
        changes["wire_alpha"] = changes["alphas"][-1]
    try:
        settings = dataclasses.replace(settings, **changes)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out or Path(f"study-{settings.variant}")
    torch.set_num_threads(int(os.environ.get("SPLITFT_STUDY_THREADS", "2")))
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, once per model
    hf_logging.set_verbosity_error()  # not a warning per long GSM8K problem while partitioning
    hf_logging.disable_progress_bar()
    if not args.report_only:
        run_study(settings, out, args.base)
    else:  # the settings the results were made with, and their plots again
        recorded = json.loads((out / "study.json").read_text())["settings"]
        settings = StudySettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
        replay_runs(settings, out)
        summaries = read_jsonl(out / "summary.jsonl")
        plot_study(settings, out, with_targets(out, summaries, settings.target_margin))
    text = report(out)
    print(text)
    if args.write:
        meta = json.loads((out / "study.json").read_text())
        root = args.write.resolve().parent
        kept = publish(out, root / "benchmarks" / f"study-{settings.variant}")
        write_section(args.write, f"study-{settings.variant}", section(meta, text, kept.relative_to(root)))
    return 0


def publish(out: Path, folder: Path) -> Path:
    """Copy the light results (plots, summaries, per-round JSONL) next to the report, to be committed."""
    if folder.exists():
        shutil.rmtree(folder)
    for pattern in ("*.png", "study.json", "summary.jsonl", "runs/*/*/rounds.jsonl", "runs/*/*/metrics.jsonl"):
        for path in out.glob(pattern):
            target = folder / path.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return folder


def section(meta: Mapping[str, Any], text: str, out: Path) -> str:
    st, facts = meta["settings"], meta["base_facts"]
    return (
        f"## Benchmark study ({st['variant']})\n\n"
        f"`{meta['command']}` on {meta['host']} ({meta['threads']} torch threads), {meta['date'][:10]}; "
        f"{meta.get('study_wall_s', 0) / 60:.1f} minutes in all. Raw results (JSONL per run): `{out}/`.\n\n"
        f"Base: `scripts/pretrain_base.py`'s {facts['family']} family, {facts['parameters']:,} parameters, pretrained on "
        f"{facts['tokens']:,} tokens of WikiText-2 and E2E (WikiText-2 validation perplexity {facts['valid_ppl']:.0f}). "
        f"Fleet: {', '.join(meta['fleet'])} (virtual emulation). Each method: {st['rounds']} rounds x "
        f"{st['local_steps']} local steps x {len(meta['fleet'])} devices x {st['batch_size']} sequences of at most "
        f"{st['max_length']} tokens; AdamW lr {st['lr']}, LoRA r {st['r']} (splitft r_cut {st['r_cut']}); fixed cut "
        f"{st['fixed_cut']}. Server: this host x {st['server_speedup']:g} "
        f"({meta['server_tflops']['blocks']:.2f} TFLOP/s on blocks). Per-round eval: first {st['eval_samples']} GSM8K "
        f"test problems; final: {st['final_eval_samples']} problems, greedy answers on {st['gen_samples']}.\n\n"
        "Time is read on two clocks. *Simulated* (sim.): every round replayed event by event "
        "(`scripts/virtual_clock.py`) on the devices' profiles (compute: FLOPs over sustained throughput; link: "
        "the bytes the run really sent over the profiled bandwidth, plus RTT) against the server above; the "
        "coordinator's controller plans with the same server speed. *Wall*: this host, where the coordinator, the "
        "broker and five agent processes share the cores and the agents compute at host speed (they report their "
        "profiles' times without waiting for them), so it shows the system's own overhead, not the fleet's; "
        "centralised and fedavg run in one process, without broker or messages. The target is centralised LoRA's "
        f"last per-round perplexity x {1 + st['target_margin']:g}; the time to reach it is interpolated "
        "log-linearly between rounds. Device memory: an estimate for the deepest device part (fp32 weights, LoRA "
        "with AdamW, saved activations), and in parentheses the largest agent process measured (RSS, with Python, "
        "torch and the tokenizer). GSM8K correct: greedy answers whose number after `####` is the reference's. "
        "Achieved/ideal: the step time of the round's cuts over the least step time of any fractional cuts, both "
        "in the controller's model at the round's mean batch shape (rounds 2 on).\n\n"
        f"![perplexity against time]({out}/study_ppl.png)\n![bytes]({out}/study_bytes.png)\n"
        f"![cuts]({out}/study_cuts.png)\n\n{text}\n"
    )


if __name__ == "__main__":
    sys.exit(main())
