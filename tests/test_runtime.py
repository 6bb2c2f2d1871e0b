"""The federated split runtime end to end, over a real Mosquitto broker."""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import torch
import zstandard
from peft import PeftModel

from splitft.agent.runtime import Agent, AgentSettings, batch_seed
from splitft.coordinator.runtime import Coordinator
from splitft.shared.job.config import JobConfig, OptimizerSettings
from splitft.shared.job.data import Batches, tokenize, write_shards
from splitft.shared.job.records import load_records
from splitft.shared.model.lora import LoraSettings, block_ranks, lora_state
from splitft.shared.model.loss import causal_lm_loss, padding_mask
from splitft.shared.model.memory import SHARED_PROCESS_RUNTIME_MB
from splitft.shared.model.split import SegmentSpec, build_segment, load_base_model
from splitft.shared.model.tokenizer import GSM8K, load_tokenizer
from splitft.shared.wire.broker import BrokerSettings
from splitft.shared.wire.codec import encode_tensor
from splitft.shared.wire.envelope import Envelope, encode_envelope
from splitft.shared.wire.topics import Kind, Topics

from conftest import Broker

CUTS = {"a1": 1, "a2": 2, "a3": 3}


def shards(tmp_path: Path, n: int = 3, samples: int = 48) -> dict[str, Path]:
    pairs = load_records(GSM8K / "train.jsonl", limit=samples)
    paths = write_shards(pairs, n, tmp_path / "shards", seed=0)
    return {f"a{i + 1}": p for i, p in enumerate(paths)}


async def run_job(
    broker: Broker,
    out: Path,
    job: JobConfig,
    data: dict[str, Path],
    emulate: dict[str, Path] | None = None,
    resume: bool = False,
    dtype: str | None = None,
    fleet_key: bytes | None = None,
    **options: Any,
) -> Coordinator:
    """Run ``job`` to the end: a coordinator (given ``options``) and one in-process agent per data shard
    (emulating a profile; its base weights in ``dtype``, by default the profile's)."""
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, out, resume=resume, **options)
    agents = [
        Agent(
            AgentSettings(
                name,
                job.job,
                job.model,
                path,
                emulate=str((emulate or {})[name]) if emulate else None,
                runtime_mb=SHARED_PROCESS_RUNTIME_MB,  # the agents share this process (and pytest's memory)
                dtype=dtype,
                fleet_key=fleet_key,
            ),
            settings,
        )
        for name, path in data.items()
    ]
    tasks = [asyncio.create_task(a.run(), name=a.name) for a in agents]
    try:
        await asyncio.wait_for(coordinator.run(), timeout=600)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert all(a.rounds_done == job.rounds for a in agents) or resume
    return coordinator


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_three_agents_different_cuts_loss_falls(broker: Broker, tmp_path: Path) -> None:
    job = JobConfig(
        job="e2e",
        model="tiny-gpt2",
        rounds=3,
        local_steps=3,
        batch_size=4,
        max_length=192,
        min_agents=3,
        cuts=CUTS,
        optimizer=OptimizerSettings(name="adamw", lr=2e-3),
        eval_samples=16,
        step_timeout_s=60,
        upload_timeout_s=60,
        join_window_s=0.2,
    )
    out = tmp_path / "out"
    coordinator = await run_job(broker, out, job, shards(tmp_path))
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]
    losses = [m["eval_loss"] for m in metrics]
    # Random frozen base weights bound how far LoRA alone can go; a steady fall is what is asserted.
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.15, losses
    last = metrics[-1]
    assert last["cuts"] == CUTS
    assert all(a["dropped"] is None and a["bytes_up"] > 0 for a in last["agents"].values())
    assert (out / "checkpoints" / "round-00003" / "state.json").is_file()

    # The exported adapter is a standard PEFT folder that reproduces the final eval loss.
    model = PeftModel.from_pretrained(load_base_model("tiny-gpt2"), str(out / "adapter"))
    model.eval()
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for input_ids, labels, lengths in coordinator.eval_batches:
            mask = padding_mask(lengths, input_ids.shape[1])
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            loss_sum += float(causal_lm_loss(logits, labels, num_targets=1))
            tokens += int((labels[:, 1:] != -100).sum())
    assert loss_sum / tokens == pytest.approx(last["eval_loss"], abs=1e-5)


async def test_federated_split_equals_centralised(broker: Broker, tmp_path: Path) -> None:
    """The coordinator's adapters equal centralised SGD on the union of the agents' batches, step after step."""
    job = equivalence_job("equiv")
    data = shards(tmp_path)
    coordinator = await run_job(broker, tmp_path / "out", job, data)
    assert coordinator.server is not None
    assert_equals_centralised(lora_state(coordinator.server.segment.peft_model), job, data)


