"""The U-shaped split end to end over a real Mosquitto: no token leaves a device, and the federated
U split with a different (cut, tail) per device equals centralised SGD on the union objective."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import msgpack
import pytest
import torch
import zstandard
from test_runtime import assert_same_adapters, equivalence_job, read_metrics, run_job, shards

from splitft.agent.runtime import batch_seed
from splitft.agent.step import forward
from splitft.shared.errors import ConfigError, WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import Batches, tokenize
from splitft.shared.job.records import load_records
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.lora import block_ranks, lora_state
from splitft.shared.model.loss import IGNORE_INDEX, causal_lm_loss
from splitft.shared.model.split import SegmentSpec, build_segment
from splitft.shared.model.tokenizer import load_tokenizer
from splitft.shared.wire.control import parse_assign
from splitft.shared.wire.messages import act_body, grad_body, parse_act, parse_grad, parse_tail_grad, tail_grad_body

from conftest import Broker

CUTS = {"a1": 1, "a2": 2, "a3": 3}
TAILS = {"a1": 0, "a2": 1, "a3": 2}


def u_job(name: str, **changes: Any) -> JobConfig:
    """The runtime tests' equivalence job (plain SGD, one step per round, one rank, fp32 on the wire) in the U
    split, with a different (cut, tail) per agent."""
    return replace(equivalence_job(name), split="u", tails=TAILS, k_min=0, **changes)


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
    assert_u_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)
    last = read_metrics(tmp_path / "out")[-1]
    assert last["cuts"] == CUTS and last["tails"] == TAILS


def assert_u_equals_centralised(federated: dict[str, torch.Tensor], job: JobConfig, data: dict[str, Path]) -> None:
    """``federated`` equals centralised SGD on the U split's union objective, round after round."""
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
    assert_same_adapters(federated, lora_state(whole.peft_model))


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


def test_u_split_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="split must be one of"):
        JobConfig(split="three-part")
    with pytest.raises(ConfigError, match="tail = 0 is outside k_min"):
        JobConfig(split="u", tail=0, k_min=1)
    with pytest.raises(ConfigError, match="leaves the server no block"):
        JobConfig(split="u", cut=10, tail=2).check_cuts(12)
    with pytest.raises(ConfigError, match=r"tails\.a1 must be an integer"):
        JobConfig.from_dict({"split": "u", "tails": {"a1": -1}})
    JobConfig(split="u", cut=9, tail=2).check_cuts(12)
    assert JobConfig(split="u", tails={"a1": 3}).tail_of("a1") == 3
    assert JobConfig(tails={"a1": 3}).tail_of("a1") == 0  # the two-part split has no tail


def test_u_split_messages_are_checked() -> None:
    hidden, lengths = torch.randn(2, 5, 8), torch.tensor([5, 3])
    with_labels = act_body(hidden, torch.zeros(2, 5, dtype=torch.long), lengths, "fp32", {})
    with pytest.raises(WireError, match="must stay on the device") as info:
        parse_act(with_labels, 8, 4, 16, 100, with_labels=False)
    assert info.value.reason == "bad_schema"
    act = parse_act(act_body(hidden, None, lengths, "fp32", {}), 8, 4, 16, 100, with_labels=False)
    assert act.labels is None and act.lengths.tolist() == [5, 3]
    with pytest.raises(WireError, match="lacks field 'labels'"):
        parse_act(act_body(hidden, None, lengths, "fp32", {}), 8, 4, 16, 100)  # a two-part job needs them
    grad, loss = parse_tail_grad(tail_grad_body(hidden, "fp32", None), (2, 5, 8))
    assert loss is None and torch.equal(grad, hidden)
    with pytest.raises(WireError) as info:
        parse_tail_grad(tail_grad_body(hidden, "fp32", 1.0), (2, 5, 9))
    assert info.value.reason == "bad_shape"
    assert parse_grad(grad_body(hidden, "fp32"), (2, 5, 8))[1:] == (None, None)


def assignment(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny-gpt2", "fingerprint": "f1", "cut": 2, "split": "u", "tail": 1, "ranks": [8, 8, 8], "lora": {"r": 8, "r_cut": 8},
        "adapter": {}, "local_steps": 1, "batch_size": 2, "max_length": 64, "optimizer": {"name": "sgd", "lr": 0.1},
        "wire_dtype": "fp16", "adapter_wire_dtype": "fp32", "step_timeout_s": 10.0, "seed": 0,
        "defense": {"clip": 2.0, "noise": 0.5},
    }  # fmt: skip
    return {**body, **changes}


def test_u_assignment_is_checked() -> None:
    a = parse_assign(1, assignment(), "f1", 12)
    assert a.u_split and a.tail == 1 and a.ranks == {0: 8, 1: 8, 11: 8}
    assert a.defense == DefenseSettings(noise=0.5, clip=2.0)
    for changes, match in [
        ({"tail": 10}, "does not fit"),
        ({"split": "two-part"}, "does not fit"),  # a two-part assignment has no tail
        ({"split": "x"}, "unknown split"),
        ({"ranks": [8, 8]}, "one positive rank per client block"),
        ({"report_loss": 1}, "report_loss must be a boolean"),
        ({"defense": {"noise": -1.0}}, "defense.noise"),
        ({"defense": {"unknown": 1}}, "assignment settings"),
    ]:
        with pytest.raises(WireError, match=match):
            parse_assign(1, assignment(**changes), "f1", 12)


def test_agent_sends_defended_activations() -> None:
    """The agent clips each token and adds noise before the activations leave; its backward runs through the clip."""
    segment = build_segment("tiny-gpt2", SegmentSpec.u_device(2, 1, 12))
    ids = torch.randint(0, 1000, (2, 6))
    lengths = torch.tensor([6, 4])
    defense = DefenseSettings(clip=0.2, noise=0.0)
    sent, extra, body, _ = forward(segment, ids, None, lengths, "fp32", {}, None, 1.0, defense, torch.Generator())
    assert extra is None and "labels" not in body
    assert float(sent.detach().norm(dim=-1).max()) <= 0.2 + 1e-6
    plain, _, _, _ = forward(segment, ids, None, lengths, "fp32", {}, None, 1.0, DefenseSettings(), torch.Generator())
    assert float(plain.detach().norm(dim=-1).min()) > 0.3  # the clip did something
    noisy, _, _, _ = forward(
        segment, ids, None, lengths, "fp32", {}, None, 1.0, DefenseSettings(clip=0.2, noise=1.0), torch.Generator()
    )
    assert not torch.allclose(noisy, sent)
    noisy.sum().backward()
    assert all(p.grad is not None for n, p in segment.lora_parameters().items() if ".h.0." in n)
