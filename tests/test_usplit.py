"""The U-shaped split end to end over a real Mosquitto: no token leaves a device, and the federated
U split with a different (cut, tail) per device equals centralised SGD on the union objective."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import torch
import zstandard
from test_runtime import read_metrics, run_job, shards

from splitft.agent.runtime import batch_seed
from splitft.shared.config import JobConfig, OptimizerSettings
from splitft.shared.data import Batches, load_records, tokenize
from splitft.shared.lora import LoraSettings, block_ranks, lora_state
from splitft.shared.split import IGNORE_INDEX, SegmentSpec, build_segment, causal_lm_loss
from splitft.shared.text import load_tokenizer

from conftest import Broker

CUTS = {"a1": 1, "a2": 2, "a3": 3}
TAILS = {"a1": 0, "a2": 1, "a3": 2}


def u_job(name: str, **changes: Any) -> JobConfig:
    """Plain SGD, one step per round, one rank everywhere, a different (cut, tail) per agent, fp32 on the wire."""
    settings: dict[str, Any] = dict(
        job=name,
        model="tiny-gpt2",
        split="u",
        rounds=3,
        local_steps=1,
        batch_size=2,
        max_length=64,
        min_agents=3,
        cuts=CUTS,
        tails=TAILS,
        lora=LoraSettings(r=4, r_cut=4),
        optimizer=OptimizerSettings(name="sgd", lr=0.5),
        wire_dtype="fp32",
        eval_samples=4,
        step_timeout_s=60,
        upload_timeout_s=60,
        join_window_s=0.2,
    )
    return JobConfig(**{**settings, **changes})


def batch_streams(job: JobConfig, data: dict[str, Path]) -> dict[str, Batches]:
    """Each agent's batches, as the agent draws them (the same seed, the same order)."""
    tokenizer = load_tokenizer(job.model)
    pad = int(tokenizer.pad_token_id)
    return {
        name: Batches(
            tokenize(load_records(path), tokenizer, job.max_length), job.batch_size, pad, seed=batch_seed(0, name)
        )
        for name, path in data.items()
    }