async def test_custom_lora_targets_train_end_to_end(broker: Broker, tmp_path: Path) -> None:
    """A job that puts LoRA on the MLP only: the agents build the job's targets (not the family's default),
    every round completes, the result equals centralised SGD with the same targets, and the exported
    adapter names them."""
    job = replace(equivalence_job("targets"), lora=LoraSettings(r=4, r_cut=4, targets=("c_fc",)))
    data = shards(tmp_path)
    out = tmp_path / "out"
    coordinator = await run_job(broker, out, job, data)
    assert coordinator.server is not None
    federated = lora_state(coordinator.server.segment.peft_model)
    assert federated and all(".mlp.c_fc." in name for name in federated)
    assert_equals_centralised(federated, job, data)
    assert [m["round"] for m in read_metrics(out)] == [0, 1, 2, 3]
    exported = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(exported["target_modules"]) == {"c_fc"}


async def test_runs_are_reproducible_and_a_resume_is_bit_for_bit(broker: Broker, tmp_path: Path) -> None:
    """Two runs of one job give the same adapters bit for bit, and so does a run resumed from a checkpoint:
    the server sums the devices' gradients in the order of their names, not of their arrival, and each
    device's batches are a function of (seed, device, round, step). AdamW, three devices at three cuts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit for bit on CPU: the same reduction order inside each kernel
    try:
        job = replace(small_job("repro", rounds=3), optimizer=OptimizerSettings(name="adamw", lr=3e-3))
        data = shards(tmp_path)
        runs = []
        for name in ("first", "second"):
            coordinator = await run_job(broker, tmp_path / name, job, data)
            assert coordinator.server is not None
            runs.append(lora_state(coordinator.server.segment.peft_model))
        await run_job(broker, tmp_path / "resumed", replace(job, rounds=2), data)  # stopped after round 2 ...
        coordinator = await run_job(broker, tmp_path / "resumed", job, data, resume=True)  # ... then resumed
        assert coordinator.server is not None
        runs.append(lora_state(coordinator.server.segment.peft_model))
    finally:
        torch.set_num_threads(threads)
    first, second, resumed = runs
    assert all(t.abs().max() > 0 for n, t in first.items() if "lora_B" in n)  # trained, on every block
    for other, what in ((second, "a second run"), (resumed, "the resumed run")):
        differ = [n for n in first if not torch.equal(first[n], other[n])]
        assert not differ, f"{what}: {len(differ)} of {len(first)} tensors differ, e.g. {differ[:3]}"
    metrics = [read_metrics(tmp_path / name)[-1] for name in ("first", "resumed")]
    assert metrics[0]["eval_loss"] == metrics[1]["eval_loss"] and metrics[1]["round"] == 3


def equivalence_job(name: str) -> JobConfig:
    """Plain SGD, one step per round, one rank everywhere, cuts 1/2/3, fp32 on the wire."""
    return JobConfig(
        job=name,
        model="tiny-gpt2",
        rounds=3,
        local_steps=1,
        batch_size=2,
        max_length=64,
        min_agents=3,
        cuts=CUTS,
        lora=LoraSettings(r=4, r_cut=4),
        optimizer=OptimizerSettings(name="sgd", lr=0.5),
        wire_dtype="fp32",
        eval_samples=4,
        step_timeout_s=60,
        upload_timeout_s=60,
        join_window_s=0.2,
    )


def assert_equals_centralised(federated: dict[str, torch.Tensor], job: JobConfig, data: dict[str, Path]) -> None:
    """``federated`` equals centralised SGD on the union of the agents' batches, round after round."""
    lora = job.lora
    # Centralised: the whole model, the same initial adapters, SGD on the union batch of each step.
    whole = build_segment("tiny-gpt2", SegmentSpec.whole(12), lora=lora, ranks=block_ranks(12, [], lora), lora_seed=0)
    optimizer = torch.optim.SGD(whole.lora_parameters().values(), lr=job.optimizer.lr)
    tokenizer = load_tokenizer("tiny-gpt2")
    pad = int(tokenizer.pad_token_id)
    streams = {
        name: Batches(
            tokenize(load_records(path), tokenizer, job.max_length), job.batch_size, pad, seed=batch_seed(0, name)
        )
        for name, path in data.items()
    }
    for _ in range(job.rounds):
        parts = [streams[name].next() for name in sorted(data)]
        width = max(p[0].shape[1] for p in parts)
        ids = torch.cat([torch.nn.functional.pad(p[0], (0, width - p[0].shape[1]), value=pad) for p in parts])
        labels = torch.cat([torch.nn.functional.pad(p[1], (0, width - p[1].shape[1]), value=-100) for p in parts])
        lengths = torch.cat([p[2] for p in parts])
        mask = (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()
        loss = causal_lm_loss(whole(ids, mask), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    central = lora_state(whole.peft_model)

    assert job.local_steps == 1  # aggregation after every step: the condition of the equivalence
    assert_same_adapters(federated, central)


def assert_same_adapters(federated: dict[str, torch.Tensor], central: dict[str, torch.Tensor]) -> None:
    """The same LoRA weights, each equal to 1e-5, and training moved every B away from its zero start (on the
    devices' blocks and the server's alike), so that the comparison proves something."""
    assert set(central) == set(federated)
    assert all(t.abs().max() > 0 for n, t in central.items() if "lora_B" in n)
    wrong = [
        name
        for name, expected in central.items()
        if not torch.allclose(federated[name], expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    ]
    assert not wrong, f"{len(wrong)} of {len(central)} LoRA weights differ, e.g. {wrong[:4]}"


def small_job(name: str, rounds: int) -> JobConfig:
    return JobConfig(
        job=name,
        model="tiny-gpt2",
        rounds=rounds,
        local_steps=2,
        batch_size=2,
        max_length=96,
        min_agents=3,
        cuts=CUTS,
        eval_samples=4,
        step_timeout_s=60,
        upload_timeout_s=60,
        join_window_s=0.2,
    )


async def test_garbage_on_activation_and_adapter_topics_is_rejected(broker: Broker, tmp_path: Path) -> None:
    """A raw MQTT client floods a1's act and adapter topics with garbage while the job runs."""
    job = small_job("garbage", rounds=2)
    topics = Topics(job.job)
    bomb = zstandard.ZstdCompressor().compress(bytes(300 << 20))  # declares 300 MiB
    nan = torch.full((2, 8, 128), float("nan"))
    nan_act = {"act": encode_tensor(nan, "fp32"), "labels": {}, "lengths": {}, "timings": {}}
    forged = [
        Envelope(type=Kind.ACT, job=job.job, sender="a2", sid="x", seq=1, body={}),  # a2 speaking on a1's topic
        Envelope(type=Kind.ACT, job=job.job, sender="a1", sid="x", seq=2, round=1, step=0, body={"act": 1}),
        Envelope(type=Kind.ACT, job=job.job, sender="a1", sid="x", seq=3, round=1, step=1, body=nan_act),
        Envelope(type=Kind.ADAPTER, job=job.job, sender="a1", sid="x", seq=4, round=1, body={"x": 1}),
    ]
    payloads = [b"", b"\x28\xb5\x2f\xfd garbage", bomb, *map(encode_envelope, forged)]

    done = asyncio.Event()

    async def flood() -> int:
        """At least 50 volleys, and on until the job ends (on a busy host the job reaches its rounds late)."""
        sent = volleys = 0
        async with aiomqtt.Client(broker.host, broker.port) as raw:
            while volleys < 50 or not done.is_set():
                for kind in ("act", "adapter"):
                    for payload in payloads:
                        await raw.publish(topics.agent("a1", kind), payload)
                        sent += 1
                volleys += 1
                await asyncio.sleep(0.05)
        return sent

    flooder = asyncio.create_task(flood())
    out = tmp_path / "out"
    try:
        await run_job(broker, out, job, shards(tmp_path))
    finally:
        done.set()
    sent = await flooder
    metrics = read_metrics(out)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    assert all(a["dropped"] is None for m in metrics[1:] for a in m["agents"].values())
    rejected = metrics[-1]["rejected"]
    assert rejected["bad_compression"] > 0 and rejected["wrong_sender"] > 0 and rejected["too_large"] > 0
    # Well-formed, but of no assignment (no corr): counted too, not dropped unseen.
    assert rejected["unexpected"] >= 2
    assert sum(rejected.values()) >= 50  # most of the flood arrived while the job ran, all of it refused
    assert sent >= 50 * 2 * len(payloads)


@pytest.mark.parametrize("split", ["two-part", "u"])
async def test_resume_continues_from_the_last_checkpoint(broker: Broker, tmp_path: Path, split: str) -> None:
    out = tmp_path / "out"
    data = shards(tmp_path)
    first = await run_job(broker, out, replace(small_job("resume", rounds=2), split=split), data)
    assert first.server is not None
    saved = lora_state(first.server.segment.peft_model)
    settings = BrokerSettings(url=broker.url)
    resumed = Coordinator(replace(small_job("resume", rounds=3), split=split), settings, out, resume=True)
    agents = [Agent(AgentSettings(n, "resume", "tiny-gpt2", p), settings) for n, p in data.items()]
    tasks = [asyncio.create_task(a.run()) for a in agents]

    loaded: dict[str, torch.Tensor] = {}
    original_round = resumed._round

    async def spy(round_: int, attempt: int) -> dict | None:  # type: ignore[type-arg]
        if not loaded:
            assert resumed.server is not None
            loaded.update(lora_state(resumed.server.segment.peft_model))
        return await original_round(round_, attempt)

    resumed._round = spy  # type: ignore[method-assign]
    await asyncio.wait_for(resumed.run(), timeout=300)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)  # bit for bit
    assert [m["round"] for m in read_metrics(out)] == [0, 1, 2, 3]
    assert all(a.rounds_done == 1 for a in agents)
