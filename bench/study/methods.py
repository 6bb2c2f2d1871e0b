"""How each method of the study trains: the data, the in-process baselines (centralised, fedavg), the real
split runs through a broker and their replay on the virtual clock, the final evaluation, the memory estimate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import torch

from splitft.agent.runtime import batch_seed
from splitft.bench.clock import (
    CostModel,
    Device,
    LocalParticipant,
    RoundTiming,
    SplitParticipant,
    SplitStep,
    local_round,
    split_round,
)
from splitft.bench.study.settings import FLEET, IGNORE_INDEX, StudySettings, read_jsonl, say
from splitft.bench.study.tasks import Task
from splitft.coordinator.controller import DeviceEstimate, ServerEstimate, ideal_bound, makespan_s
from splitft.coordinator.local import LocalRun, run_local
from splitft.coordinator.progress import Event
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import Batches, collate, tokenize
from splitft.shared.job.partition import length_dirichlet_partition, token_lengths, write_partition
from splitft.shared.job.records import Record, load_records, record_text
from splitft.shared.model.loading import block_flops, block_params, load_config, num_layers
from splitft.shared.model.lora import LoraSettings, load_lora_state, lora_state
from splitft.shared.model.loss import causal_lm_loss, evaluate_lm, padding_mask
from splitft.shared.model.split import Segment, SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.shared.profiles import load_profile
from splitft.shared.wire.codec import encode_state

# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Fleet:
    """The devices of one alpha: names, profiles and data shards."""

    names: tuple[str, ...]
    devices: tuple[Device, ...]
    shards: tuple[tuple[Record, ...], ...]  # the records of each device
    task: Task


def make_fleet(settings: StudySettings, base: Path, alpha: float, folder: Path, task: Task) -> Fleet:
    """The same partition run_local makes for these settings (checked against its files after each run)."""
    names = tuple(f"agent-{i + 1}" for i in range(settings.agents))
    records = load_records(task.train, limit=settings.agents * settings.samples_per_agent)
    lengths = token_lengths(records, load_tokenizer(str(base)))
    partition = length_dirichlet_partition(lengths, settings.agents, alpha, seed=settings.seed)
    write_partition(records, partition, folder, prefix="shard")
    shards = tuple(tuple(records[i] for i in part) for part in partition.parts)
    devices = tuple(Device.from_profile(load_profile(name)) for name in FLEET)
    return Fleet(names, devices, shards, task)


def agent_streams(settings: StudySettings, base: Path, fleet: Fleet) -> dict[str, Batches]:
    """The batches each device draws, in order (agent/runtime.py tokenizes and seeds them the same way)."""
    tokenizer = load_tokenizer(str(base))
    pad = int(tokenizer.pad_token_id)
    streams = {}
    for name, shard in zip(fleet.names, fleet.shards, strict=True):
        examples = tokenize(list(shard), tokenizer, settings.max_length)
        streams[name] = Batches(examples, settings.batch_size, pad, seed=batch_seed(settings.seed, name))
    return streams


def eval_batches(
    tokenizer: Any, max_length: int, samples: int, source: Path, batch: int = 8
) -> list[tuple[Any, Any, Any]]:
    """The first ``samples`` records of ``source`` (the task's evaluation records), as the coordinator evaluates
    them."""
    examples = tokenize(load_records(source, limit=samples), tokenizer, max_length)
    pad = int(tokenizer.pad_token_id)
    return [collate(examples[i : i + batch], pad) for i in range(0, len(examples), batch)]


# --------------------------------------------------------------------------- in-process methods


def evaluate(segment: Segment, batches: Sequence[tuple[Any, Any, Any]]) -> dict[str, float]:
    """Perplexity and shifted next-token accuracy on the response tokens, as the coordinator evaluates."""
    segment.eval()
    result = evaluate_lm(segment.target_loss, batches)
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
    data_bytes = sum(len(record_text(r).encode()) for shard in fleet.shards for r in shard)
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
                batch, length = input_ids.shape
                compute.append(2 * costs.device_pass_s(device, costs.layers, batch, length, head=True))
            uploads.append((tokens, lora_state(segment.peft_model)))
            participants.append(LocalParticipant(name, device.down_s(size), compute, device.up_s(size)))
        total = sum(t for t, _ in uploads)
        global_state = {n: sum(t * s[n] for t, s in uploads) / total for n in global_state}  # type: ignore[misc]
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


def split_job(settings: StudySettings, base: Path, method: str, alpha: float, wire: str, task: Task) -> JobConfig:
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
        eval_data=str(task.eval),
        emulate_server=settings.server,
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
    job = split_job(settings, base, method, alpha, wire, fleet.task)
    plan = LocalRun(
        job,
        out,
        agents=settings.agents,
        cuts=(settings.fixed_cut,),
        samples_per_agent=settings.samples_per_agent,
        alpha=alpha,
        data=fleet.task.train,
        broker_url=broker[0] if broker else None,
        mqtt_protocol=broker[1] if broker else "5",
        emulate=FLEET,
        emulate_virtual=True,
    )

    def progress(event: Event, data: dict[str, Any]) -> None:
        if event == Event.ROUND_END:
            cuts = "/".join(str(c) for c in data["cuts"].values())
            say(
                f"  {method} ({wire}) round {data['round']}/{settings.rounds}: eval ppl {data['eval_ppl']:.1f}, cuts {cuts}"
            )
        elif event == Event.ROUND_RETRY:
            say(f"  {method}: round {data['round']} runs again (attempt {data['attempt']})")

    summary = asyncio.run(run_local(plan, progress))
    for i, name in enumerate(fleet.names):  # the harness's partition must be the run's
        theirs = load_records(out / "data" / f"{name}.jsonl")
        if tuple(theirs) != fleet.shards[i]:
            raise RuntimeError(f"{out}: {name}'s shard differs from the study's partition")
    metrics = read_jsonl(out / "metrics.jsonl")
    return replay_split(settings, base, fleet, costs, metrics), summary


@dataclass(frozen=True)
class AgentRound:
    """What one device did in one round of a split run: its cut, its steps' shapes and the bytes it sent."""

    name: str
    device: Device
    cut: int
    tail: int | None
    shapes: tuple[tuple[int, int, int], ...]  # per step: sequences, padded length, target tokens
    act: float  # bytes per step, up (activations) and down (gradients)
    grad: float
    adapter_up: float  # the round's adapter upload and the assignment's adapters, bytes
    adapter_down: float


def round_agents(
    settings: StudySettings, streams: Mapping[str, Batches], fleet: Fleet, record: Mapping[str, Any]
) -> list[AgentRound]:
    """A split run's round as its devices ran it (the batches drawn from ``streams``, the agents' own)."""
    devices = dict(zip(fleet.names, fleet.devices, strict=True))
    agents = []
    for name, agent in record["agents"].items():
        timings = agent.get("timings") or {}
        act, grad = float(timings.get("bytes_up", 0.0)), float(timings.get("bytes_down", 0.0))
        shapes = []
        for _ in range(settings.local_steps):
            input_ids, labels, _ = streams[name].next()
            targets = int((labels[:, 1:] != IGNORE_INDEX).sum())  # the head runs on the targets only
            shapes.append((int(input_ids.shape[0]), int(input_ids.shape[1]), targets))
        agents.append(
            AgentRound(
                name, devices[name], int(agent["cut"]), agent.get("tail"), tuple(shapes), act, grad,
                adapter_up=max(agent["bytes_up"] - settings.local_steps * act, 0.0),
                adapter_down=max(agent["bytes_down"] - settings.local_steps * grad, 0.0),
            )
        )  # fmt: skip
    return agents


def _held(agent: AgentRound, cut: int) -> float:
    """The blocks a device holds at ``cut`` over those it held in the run (its adapters scale with them)."""
    return (cut + (agent.tail or 0)) / (agent.cut + (agent.tail or 0))


def round_timing(costs: CostModel, agents: Sequence[AgentRound], cuts: Mapping[str, int] | None = None) -> RoundTiming:
    """The round on the simulated clock, at the devices' own cuts or at ``cuts`` (the adapter bytes then scale
    with the blocks a device holds; the activations' size does not depend on the cut)."""
    participants = []
    for a in agents:
        cut = a.cut if cuts is None else cuts[a.name]
        held = _held(a, cut)
        steps_run = [split_step(costs, a.device, cut, a.tail, b, t, n, a.act, a.grad) for b, t, n in a.shapes]
        down, up = a.device.down_s(a.adapter_down * held), a.device.up_s(a.adapter_up * held)
        participants.append(SplitParticipant(a.name, down, steps_run, up))
    return split_round(participants)


def split_rounds(
    settings: StudySettings, base: Path, fleet: Fleet, metrics: Sequence[Mapping[str, Any]]
) -> list[list[AgentRound]]:
    """Every round of a split run as its devices ran it (the batch shapes drawn once from the agents' streams)."""
    streams = agent_streams(settings, base, fleet)
    return [round_agents(settings, streams, fleet, record) for record in metrics[1:]]


def replay_split(
    settings: StudySettings,
    base: Path,
    fleet: Fleet,
    costs: CostModel,
    metrics: Sequence[Mapping[str, Any]],
    cuts_of: Callable[[Sequence[AgentRound]], Mapping[str, int]] | None = None,
    rounds: Sequence[Sequence[AgentRound]] | None = None,
) -> list[dict[str, Any]]:
    """Per-round rows of a split run, with each round replayed on the simulated clock.

    The batch shapes are the agents' own (the same seeded streams); the bytes are the ones the run
    sent (per step: the agent's mean activation and gradient messages; the rest of a round's traffic
    is the assignment and the adapter upload). ``cuts_of`` replays the rounds at other cuts (a round's
    devices -> their cuts; the learning, evaluation and bytes stay the run's). ``rounds``: the run's
    :func:`split_rounds`, when the caller replays it more than once.
    """
    rounds = split_rounds(settings, base, fleet, metrics) if rounds is None else rounds
    rows = [_row(0, 0.0, 0.0, metrics[0], 0, 0, {})]
    virtual, wall, up, down = 0.0, 0.0, 0, 0
    for record, agents in zip(metrics[1:], rounds, strict=True):
        wall += record["round_time_s"]  # from the round's assignments to its evaluation (not start-up)
        cuts = None if cuts_of is None else dict(cuts_of(agents))
        timing = round_timing(costs, agents, cuts)
        virtual += timing.seconds
        if cuts is None:
            up, down = up + record["bytes_up"], down + record["bytes_down"]
        else:  # the activations as sent, the adapters of the blocks each device would have held
            up += round(sum(len(a.shapes) * a.act + a.adapter_up * _held(a, cuts[a.name]) for a in agents))
            down += round(sum(len(a.shapes) * a.grad + a.adapter_down * _held(a, cuts[a.name]) for a in agents))
        row = _row(record["round"], virtual, wall, record, up, down, record["cuts"] if cuts is None else cuts)
        if settings.split == "two-part" and cuts is None:
            row.update(_balance(costs, timing, agents, record))
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
    costs: CostModel, timing: RoundTiming, agents: Sequence[AgentRound], record: Mapping[str, Any]
) -> dict[str, Any]:
    """The round's cuts against the balanced lower bound, both in the controller's step model at the round's
    mean batch shape: the step time M of these cuts over the least M of any fractional cuts (>= 1)."""
    shapes = [shape for a in agents for shape in a.shapes]
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
            block_s=2 * flops / a.device.flops_per_s,
            up_bytes=a.act,
            down_bytes=a.grad,
            uplink_bps=a.device.uplink_bps,
            downlink_bps=a.device.downlink_bps,
            rtt_s=a.device.rtt_s,
        )
        for i, a in enumerate(agents)
    ]
    cuts = {f"{i}": float(a.cut) for i, a in enumerate(agents)}
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