async def test_federated_u_split_equals_centralised(broker: Broker, tmp_path: Path) -> None:
    """Cuts 1/2/3 with tails 0/1/2: the coordinator's adapters equal centralised SGD, step after step, on the
    objective the U split optimises, sum_i N_i L_i / sum_i N_i (L_i a device's mean loss over its targets,
    N_i the real tokens of its rows: the target count never leaves the device)."""
    job = u_job("uequiv")
    data = shards(tmp_path)
    coordinator = await run_job(broker, tmp_path / "out", job, data)
    assert coordinator.server is not None
    federated = lora_state(coordinator.server.segment.peft_model)

    whole = build_segment("tiny-gpt2", SegmentSpec.whole(12), lora=job.lora, ranks=block_ranks(12, [], job.lora))
    optimizer = torch.optim.SGD(whole.lora_parameters().values(), lr=job.optimizer.lr)
    streams = batch_streams(job, data)
    for _ in range(job.rounds):
        parts = [streams[name].next() for name in sorted(data)]
        weights = [float(lengths.sum()) for _, _, lengths in parts]
        objective = torch.zeros(())
        for (ids, labels, lengths), weight in zip(parts, weights, strict=True):
            mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
            objective = objective + weight * causal_lm_loss(whole(ids, mask), labels)
        (objective / sum(weights)).backward()
        optimizer.step()
        optimizer.zero_grad()
    central = lora_state(whole.peft_model)

    assert set(central) == set(federated)
    assert all(t.abs().max() > 0 for n, t in central.items() if "lora_B" in n)
    wrong = [
        name
        for name, expected in central.items()
        if not torch.allclose(federated[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    ]
    assert not wrong, f"{len(wrong)} of {len(central)} LoRA weights differ, e.g. {wrong[:4]}"
    last = read_metrics(tmp_path / "out")[-1]
    assert last["cuts"] == CUTS and last["tails"] == TAILS


def tensors_in(value: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every encoded tensor (a ``{dtype, shape, data}`` map) anywhere in a decoded message, with its path."""
    if isinstance(value, dict):
        if {"dtype", "shape", "data"} <= set(value):
            yield path, value
            return
        for key, item in value.items():
            yield from tensors_in(item, f"{path}/{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from tensors_in(item, f"{path}/{i}")


async def test_no_token_or_label_on_the_wire(broker: Broker, tmp_path: Path) -> None:
    """A listener on ``splitft/#`` decodes every payload of a U job on its own: no integer tensor but the rows'
    padding lengths, no label-derived field (loss reporting off), and no run of the agents' token ids as bytes."""
    job = u_job("uwire", rounds=2, local_steps=2, report_loss=False, wire_dtype="fp16")
    data = shards(tmp_path)
    payloads: list[tuple[str, bytes]] = []
    listening = asyncio.Event()

    async def listen() -> None:
        async with aiomqtt.Client(broker.host, broker.port) as client:
            await client.subscribe("splitft/#")
            listening.set()
            async for message in client.messages:
                payloads.append((str(message.topic), bytes(message.payload)))  # type: ignore[arg-type]

    listener = asyncio.create_task(listen())
    await asyncio.wait_for(listening.wait(), 10)
    try:
        await run_job(broker, tmp_path / "out", job, data)
        await asyncio.sleep(0.5)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)

    kinds: dict[str, int] = {}
    integer_tensors = []
    label_fields = []
    raw = []
    for topic, payload in payloads:
        if not payload:
            continue  # a cleared retained message
        body = zstandard.ZstdDecompressor().decompress(payload, max_output_size=64 << 20)
        raw.append(body)
        envelope = msgpack.unpackb(body, raw=False)
        assert envelope["type"] != "chunk"  # small messages: every payload is whole
        kind = topic.rsplit("/", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + 1
        for path, tensor in tensors_in(envelope["body"]):
            if not tensor["dtype"].startswith(("fp", "bf")):
                integer_tensors.append((kind, path, tensor["dtype"]))
        if kind in ("act", "tail_grad", "grad", "tail_act", "adapter"):
            label_fields += [(kind, k) for k in envelope["body"] if k in ("labels", "tokens_target", "accuracy")]
            if kind != "adapter" and envelope["body"].get("loss") is not None:
                label_fields.append((kind, "loss"))
            if kind == "adapter" and envelope["body"]["loss"] is not None:
                label_fields.append((kind, "loss"))

    steps = job.rounds * job.local_steps * len(data)
    assert kinds.get("act") == kinds.get("tail_act") == kinds.get("tail_grad") == kinds.get("grad") == steps, kinds
    assert set(integer_tensors) == {("act", "/lengths", "int32")}, integer_tensors  # padding lengths, nothing more
    assert not label_fields, label_fields

    # Independently of the message structure: no 6 consecutive token ids of any agent's batches appear in any
    # decompressed payload, as int32 or int64 bytes.
    streams = batch_streams(job, data)
    found = []
    for name, stream in streams.items():
        for _ in range(job.rounds * job.local_steps):
            ids, labels, lengths = stream.next()
            for row in range(ids.shape[0]):
                targets = labels[row][labels[row] != IGNORE_INDEX]
                for tokens in (ids[row, : int(lengths[row])], targets):
                    for start in range(0, max(len(tokens) - 6, 1), 6):
                        window = tokens[start : start + 6]
                        if len(window) < 6:
                            continue
                        for dtype in (torch.int32, torch.int64):
                            needle = window.to(dtype).numpy().tobytes()
                            if any(needle in body for body in raw):
                                found.append((name, row, start, str(dtype)))
    assert not found, found[:5]


def test_u_split_plans_cut_and_tail_from_the_blocks() -> None:
    from splitft.coordinator.controller import split_blocks

    assert split_blocks(5, tail=1, c_min=1, k_min=0, k_max=10) == (4, 1)  # the tail keeps its depth
    assert split_blocks(1, tail=1, c_min=1, k_min=0, k_max=10) == (1, 0)  # c_min first
    assert split_blocks(6, tail=4, c_min=1, k_min=0, k_max=2) == (4, 2)  # k_max caps the tail
    assert split_blocks(3, tail=0, c_min=1, k_min=1, k_max=5) == (2, 1)  # k_min raises it
