"""Memory planned per device: the figures an agent measures, the refusal of a device that cannot hold
c_min, cuts kept within memory, and a bf16 server with fp16 devices through Mosquitto."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_runtime import read_metrics, run_job, shards

from splitft.agent.profile import measure_memory
from splitft.agent.runtime import Agent, AgentSettings
from splitft.coordinator.controller import Controller, ControllerSettings, ServerEstimate
from splitft.coordinator.estimates import FleetEstimates
from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import ModelError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.memory import ACTIVATION_OVERHEAD, SHARED_PROCESS_RUNTIME_MB, MemoryFigures, shortfall
from splitft.shared.model.precision import DTYPES
from splitft.shared.wire.broker import BrokerSettings

from conftest import Broker

BOARD = """
name = "{name}"
description = "a device class with little memory"
[compute]
peak_gflops = 50.0
efficiency = 1.0
dtype = "{dtype}"
[memory]
total_mb = {usable}
usable_mb = {usable}
[link]
uplink_mbps = 100.0
downlink_mbps = 100.0
rtt_ms = 2.0
"""


def figures(**changes: float) -> MemoryFigures:
    values = dict(usable_mb=1000.0, runtime_mb=400.0, embed_mb=50.0, block_mb=10.0, act_mb=10.0, head_mb=100.0)
    return MemoryFigures(**{**values, "io_mb": 5.0, "load_mb": 0.0, **changes})


def test_need_and_blocks_that_fit() -> None:
    f = figures()
    assert f.need_mb(0, head=False) == pytest.approx(400 + 55 * 1.1)
    assert f.need_mb(3, head=True) == pytest.approx(400 + (55 + 3 * (10 + 10 * ACTIVATION_OVERHEAD) + 100) * 1.1)
    fits = f.blocks_that_fit(head=False)
    assert f.need_mb(fits, head=False) <= f.usable_mb < f.need_mb(fits + 1, head=False)
    assert f.blocks_that_fit(head=True) < fits  # the U split's head takes room from the blocks
    assert figures(usable_mb=420.0).blocks_that_fit(head=False) == 0
    assert MemoryFigures.from_profile(f.to_profile()) == f
    assert MemoryFigures.from_profile({**f.to_profile(), "memory_act_mb": "lots"}) is None
    assert MemoryFigures.from_profile({"usable_mb": 3}) is None  # an agent that did not measure


def test_the_shortfall_names_the_model_what_it_needs_and_what_the_device_has() -> None:
    f = figures(usable_mb=450.0)
    assert shortfall(f, "tiny-gpt2", 1, False, "cut 1") is not None
    reason = shortfall(f, "SmolLM2.gguf", 1, False, "cut 1")
    assert reason is not None and "SmolLM2.gguf needs 490 MiB" in reason and "has 450 MiB usable" in reason
    assert shortfall(figures(), "m", 1, False, "cut 1") is None


def test_measured_figures_follow_the_step_shape_and_the_dtype() -> None:
    small = measure_memory("tiny-llama", 2, 64, usable=4000, runtime=400)
    large = measure_memory("tiny-llama", 4, 128, usable=4000, runtime=400)
    half = measure_memory("tiny-llama", 4, 128, usable=4000, runtime=400, dtype=torch.bfloat16)
    assert 3.0 < large.act_mb / small.act_mb < 5.0  # activations grow with the step's tokens (4x here)
    assert large.block_mb == small.block_mb and large.embed_mb == small.embed_mb  # weights do not
    assert half.embed_mb == pytest.approx(large.embed_mb / 2)  # bf16 weights are half the bytes
    assert half.block_mb < large.block_mb and half.act_mb < large.act_mb


def test_the_estimates_cap_a_device_at_what_its_memory_holds() -> None:
    """The fastest device would take the most blocks; its memory holds two, and the controller keeps to it."""
    server = ServerEstimate(block_s=0.05, head_s=0.01)
    estimates = FleetEstimates(0.5, server, block_mb=1.0)
    tight = figures(usable_mb=400 + (55 + 2.5 * (10 + 10 * ACTIVATION_OVERHEAD)) * 1.1)  # two blocks and a half
    assert tight.blocks_that_fit(head=False) == 2
    for name, block_s, memory in (("fast", 0.001, tight), ("slow", 0.05, figures(usable_mb=1e6))):
        estimates.observe_join(name, {"block_s": block_s, "block_tokens": 512, **memory.to_profile()}, 512)
    devices = [estimates.device("fast"), estimates.device("slow")]
    assert devices[0] is not None and devices[0].max_blocks == 2
    decision = Controller(ControllerSettings(policy="latency", num_layers=12)).decide(
        [d for d in devices if d is not None], estimates.server()
    )
    assert decision.cuts["fast"] == 2, decision


def _board(tmp_path: Path, name: str, usable: float, dtype: str = "fp32") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(BOARD.format(name=name, usable=int(usable), dtype=dtype))
    return path


def _job(**changes: object) -> JobConfig:
    values: dict[str, object] = dict(
        job="memory", model="tiny-gpt2", rounds=2, local_steps=2, batch_size=2, max_length=96, min_agents=2,
        eval_samples=4, step_timeout_s=120, upload_timeout_s=120, join_window_s=0.2,
    )  # fmt: skip
    return JobConfig(**{**values, **changes})  # type: ignore[arg-type]


async def test_a_device_that_cannot_hold_c_min_is_refused_at_join(broker: Broker, tmp_path: Path) -> None:
    job = _job(min_agents=1, rounds=1, local_steps=1, policy="fixed")
    need = measure_memory("tiny-gpt2", 2, 96, usable=0, runtime=SHARED_PROCESS_RUNTIME_MB).need_mb(1, head=False)
    data = shards(tmp_path, n=2)
    small = _board(tmp_path, "too-small", math.floor(need) - 5)
    settings = BrokerSettings(url=broker.url)
    coordinator = Coordinator(job, settings, tmp_path / "out")
    refused = Agent(
        AgentSettings("a1", job.job, job.model, data["a1"], emulate=str(small), runtime_mb=SHARED_PROCESS_RUNTIME_MB),
        settings,
    )
    tasks = [asyncio.create_task(coordinator.run())]
    try:
        with pytest.raises(ModelError) as caught:
            await asyncio.wait_for(refused.run(), timeout=120)
        message = str(caught.value)
        assert "tiny-gpt2 needs" in message and "at cut 1" in message, message
        assert f"has {math.floor(need) - 5:,} MiB usable" in message, message
        # A device with room joins the same job and trains it.
        good = Agent(
            AgentSettings("a2", job.job, job.model, data["a2"], runtime_mb=SHARED_PROCESS_RUNTIME_MB), settings
        )
        tasks.append(asyncio.create_task(good.run()))
        await asyncio.wait_for(tasks[0], timeout=300)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert set(read_metrics(tmp_path / "out")[-1]["cuts"]) == {"a2"}  # a1 never took part


async def test_cuts_stay_within_each_device_memory(broker: Broker, tmp_path: Path) -> None:
    """Round 1 asks for cut 6; one device holds 2 blocks: it gets 2, and the controller never goes deeper."""
    job = _job(cut=6, policy="latency", plan_first_round=False, rounds=3)
    f = measure_memory("tiny-gpt2", 2, 96, usable=0, runtime=SHARED_PROCESS_RUNTIME_MB)
    usable = f.need_mb(2, head=False) + 0.5 * f.per_block_mb * 1.1
    data = shards(tmp_path, n=2)
    boards = {"a1": _board(tmp_path, "two-blocks", usable), "a2": _board(tmp_path, "roomy", 64_000)}
    await run_job(broker, tmp_path / "out", job, data, emulate=boards)
    rounds = read_metrics(tmp_path / "out")[1:]
    assert rounds[0]["cuts"]["a1"] == 2 and rounds[0]["cuts"]["a2"] == 6, rounds[0]["cuts"]
    assert all(r["cuts"]["a1"] <= 2 for r in rounds), [r["cuts"] for r in rounds]
    peaks = [a["timings"]["peak_rss_mb"] for r in rounds for a in r["agents"].values() if a.get("timings")]
    assert peaks and all(p > 0 for p in peaks)  # the metrics carry each agent's peak memory


@pytest.mark.parametrize(
    ("split", "server", "device"), [("two-part", "bf16", "fp16"), ("u", "bf16", "fp16"), ("u", "fp16", "bf16")]
)
async def test_half_precision_servers_and_devices_train_and_export_fp32(
    broker: Broker, tmp_path: Path, split: str, server: str, device: str
) -> None:
    job = _job(base_dtype=server, split=split, rounds=3, local_steps=3, min_agents=2, cuts={"a1": 1, "a2": 2})
    coordinator = await run_job(broker, tmp_path / "out", job, shards(tmp_path, n=2), dtype=device)
    assert coordinator.server is not None
    frozen = {p.dtype for p in coordinator.server.segment.parameters() if not p.requires_grad}
    assert frozen == {DTYPES[server]}
    assert all(a.profile.get("base_dtype") == device for a in coordinator.agents.known.values())
    losses = [m["eval_loss"] for m in read_metrics(tmp_path / "out")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    adapter = tmp_path / "out" / "adapter" / "adapter_model.safetensors"
    with safe_open(adapter, framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}  # noqa: SIM118 (not a dict)
