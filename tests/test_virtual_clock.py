"""The study's simulated clock (splitft.bench.clock) and virtual emulation (agent/emulation.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitft.agent.emulation import Emulation
from splitft.bench.clock import (
    CostModel,
    Device,
    LocalParticipant,
    Server,
    SplitParticipant,
    SplitStep,
    head_flops,
    local_round,
    split_round,
)
from splitft.shared.errors import ConfigError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.loading import block_flops, load_config
from splitft.shared.profiles import load_profile


def step(fwd: float, up: float, server: float, down: float, bwd: float) -> SplitStep:
    return SplitStep(forward_s=fwd, up_s=up, server_s=server, down_s=down, backward_s=bwd)


def test_one_device_adds_up_its_path() -> None:
    p = SplitParticipant("a", adapter_down_s=0.5, steps=[step(1, 0.25, 2, 0.25, 1)] * 2, adapter_up_s=0.5)
    timing = split_round([p])
    assert timing.seconds == pytest.approx(0.5 + 2 * (1 + 0.25 + 2 + 0.25 + 1) + 0.5)
    assert timing.step_ends == pytest.approx([0.5 + 3.25, 0.5 + 4.5 + 3.25])
    assert timing.server_busy_s == pytest.approx(4.0)
    assert timing.mean_step_s == pytest.approx(4.5)


def test_the_server_serves_in_arrival_order_one_batch_at_a_time() -> None:
    # a arrives at 1, b at 1.5; the server takes 1 s each: a is served 1-2, b waits and is served 2-3.
    a = SplitParticipant("a", 0.0, [step(1, 0, 1, 0, 0)], 0.0)
    b = SplitParticipant("b", 0.0, [step(1.5, 0, 1, 0, 0)], 0.0)
    timing = split_round([b, a])
    assert timing.device_finish == pytest.approx({"a": 2.0, "b": 3.0})
    assert timing.step_ends == pytest.approx([3.0])


def test_a_fast_device_waits_for_the_whole_step_before_its_next_batch_is_served() -> None:
    # a is fast: its step-2 batch arrives at 2.0, but step 1 ends only when slow b's batch is served
    # (b arrives at 5, served 5-6); a's step-2 batch is then served 6-6.5, and its backward ends at 7.
    a = SplitParticipant("a", 0.0, [step(0.5, 0, 0.5, 0, 0.5)] * 2, 0.0)
    b = SplitParticipant("b", 0.0, [step(5, 0, 1, 0, 0)] * 2, 0.0)
    timing = split_round([a, b])
    assert timing.step_ends[0] == pytest.approx(6.0)
    assert timing.device_finish["a"] == pytest.approx(7.0)
    # b: served 5-6, then its second forward (5) arrives at 11, served 11-12.
    assert timing.device_finish["b"] == pytest.approx(12.0)
    assert timing.seconds == pytest.approx(12.0)


def test_rounds_without_a_split_take_the_slowest_device() -> None:
    timing = local_round([LocalParticipant("a", 1, [2, 2], 1), LocalParticipant("b", 0.5, [1], 0.5)])
    assert timing.seconds == 6
    assert timing.device_finish == {"a": 6, "b": 2}


def test_costs_follow_the_profiles_and_the_flop_counts() -> None:
    config = load_config("tiny-gpt2")
    nano = Device.from_profile(load_profile("jetson-nano"))
    assert nano.flops_per_s == pytest.approx(472e9 * 0.25)
    assert nano.up_s(1_000_000) == pytest.approx(8e6 / 80e6 + 0.003)
    costs = CostModel(config, Server(block_flops_per_s=1e12, head_flops_per_s=2e12))
    one_block = block_flops(config, 4, 64)
    assert costs.device_pass_s(nano, 3, 4, 64) == pytest.approx(3 * one_block / nano.flops_per_s)
    whole = costs.device_pass_s(nano, 12, 4, 64, head=True)
    assert whole == pytest.approx((12 * one_block + head_flops(config, 4, 64)) / nano.flops_per_s)
    deeper = costs.server_batch_s(5, 4, 64)
    assert costs.server_batch_s(2, 4, 64) - deeper == pytest.approx(3 * 2 * one_block / 1e12)


def test_virtual_emulation_reports_the_profile_without_waiting() -> None:
    profile = load_profile("raspberry-pi-5")
    flops = 50e9  # about two seconds on the profile
    virtual, real = Emulation(profile, virtual=True), Emulation(profile)
    t0 = time.perf_counter()
    assert virtual.pad_compute(0.001, flops) == pytest.approx(profile.compute_seconds(flops))
    asyncio.run(virtual.wait_link(5.0))
    assert time.perf_counter() - t0 < 1.0
    t0 = time.perf_counter()
    assert real.pad_compute(0.0, 1e9) == pytest.approx(profile.compute_seconds(1e9))  # slept ~0.04 s
    assert time.perf_counter() - t0 >= profile.compute_seconds(1e9) * 0.9


def test_server_speedup_must_be_positive() -> None:
    assert JobConfig(server_speedup=100).server_speedup == 100
    for bad in (0, -1, float("nan"), "fast", True):
        with pytest.raises(ConfigError, match="server_speedup"):
            JobConfig(server_speedup=bad)  # type: ignore[arg-type]
